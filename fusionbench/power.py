"""``fusionbench power``: from a pilot's rows, what the study can detect (``results/power.md``).

The pilot (``experiments/pilot.yaml``) trains one strategy for long, with the val choice accuracy
and image gain every N steps, in >= 2 seeds scored on the study's test items. From its rows:

* **budget** -- the first validation step at which the val choice accuracy (mean over seeds) is
  within ``tol`` (default 0.02) of the best the pilot reached: training longer buys less than
  that (the val curve is printed, so the rule can be checked by eye);
* **noise** -- on the same test items, the between-seed standard deviation of the accuracy
  (``sd_seed``) and the paired *discordance* between two seeds (the share of items one gets right
  and the other wrong): the per-item variance of a paired difference is at most the discordance
  of the two models compared; two strategies disagree at least as often as two seeds of one, so
  the study's contrasts use ``max(pilot discordance, fusionbench.stats.DISCORDANCE)``;
* **minimum detectable effect** (80% power, alpha 0.05, two-sided) of a paired difference of two
  strategies' accuracies over ``S`` seeds on the same ``n`` test items, for the test the report
  runs (:func:`fusionbench.stats.paired_contrast`: Student t, Welch-Satterthwaite df):
  ``MDE = (t_0.975 + t_0.8) * sqrt(discordance / n + 2 sd_seed^2 / S)`` with df from the item term
  (``n - 1``) and the seed term (``S - 1``): item noise shrinks with n only (every seed sees the same
  items), training noise with S, and with few seeds the t quantiles add their own price. With one
  seed the interval cannot see the seed term (its df is the items'). Conservative: sd_seed,
  measured on fixed items, already contains part of the item-level flips;
* **a check on that noise from the study itself** (with ``study``): the between-seed s.d. of every
  strategy with >= 2 seeds in the study's own results table, pooled, and the MDE it implies. The
  pilot's seeds ran on one CPU; the study's run on whichever machine a session gets, and another
  CPU moves a run like another seed does, so the study's own spread is the one its contrasts face.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusionbench.errors import FusionBenchError
from fusionbench.stats import DISCORDANCE, t_mde, welch_df

SEED_GRID = (1, 3, 5, 10)


def mde(discordance: float, sd_seed: float, n: int, seeds: int) -> float:
    """Minimum detectable paired difference (module docstring)."""
    item, seed = discordance / n, 2 * sd_seed ** 2 / seeds
    # the interval's df: one seed cannot estimate the seed term, so only the items' count there
    df = welch_df([(item, max(1, n - 1))] + ([(seed, seeds - 1)] if seeds > 1 else []))
    return t_mde(math.sqrt(item + seed), df)


def seeds_needed(target: float, discordance: float, sd_seed: float, n: int, max_seeds: int = 100) -> int | None:
    """The fewest seeds whose :func:`mde` is <= ``target`` at ``n`` items (None: not within ``max_seeds``)."""
    return next((s for s in range(1, max_seeds + 1) if mde(discordance, sd_seed, n, s) <= target), None)


def budget_step(curve: pd.DataFrame, tol: float = 0.02) -> int:
    """First step whose mean val choice accuracy is within ``tol`` of the curve's best."""
    mean = curve.groupby("step")["val/choice_acc"].mean().sort_index()
    return int(mean.index[(mean >= mean.max() - tol).to_numpy().argmax()])


def _items(row: pd.Series, group: str) -> np.ndarray | None:
    from fusionbench.report import item_values

    return item_values(row.to_dict(), f"mm/choice/{group}acc")


