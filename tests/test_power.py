"""``fusionbench power``: budget, noise and minimum detectable effect from pilot rows."""
import json
import math

import numpy as np
import pytest

from fusionbench.cli import main
from fusionbench.power import analyse, budget_step, mde, seeds_needed
from fusionbench.results import append_row, read_results
from fusionbench.stats import DISCORDANCE, MDE_Z


def _pilot_rows(path, n=200):
    rng = np.random.default_rng(0)
    base = rng.random(n) < 0.5
    for seed in (0, 1):
        flip = rng.random(n) < 0.1                    # two seeds disagree on ~10% of the items
        items = np.where(flip, ~base, base).astype(int)
        curve = [{"step": s, "val/lm_loss": 1.0 / s, "val/choice_acc": a + 0.01 * seed}
                 for s, a in ((100, 0.30), (200, 0.40), (300, 0.45), (400, 0.455))]
        half = n // 2
        append_row(path, {"experiment": "pilot", "seed": seed, "steps": 400, "source": "run",
                          "mm/choice/acc": items.mean(), "mm/choice/items": "".join(map(str, items)),
                          "mm/choice/count/items": "".join(map(str, items[:half])),
                          "mm/choice/spatial/items": "".join(map(str, items[half:])),
                          "mm/choice/image_gain": 0.1, "val_curve": json.dumps(curve)})
    return read_results(path)


