"""``fusionbench report``: figures and LaTeX tables for ``paper/``, regenerated from ``results/``
alone (every ``*.jsonl`` table there). Runs in seconds; no model is loaded."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fusionbench.errors import FusionBenchError
from fusionbench.results import read_results

QTYPES = ("attribute", "count", "spatial")


def load_all(results_dir: str | Path) -> pd.DataFrame:
    files = sorted(Path(results_dir).glob("*.jsonl"))
    frames = [read_results(f).assign(table=f.stem) for f in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        raise FusionBenchError(f"no result rows in {results_dir}/*.jsonl; run `fusionbench run CONFIG` first")
    return pd.concat(frames, ignore_index=True)


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% confidence interval (Student t over the seeds;
    NaN half-width for a single seed)."""
    import numpy as np
    from scipy import stats

    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One line per (table, strategy, stage): mean over seeds of the headline metrics, and for each
    its 95% confidence-interval half-width as ``<metric>_ci95``."""
    cols = ["mm/acc", *[f"mm/{q}/acc" for q in QTYPES], *[f"mm/{q}/acc_majority" for q in QTYPES],
            "forgetting/mc_avg", "forgetting/austen/delta_log_ppl", "params_trainable", "train_s"]
    cols = [c for c in cols if c in df.columns]
    lines = []
    for (table, strategy, stage), group in df.groupby(["table", "strategy", "stage"], sort=False):
        line = {"table": table, "strategy": strategy, "stage": stage, "seeds": group["seed"].nunique()}
        for c in cols:
            line[c], line[f"{c}_ci95"] = mean_ci(group[c])
        lines.append(line)
    return pd.DataFrame(lines)


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    return paths


def figures(summary: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [f"{r.strategy}" + ("" if r.stage == "main" else f"/{r.stage}") for r in summary.itertuples()]
    # multimodal accuracy per question type, majority baseline as a marker
    types = [q for q in QTYPES if f"mm/{q}/acc" in summary]
    if types:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels) * len(types) / 2, 3.4))
        width = 0.8 / len(types)
        for j, q in enumerate(types):
            xs = [i + (j - (len(types) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, summary[f"mm/{q}/acc"], width, label=q, color=["C0", "C1", "C3"][j % 3])
            if f"mm/{q}/acc_majority" in summary:
                ax.scatter(xs, summary[f"mm/{q}/acc_majority"], marker="_", s=200, color="k", zorder=3,
                           label="majority baseline" if j == 0 else None)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("Multimodal accuracy by question type")
        ax.legend(fontsize=8, ncol=2)
        written += _save(fig, out, "mm_accuracy")
        plt.close(fig)
    # forgetting: relative drop of text multiple-choice accuracy, and change in log-perplexity
    metrics = [(c, t) for c, t in (("forgetting/mc_avg", "forgetting (relative MC accuracy drop)"),
                                   ("forgetting/austen/delta_log_ppl", "Δ log-perplexity (Austen)"))
               if c in summary]
    if metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False,
                                 layout="constrained")
        for ax, (col, title) in zip(axes[0], metrics):
            values = summary[col].fillna(0.0)
            bars = ax.bar(range(len(labels)), values, color="C2")
            # exact values on the bars: a zero bar (frozen LM) is otherwise invisible
            ax.bar_label(bars, labels=["0 (exact)" if v == 0 else f"{v:+.3f}" for v in values], fontsize=8,
                         padding=2)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("after − base" if "delta" in col else "(base − after) / base")
        fig.suptitle("NLP forgetting: the LM's text-only ability after multimodal training", fontsize=10)
        written += _save(fig, out, "forgetting")
        plt.close(fig)
    return written


def latex_table(summary: pd.DataFrame, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cols = {"mm/acc": "MM acc", **{f"mm/{q}/acc": q for q in QTYPES}, "forgetting/mc_avg": "forgetting",
            "forgetting/austen/delta_log_ppl": r"$\Delta$ log-ppl", "params_trainable": "trainable", "seeds": "seeds"}
    cols = {k: v for k, v in cols.items() if k in summary}
    table = summary[["strategy", "stage"]].copy()
    for key, label in cols.items():
        if key == "params_trainable":
            table[label] = summary[key].map(lambda n: f"{n / 1e6:.2f}M")
        elif key == "seeds":
            table[label] = summary[key]
        else:  # mean, with ± the 95% interval over seeds where there are several
            ci = summary.get(f"{key}_ci95", pd.Series(float("nan"), index=summary.index))
            table[label] = [f"{m:.3f}" + (f" $\\pm$ {h:.3f}" if pd.notna(h) else "") if pd.notna(m) else "--"
                            for m, h in zip(summary[key], ci)]
    path = out / "main.tex"
    table.columns = [c.replace("_", "\\_") for c in table.columns]
    table["strategy"] = table["strategy"].str.replace("_", "\\_")
    table["stage"] = table["stage"].str.replace("_", "\\_")
    path.write_text(table.to_latex(index=False, escape=False))
    return path


def report(results_dir: str | Path = "results", paper_dir: str | Path = "paper") -> list[Path]:
    summary = summarise(load_all(results_dir))
    paper = Path(paper_dir)
    written = figures(summary, paper / "figures")
    written.append(latex_table(summary, paper / "tables"))
    return written