def analyse(rows: pd.DataFrame, target: float = 0.05, tol: float = 0.02) -> dict[str, Any]:
    """The numbers :func:`write_power` prints (budget, noise, MDE tables) from pilot rows."""
    if rows.empty:
        raise FusionBenchError("no pilot rows: run `fusionbench sweep experiments/pilot.yaml` first")
    final = rows[(rows.get("source", "run") == "run")] if "source" in rows else rows
    final = final.drop_duplicates("seed", keep="last").sort_values("seed")
    if "mm/choice/items" not in final:
        raise FusionBenchError("the pilot rows have no choice-scored test items (eval.metrics needs choice)")
    curve = pd.DataFrame([{"seed": int(r["seed"]), **p} for _, r in final.iterrows()
                          for p in json.loads(r.get("val_curve") or "[]")])
    if curve.empty or "val/choice_acc" not in curve:
        raise FusionBenchError("the pilot rows have no val curve (set trainer.val_every_n_steps and eval.val_items)")
    groups = [""] + sorted({c[len("mm/choice/"):-len("items")] for c in final.columns
                            if c.startswith("mm/choice/") and c.endswith("/items") and c.count("/") == 3})
    noise = []
    for g in groups:
        items = [x for x in (_items(r, g) for _, r in final.iterrows()) if x is not None]
        accs = [float(x.mean()) for x in items]
        pairs = [(a != b).mean() for i, a in enumerate(items) for b in items[i + 1:] if len(a) == len(b)]
        disc = float(np.mean(pairs)) if pairs else float("nan")
        noise.append({"group": g.rstrip("/") or "all", "n": len(items[0]) if items else 0, "seeds": len(items),
                      "acc_mean": float(np.mean(accs)) if accs else float("nan"),
                      "sd_seed": float(np.std(accs, ddof=1)) if len(accs) > 1 else float("nan"),
                      "discordance_seeds": disc, "discordance_used": max(disc, DISCORDANCE) if pairs else DISCORDANCE})
    noise = pd.DataFrame(noise)
    mdes, targets = [], []
    for _, r in noise.iterrows():
        sd = 0.0 if math.isnan(r["sd_seed"]) else r["sd_seed"]
        n = max(1, int(r["n"]))
        for s in SEED_GRID:
            mdes.append({"group": r["group"], "n": int(r["n"]), "seeds": s, "mde": mde(r["discordance_used"], sd, n, s)})
        targets.append({"group": r["group"], "n": int(r["n"]), "seeds_for_target": seeds_needed(target, r["discordance_used"], sd, n)})
    gain = [{"seed": int(r["seed"]), "acc": r["mm/choice/acc"], "acc_shuffled": r.get("mm/choice/acc_shuffled"),
             "image_gain": r.get("mm/choice/image_gain"), "ci_lo": r.get("mm/choice/image_gain_ci_lo"),
             "ci_hi": r.get("mm/choice/image_gain_ci_hi"), "chance": r.get("mm/choice/chance"),
             "steps": int(r["steps"])} for _, r in final.iterrows()]
    return {"curve": curve, "budget": budget_step(curve, tol), "tol": tol, "noise": noise,
            "mde": pd.DataFrame(mdes), "targets": pd.DataFrame(targets), "gain": pd.DataFrame(gain), "target": target,
            "provenance": {k: final.iloc[-1].get(k) for k in ("git_sha", "device", "version_torch",
                                                                "version_transformers", "experiment")}}