def test_mde_formula_and_seeds_needed():
    assert mde(0.3, 0.0, 942, 1) == pytest.approx(MDE_Z * math.sqrt(0.3 / 942), rel=2e-3)  # t ~ z at 941 df
    assert mde(0.3, 0.0, 942, 5) == mde(0.3, 0.0, 942, 1)            # the same items for every seed
    assert mde(0.3, 0.0, 942, 1) == pytest.approx(0.05, abs=1e-4)   # stats.items_needed's case
    assert mde(0.3, 0.02, 1000, 4) < mde(0.3, 0.02, 1000, 1)
    # the seed term dominating at 3 seeds: t quantiles of ~2 df, not z (the report's test)
    se = math.sqrt(0.3 / 1e6 + 2 * 0.05 ** 2 / 3)
    assert mde(0.3, 0.05, 10 ** 6, 3) > 1.8 * MDE_Z * se
    assert mde(0.3, 0.05, 10 ** 6, 3) == pytest.approx((4.303 + 1.061) * se, rel=0.01)
    assert seeds_needed(0.05, 0.3, 0.0, 950) == 1
    # both terms: Welch-Satterthwaite df, as stats.paired_contrast computes it
    from scipy import stats

    item, seed = 0.3 / 1500, 2 * 0.02 ** 2 / 3
    df = (item + seed) ** 2 / (item ** 2 / 1499 + seed ** 2 / 2)
    assert mde(0.3, 0.02, 1500, 3) == pytest.approx((stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * math.sqrt(item + seed))
    assert seeds_needed(0.05, 0.3, 0.02, 1500) > seeds_needed(0.05, 0.3, 0.0, 1500)
    assert seeds_needed(0.05, 0.3, 0.0, 400) is None                # 400 items cannot, at any seed count
    assert seeds_needed(0.001, 0.3, 0.2, 10) is None


def test_budget_is_the_first_step_near_the_best_val_accuracy():
    import pandas as pd

    curve = pd.DataFrame({"step": [100, 200, 300, 400], "val/choice_acc": [0.3, 0.4, 0.45, 0.455]})
    assert budget_step(curve, tol=0.02) == 300 and budget_step(curve, tol=0.0) == 400


def test_power_report_from_pilot_rows(tmp_path):
    rows = _pilot_rows(tmp_path / "pilot.jsonl")
    a = analyse(rows)
    assert a["budget"] == 300
    noise = a["noise"].set_index("group")
    assert set(noise.index) == {"all", "count", "spatial"}
    assert 0.05 < noise.loc["all", "discordance_seeds"] < 0.15       # the ~10% flips
    assert noise.loc["all", "discordance_used"] == DISCORDANCE      # floored at the stated assumption
    assert noise.loc["count", "n"] == 100
    out = tmp_path / "power.md"
    assert main(["power", "--pilot", str(tmp_path / "pilot.jsonl"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "step **300**" in text and "Seeds needed" in text
    # at the study's own size (experiments/main.yaml: its test items, split evenly over its types, and seeds)
    assert "can and cannot detect" in text and "| all | 4500 | 3 |" in text and "| spatial | 1500 | 3 |" in text
    assert main(["power", "--pilot", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2


def test_study_noise_pools_the_study_rows_own_seeds(tmp_path):
    from fusionbench.power import study_noise

    rows = tmp_path / "main.jsonl"
    accs = {"mlp": [0.55, 0.58, 0.57], "visual_expert": [0.56, 0.60], "flamingo": [0.40]}  # flamingo: 1 seed
    for variant, values in accs.items():
        cfg = json.dumps({"fusion": {"name": variant}, "seed": 0})
        for seed, acc in enumerate(values):
            append_row(rows, {"experiment": "main", "strategy": variant, "stage": "main", "seed": seed,
                              "config_hash": f"{variant}{seed}", "point_hash": variant, "config": cfg,
                              "grid_point": json.dumps({"variant": variant}), "git_sha": "x",
                              "device": "cpu:AMD EPYC x2" if seed else "cpu:Intel(R) Xeon(R) Processor x2",
                              "mm/choice/acc": acc, "mm/choice/spatial/acc": acc - 0.05})
    old = json.dumps({"fusion": {"name": "mlp", "lr": 1}, "seed": 0})   # an older mlp configuration, 2 seeds
    for seed, acc in enumerate([0.1, 0.9]):
        append_row(rows, {"experiment": "main", "strategy": "mlp", "stage": "main", "seed": seed,
                          "config_hash": f"old{seed}", "point_hash": "old", "config": old, "git_sha": "y",
                          "grid_point": json.dumps({"variant": "mlp"}), "mm/choice/acc": acc,
                          "mm/choice/spatial/acc": acc})
    for seed, acc in enumerate(accs["mlp"]):                          # the newest rows are the current config's
        append_row(rows, {"experiment": "main", "strategy": "mlp", "stage": "main", "seed": seed,
                          "config_hash": f"mlp{seed}", "point_hash": "mlp",
                          "config": json.dumps({"fusion": {"name": "mlp"}, "seed": 0}),
                          "grid_point": json.dumps({"variant": "mlp"}), "git_sha": "x",
                          "device": "cpu:AMD EPYC x2" if seed else "cpu:Intel(R) Xeon(R) Processor x2",
                          "mm/choice/acc": acc, "mm/choice/spatial/acc": acc - 0.05})
    per, pooled, _ = study_noise("experiments/main.yaml", ["all", "spatial"], rows_file=rows)
    assert set(per["strategy"]) == {"mlp", "visual_expert"}                  # >= 2 seeds only
    mlp = per[(per["strategy"] == "mlp") & (per["group"] == "all")].iloc[0]
    assert mlp["sd_seed"] == pytest.approx(np.std([0.55, 0.58, 0.57], ddof=1))
    assert mlp["acc"] == "0.550 / 0.580 / 0.570" and mlp["devices"] == "Intel(R) Xeon(R) / AMD EPYC x2 / AMD EPYC x2"
    p = pooled.set_index("group").loc["all"]
    want = math.sqrt((2 * np.var([0.55, 0.58, 0.57], ddof=1) + 1 * np.var([0.56, 0.60], ddof=1)) / 3)
    assert p["df"] == 3 and p["sd_seed_pooled"] == pytest.approx(want)
    # no strategy with 2 seeds: nothing to pool
    one = tmp_path / "one.jsonl"
    append_row(one, {"experiment": "main", "strategy": "mlp", "stage": "main", "seed": 0, "config_hash": "a",
                     "point_hash": "a", "config": json.dumps({"fusion": {"name": "mlp"}}), "git_sha": "x",
                     "mm/choice/acc": 0.5})
    assert study_noise("experiments/main.yaml", ["all"], rows_file=one)[1].empty


def test_committed_power_md_is_reproduced_from_the_committed_rows(tmp_path, monkeypatch):
    """results/power.md is generated from the pilot's rows and the study's own rows, which grow as
    the grid lands (`make report` rewrites it): a stale copy fails here."""
    from pathlib import Path

    from fusionbench.power import write_power

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the paths the file names are the repository's
    out = write_power("results/pilot.jsonl", tmp_path / "power.md", study="experiments/main.yaml")
    assert out.read_text() == (root / "results" / "power.md").read_text(), "results/power.md is stale: make report"
