"""``fusionbench report``: every figure and LaTeX table of ``paper/``, regenerated from ``results/``
alone (the ``*.jsonl`` run tables there); no model is loaded, it takes seconds.

What it writes (``paper/figures/*.{pdf,png}``, ``paper/tables/*``):

* from the main table (``results/main.jsonl``; without one, the largest run table):
  ``pareto`` (multimodal accuracy vs forgetting), ``mm_by_qtype`` (per question type, spatial
  highlighted), ``spatial_relations`` (per relation), ``forgetting`` (bars), ``forgetting_curves``
  (during training), ``val_curves`` (convergence: val accuracy and loss per step), ``probe_curves``
  (depth probes per layer), ``efficiency`` (accuracy vs trainable parameters and training FLOPs);
  tables ``main.tex`` (mean ± 95% CI over seeds), ``main_runs.tex`` (every row, seed by seed, as it
  landed: commit, CPU, resume, accuracy beside its controls, wall time), ``convergence.tex`` (how near
  a plateau each point ended, from its own val curve), ``efficiency.tex`` and ``numbers.tex`` (the
  macros ``paper/main.tex`` quotes);
* per other run table ``T`` (quickstart, ablations): ``tables/T.tex`` and ``figures/T.{pdf,png}``;
* every summary also as Markdown (``tables/*.md``) for the README.

Rows are grouped into *points* (``point_hash``: the config hash without the seed); a re-run of the
same config and seed replaces the older row; seeds are aggregated into mean and Student-t interval.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from fusionbench.errors import FusionBenchError
from fusionbench.results import read_results

QTYPES = ("attribute", "count", "spatial")
PROBES = ("color", "column", "row")
MAIN_TABLE = "main"
# The study's pre-registered seeds per contrast (experiments/main.yaml, results/power.md). Below it a
# contrast's interval holds the item noise (and at most a 2-seed spread), not the seed-to-seed and
# CPU-to-CPU variation, which for mlp alone is 0.024 (seed 0 vs 1): its verdict is printed as preliminary.
FULL_SEEDS = 3


# -- loading ---------------------------------------------------------------------------------------
def load_all(results_dirs: str | Path | list[str | Path]) -> pd.DataFrame:
    """Every run row of ``<dir>/*.jsonl`` for each of ``results_dirs`` (not recursive: the
    committed ``results/`` does not read the git-ignored ``results/local/``; benchmark tables, which
    have no ``stage``, are left out), a column ``table`` naming the file and ``origin`` the folder.
    A table of the same name in several folders is one table; the rows of every folder after the
    first are labelled with their folder's name (``linear (local)``), so a user's runs sit beside
    the committed reference rows without replacing them."""
    dirs = [Path(d) for d in ([results_dirs] if isinstance(results_dirs, (str, Path)) else results_dirs)]
    frames = []
    for i, d in enumerate(dirs):
        for f in sorted(d.glob("*.jsonl")):
            frames.append(read_results(f).assign(table=f.stem, origin=d.name if i else ""))
    frames = [f for f in frames if len(f) and "stage" in f and "strategy" in f]
    if not frames:
        where = ", ".join(f"{d}/*.jsonl" for d in dirs)
        raise FusionBenchError(f"no result rows in {where}; run `fusionbench run CONFIG` first")
    return prepare(pd.concat(frames, ignore_index=True))


def _point_hash(config: str) -> str:
    from fusionbench.config import config_hash
    from omegaconf import OmegaConf

    cfg = json.loads(config)
    return config_hash(OmegaConf.create(cfg), drop=("seed",))


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``point_hash`` where old rows lack it, ``label`` (what the point is), ``final`` (the
    point's last stage), ``frozen_text`` (the strategy declares its text path unchanged); keeps the
    newest row per (table, origin, config hash, stage, source)."""
    df = df.copy()
    if "source" not in df:
        df["source"] = "run"
    df["source"] = df["source"].fillna("run")
    if "point_hash" not in df:
        df["point_hash"] = None
    if "origin" not in df:
        df["origin"] = ""
    df["origin"] = df["origin"].fillna("")
    df["point_hash"] = df["point_hash"].astype(object)
    missing = df["point_hash"].isna()
    df.loc[missing, "point_hash"] = [_point_hash(c) for c in df.loc[missing, "config"]]
    key = ["table", "origin", "config_hash", "stage", "source"]
    replaced = _replaced_on_other_device(df, key)
    df = df.drop_duplicates(subset=key, keep="last").reset_index(drop=True)
    configs = [json.loads(c) for c in df["config"]]
    df["label"] = [_label(row, cfg) for row, cfg in zip(df.to_dict("records"), configs)]
    df["final"] = [row["stage"] == ([s["name"] for s in cfg.get("stages") or []] or ["main"])[-1]
                   for row, cfg in zip(df.to_dict("records"), configs)]
    recorded = df["text_invariant"] if "text_invariant" in df else pd.Series([None] * len(df))
    df["frozen_text"] = [_frozen_text(cfg["fusion"], r) for cfg, r in zip(configs, recorded)]
    df.loc[~df["final"], "label"] = df.loc[~df["final"], "label"] + " [" + df.loc[~df["final"], "stage"] + "]"
    other = df["origin"] != ""
    df.loc[other, "label"] = df.loc[other, "label"] + " (" + df.loc[other, "origin"] + ")"
    df["base_label"] = df["label"]  # before telling configurations apart: what contrasts name
    # one label, several configurations in one table: tell them apart by the commit that produced
    # each (runs of successive code versions whose resolved configs differ), else by config hash
    groups = df.groupby(["table", "label"])
    shared = groups["point_hash"].transform("nunique") > 1
    by_sha = shared & (groups["git_sha"].transform("nunique") > 1)
    by_hash = shared & ~by_sha
    df.loc[by_sha, "label"] = df.loc[by_sha, "label"] + " @" + df.loc[by_sha, "git_sha"].astype(str).str[:7]
    df.loc[by_hash, "label"] = df.loc[by_hash, "label"] + " #" + df.loc[by_hash, "point_hash"].astype(str).str[:6]
    df.attrs["replaced_other_device"] = replaced
    return df


def _replaced_on_other_device(df: pd.DataFrame, key: list[str]) -> list[str]:
    """The rows the newest-row rule drops although they ran on another device (or numeric path:
    :func:`_same_path`) than the row that replaces them: a rerun of the same configuration and seed
    on another CPU is a replication (the same seed gives other numbers there), not a correction; the
    report says so instead of swapping numbers silently (``fusionbench report`` prints these as
    warnings)."""
    if "device" not in df:
        return []
    metric = "mm/choice/acc"
    value = lambda r: f", {metric} {r[metric]:.3f}" if metric in r and pd.notna(r[metric]) else ""  # noqa: E731
    out = []
    for _, g in df[df.duplicated(subset=key, keep=False)].groupby(key, sort=False):
        newest = g.iloc[-1]
        for _, old in g.iloc[:-1].iterrows():
            moved = not _same_path(_numeric_path(old), _numeric_path(newest))
            if pd.notna(old["device"]) and pd.notna(newest["device"]) and moved:
                out.append(f"{newest['table']}: {newest.get('strategy')} seed {newest.get('seed')} stage {newest['stage']} "
                           f"(config {str(newest['config_hash'])[:12]}) ran on {old['device']}{value(old)} and again on "
                           f"{newest['device']}{value(newest)}; the report shows the newer row only")
    return out


def _label(row: dict[str, Any], cfg: dict[str, Any]) -> str:
    point = row.get("grid_point")
    if isinstance(point, str) and point:
        values = json.loads(point)
        if list(values) == ["variant"]:
            return str(values["variant"])
        if values:  # a strategy name as the grid value reads as itself
            return ", ".join(str(v) if k == "fusion" and isinstance(v, str) else f"{k.split('.')[-1]}={v}"
                             for k, v in values.items())
    return str(row["strategy"])


def _frozen_text(fusion: dict[str, Any], recorded: Any = None) -> bool:
    """Did the strategy (with these options) declare its text-only path the base LM's? The row's
    ``text_invariant`` (recorded at run time) where it has one; for older rows the strategy's
    answer for the row's options, independent of what was measured."""
    if isinstance(recorded, (bool, np.bool_)) or (isinstance(recorded, (int, float)) and not pd.isna(recorded)):
        return bool(recorded)
    from fusionbench.fusion import FUSIONS
    from fusionbench.fusion.base import fusion_options

    try:
        cls = FUSIONS.get(fusion["name"])
        return bool(cls.text_invariant_for(fusion_options({k: v for k, v in fusion.items()})))
    except Exception:  # a strategy no longer registered (or options it no longer takes): not frozen
        return False


# -- aggregation -----------------------------------------------------------------------------------
def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% confidence interval (Student t over the seeds;
    NaN half-width for a single seed)."""
    from scipy import stats

    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def standard_error(values) -> float:
    """Standard error of the mean over the seeds (NaN for one seed): the error bars of the figures,
    which stay readable with 2-3 seeds where a 95% t-interval is 4-13x wider (tables give the CI)."""
    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _metric_columns(df: pd.DataFrame) -> list[str]:
    keep = ("mm/", "forgetting/", "text/", "eff/", "probe/", "cap/", "val/")
    cols = [c for c in df.columns if c.startswith(keep) and pd.api.types.is_numeric_dtype(df[c])]
    return cols + [c for c in ("params_trainable", "params_total", "train_s", "eval_s", "steps", "lr",
                               "train_loss_final", "flops_per_train_step") if c in df]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One line per (table, origin, point, stage, source): mean over seeds of every metric, and for each its
    95% confidence-interval half-width as ``<metric>_ci95``; ``seeds`` counts them."""
    if "label" not in df:
        df = prepare(df)
    cols = _metric_columns(df)
    lines = []
    keys = ["table", "origin", "point_hash", "stage", "source"]
    for _, group in df.groupby(keys, sort=False):
        first = group.iloc[0]
        line = {k: first[k] for k in (*keys, "label", "strategy", "final", "frozen_text")}
        line["seeds"] = group["seed"].nunique()
        for c in cols:
            line[c], line[f"{c}_ci95"] = mean_ci(group[c])
            line[f"{c}_se"] = standard_error(group[c])
        if "curve" in group:
            line["curve"] = _mean_curve(group["curve"])
        if "val_curve" in group:
            line["val_curve"] = _mean_curve(group["val_curve"])
            flags = [bool(v) for v in group.get("converged", pd.Series(dtype=object)) if isinstance(v, (bool, np.bool_))]
            line["converged_seeds"] = sum(flags) if flags else np.nan
        lines.append(line)
    return pd.DataFrame(lines)


def _mean_curve(curves: pd.Series) -> list[dict[str, float]] | None:
    """Curve points (forgetting or validation) averaged over seeds, step by step."""
    frames = [pd.DataFrame(json.loads(c)) for c in curves if isinstance(c, str) and c]
    if not frames:
        return None
    return pd.concat(frames).groupby("step", as_index=False).mean(numeric_only=True).to_dict("records")


# -- figures ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "figure.dpi": 150})
    return plt


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _finish(fig, legend_ax, title: str, out: Path, name: str) -> list[Path]:
    """One legend for all panels (from ``legend_ax``) right of the figure, the title, saved."""
    handles, labels = legend_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    fig.suptitle(title)
    return _save(fig, out, name)


def _style(i: int) -> dict[str, Any]:
    import matplotlib

    markers = "osD^vP*Xh<>p"
    palette = [*matplotlib.colormaps["tab10"].colors, "#000000", "#8c6d31", "#393b79", "#843c39", "#7b4173"]
    return {"color": palette[i % len(palette)], "marker": markers[i % len(markers)]}


def _forgetting_axis(s: pd.DataFrame) -> tuple[str, str] | None:
    for col, name in (("forgetting/austen/delta_log_ppl", "Δ log-perplexity on Austen (after − base)"),
                      ("forgetting/austen/delta_bits_per_byte", "Δ bits per byte on Austen (after − base)"),
                      ("forgetting/mc_avg", "MC forgetting (base − after) / base")):
        if col in s and s[col].notna().any():
            return col, name
    return None


def fig_pareto(s: pd.DataFrame, out: Path) -> list[Path]:
    """Multimodal accuracy vs forgetting, one marker per strategy (mean, 95% CI bars), the Pareto
    front (higher accuracy, less forgetting) as a line."""
    s = s[s["final"]]
    axes_cols = [c for c in (("forgetting/mc_avg", "MC forgetting (base − after) / base"), _forgetting_axis(s))
                 if c and c[0] in s and s[c[0]].notna().any()]
    axes_cols = list(dict.fromkeys(axes_cols))
    pre, ylabel = _acc(s)
    acc = f"{pre}acc"
    if acc not in s or not axes_cols:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(axes_cols), figsize=(4.6 * len(axes_cols), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (col, name) in zip(axes[0], axes_cols):
        for i, r in enumerate(s.itertuples()):
            row = s.loc[r.Index]
            ax.errorbar(row[col], row[acc], xerr=_nan0(row.get(f"{col}_ci95")),
                        yerr=_nan0(row.get(f"{acc}_ci95")), linestyle="none", markersize=6, capsize=2,
                        label=row["label"], **_style(i))
        front = _pareto_front(s[col].to_numpy(), s[acc].to_numpy())
        if len(front) > 1:
            ax.plot(s[col].to_numpy()[front], s[acc].to_numpy()[front], color="0.5", lw=1, ls="--", zorder=0,
                    label="Pareto front")
        floor = f"{pre}chance" if pre.startswith("mm/choice") else "mm/acc_majority"
        if floor in s and s[floor].notna().any():
            ax.axhline(s[floor].mean(), color="k", lw=0.8, ls=":",
                       label="chance" if floor.endswith("chance") else "majority answer")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_ylim(0, 1)
        ax.set_xlabel(name)
        ax.set_ylabel(f"multimodal {ylabel}")
        ax.grid(alpha=0.3)
    return _finish(fig, axes[0][0], "Accuracy vs forgetting (mean, 95% CI over seeds); left/up is better", out, "pareto")


def _acc(s: pd.DataFrame, qtype: str = "") -> tuple[str, str]:
    """``(column prefix, axis label)`` of the multimodal accuracy to plot: choice scoring on the
    test split where the rows have it (primary), else exact match of generated answers."""
    q = f"{qtype}/" if qtype else ""
    if f"mm/choice/{q}acc" in s and s[f"mm/choice/{q}acc"].notna().any():
        return f"mm/choice/{q}", "choice accuracy (test split)"
    return f"mm/{q}", "exact-match accuracy"


def _nan0(v) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _pareto_front(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of points not dominated (lower x and higher y is better), sorted by x."""
    idx = [i for i in range(len(x)) if not any((x[j] <= x[i] and y[j] >= y[i]) and (x[j] < x[i] or y[j] > y[i])
                                               for j in range(len(x)))]
    return sorted(idx, key=lambda i: (x[i], y[i]))


def fig_mm_by_qtype(s: pd.DataFrame, out: Path, name: str = "mm_by_qtype") -> list[Path]:
    types = [q for q in QTYPES if f"{_acc(s, q)[0]}acc" in s and s[f"{_acc(s, q)[0]}acc"].notna().any()]
    if not types:
        return []
    ylabel = _acc(s, types[0])[1]
    plt = _plt()
    labels = list(s["label"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(labels) + 2), 3.6), layout="constrained")
    width = 0.8 / len(types)
    colors = {"attribute": "#9ecae1", "count": "#c6dbef", "spatial": "#d62728"}
    for j, q in enumerate(types):
        xs = np.arange(len(labels)) + (j - (len(types) - 1) / 2) * width
        pre = _acc(s, q)[0]
        ax.bar(xs, s[f"{pre}acc"], width, yerr=s.get(f"{pre}acc_ci95", None), capsize=1.5,
               label=q + (" (highlighted)" if q == "spatial" else ""), color=colors.get(q, f"C{j}"),
               edgecolor="k" if q == "spatial" else "none", linewidth=0.8, error_kw={"lw": 0.7})
        floor, controls = ((f"{pre}chance", f"{pre}acc_shuffled") if pre.startswith("mm/choice")
                           else (f"{pre}acc_majority", f"{pre}acc_text_only"))
        if floor in s:
            ax.scatter(xs, s[floor], marker="_", s=120, color="k", zorder=3,
                       label=("chance" if floor.endswith("chance") else "majority-answer baseline") if j == 0 else None)
        if controls in s:
            ax.scatter(xs, s[controls], marker="x", s=14, color="0.35", zorder=3, linewidths=0.8,
                       label=("same model, shuffled images" if controls.endswith("shuffled")
                              else "same model, no image") if j == 0 else None)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title("Multimodal accuracy by question type (mean, 95% CI over seeds)")
    ax.legend(ncol=3, loc="upper left", fontsize=7)
    return _save(fig, out, name)


def fig_spatial_relations(s: pd.DataFrame, out: Path) -> list[Path]:
    rels = sorted({c.split("/")[2] for c in s.columns
                   if c.startswith("mm/spatial/") and c.count("/") == 3 and c.endswith("/acc") and s[c].notna().any()})
    if not rels:
        return []
    plt = _plt()
    values = np.array([[s.iloc[i].get(f"mm/spatial/{r}/acc", np.nan) for r in rels] for i in range(len(s))], float)
    majority = np.array([s[f"mm/spatial/{r}/acc_majority"].mean() if f"mm/spatial/{r}/acc_majority" in s else np.nan
                         for r in rels])
    fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(rels), 0.9 + 0.32 * len(s)), layout="constrained")
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if values[i, j] < 0.6 else "k")
    ax.set_xticks(range(len(rels)), [f"{r}\n(maj. {m:.2f})" for r, m in zip(rels, majority)])
    ax.set_yticks(range(len(s)), s["label"])
    fig.colorbar(im, ax=ax, label="exact-match accuracy")
    ax.set_title("Spatial questions by relation (mean over seeds)")
    return _save(fig, out, "spatial_relations")


def fig_forgetting(s: pd.DataFrame, out: Path) -> list[Path]:
    metrics = [(c, t) for c, t in (("text/kl", "token KL(base ‖ trained), Austen"),
                                   ("forgetting/mc_acc_drop", "MC accuracy drop (base − after, points)"),
                                   ("forgetting/mc_avg", "MC forgetting (base − after) / base"),
                                   ("forgetting/austen/delta_log_ppl", "Δ log-perplexity, Austen (after − base)"),
                                   ("forgetting/austen/delta_bits_per_byte", "Δ bits/byte, Austen (after − base)"))
               if c in s and s[c].notna().any()]
    if not metrics:
        return []
    plt = _plt()
    labels = list(s["label"])
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(5.0, 0.6 * len(labels) + 1.5), 2.4 * len(metrics) + 0.8),
                             squeeze=False, layout="constrained", sharex=True)
    for ax, (col, title) in zip(axes[:, 0], metrics):
        values = s[col]
        colors = ["#2ca02c" if f else "#ff7f0e" for f in s["frozen_text"]]
        bars = ax.bar(range(len(labels)), values.fillna(0.0), yerr=s.get(f"{col}_ci95"), color=colors, capsize=2,
                      error_kw={"lw": 0.7})
        # exact values on the bars: a zero bar (frozen LM) is otherwise invisible
        ax.bar_label(bars, labels=["0" if v == 0 else f"{v:+.2g}" for v in values.fillna(0.0)], fontsize=7,
                     padding=2)
        ax.axhline(0, color="k", lw=0.8)
        reach = float(np.nanmax(np.abs(values.to_numpy(float)) + np.nan_to_num(
            s.get(f"{col}_ci95", pd.Series(0.0, index=s.index)).to_numpy(float)))) if len(values) else 0.0
        reach = reach if reach > 0 else 0.01  # all exactly zero: a readable axis around 0
        ax.set_ylim(-1.35 * reach, 1.35 * reach)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="#2ca02c", label="text path declared frozen"),
                        Patch(color="#ff7f0e", label="LM weights train")], loc="outside lower center", ncol=2)
    fig.suptitle("NLP forgetting: text-only scores after vs before multimodal training (mean, 95% CI over seeds)")
    return _save(fig, out, "forgetting")


def fig_forgetting_curves(s: pd.DataFrame, out: Path) -> list[Path]:
    s = s[s["final"]]
    if "curve" not in s or not s["curve"].notna().any():
        return []
    curves = [(r["label"], pd.DataFrame(r["curve"])) for _, r in s.iterrows() if isinstance(r["curve"], list)]
    metrics = [(c, t) for c, t in (("forgetting/mc_avg", "MC forgetting (base − after) / base"),
                                   ("forgetting/austen/delta_log_ppl", "Δ log-perplexity, Austen"))
               if any(c in df for _, df in curves)]
    return _step_curves(curves, metrics, lambda ax, col: ax.axhline(0, color="k", lw=0.5),
                        "Forgetting during training (text-suite slice, mean over seeds)", out, "forgetting_curves")


def _step_curves(curves: list[tuple[str, pd.DataFrame]], panels: list[tuple[str, str]], mark, title: str,
                 out: Path, name: str) -> list[Path]:
    """One panel per (column, panel title): every labelled curve against training step;
    ``mark(ax, column)`` adds a panel's reference line (zero, chance)."""
    if not panels:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1.6, 3.4), squeeze=False,
                             layout="constrained")
    for ax, (col, panel) in zip(axes[0], panels):
        for i, (label, df) in enumerate(curves):
            if col in df:
                ax.plot(df["step"], df[col], label=label, lw=1.2, markersize=3, **_style(i))
        mark(ax, col)
        ax.set_xlabel("training step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    return _finish(fig, axes[0][0], title, out, name)


def _val_curves(s: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, val curve) of every point and stage with one (the MoE's dense stage beside its
    upcycled stage: the curve the experts were copied from)."""
    if "val_curve" not in s:
        return []
    return [(r["label"], pd.DataFrame(r["val_curve"])) for _, r in s.iterrows()
            if isinstance(r["val_curve"], list) and r["val_curve"]]


def fig_val_curves(s: pd.DataFrame, out: Path) -> list[Path]:
    """Convergence: each point's val choice accuracy (with the val items' chance, dashed) and val
    LM loss against training step, mean over seeds; every stage its own line."""
    curves = _val_curves(s)
    panels = [(c, t) for c, t in (("val/choice_acc", "val choice accuracy"), ("val/lm_loss", "val LM loss"))
              if any(c in df for _, df in curves)]
    chance = [df["val/chance"].mean() for _, df in curves if "val/chance" in df]

    def mark(ax, col):
        if col == "val/choice_acc" and chance:
            ax.axhline(float(np.mean(chance)), color="k", lw=0.8, ls="--", label="chance (val items)")
    return _step_curves(curves, panels, mark, "Convergence: validation curves (mean over seeds)", out, "val_curves")


def convergence_table(s: pd.DataFrame, out: Path) -> list[Path]:
    """``convergence.{tex,md}``: per point and stage, how near a plateau its training ended, from
    its own validation curve (mean over seeds): the val choice accuracy at the end and its best
    (with the step), its change over the last third of the curve, the val LM loss's relative change
    over that third, and how many seeds the stated criterion (``converged``: loss improving by less
    than ``eval.plateau_tol`` over the last third) calls converged."""
    curves = dict(_val_curves(s))
    if not curves:
        return []
    lines = []
    for _, r in s.iterrows():
        df = curves.get(r["label"])
        if df is None or "step" not in df or len(df) < 3:
            continue
        tail = df.iloc[-max(2, len(df) // 3 + 1):]
        line = {"point": r["label"], "steps": f"{df['step'].iloc[-1]:.0f}", "val points": str(len(df))}
        if "val/choice_acc" in df:
            best = df["val/choice_acc"].idxmax()
            line["val acc (end)"] = f"{df['val/choice_acc'].iloc[-1]:.3f}"
            line["best (step)"] = f"{df['val/choice_acc'][best]:.3f} ({df['step'][best]:.0f})"
            line["acc change, last third"] = f"{tail['val/choice_acc'].iloc[-1] - tail['val/choice_acc'].iloc[0]:+.3f}"
        if "val/chance" in df:
            line["chance"] = f"{df['val/chance'].iloc[-1]:.3f}"
        if "val/lm_loss" in df:
            start = tail["val/lm_loss"].iloc[0]
            line["loss change, last third"] = f"{(tail['val/lm_loss'].min() - start) / abs(start):+.1%}"
        n = r.get("converged_seeds")
        line["converged (seeds)"] = "--" if pd.isna(n) else f"{n:.0f} of {r['seeds']:.0f}"
        lines.append(line)
    if not lines:
        return []
    t = pd.DataFrame(lines).fillna("--")
    out.mkdir(parents=True, exist_ok=True)
    tex, md = out / "convergence.tex", out / "convergence.md"
    tex.write_text(_latex(t, "convergence from each point's own validation curve (mean over seeds); converged: the "
                             "val LM loss improved by less than eval.plateau_tol over the last third"))
    md.write_text(_markdown(t))
    return [tex, md]


def _layers(s: pd.DataFrame, kind: str) -> list[int]:
    return sorted(int(c.rsplit("_", 1)[1]) for c in s.columns
                  if c.startswith(f"probe/{kind}/layer_") and not c.endswith(("_se", "_ci95")))


def fig_probe_curves(s: pd.DataFrame, out: Path) -> list[Path]:
    s = s[s["final"]]
    kinds = [k for k in (*PROBES, "cos_img_text") if _layers(s, k) and s[f"probe/{k}/layer_{_layers(s, k)[0]}"].notna().any()]
    if not kinds:
        return []
    plt = _plt()
    titles = {"color": "colour of the object", "column": "column of the object", "row": "row of the object",
              "cos_img_text": "cosine(image tokens, question tokens)"}
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.3 * len(kinds) + 1.6, 3.2), squeeze=False,
                             layout="constrained", sharex=True)
    for ax, kind in zip(axes[0], kinds):
        layers = _layers(s, kind)
        for i, (_, r) in enumerate(s.iterrows()):
            ax.plot(layers, [r.get(f"probe/{kind}/layer_{l}") for l in layers], lw=1.1, markersize=2.5,
                    label=r["label"], **_style(i))
            floor = [r.get(f"probe/untrained/{kind}/layer_{l}") for l in layers]
            if kind in PROBES and not pd.isna(floor).all():  # the same strategy before training
                ax.plot(layers, floor, lw=0.8, ls="--", alpha=0.6, color=_style(i)["color"])
        if f"probe/{kind}/majority" in s:
            ax.axhline(s[f"probe/{kind}/majority"].mean(), color="k", ls=":", lw=0.9, label="majority class")
        ax.set_title(titles.get(kind, kind))
        ax.set_xlabel("LM layer (0 = embeddings)")
        ax.set_ylabel("probe accuracy (held out)" if kind in PROBES else "mean cosine")
        ax.grid(alpha=0.3)
    return _finish(fig, axes[0][0], "Depth probes: how far into the LM visual facts are linearly readable at the question's "
                   "last token (dashed: the same strategy untrained)", out, "probe_curves")


def fig_efficiency(s: pd.DataFrame, out: Path) -> list[Path]:
    s = s[s["final"]]
    xs = [(c, t) for c, t in (("params_trainable", "trainable parameters"),
                              ("eff/flops_train_step", "training FLOPs per step (batch 8)"))
          if c in s and s[c].notna().any()]
    pre, ylabel = _acc(s)
    acc = f"{pre}acc"
    if acc not in s or not xs:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(xs), figsize=(4.2 * len(xs) + 1.6, 3.4), squeeze=False, layout="constrained")
    for ax, (col, title) in zip(axes[0], xs):
        for i, (_, r) in enumerate(s.iterrows()):
            ax.errorbar(r[col], r[acc], yerr=_nan0(r.get(f"{acc}_ci95")), linestyle="none", capsize=2,
                        markersize=6, label=r["label"], **_style(i))
        ax.set_xscale("log")
        ax.set_xlabel(title + " (log scale)")
        ax.set_ylabel(f"multimodal {ylabel}")
        ax.grid(alpha=0.3, which="both")
    return _finish(fig, axes[0][0], "Accuracy vs cost (mean, 95% CI over seeds)", out, "efficiency")


def fig_table(s: pd.DataFrame, out: Path, name: str, val_items: int | None = None) -> list[Path]:
    """The compact figure of a secondary table (quickstart, an ablation): accuracy by question type
    and, where measured, Δ log-perplexity, per point; for a learning-rate selection table (rows
    scored on val only, at several rates per strategy) the sweep's curves (:func:`fig_lr_sweep`)."""
    if _is_lr_selection(s):
        return fig_lr_sweep(s, out, name, val_items)
    return fig_mm_by_qtype(s, out, name)


def _is_lr_selection(s: pd.DataFrame) -> bool:
    """Rows scored on val only (no test metric), some strategy at more than one learning rate."""
    if any(k in s and s[k].notna().any() for k in MAIN_COLUMNS) or "lr" not in s:
        return False
    acc = s.get("val/choice_acc_final")
    rows = s[s["final"]] if "final" in s else s
    return acc is not None and acc.notna().any() and bool((rows.groupby("strategy")["lr"].nunique() > 1).any())


def _best_of_strategy(s: pd.DataFrame) -> pd.Series:
    """Whether each row holds its strategy's highest val choice accuracy (ties all true), among the
    last-stage rows only: a multi-stage point is chosen by its last stage (the MoE's upcycle, not its
    dense stage)."""
    acc = s["val/choice_acc_final"]
    if "final" in s:
        acc = acc.where(s["final"].astype(bool))
    return acc.notna() & (acc == acc.groupby(s["strategy"]).transform("max"))


def _wilson(p: pd.Series, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Distances below and above ``p`` of the 95% Wilson interval of a proportion of ``n`` items
    (zeros when ``n`` is unknown)."""
    p = np.asarray(p, dtype=float)
    if not n:
        return np.zeros_like(p), np.zeros_like(p)
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p - (centre - half), centre + half - p


def fig_lr_sweep(s: pd.DataFrame, out: Path, name: str, val_items: int | None = None) -> list[Path]:
    """A learning-rate sweep: val choice accuracy (last stage) against the learning rate (log axis),
    one line per strategy with 95% Wilson intervals over the ``val_items`` val items, each
    strategy's best value ringed, the val chance level dashed."""
    rows = (s[s["final"]] if "final" in s else s).dropna(subset=["lr", "val/choice_acc_final"])
    if rows.empty:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    for i, (strategy, g) in enumerate(rows.groupby("strategy", sort=False)):
        g = g.sort_values("lr")
        acc = g["val/choice_acc_final"]
        style = _style(i)
        ax.errorbar(g["lr"], acc, yerr=np.vstack(_wilson(acc, val_items)), capsize=2, lw=1, ms=4,
                    label=strategy, **style)
        best = g[_best_of_strategy(g)]
        ax.scatter(best["lr"], best["val/choice_acc_final"], s=110, facecolors="none",
                   edgecolors=style["color"], linewidths=1.2, zorder=4)
    if "val/chance_final" in rows and rows["val/chance_final"].notna().any():
        ax.axhline(rows["val/chance_final"].mean(), ls="--", color="0.4", lw=0.9, label="chance (val)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (the last stage's)")
    ax.set_ylabel("val choice accuracy (final)")
    bars = f"95% Wilson interval over {val_items} val items" if val_items else "no interval: val size unknown"
    ax.set_title(f"Learning-rate sweep: one seed per value, best ringed ({bars})", fontsize=8)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", frameon=False)
    return _save(fig, out, name)


def _val_items(rows: pd.DataFrame) -> int | None:
    """The number of val items each row's final val choice accuracy was scored on (its config's
    ``eval.val_items``), when all rows agree."""
    sizes = {json.loads(c).get("eval", {}).get("val_items") for c in rows.get("config", pd.Series(dtype=str)).dropna()}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


# -- tables ----------------------------------------------------------------------------------------
def _cell(m: float, h: float, digits: int = 3, latex: bool = True) -> str:
    if pd.isna(m):
        return "--"
    pm = r" $\pm$ " if latex else " ± "
    return f"{m:.{digits}f}" + (f"{pm}{h:.{digits}f}" if pd.notna(h) else "")


MAIN_COLUMNS = {
    # choice scoring on the balanced test split (primary), its controls and chance
    "mm/choice/acc": "choice acc", "mm/choice/acc_shuffled": "shuffled images", "mm/choice/image_gain": "image gain",
    "mm/choice/chance": "chance", "mm/choice/attribute/acc": "attribute (choice)",
    "mm/choice/count/acc": "count (choice)", "mm/choice/spatial/acc": "spatial (choice)",
    # generation + exact match (secondary; the only multimodal metric of rows before choice scoring)
    "mm/acc": "MM acc", "mm/attribute/acc": "attribute", "mm/count/acc": "count",
    "mm/spatial/acc": "spatial", "forgetting/mc_avg": "MC forgetting",
    "forgetting/mc_acc_drop": "MC acc drop", "text/kl": "token KL",
    "forgetting/austen/delta_log_ppl": "Δ log-ppl", "forgetting/austen/delta_bits_per_byte": "Δ bits/byte"}


#: the columns of a table whose rows scored no test item (e.g. the learning-rate sweep, chosen on val)
VAL_COLUMNS = {"val/choice_acc_final": "val choice acc (final)", "val/chance_final": "val chance",
               "val/image_gain_final": "val image gain (final)", "val/lm_loss_final": "val loss (final)"}


def table_frame(s: pd.DataFrame, latex: bool = True) -> pd.DataFrame:
    cols = {k: v for k, v in MAIN_COLUMNS.items() if k in s and s[k].notna().any()}
    val_only = not cols
    if val_only:
        cols = {k: v for k, v in VAL_COLUMNS.items() if k in s and s[k].notna().any()}
    t = pd.DataFrame({"strategy": s["label"]})
    for key, label in cols.items():
        t[label] = [_cell(m, h, 3, latex) for m, h in zip(s[key], s.get(f"{key}_ci95", [np.nan] * len(s)))]
    if val_only and "val/choice_acc_final" in cols:  # a selection table (e.g. learning rates): each strategy's best
        t["best of its strategy"] = np.where(_best_of_strategy(s), "yes", "")
    # the recipe each number was reached with: its (stage's) learning rate and steps
    if "lr" in s:
        t["lr"] = s["lr"].map(_lr)
    if "steps" in s:
        t["steps"] = s["steps"].map(lambda n: "--" if pd.isna(n) else f"{n:.0f}")
    if "params_trainable" in s:
        t["trainable"] = s["params_trainable"].map(lambda n: f"{n / 1e6:.2f}M")
    t["seeds"] = s["seeds"].astype(int)
    return t


def _lr(v: float) -> str:
    """A learning rate as the configs write it: 1.28e-1, 2.5e-4."""
    if pd.isna(v):
        return "--"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _escape(text: str) -> str:
    return (str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")
            .replace("&", r"\&").replace("#", r"\#").replace("Δ", r"$\Delta$").replace("±", r"$\pm$"))


def _latex(t: pd.DataFrame, caption: str) -> str:
    header = " & ".join(_escape(c) for c in t.columns) + r" \\"
    body = "\n".join(" & ".join(_escape(v) if not str(v).count("$") else str(v) for v in row) + r" \\"
                     for row in t.astype(str).itertuples(index=False))
    return ("% generated by `fusionbench report` from results/; do not edit\n"
            f"% {caption}\n"
            r"\begin{tabular}{l" + "r" * (len(t.columns) - 1) + "}\n\\toprule\n" + header + "\n\\midrule\n"
            + body + "\n\\bottomrule\n\\end{tabular}\n")


def _markdown(t: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(s: pd.DataFrame, out: Path, name: str, caption: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    tex, md = out / f"{name}.tex", out / f"{name}.md"
    tex.write_text(_latex(table_frame(s), caption))
    md.write_text(_markdown(table_frame(s, latex=False)))
    return [tex, md]


def efficiency_table(s: pd.DataFrame, out: Path) -> list[Path]:
    s = s[s["final"]]
    cols = [("params_total", "params", lambda v: f"{v / 1e6:.1f}M"),
            ("params_trainable", "trainable", lambda v: f"{v / 1e6:.2f}M"),
            ("eff/flops_fwd_per_text_token", "MFLOP/text token", lambda v: f"{v / 1e6:.1f}"),
            ("eff/flops_fwd_per_image", "GFLOP/image", lambda v: f"{v / 1e9:.2f}"),
            ("eff/flops_train_step", "GFLOP/train step", lambda v: f"{v / 1e9:.0f}")]
    # (no wall time here: a run's train_s includes forgetting-curve scoring and checkpointing on a
    # shared machine; step times side by side come from benchmarks/, results/throughput_*.jsonl)
    t = pd.DataFrame({"strategy": s["label"]})
    for key, label, fmt in cols:
        if key in s and s[key].notna().any():
            t[label] = [fmt(v) if pd.notna(v) else "--" for v in s[key]]
    out.mkdir(parents=True, exist_ok=True)
    tex, md = out / "efficiency.tex", out / "efficiency.md"
    tex.write_text(_latex(t, "parameters and FLOPs (torch FLOP counter, one batch of 8)"))
    md.write_text(_markdown(t))
    return [tex, md]


# -- pre-registered contrasts ---------------------------------------------------------------------------
def declared_contrasts(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The ``contrasts`` of the experiment configs behind ``df``'s rows (each once, in order)."""
    seen, out = set(), []
    for config in df["config"]:
        for c in json.loads(config).get("contrasts") or []:
            key = json.dumps(c, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def item_values(row: dict[str, Any], metric: str) -> np.ndarray | None:
    """The per-item values whose mean is ``row[metric]``, for contrasts paired item by item: an
    accuracy's ``.../items`` string (1 = right); a forgetting ``.../delta_log_ppl`` as the per-chunk
    NLL after minus before (whole chunks of equal length: their mean is the row's value); an
    ``.../acc_drop`` / ``.../em_drop`` as base minus after per item. None: the row has no items."""
    def items(key: str) -> np.ndarray | None:
        v = row.get(key)
        return np.array([int(ch) for ch in v]) if isinstance(v, str) and v and v.isdigit() else None

    if metric.endswith("/acc"):
        return items(metric[: -len("acc")] + "items")
    if metric.startswith("forgetting/") and metric.endswith("/delta_log_ppl"):
        name = metric[len("forgetting/"): -len("/delta_log_ppl")]
        after, base = row.get(f"text/{name}/chunk_nll"), row.get(f"base/text/{name}/chunk_nll")
        tokens = row.get(f"text/{name}/tokens")
        if isinstance(after, str) and isinstance(base, str):
            a, b = np.array(json.loads(after), dtype=float), np.array(json.loads(base), dtype=float)
            # the mean over chunks is the per-token value only for chunks of equal length
            equal = isinstance(tokens, (int, float)) and len(a) and float(tokens) % len(a) == 0
            return a - b if a.shape == b.shape and len(a) > 1 and equal else None
    if metric.startswith("forgetting/") and metric.endswith(("/acc_drop", "/em_drop")):
        name = metric[len("forgetting/"): metric.rindex("/")]
        after, base = items(f"text/{name}/items"), items(f"base/text/{name}/items")
        if after is not None and base is not None and after.shape == base.shape:
            return base - after
    return None


def _per_seed(rows: pd.DataFrame, metric: str) -> tuple[dict[int, np.ndarray], str]:
    """Per seed the per-item values of ``metric`` (:func:`item_values`) or, for metrics without
    items, the row's value as a single item (the contrast's interval then has its seed term alone)."""
    out, unit = {}, "items"
    for _, r in rows.iterrows():
        values = item_values(r.to_dict(), metric)
        if values is not None:
            out[int(r["seed"])] = values
        elif metric in r and pd.notna(r[metric]):
            out[int(r["seed"])] = np.array([float(r[metric])])
            unit = "seeds"
    return out, unit


def comparisons(df: pd.DataFrame, table: str | None = None) -> pd.DataFrame:
    """One line per contrast ``{name, a, b, metric, expect, a_table, b_table}`` declared by the rows
    of ``table`` (None: of every row of ``df``): ``a``/``b`` are report labels of that experiment's
    rows, or of the results table ``a_table``/``b_table`` names (e.g. a compute-matched run against
    the main study's ``mlp``: only rows scored on the same test items count there); ``expect``:
    ``greater`` (default) or ``less``, the direction the hypothesis predicts for a - b. The paired
    difference over the seeds both have, its 95% interval (Student t with a seed and an item
    variance term: :func:`fusionbench.stats.paired_contrast`), p, the minimum detectable effect at
    this n and the verdict; ``n/a`` with the reason when a side has no rows, the metric is missing,
    or the two were scored on other items. A label with rows of several configurations (a learning
    rate changed after some seeds ran, successive code versions) takes the newest configuration's
    rows (the last appended), never a mix."""
    from fusionbench.stats import holm, paired_contrast, verdict

    runs = df[df["final"] & (df["source"] == "run")]
    final = runs if table is None else runs[runs["table"] == table]
    def labels(frame: pd.DataFrame) -> pd.Series:  # what contrasts name: the label before disambiguation
        return frame["base_label"] if "base_label" in frame else frame["label"]

    label = labels(final)
    lines = []
    for c in declared_contrasts(final):
        line = {"contrast": c.get("name", f"{c.get('a')} - {c.get('b')}"), "a": c.get("a"), "b": c.get("b"),
                "metric": c.get("metric", "mm/choice/acc"), "expect": c.get("expect", "greater")}
        # only rows of the experiment (config name) that declares the contrast: a table may hold other
        # experiments' rows under the same labels, but rows the experiment ran before the contrast was
        # added (or edited) count: they are its rows all the same
        declares = final["config"].map(lambda cf: c in (json.loads(cf).get("contrasts") or []))
        names = {json.loads(cf).get("name") for cf in final.loc[declares, "config"]}
        ours = final["config"].map(lambda cf: json.loads(cf).get("name") in names)
        side = {k: final[ours & (label == line[k])] for k in ("a", "b") if not c.get(f"{k}_table")}
        for k in ("a", "b"):
            if c.get(f"{k}_table"):
                other = runs[runs["table"] == c[f"{k}_table"]]
                side[k] = other[labels(other) == line[k]]
                line[k] = f"{line[k]} ({c[f'{k}_table']})"
        missing = [line[k] for k in ("a", "b") if side[k].empty]
        if missing:
            lines.append({**line, "verdict": "n/a", "why": f"no rows of {', '.join(map(str, missing))}"})
            continue
        foreign = [k for k in ("a", "b") if c.get(f"{k}_table")]
        if foreign:  # the other table's rows scored on the same test items as this experiment's
            k, own = foreign[0], "b" if foreign[0] == "a" else "a"
            mine = set(side[own].get("mm/choice/test_hash", pd.Series(dtype=object)).dropna())
            side[k] = side[k][side[k].get("mm/choice/test_hash", pd.Series(index=side[k].index, dtype=object)).isin(mine)]
            if side[k].empty:
                lines.append({**line, "verdict": "n/a", "why": f"no rows of {line[k]} on the same test items"})
                continue
        for k in ("a", "b"):  # several configurations under one label: the newest one's rows, never a mix
            side[k] = side[k][side[k]["point_hash"] == side[k]["point_hash"].iloc[-1]]
        hashes = {k: set(side[k].get("mm/choice/test_hash", pd.Series(dtype=object)).dropna()) for k in ("a", "b")}
        if hashes["a"] and hashes["b"] and hashes["a"] != hashes["b"]:
            lines.append({**line, "verdict": "n/a", "why": "the two sides were scored on different test items"})
            continue
        (a, unit), (b, _) = _per_seed(side["a"], line["metric"]), _per_seed(side["b"], line["metric"])
        if not (set(a) & set(b)):
            lines.append({**line, "verdict": "n/a", "why": f"no seed with {line['metric']} on both sides"})
            continue
        try:
            r = paired_contrast(a, b)
        except ValueError as e:
            lines.append({**line, "verdict": "n/a", "why": str(e)})
            continue
        lines.append({**line, **r, "unit": unit, "verdict": verdict(r["ci_lo"], r["ci_hi"], line["expect"]), "why": "",
                      "hardware": _hardware_pairing(side["a"], side["b"], sorted(set(a) & set(b)))})
    out = pd.DataFrame(lines)
    if "p" in out:  # family-wise over every declared contrast; one not measured yet counts as p = 1
        measured = out["p"].notna()
        out.loc[measured, "p_holm"] = np.array(holm(list(out["p"].fillna(1.0))))[measured.to_numpy()]
    return out


def _train_machines(row) -> tuple | None:
    """The distinct machines (device, instruction set, CPU model) a row's run trained on, or None
    where the row predates ``train_machines``."""
    raw = row.get("train_machines")
    if not isinstance(raw, str):
        return None
    return tuple(sorted({json.dumps({k: v for k, v in m.items() if k != "from_step"}, sort_keys=True)
                         for m in json.loads(raw)}))


class NumericPath(NamedTuple):
    device: Any
    cpu_capability: Any
    cpu_model: Any
    machines: tuple | None  # :func:`_train_machines`
    fingerprint: tuple[float, float] | None  # (prose tokens, the base LM's log-ppl of them)


def _numeric_path(row) -> NumericPath:
    """What a row records of the numeric path its run took, beyond ``device`` (a CPU's marketing
    name): the instruction set torch dispatched to and the CPU's model (``cpu_capability``,
    ``cpu_model``: rows from 812d516 on), every machine a run resumed across sessions trained on
    (``train_machines``, from f282d56 on), and a fingerprint every row of one evaluation carries:
    the base LM's log-perplexity of the same prose. Two different values of it prove different
    kernels (the main grid's "AMD EPYC" rows hold two); equal values do not prove equal ones, and
    the value is the evaluating session's (with the name-only cache key before 812d516, the session
    that filled that machine's cache). :func:`_same_path` compares each part where both rows have it."""
    fingerprint = row.get("base/text/austen/log_ppl")
    tokens = row.get("base/text/austen/tokens")  # the fingerprint holds for one amount of prose only
    return NumericPath(row.get("device"), row.get("cpu_capability"), row.get("cpu_model"), _train_machines(row),
                       None if pd.isna(fingerprint) or pd.isna(tokens) else (float(tokens), float(fingerprint)))


def _same_path(a: NumericPath, b: NumericPath) -> bool:
    """Two rows' :func:`_numeric_path`: the same device, and each other part equal where both have it
    (the fingerprint only where both scored the same amount of prose)."""
    if a.device != b.device and not (pd.isna(a.device) and pd.isna(b.device)):
        return False
    if any(x != y for x, y in ((a.cpu_capability, b.cpu_capability), (a.cpu_model, b.cpu_model))
           if not pd.isna(x) and not pd.isna(y)):
        return False
    if a.machines is not None and b.machines is not None and a.machines != b.machines:
        return False
    fa, fb = a.fingerprint, b.fingerprint
    return fa is None or fb is None or fa[0] != fb[0] or fa[1] == fb[1]


def _seeds(n: int) -> str:
    """``1 seed``, ``3 seeds``."""
    return f"{n} seed{'' if n == 1 else 's'}"


def _hardware_pairing(a: pd.DataFrame, b: pd.DataFrame, seeds: list[int]) -> str:
    """Whether the two sides of a contrast took the same numeric path, seed by seed: ``same`` or
    ``differs in k of n seeds``. The same seed gives the same numbers on one CPU model only (another
    instruction set or BLAS path rounds differently and training diverges like another seed does):
    across sessions the grid lands on whichever machine it gets, so the pairing says where a paired
    difference also holds a hardware difference. Two rows differ when their ``device`` does, or any
    other part of :func:`_numeric_path` that both record."""
    if "device" not in a or "device" not in b:
        return "unrecorded"
    path = {k: {int(s): _numeric_path(g.iloc[-1]) for s, g in frame.groupby(frame["seed"].astype(int))}
            for k, frame in (("a", a), ("b", b))}
    if any(s not in path[k] or pd.isna(path[k][s].device) for k in path for s in seeds):  # a seed without a device
        return "unrecorded"
    differ = sum(not _same_path(path["a"][s], path["b"][s]) for s in seeds)
    return "same" if not differ else f"differs in {differ} of {_seeds(len(seeds))}"


def format_p(p: float) -> str:
    """A p-value as the tables and the paper print it (below 0.001 as ``< 0.001``)."""
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def comparisons_table(cmp: pd.DataFrame, out: Path, name: str = "comparisons") -> list[Path]:
    """``<name>.tex`` / ``.md``: each contrast's difference with its 95% interval, p, the
    minimum detectable effect (80% power) and the verdict."""
    rows = []
    for _, r in cmp.iterrows():
        ok = r["verdict"] != "n/a"
        rows.append({"contrast": r["contrast"], "a - b": f"{r['a']} - {r['b']}", "metric": r["metric"],
                     "difference [95% CI]": f"{r['diff']:+.3f} [{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}]" if ok else "n/a",
                     "p": format_p(r["p"]) if ok else "",
                     "p (Holm)": format_p(r["p_holm"]) if ok else "",
                     "MDE": f"{r['mde']:.3f}" if ok else "",
                     "n": f"{_seeds(int(r['seeds']))} x {int(r['items'])} items" if ok else "",
                     "hardware (a, b)": r.get("hardware", "") if ok else "",
                     "verdict": verdict_label(r) if ok else f"n/a: {r['why']}"})
    t = pd.DataFrame(rows, columns=["contrast", "a - b", "metric", "difference [95% CI]", "p", "p (Holm)", "MDE", "n",
                                    "hardware (a, b)", "verdict"])
    out.mkdir(parents=True, exist_ok=True)
    tex, md = out / f"{name}.tex", out / f"{name}.md"
    tex.write_text(_latex(t, "pre-registered contrasts: paired difference, 95% Student-t interval (seed and item "
                            "variance terms, Welch-Satterthwaite df), two-sided p (and Holm-adjusted over the "
                            "table's contrasts), minimum detectable effect at 80% power; hardware: whether each "
                            "seed's two runs had the same CPU"))
    md.write_text(_markdown(t))
    return [tex, md]


def verdict_label(r: dict[str, Any]) -> str:
    """The verdict as the tables and the paper print it: marked preliminary while the contrast has
    fewer than :data:`FULL_SEEDS` seeds (``n/a`` as it is)."""
    if r["verdict"] == "n/a":
        return "n/a"
    seeds = int(r["seeds"])
    return r["verdict"] if seeds >= FULL_SEEDS else f"{r['verdict']} (preliminary: {_seeds(seeds)})"


def verdict_sentence(r: dict[str, Any]) -> str:
    """One contrast as the paper states it: the verdict, the difference with its 95% interval, p,
    the minimum detectable effect and n (and where the sides ran on different CPUs); or why there
    is none yet (LaTeX)."""
    if r["verdict"] == "n/a":
        return f"no verdict yet ({_escape(r['why'])})"
    n = _seeds(int(r["seeds"]))
    n += f" $\\times$ {int(r['items'])} items" if r.get("unit") == "items" else ""
    if str(r.get("hardware", "same")).startswith("differs"):  # a paired difference that also holds a CPU change
        n += f" ({_escape(r['hardware'].replace('differs in', 'on different CPUs in'))})"
    if int(r["seeds"]) < FULL_SEEDS:
        n += f"; preliminary: fewer than {FULL_SEEDS} seeds"
    return (f"\\emph{{{_escape(r['verdict'])}}}: ${r['diff']:+.3f}$ [${r['ci_lo']:+.3f}$, ${r['ci_hi']:+.3f}$], "
            f"$p {_p_math(r['p'])}$ (Holm ${_p_math(r['p_holm'])}$), MDE ${r['mde']:.3f}$, {n}")


def _p_math(p: float) -> str:
    text = format_p(p)
    return text if text.startswith("<") else f"= {text}"


def comparison_numbers(cmp: pd.DataFrame, out: Path, name: str = "comparison_numbers") -> list[Path]:
    """``comparisons.tex``'s numbers as macros (``<name>.tex``: ``comparison_numbers.tex`` for the
    main table, ``<table>_comparison_numbers.tex`` for an ablation's own contrasts): per contrast
    ``\\fbCmp<Name>Diff``, ``...Lo``, ``...Hi``, ``...P``, ``...Mde`` (only when measured),
    ``...Verdict``, ``...Brief`` (the verdict with its difference and 95% interval, for the abstract:
    a verdict is never quoted without its interval, nor without its Holm-adjusted p where that is not
    below 0.05) and ``...Summary`` (:func:`verdict_sentence`);
    the last three always defined, so the paper's text compiles before the rows land and states
    exactly what they say once they have."""
    lines, seen = [], set()
    for _, r in cmp.iterrows():
        tag = "Cmp" + _macro(str(r["contrast"]))
        while tag in seen:  # macro names keep letters only: keep two contrasts apart
            tag += "X"
        seen.add(tag)
        if r["verdict"] != "n/a":
            for k, v in (("Diff", r["diff"]), ("Lo", r["ci_lo"]), ("Hi", r["ci_hi"]), ("P", r["p"]), ("Mde", r["mde"])):
                lines.append(f"\\newcommand{{\\fb{tag}{k}}}{{{v:.3f}}}\n" if k == "Mde" else  # a size: no sign
                             f"\\newcommand{{\\fb{tag}{k}}}{{{v:+.3f}}}\n" if k != "P" else
                             f"\\newcommand{{\\fb{tag}{k}}}{{{_escape(format_p(v)).replace('<', '$<$')}}}\n")
        label = _escape(verdict_label(r))
        lines.append(f"\\newcommand{{\\fb{tag}Verdict}}{{{label}}}\n")
        brief = (f"{label}, ${r['diff']:+.3f}$ [${r['ci_lo']:+.3f}$, ${r['ci_hi']:+.3f}$]"
                 if r["verdict"] != "n/a" else "no verdict yet")
        if r["verdict"] in ("supported", "contradicted") and not r["p_holm"] < 0.05:
            # the verdict reads the raw interval; where the multiplicity correction undoes it, say so
            brief += f" (Holm-adjusted $p {_p_math(r['p_holm'])}$)"
        lines.append(f"\\newcommand{{\\fb{tag}Brief}}{{{brief}}}\n")
        lines.append(f"\\newcommand{{\\fb{tag}Summary}}{{{verdict_sentence(r)}}}\n")
    out.mkdir(parents=True, exist_ok=True)
    tex = out / f"{name}.tex"
    tex.write_text("% generated by `fusionbench report` from results/; do not edit\n" + "".join(lines))
    return [tex]


def _macro(name: str) -> str:
    return "".join(part.capitalize() for part in
                   "".join(ch if ch.isalpha() else " " for ch in name).split())


def numbers(s: pd.DataFrame, df: pd.DataFrame, out: Path) -> list[Path]:
    """``numbers.tex``: LaTeX macros with the numbers the paper's text quotes, and ``numbers.json``
    with the same values (for the README and for tests)."""
    s = s[s["final"]]
    raw = df[(df["table"] == s["table"].iloc[0]) & df["final"]]
    # seeds per strategy as the rows have them: "2" when every strategy has 2, "1--2" while they differ
    lo, hi = int(s["seeds"].min()), int(s["seeds"].max())
    vals: dict[str, Any] = {"NumStrategies": len(s), "NumSeeds": hi if lo == hi else f"{lo}--{hi}",
                            "FullSeeds": FULL_SEEDS,  # the seeds below which a verdict is preliminary
                            "NumRuns": len(raw), "Steps": int(raw["steps"].mode().max()) if "steps" in raw else 0}
    if "device" in raw:
        # every device the rows ran on, with its number of runs (most first): a study spread over
        # several CPU models says so
        counts = sorted(raw["device"].dropna().astype(str).value_counts().items(), key=lambda kv: (-kv[1], kv[0]))
        unknown = int(raw["device"].isna().sum())
        counts = [(d.replace("cpu:", "CPU: "), n) for d, n in counts] + ([("device not recorded", unknown)] if unknown else [])
        if counts:
            vals["Device"] = counts[0][0] if len(counts) == 1 else "; ".join(
                f"{d} ({n} run{'s' if n > 1 else ''})" for d, n in counts)
    frozen = raw[raw["frozen_text"]]
    for col, key in (("forgetting/austen/delta_log_ppl", "MaxAbsDeltaLogPplFrozen"),
                     ("forgetting/mc_avg", "MaxAbsMcForgettingFrozen")):
        if col in frozen and frozen[col].notna().any():
            vals[key] = f"{frozen[col].abs().max():.3g}"
            vals[key.replace("MaxAbs", "NumRuns")] = int(frozen[col].notna().sum())
    for _, r in s.iterrows():
        tag = _macro(r["label"])
        for col, name in (("mm/acc", "Acc"), ("mm/spatial/acc", "Spatial"), ("mm/attribute/acc", "Attribute"),
                          ("mm/count/acc", "Count"), ("forgetting/mc_avg", "McForgetting"),
                          ("forgetting/austen/delta_log_ppl", "DeltaLogPpl"),
                          # choice scoring on the balanced test split and its image control
                          ("mm/choice/acc", "ChoiceAcc"), ("mm/choice/spatial/acc", "ChoiceSpatial"),
                          ("mm/choice/acc_shuffled", "ChoiceShuffled"), ("mm/choice/image_gain", "ImageGain"),
                          ("forgetting/mc_acc_drop", "McAccDrop"), ("text/kl", "TokenKl")):
            if col in r and pd.notna(r[col]):
                digits = 4 if "delta" in col or col.endswith("kl") else 3
                vals[f"{tag}{name}"] = f"{r[col]:.{digits}f}"
                if pd.notna(r.get(f"{col}_ci95")):
                    vals[f"{tag}{name}Ci"] = f"{r[f'{col}_ci95']:.{digits}f}"
    for col, name in (("mm/spatial/acc_majority", "SpatialMajority"), ("mm/acc_majority", "AccMajority"),
                      ("mm/spatial/acc_text_only", "SpatialTextOnly"), ("mm/choice/chance", "ChoiceChance"),
                      ("mm/choice/spatial/chance", "ChoiceSpatialChance")):
        if col in s and s[col].notna().any():
            vals[name] = f"{s[col].mean():.3f}"
    # no "best strategy" macro: a ranking is stated only through a contrast and its interval
    out.mkdir(parents=True, exist_ok=True)
    tex = out / "numbers.tex"
    tex.write_text("% generated by `fusionbench report` from results/; do not edit\n" + "".join(
        f"\\newcommand{{\\fb{k}}}{{{_escape(v)}}}\n" for k, v in vals.items()))
    js = out / "numbers.json"
    js.write_text(json.dumps(vals, indent=1, default=str) + "\n")
    return [tex, js]


def compute_table(df: pd.DataFrame, out: Path) -> list[Path]:
    """``compute.md``: per results table the training runs behind it, how long they took (hours of
    ``train_s`` + ``eval_s``, wall time of each run) and on what: what the committed numbers cost
    (the rows the report uses: a re-run that replaced an older row of its config counts once).
    ``variants``: grid points without their seeds; ``runs``: variant x seed (a multi-stage run has a
    row per stage)."""
    runs = df[df["source"] == "run"]
    lines = []
    for table, g in runs.groupby("table", sort=True):
        hours = lambda c: g[c].fillna(0).sum() / 3600 if c in g else 0.0  # noqa: E731
        lines.append({"table": table, "rows": len(g), "variants": g["point_hash"].nunique(),
                      "runs": len(g[["point_hash", "seed"]].drop_duplicates()),
                      "train wall h": f"{hours('train_s'):.2f}", "eval wall h": f"{hours('eval_s'):.2f}",
                      "total wall h": f"{hours('train_s') + hours('eval_s'):.2f}",
                      "devices": "; ".join(sorted(g["device"].dropna().astype(str).unique())) if "device" in g else ""})
    t = pd.DataFrame(lines, columns=["table", "rows", "variants", "runs", "train wall h", "eval wall h", "total wall h", "devices"])
    out.mkdir(parents=True, exist_ok=True)
    md = out / "compute.md"
    md.write_text(_markdown(t))
    return [md]


def _cpu(device: Any) -> str:
    """A row's ``device`` as a short CPU name ("cpu:Intel(R) Xeon(R) Processor x2" -> "Intel Xeon")."""
    if not isinstance(device, str) or not device:
        return "not recorded"
    name = re.sub(r"\(R\)|\(TM\)|\bProcessor\b|@.*$|\s+x\d+$", "", device.removeprefix("cpu:"))
    return " ".join(name.split()) or device


def _cpu_cells(records: list[dict]) -> list[str]:
    """Each row's CPU for the runs table: its short name; ``#k`` where rows of one name took
    different numeric paths (:func:`_same_path`, numbered in the order they first appear; ``#?`` for
    a row that records nothing to tell them apart); the instruction set where recorded; ``(+k
    other)`` where a run resumed across sessions also trained on k other machines. So the table
    shows which runs computed on the same kernels."""
    names = [_cpu(r.get("device")) for r in records]
    paths = [_numeric_path(r) for r in records]
    known = [any(p is not None and not (isinstance(p, float) and pd.isna(p)) for p in path[1:])  # beyond the device
             for path in paths]
    seen: dict[str, list[tuple]] = {}
    index: list[int | None] = []
    for name, path, evidence in zip(names, paths, known):
        groups = seen.setdefault(name, [])
        if not evidence:
            index.append(None)
            continue
        k = next((i for i, q in enumerate(groups) if _same_path(path, q)), None)
        if k is None:
            groups.append(path)
            k = len(groups) - 1
        index.append(k)
    cells = []
    for r, name, path, k in zip(records, names, paths, index):
        cell = name + ((f" #{k + 1}" if k is not None else " #?") if len(seen[name]) > 1 else "")
        if isinstance(r.get("cpu_capability"), str):
            cell += f" {r['cpu_capability']}"
        others = len(path.machines or ()) - 1
        cells.append(cell + (f" (+{others} other)" if others > 0 else ""))
    return cells


def runs_table(df: pd.DataFrame, out: Path, table: str) -> list[Path]:
    """``<table>_runs.{md,tex}``: one line per training row of ``table`` (each seed of each point and
    stage), in the order the rows landed: the commit and CPU it ran on, the step it resumed from, its
    test choice accuracy beside the same model with shuffled images and chance, the image gain with
    its paired 95% interval over items, spatial accuracy (shuffled), whether its val loss had
    plateaued (``converged``), and its training and evaluation wall minutes. What the README's per-run paragraphs used to copy by hand."""
    rows = df[(df["table"] == table) & (df["source"] == "run")]
    if not len(rows):
        return []

    def num(r, key: str, fmt: str = "{:.3f}") -> str:
        v = r.get(key)
        return fmt.format(v) if v is not None and pd.notna(v) else "--"

    def minutes(r, key: str) -> str:
        v = r.get(key)
        return f"{v / 60:.0f}" if v is not None and pd.notna(v) else "--"

    order = {label: i for i, label in enumerate(dict.fromkeys(rows["label"]))}
    rows = rows.assign(_order=rows["label"].map(order)).sort_values(["_order", "seed"], kind="stable")
    cpus = _cpu_cells(rows.to_dict("records"))
    lines = []
    for r, cpu in zip(rows.to_dict("records"), cpus):
        gain = num(r, "mm/choice/image_gain", "{:+.3f}")
        if gain != "--" and pd.notna(r.get("mm/choice/image_gain_ci_lo")):
            gain += f" [{r['mm/choice/image_gain_ci_lo']:+.3f}, {r['mm/choice/image_gain_ci_hi']:+.3f}]"
        spatial = num(r, "mm/choice/spatial/acc")
        if spatial != "--" and pd.notna(r.get("mm/choice/spatial/acc_shuffled")):
            spatial += f" ({r['mm/choice/spatial/acc_shuffled']:.3f})"
        lines.append({"point": r["label"], "seed": f"{r['seed']:.0f}", "commit": str(r.get("git_sha") or "--")[:7],
                      "CPU": cpu,
                      "resumed from step": num(r, "resumed_from_step", "{:.0f}"),
                      "choice acc": num(r, "mm/choice/acc"), "shuffled images": num(r, "mm/choice/acc_shuffled"),
                      "chance": num(r, "mm/choice/chance"), "image gain [95% CI]": gain,
                      "spatial (shuffled)": spatial,
                      "converged": {True: "yes", False: "no"}.get(r.get("converged"), "--"),
                      "train min": minutes(r, "train_s"), "eval min": minutes(r, "eval_s")})
    t = pd.DataFrame(lines)
    out.mkdir(parents=True, exist_ok=True)
    tex, md = out / f"{table}_runs.tex", out / f"{table}_runs.md"
    tex.write_text(_latex(t, f"results/{table}.jsonl: every training row (seed) as it landed; CPU with the instruction "
                             "set its kernels used where recorded, #k where one CPU name computed different "
                             "numbers (the base LM's score of the same prose differs), (+k other) where a resumed "
                             "run also trained on k other machines; image gain = acc - acc "
                             "with shuffled images, paired bootstrap 95% CI over items; wall minutes"))
    md.write_text(_markdown(t))
    return [tex, md]


# -- entry point -----------------------------------------------------------------------------------
README_BLOCK = re.compile(r"(<!-- report: ([\w.-]+\.md) -->\n)(.*?)(<!-- /report -->)", re.S)


def sync_readme(readme: str | Path, tables: str | Path) -> bool:
    """Rewrite each block ``<!-- report: NAME.md -->`` ... ``<!-- /report -->`` of ``readme`` with
    the generated ``tables/NAME.md``, so the README quotes the tables the report just wrote (never
    a hand copy that drifts); everything outside the blocks is kept. Returns whether it changed."""
    readme, tables = Path(readme), Path(tables)
    text = readme.read_text()
    missing = sorted({m.group(2) for m in README_BLOCK.finditer(text) if not (tables / m.group(2)).exists()})
    if missing:
        raise FusionBenchError(f"{readme} quotes {', '.join(missing)}, which the report did not write in {tables}")
    new = README_BLOCK.sub(lambda m: m.group(1) + (tables / m.group(2)).read_text() + m.group(4), text)
    if new != text:
        readme.write_text(new)
    return new != text


def report(results_dir: str | Path | list[str | Path] = "results", paper_dir: str | Path = "paper") -> list[Path]:
    """Figures and tables of ``paper_dir`` from the tables of ``results_dir`` (one folder, or
    several read together: see :func:`load_all`)."""
    dirs = [results_dir] if isinstance(results_dir, (str, Path)) else list(results_dir)
    df = load_all(dirs)
    for line in df.attrs.get("replaced_other_device", []):
        print(f"fusionbench: warning: {line}", file=sys.stderr)

    def shown(d) -> str:  # a folder as the caption names it: relative to the first one's parent
        first, here = Path(dirs[0]).resolve(), Path(d).resolve()
        try:
            return (Path(first.name) / here.relative_to(first)).as_posix()
        except ValueError:
            return here.name

    def caption(table: str) -> str:
        files = [f"{shown(d)}/{table}.jsonl" for d in dirs if (Path(d) / f"{table}.jsonl").exists()]
        return f"{' + '.join(files)}: mean $\\pm$ 95% CI over seeds"

    runs = df[df["source"] == "run"]
    summary = summarise(runs if len(runs) else df)
    paper = Path(paper_dir)
    figs, tabs = paper / "figures", paper / "tables"
    tables = list(dict.fromkeys(summary["table"]))
    main = MAIN_TABLE if MAIN_TABLE in tables else max(tables, key=lambda t: (summary["table"] == t).sum())
    s = summary[summary["table"] == main].reset_index(drop=True)
    written: list[Path] = []
    for fn in (fig_pareto, fig_mm_by_qtype, fig_spatial_relations, fig_forgetting, fig_forgetting_curves,
               fig_val_curves, fig_probe_curves, fig_efficiency):
        written += fn(s, figs)
    written += write_table(s, tabs, "main", caption(main))
    written += convergence_table(s, tabs)
    written += efficiency_table(s, tabs)
    written += numbers(s, df[df["source"] == "run"] if len(runs) else df, tabs)
    written += compute_table(df, tabs)
    written += runs_table(df, tabs, main)
    for table in tables:  # pre-registered contrasts: comparisons.* (main table), <table>_comparisons.*
        if declared_contrasts(df[df["table"] == table]):
            cmp = comparisons(df, table)
            prefix = "" if table == main else f"{table}_"
            written += comparisons_table(cmp, tabs, f"{prefix}comparisons")
            # the verdicts as macros, so the paper's prose quotes an ablation's contrasts as it does main's
            written += comparison_numbers(cmp, tabs, f"{prefix}comparison_numbers")
    for table in tables:
        if table == main:
            continue
        t = summary[summary["table"] == table].reset_index(drop=True)
        written += fig_table(t, figs, table, _val_items(df[df["table"] == table]))
        written += write_table(t, tabs, table, caption(table))
    return written