def _md(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    cols = list(df.columns)
    fmt = lambda v: (f"{v:{floatfmt}}" if isinstance(v, float) and not math.isnan(v)  # noqa: E731
                     else "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def at_study_size(noise: pd.DataFrame, study: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The minimum detectable effect of a paired contrast at the study's own size: ``study``'s test
    items (balanced: ``test_size / #question types`` per type) and seeds, with the pilot's noise."""
    from fusionbench.config import load_config, study_qtypes

    cfg = load_config(study)
    seeds = len(cfg.seeds) or 1
    qtypes = study_qtypes(cfg) or [g for g in noise["group"] if g != "all"]
    lines = []
    for _, r in noise.iterrows():
        if r["group"] != "all" and r["group"] not in qtypes:
            continue
        n = int(cfg.data.test_size) // (1 if r["group"] == "all" else len(qtypes))
        sd = 0.0 if math.isnan(r["sd_seed"]) else r["sd_seed"]
        lines.append({"group": r["group"], "n": n, "seeds": seeds, "mde": mde(r["discordance_used"], sd, n, seeds)})
    return pd.DataFrame(lines), {"study": str(study), "seeds": seeds, "test_size": int(cfg.data.test_size)}


def study_noise(study: str | Path, groups: list[str],
                rows_file: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The between-seed noise in the study's own rows (``rows_file``, default ``study``'s
    ``results_file``): per strategy with >= 2 final seeds and per group (``all`` and each question
    type), the seeds, their devices and the s.d. of the accuracy; and per group that s.d. pooled
    over the strategies (variances weighted by their degrees of freedom). Empty frames while no
    strategy has 2 seeds."""
    from fusionbench.config import load_config
    from fusionbench.report import prepare
    from fusionbench.results import read_results

    path = Path(rows_file if rows_file is not None else load_config(study).results_file)
    rows = read_results(path) if path.exists() else pd.DataFrame()
    if rows.empty or "stage" not in rows:
        return pd.DataFrame(), pd.DataFrame(), str(path)
    df = prepare(rows.assign(table=path.stem))
    df = df[df["final"] & (df["source"] == "run")]
    per, pooled = [], []
    # one strategy = what contrasts name (base_label), its newest configuration's rows, as the report pairs them
    for label, g in df.groupby("base_label", sort=False):
        g = g[g["point_hash"] == g["point_hash"].iloc[-1]].drop_duplicates("seed", keep="last").sort_values("seed")
        if len(g) < 2:
            continue
        for grp in groups:
            col = "mm/choice/acc" if grp == "all" else f"mm/choice/{grp}/acc"
            if col not in g or g[col].isna().any():
                continue
            accs = g[col].astype(float).to_numpy()
            per.append({"strategy": label, "group": grp, "seeds": len(accs),
                        "acc": " / ".join(f"{a:.3f}" for a in accs), "sd_seed": float(np.std(accs, ddof=1)),
                        "devices": " / ".join(str(d).removeprefix("cpu:").split(" Processor")[0]
                                              for d in g.get("device", pd.Series(["?"] * len(g)))),
                        "_df": len(accs) - 1})
    per = pd.DataFrame(per)
    if per.empty:
        return per, pd.DataFrame(), str(path)
    for grp, g in per.groupby("group", sort=False):
        dof = int(g["_df"].sum())
        pooled.append({"group": grp, "strategies": len(g), "df": dof,
                       "sd_seed_pooled": float(math.sqrt((g["_df"] * g["sd_seed"] ** 2).sum() / dof))})
    return per.drop(columns="_df"), pd.DataFrame(pooled), str(path)


def write_power(pilot: str | Path, out: str | Path, target: float = 0.05, tol: float = 0.02,
                study: str | Path | None = None) -> Path:
    """Read the pilot rows, write the power analysis as Markdown to ``out`` (with ``study``, an
    experiment config: also what that study can and cannot detect at its own size)."""
    from fusionbench.results import read_results

    a = analyse(read_results(pilot), target, tol)
    curve = a["curve"].copy()
    keep = [c for c in ("seed", "step", "val/lm_loss", "val/choice_acc", "val/acc_shuffled", "val/image_gain",
                        "val/image_gain_ci_lo", "val/image_gain_ci_hi") if c in curve]
    lines = [
        "# Power analysis of the main study (generated by `fusionbench power`; do not edit)",
        "",
        f"Pilot rows: `{pilot}` ({a['provenance'].get('experiment')}, git {a['provenance'].get('git_sha')}, "
        f"{a['provenance'].get('device')}, torch {a['provenance'].get('version_torch')}, transformers "
        f"{a['provenance'].get('version_transformers')}). Method: `fusionbench/power.py` (docstring).",
        "",
        "## Budget",
        "",
        f"The val choice accuracy (mean over seeds) first comes within {a['tol']:.2f} of its best at step "
        f"**{a['budget']}**. Val curve (every validation, per seed):",
        "",
        _md(curve[keep].sort_values(["step", "seed"])),
        "",
        "## Does the pilot strategy use the image? (test set, final step)",
        "",
        _md(a["gain"]),
        "",
        "## Noise on the study's test items",
        "",
        "sd_seed: between-seed s.d. of the accuracy; discordance_seeds: share of items two seeds disagree on "
        f"(right vs wrong); discordance_used: max(that, {DISCORDANCE}), since two strategies disagree at least "
        "as often as two seeds of one.",
        "",
        _md(a["noise"]),
        "",
        f"## Minimum detectable effect (80% power, alpha 0.05) of a paired difference of two strategies",
        "",
        _md(a["mde"].pivot(index=["group", "n"], columns="seeds", values="mde")
            .rename(columns=lambda c: f"{c} seed(s)").reset_index()),
        "",
        f"Seeds needed to detect a difference of {a['target']:.2f} at the pilot's n (None: more than 100):",
        "",
        _md(a["targets"]),
        "",
    ]
    if study is not None:
        size, info = at_study_size(a["noise"], study)
        worst = size.loc[size["group"] != "all", "mde"].max() if (size["group"] != "all").any() else float("nan")
        lines += [
            f"## What `{info['study']}` can and cannot detect",
            "",
            f"Its {info['test_size']} balanced test items and {info['seeds']} seeds, with the pilot's noise:",
            "",
            _md(size),
            "",
            f"A paired accuracy difference smaller than the MDE above (overall "
            f"{size.loc[size['group'] == 'all', 'mde'].iloc[0]:.3f}; per question type up to {worst:.3f}) is "
            "likely to come out *inconclusive*: that verdict is not evidence of no difference. "
            "Forgetting contrasts are paired over prose chunks and text items; their power is in each "
            "contrast's own interval (the report's comparisons table), not here.",
            "",
        ]
        per, pooled, rows_path = study_noise(study, list(a["noise"]["group"]))
        lines += [f"## Check: the between-seed noise of the study's own rows (`{rows_path}`)", ""]
        if pooled.empty:
            lines += ["No strategy has 2 seeds there yet.", ""]
        else:
            pilot = a["noise"].set_index("group")
            check = []
            for _, p in pooled.iterrows():
                r = size[size["group"] == p["group"]]
                if r.empty:
                    continue
                r = r.iloc[0]
                disc = float(pilot.loc[p["group"], "discordance_used"])
                check.append({"group": p["group"], "n": int(r["n"]), "seeds": int(r["seeds"]),
                              "sd_seed_pilot": float(pilot.loc[p["group"], "sd_seed"]),
                              "sd_seed_study": p["sd_seed_pooled"], "df_study": int(p["df"]),
                              "mde_pilot_noise": float(r["mde"]),
                              "mde_study_noise": mde(disc, p["sd_seed_pooled"], int(r["n"]), int(r["seeds"])),
                              "seeds_for_target": seeds_needed(a["target"], disc, p["sd_seed_pooled"], int(r["n"]))})
            check = pd.DataFrame(check)
            lines += [
                "Every strategy with at least 2 seeds there (accuracy per seed, in seed order, and where each ran):",
                "",
                _md(per),
                "",
                "Pooled over those strategies (variances weighted by their degrees of freedom), and the study's MDE "
                f"and the seeds needed for {a['target']:.2f} with that noise instead of the pilot's:",
                "",
                _md(check),
                "",
                "An s.d. from few seeds is itself uncertain (with 1 degree of freedom its 95% interval spans "
                "0.45x to 32x the estimate), so this check is read as a warning, not a new budget: where the "
                "study's own seeds spread more than the pilot's, its contrasts' intervals (which estimate the "
                "seed term from the contrast's own seeds) are wider than the table above promised.",
                "",
            ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
