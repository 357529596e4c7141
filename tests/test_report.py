"""``fusionbench report``: figures and tables from ``results/`` alone; the committed paper tables are
reproduced exactly from the committed results; every macro and file ``paper/main.tex`` uses is
produced; seeds of one point aggregate, re-runs replace, points stay apart."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusionbench.cli import main
from fusionbench.errors import FusionBenchError
from fusionbench.report import README_BLOCK, _pareto_front, load_all, report, summarise, sync_readme
from tests.helpers import ROOT, TINY


def _run(tmp_path, *overrides):
    return main(["run", str(TINY), f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'results' / 'runs.jsonl'}",
                 *overrides])


def test_report_regenerates_figures_and_tables_from_results_alone(tmp_path):
    assert _run(tmp_path, "grid={fusion: [linear, full_finetune]}", "seeds=[0,1]") == 0
    written = report(tmp_path / "results", tmp_path / "paper")
    names = {p.name for p in written}
    # no text suite on the tiny tier: no forgetting figures; everything else is there
    assert {"mm_by_qtype.pdf", "mm_by_qtype.png", "efficiency.png", "main.tex", "main.md", "efficiency.tex",
            "numbers.tex", "numbers.json", "compute.md"} <= names
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    tex = (tmp_path / "paper" / "tables" / "main.tex").read_text()
    assert "full\\_finetune" in tex and "linear" in tex and "\\begin{tabular}" in tex and "$\\pm$" in tex
    md = (tmp_path / "paper" / "tables" / "main.md").read_text()
    assert md.count("\n") == 4 and "| 2 |" in md  # header, rule, two strategies with 2 seeds each
    assert json.loads((tmp_path / "paper" / "tables" / "numbers.json").read_text())["NumSeeds"] == 2
    compute = (tmp_path / "paper" / "tables" / "compute.md").read_text().splitlines()
    assert len(compute) == 3 and compute[2].startswith("| runs | 4 | 2 | 4 |")  # 2 strategies x 2 seeds, wall hours
    assert main(["report", "--results", str(tmp_path / "nothing"), "--paper", str(tmp_path / "p2")]) == 2


def test_rerun_replaces_its_row_and_points_stay_apart(tmp_path):
    assert _run(tmp_path, "fusion=linear") == 0
    assert _run(tmp_path, "fusion=linear", f"output_dir={tmp_path / 'again'}") == 0  # same config, same seed
    assert _run(tmp_path, "fusion=linear", "trainer.lr=0.05") == 0  # another point of the same strategy
    df = load_all(tmp_path / "results")
    assert len(df) == 2 and df.point_hash.nunique() == 2
    s = summarise(df)
    assert len(s) == 2 and set(s.seeds) == {1}
    # one label for two configurations: told apart (same commit: by config hash)
    labels = sorted(s.label)
    assert labels[0] != labels[1] and all(lab.startswith("linear #") for lab in labels)


def test_a_rerun_on_another_device_is_reported_not_swapped_silently():
    from fusionbench.report import prepare

    cfg = json.dumps({"fusion": {"name": "mlp"}})
    row = {"table": "main", "config_hash": "aaa", "point_hash": "p", "stage": "main", "config": cfg,
           "strategy": "mlp", "seed": 0, "git_sha": "1111111abc"}
    rows = [{**row, "device": "cpu:Intel Xeon x2", "mm/choice/acc": 0.552},
            {**row, "device": "cpu:AMD EPYC x2", "mm/choice/acc": 0.560},
            {**row, "config_hash": "bbb", "seed": 1, "device": "cpu:AMD EPYC x2"},
            {**row, "config_hash": "bbb", "seed": 1, "device": "cpu:AMD EPYC x2"}]  # same device: a plain rerun
    df = prepare(pd.DataFrame(rows))
    assert len(df) == 2 and df.loc[df["seed"] == 0, "mm/choice/acc"].item() == 0.560  # the newest row is shown
    [warning] = df.attrs["replaced_other_device"]
    assert "seed 0" in warning and "Xeon" in warning and "0.552" in warning and "EPYC" in warning and "0.560" in warning
    # one CPU name, two models (the base LM's score of the same prose differs): also a replication
    fp = {"base/text/austen/tokens": 20440.0}
    rows = [{**row, "device": "cpu:AMD EPYC x2", **fp, "base/text/austen/log_ppl": 3.7705924},
            {**row, "device": "cpu:AMD EPYC x2", **fp, "base/text/austen/log_ppl": 3.7706013}]
    [warning] = prepare(pd.DataFrame(rows)).attrs["replaced_other_device"]
    assert "seed 0" in warning
    rows[1]["base/text/austen/log_ppl"] = 3.7705924  # the same machine again: a plain rerun
    assert prepare(pd.DataFrame(rows)).attrs["replaced_other_device"] == []


def test_labels_name_grid_strategies_and_code_versions():
    from fusionbench.report import prepare

    cfg = json.dumps({"fusion": {"name": "linear"}})
    rows = [{"table": "quickstart", "config_hash": h, "point_hash": h, "stage": "main", "config": cfg,
             "strategy": "linear", "grid_point": gp, "git_sha": sha}
            for h, gp, sha in [("aaa", None, "1111111abc"), ("bbb", json.dumps({"fusion": "linear"}), "2222222abc"),
                               ("ccc", json.dumps({"fusion": "mlp", "trainer.lr": 0.1}), "2222222abc")]]
    labels = list(prepare(pd.DataFrame(rows))["label"])
    assert labels == ["linear @1111111", "linear @2222222", "mlp, lr=0.1"]


def test_pareto_front():
    x = [0.0, 0.0, 0.1, 0.2, 0.05]
    y = [0.3, 0.5, 0.6, 0.55, 0.4]
    assert _pareto_front(x, y) == [1, 2]


def test_paper_uses_only_what_the_report_writes_and_committed_tables_are_reproduced(tmp_path):
    """From the committed results/ alone, the report rewrites every committed table byte for byte,
    writes every figure the paper includes and defines every number macro the paper quotes."""
    out = tmp_path / "paper"
    report(ROOT / "results", out)
    committed = sorted((ROOT / "paper" / "tables").glob("*"))
    assert committed
    for path in committed:
        assert (out / "tables" / path.name).read_text() == path.read_text(), f"{path.name} differs from a fresh report"
    for path in sorted((ROOT / "paper" / "figures").glob("*.p*")):
        assert (out / "figures" / path.name).exists(), f"committed figure {path.name} is no longer produced"
    tex = (ROOT / "paper" / "main.tex").read_text()
    # the macro files the paper \input's (numbers.tex, comparison_numbers.tex, an ablation's own):
    # each must be written, and none may define a macro another defines (LaTeX refuses a redefinition)
    macros = [out / t for t in re.findall(r"\\input\{(tables/\w*numbers\.tex)\}", tex)]
    assert out / "tables" / "comparison_numbers.tex" in macros and all(f.exists() for f in macros), macros
    names = [m for f in macros for m in re.findall(r"\\newcommand\{\\(fb\w+)\}", f.read_text())]
    assert len(names) == len(set(names)), sorted({m for m in names if names.count(m) > 1})
    defined = set(names)
    used = set(re.findall(r"\\(fb[A-Za-z]+)", tex))
    assert used and used <= defined, f"undefined in the report's macros: {sorted(used - defined)}"
    for target in re.findall(r"\\(?:input|includegraphics(?:\[[^\]]*\])?)\{([^}]+)\}", tex):
        assert (out / target).exists(), target


def test_readme_quotes_the_committed_tables_the_report_writes():
    """README's results are generated blocks, byte for byte the committed tables (which the test
    above regenerates from the rows): the README cannot drift from the rows."""
    blocks = list(README_BLOCK.finditer((ROOT / "README.md").read_text()))
    assert {"comparisons.md", "main.md"} <= {m.group(2) for m in blocks}
    for m in blocks:
        assert m.group(3) == (ROOT / "paper" / "tables" / m.group(2)).read_text(), f"README's {m.group(2)} is stale"


def test_sync_readme_rewrites_only_its_blocks(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report: a.md -->\nstale\n<!-- /report -->\noutro\n")
    assert sync_readme(readme, tables)
    assert readme.read_text() == "intro\n<!-- report: a.md -->\n| x |\n|---|\n| 1 |\n<!-- /report -->\noutro\n"
    assert not sync_readme(readme, tables)  # already current: untouched
    readme.write_text("<!-- report: b.md -->\nold\n<!-- /report -->\n")
    with pytest.raises(FusionBenchError, match="b.md"):
        sync_readme(readme, tables)
    assert "old" in readme.read_text()  # nothing written on error


def test_local_rows_are_reported_beside_the_committed_ones_never_instead(tmp_path):
    """A user's runs (results/local/, git-ignored) never enter the committed report; asked for
    together, they sit beside the committed rows of the same point, labelled, not merged or replaced."""
    committed, local = tmp_path / "results", tmp_path / "results" / "local"
    assert _run(tmp_path, "fusion=linear") == 0
    assert main(["run", str(TINY), f"output_dir={tmp_path / 'runs2'}", f"results_file={local / 'runs.jsonl'}",
                 "fusion=linear"]) == 0  # the same config and seed, run again by "a user"
    assert len(load_all(committed)) == 1 and set(load_all(committed)["label"]) == {"linear"}
    both = load_all([committed, local])
    assert sorted(both["label"]) == ["linear", "linear (local)"]
    s = summarise(both)
    assert len(s) == 2 and set(s.seeds) == {1}
    assert main(["report", "--results", str(committed), "--results", str(local), "--paper", str(tmp_path / "p")]) == 0
    assert "linear (local)" in (tmp_path / "p" / "tables" / "main.md").read_text()
    assert "% results/runs.jsonl + results/local/runs.jsonl:" in (tmp_path / "p" / "tables" / "main.tex").read_text()
    report(committed, tmp_path / "p1")
    assert "(local)" not in (tmp_path / "p1" / "tables" / "main.md").read_text()
    # without --paper, other rows than results/ alone go to paper/local/: the committed paper/ and the
    # README's tables are never rewritten from them by accident
    import os

    readme = tmp_path / "README.md"
    readme.write_text("<!-- report: main.md -->\nold\n<!-- /report -->\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["report", "--results", str(local)]) == 0
    finally:
        os.chdir(cwd)
    assert (tmp_path / "paper" / "local" / "tables" / "main.md").exists()
    assert not (tmp_path / "paper" / "tables").exists() and "old" in readme.read_text()


def test_user_runs_write_to_a_git_ignored_results_folder():
    """The README's quickstart, the per-strategy configs and the default write to results/local/,
    which git ignores: running them never changes the committed tables or dirties a checkout."""
    import subprocess

    from fusionbench.config import load_config

    paths = [load_config(ROOT / "experiments" / "quickstart.yaml").results_file]
    paths += [load_config(p).results_file for p in sorted((ROOT / "experiments" / "fusion").glob("*.yaml"))]
    paths.append(load_config(TINY).results_file)
    assert all(p.startswith("results/local/") for p in paths), paths
    ignored = subprocess.run(["git", "check-ignore", *sorted(set(paths)), "paper/local/tables/main.md"], cwd=ROOT,
                             capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(set(paths) | {"paper/local/tables/main.md"})


def _contrast_rows(contrasts, items_by_label):
    cfg = json.dumps({"fusion": {"name": "mlp"}, "contrasts": contrasts})
    rows = []
    for label, per_seed in items_by_label.items():
        for seed, items in per_seed.items():
            rows.append({"table": "main", "config_hash": f"{label}{seed}", "point_hash": label, "stage": "main",
                         "config": cfg, "strategy": label, "grid_point": json.dumps({"variant": label}),
                         "git_sha": "1111111", "seed": seed, "mm/choice/items": items,
                         "mm/choice/acc": items.count("1") / len(items), "mm/choice/test_hash": "t1"})
    return rows


def test_the_papers_setup_macros_name_every_cpu_and_the_seed_range(tmp_path):
    """The paper's "N seeds, on <device>" comes from the rows: a study spread over two CPU models
    names both with their run counts, and strategies with unequal seed counts give a range, not the
    largest count; there is no "best strategy" macro (a ranking goes through a contrast)."""
    from fusionbench.report import numbers, prepare, summarise

    rows = _contrast_rows([], {"mlp": {0: "1100", 1: "1010"}, "ve": {0: "1110"}})
    for r, dev in zip(rows, ["cpu:Intel Xeon x2", "cpu:AMD EPYC x2", "cpu:AMD EPYC x2"]):
        r.update({"device": dev, "source": "run", "mm/acc": r["mm/choice/acc"], "mm/spatial/acc": 0.5})
    df = prepare(pd.DataFrame(rows))
    vals = json.loads(numbers(summarise(df), df, tmp_path)[1].read_text())
    assert vals["NumSeeds"] == "1--2" and vals["NumRuns"] == 3
    assert vals["Device"] == "CPU: AMD EPYC x2 (2 runs); CPU: Intel Xeon x2 (1 run)"
    assert not [k for k in vals if k.startswith("Best")]
    one = prepare(pd.DataFrame([r for r in rows if r["strategy"] == "mlp" and r["seed"] == 1]))
    vals = json.loads(numbers(summarise(one), one, tmp_path)[1].read_text())
    assert vals["NumSeeds"] == 1 and vals["Device"] == "CPU: AMD EPYC x2" and vals["FullSeeds"] == 3
    # a row without its device is counted as such, not dropped (the counts add up to NumRuns)
    rows[0]["device"] = None
    df = prepare(pd.DataFrame(rows))
    vals = json.loads(numbers(summarise(df), df, tmp_path)[1].read_text())
    assert vals["Device"] == "CPU: AMD EPYC x2 (2 runs); device not recorded (1 run)"


def test_comparisons_table_paired_contrasts_and_n_a(tmp_path):
    from fusionbench.report import comparisons, comparisons_table, prepare

    contrasts = [{"name": "mlp beats blind", "a": "mlp", "b": "blind"},
                 {"name": "same", "a": "mlp", "b": "mlp2", "expect": "greater"},
                 {"name": "ghost", "a": "visual_expert", "b": "mlp"}]
    good, bad = "1" * 80 + "0" * 20, "1" * 40 + "0" * 60
    rows = _contrast_rows(contrasts, {"mlp": {0: good, 1: good}, "blind": {0: bad, 1: bad}, "mlp2": {0: good, 1: good}})
    cmp = comparisons(prepare(pd.DataFrame(rows))).set_index("contrast")
    r = cmp.loc["mlp beats blind"]
    assert r["diff"] == pytest.approx(0.4) and r["ci_lo"] > 0 and r["verdict"] == "supported" and r["seeds"] == 2
    assert cmp.loc["same", "diff"] == 0 and cmp.loc["same", "verdict"] == "inconclusive"
    assert cmp.loc["ghost", "verdict"] == "n/a" and "visual_expert" in cmp.loc["ghost", "why"]
    # Holm over every declared contrast (the unmeasured one counts as p = 1): the smallest p tripled
    assert cmp.loc["mlp beats blind", "p_holm"] == pytest.approx(min(1.0, 3 * cmp.loc["mlp beats blind", "p"]))
    assert cmp.loc["same", "p_holm"] >= cmp.loc["same", "p"] and pd.isna(cmp.loc["ghost", "p_holm"])
    # two configurations under one label (e.g. a learning rate changed after some rows): the newest
    # configuration's rows only (here one seed, as good as blind), never a mix of the two
    extra = _contrast_rows(contrasts[:1], {"mlp": {0: bad}})
    extra[0].update(config_hash="mlp-other-0", point_hash="mlp-other")
    newest = comparisons(prepare(pd.DataFrame(rows + extra))).set_index("contrast").loc["mlp beats blind"]
    assert newest["seeds"] == 1 and newest["diff"] == 0 and newest["verdict"] == "inconclusive"
    tex, md = comparisons_table(cmp.reset_index(), tmp_path)
    text = md.read_text()
    assert "supported" in text and "n/a: no rows of visual_expert" in text and "+0.400 [" in text
    # scored on other items: no comparison
    rows2 = _contrast_rows(contrasts[:1], {"mlp": {0: good}, "blind": {0: bad}})
    rows2[1]["mm/choice/test_hash"] = "t2"
    assert comparisons(prepare(pd.DataFrame(rows2))).iloc[0]["verdict"] == "n/a"


def test_a_contrast_added_after_some_rows_ran_counts_them(tmp_path):
    """docs/adding_a_fusion.md: add a strategy and its contrast against mlp, sweep (only the new
    points run): mlp's earlier rows of the same experiment count, although their configs predate the
    contrast; rows of another experiment in the same table with the same label do not."""
    from fusionbench.report import comparisons, prepare

    contrast = {"name": "new > mlp", "a": "new", "b": "mlp"}
    good, bad = "1" * 80 + "0" * 20, "1" * 40 + "0" * 60
    rows = _contrast_rows([], {"mlp": {0: bad, 1: bad}})  # ran before the contrast existed
    rows += _contrast_rows([contrast], {"new": {0: good, 1: good}})
    for r in rows:
        r["config"] = json.dumps({**json.loads(r["config"]), "name": "main"})
    line = comparisons(prepare(pd.DataFrame(rows))).iloc[0]
    assert line["verdict"] == "supported" and line["seeds"] == 2 and line["diff"] == pytest.approx(0.4)
    for r in rows[:2]:  # mlp's rows from another experiment: not this contrast's
        r["config"] = json.dumps({**json.loads(r["config"]), "name": "pilot"})
    line = comparisons(prepare(pd.DataFrame(rows))).iloc[0]
    assert line["verdict"] == "n/a" and "no rows of mlp" in line["why"]


def test_a_contrast_says_where_its_two_sides_ran_on_different_cpus(tmp_path):
    """The same seed reproduces only on one CPU model (the MoE dense stage: val 0.3825 on the Xeon three
    times, 0.415 on an EPYC): the table and the paper's sentence say when a pair's runs had other CPUs."""
    from fusionbench.report import comparison_numbers, comparisons, comparisons_table, prepare

    contrasts = [{"name": "mixed", "a": "mlp", "b": "blind"}]
    good, bad = "1" * 80 + "0" * 20, "1" * 40 + "0" * 60
    rows = _contrast_rows(contrasts, {"mlp": {0: good, 1: good, 2: good}, "blind": {0: bad, 1: bad, 2: bad}})
    for r in rows:
        r["device"] = "cpu:AMD EPYC x2" if (r["strategy"], r["seed"]) == ("blind", 1) else "cpu:Intel Xeon x2"
    cmp = comparisons(prepare(pd.DataFrame(rows)))
    assert cmp.iloc[0]["hardware"] == "differs in 1 of 3 seeds"
    assert "differs in 1 of 3 seeds" in comparisons_table(cmp, tmp_path)[1].read_text()
    assert "(on different CPUs in 1 of 3 seeds)" in comparison_numbers(cmp, tmp_path)[0].read_text()
    for r in rows:
        r["device"] = "cpu:Intel Xeon x2"
    same = comparisons(prepare(pd.DataFrame(rows)))
    assert same.iloc[0]["hardware"] == "same"
    assert "CPUs" not in comparison_numbers(same, tmp_path)[0].read_text()
    # one seed: the table says so in the singular
    rows[0]["device"] = "cpu:AMD EPYC x2"
    one = comparisons(prepare(pd.DataFrame([r for r in rows if r["seed"] == rows[0]["seed"]])))
    assert one.iloc[0]["hardware"] == "differs in 1 of 1 seed"
    table = comparisons_table(one, tmp_path)[1].read_text()
    assert "1 seed x " in table and "1 seeds" not in table and "(preliminary: 1 seed)" in table


def test_two_cpus_with_one_name_are_told_apart_by_their_numeric_path():
    """Two "AMD EPYC" machines of the main grid computed different numbers (the base LM's log-ppl of
    the same prose: 3.7705924 on one, 3.7706013 on the other): a pair whose rows share a device name
    but not the base LM's fingerprint, or the recorded instruction set / CPU model, ran on different
    CPUs; a part only one row records, or a fingerprint of another amount of prose, decides nothing."""
    from fusionbench.report import comparisons, prepare

    contrasts = [{"name": "mixed", "a": "mlp", "b": "blind"}]
    good, bad = "1" * 80 + "0" * 20, "1" * 40 + "0" * 60
    rows = _contrast_rows(contrasts, {"mlp": {0: good, 1: good, 2: good}, "blind": {0: bad, 1: bad, 2: bad}})

    def hardware(per_seed=None, **every_row):
        for r in rows:
            r.update({"device": "cpu:AMD EPYC x2", "base/text/austen/tokens": 20440.0,
                      "base/text/austen/log_ppl": 3.770601312148361, **every_row,
                      **(per_seed or {}).get((r["strategy"], r["seed"]), {})})
        return comparisons(prepare(pd.DataFrame(rows))).iloc[0]["hardware"]

    other_epyc = {"base/text/austen/log_ppl": 3.7705924136764617}
    assert hardware() == "same"
    assert hardware({("blind", 0): other_epyc, ("mlp", 2): other_epyc}) == "differs in 2 of 3 seeds"
    assert hardware({("blind", 0): {"device": "cpu:Intel Xeon x2"}}) == "differs in 1 of 3 seeds"
    # another amount of prose: its log-ppl is not comparable, so it decides nothing
    assert hardware({("blind", 0): {"base/text/austen/log_ppl": 3.9, "base/text/austen/tokens": 3066.0}}) == "same"
    assert hardware({("blind", 1): {"cpu_capability": "AVX2"}}) == "same"  # the other rows predate the field
    recorded = {"cpu_capability": "AVX512", "cpu_model": "AuthenticAMD 25/17/1"}
    assert hardware(**recorded) == "same"
    assert hardware({("blind", 1): {"cpu_capability": "AVX2"}}, **recorded) == "differs in 1 of 3 seeds"
    assert hardware({("mlp", 1): {"cpu_model": "AuthenticAMD 25/1/1"}}, **recorded) == "differs in 1 of 3 seeds"
    # a run that trained its first steps on another machine (resumed across sessions)
    one = json.dumps([{"from_step": 0, "device": "cpu:AMD EPYC x2", **recorded}])
    two = json.dumps([{"from_step": 0, "device": "cpu:Intel Xeon x2", "cpu_capability": "AVX512"},
                      {"from_step": 150, "device": "cpu:AMD EPYC x2", **recorded}])
    assert hardware(train_machines=one, **recorded) == "same"
    assert hardware({("blind", 2): {"train_machines": two}}, train_machines=one, **recorded) == "differs in 1 of 3 seeds"


def test_the_runs_table_numbers_the_numeric_paths_of_one_cpu_name():
    """The runs table's CPU column: the name, the instruction set where recorded, and #k only where
    one name computed different numbers (the main grid's two "AMD EPYC" models)."""
    from fusionbench.report import _cpu_cells

    epyc, xeon = "cpu:AMD EPYC x2", "cpu:Intel(R) Xeon(R) Processor x2"
    base = {"base/text/austen/tokens": 20440.0}
    rows = [{"device": xeon, **base, "base/text/austen/log_ppl": 3.7706012},
            {"device": epyc, **base, "base/text/austen/log_ppl": 3.7705924},
            {"device": epyc, **base, "base/text/austen/log_ppl": 3.7706013},
            {"device": epyc, **base, "base/text/austen/log_ppl": 3.7705924},
            {"device": epyc, "cpu_capability": "AVX512", "cpu_model": "AuthenticAMD 25/17/1"}]
    # the last row: recorded on the second machine from 812d516 on (instruction set, model and fingerprint)
    rows[-1]["base/text/austen/log_ppl"], rows[-1]["base/text/austen/tokens"] = 3.7706013, 20440.0
    assert _cpu_cells(rows) == ["Intel Xeon", "AMD EPYC #1", "AMD EPYC #2", "AMD EPYC #1", "AMD EPYC #2 AVX512"]
    assert _cpu_cells(rows[:2] + rows[3:4]) == ["Intel Xeon", "AMD EPYC", "AMD EPYC"]
    # a row with nothing to tell the two apart is not put with either; rows without a device are one group
    bare = {"device": epyc}
    assert _cpu_cells([bare] + rows[1:3]) == ["AMD EPYC #?", "AMD EPYC #1", "AMD EPYC #2"]
    assert _cpu_cells([rows[1], bare, rows[2]]) == ["AMD EPYC #1", "AMD EPYC #?", "AMD EPYC #2"]
    assert _cpu_cells([{}, {}, {"device": epyc}]) == ["not recorded", "not recorded", "AMD EPYC"]
    # a run resumed on another machine
    here = {"device": epyc, "cpu_capability": "AVX512", "cpu_model": "AuthenticAMD 25/17/1"}
    resumed = {**here, "train_machines": json.dumps([{"from_step": 0, "device": xeon, "cpu_capability": "AVX512",
                                                      "cpu_model": "GenuineIntel 6/143/8"},
                                                     {"from_step": 150, **here}])}
    assert _cpu_cells([resumed]) == ["AMD EPYC AVX512 (+1 other)"]
    assert _cpu_cells([{**here, "train_machines": json.dumps([{"from_step": 0, **here}, {"from_step": 150, **here}])}]) \
        == ["AMD EPYC AVX512"]


def test_a_verdict_on_fewer_seeds_than_the_study_plans_is_printed_as_preliminary(tmp_path):
    """One seed's interval holds item noise only, not the seed-to-seed (and CPU-to-CPU) spread, which
    for mlp was 0.025 between seeds 0 and 1, more than visual_expert - mlp at seed 0 (+0.017): the
    table, the verdict macro the abstract uses and the sentence say so until FULL_SEEDS have landed;
    the statistical verdict itself is unchanged."""
    from fusionbench.report import FULL_SEEDS, comparison_numbers, comparisons, comparisons_table, prepare

    contrasts = [{"name": "early", "a": "mlp", "b": "blind"}]
    good, bad = "1" * 80 + "0" * 20, "1" * 40 + "0" * 60
    one = comparisons(prepare(pd.DataFrame(_contrast_rows(contrasts, {"mlp": {0: good}, "blind": {0: bad}}))))
    assert one.iloc[0]["verdict"] == "supported"
    assert "| supported (preliminary: 1 seed) |" in comparisons_table(one, tmp_path)[1].read_text()
    tex = comparison_numbers(one, tmp_path)[0].read_text()
    assert "\\newcommand{\\fbCmpEarlyVerdict}{supported (preliminary: 1 seed)}" in tex
    assert "1 seed $\\times$ 100 items; preliminary: fewer than 3 seeds}" in tex
    # the abstract's macro: never a verdict without its difference and interval
    assert re.search(r"\\newcommand\{\\fbCmpEarlyBrief\}\{supported \(preliminary: 1 seed\), \$\+0\.400\$ "
                     r"\[\$\+0\.\d{3}\$, \$\+0\.\d{3}\$\]\}", tex)
    seeds = {s: good for s in range(FULL_SEEDS)}
    full = comparisons(prepare(pd.DataFrame(_contrast_rows(contrasts, {"mlp": seeds, "blind": {s: bad for s in seeds}}))))
    assert "| supported |" in comparisons_table(full, tmp_path)[1].read_text()
    tex = comparison_numbers(full, tmp_path)[0].read_text()
    assert "\\newcommand{\\fbCmpEarlyVerdict}{supported}" in tex and "preliminary" not in tex


def test_the_abstract_macro_names_a_holm_p_that_undoes_the_verdict(tmp_path):
    """Verdicts read the raw 95% interval (pre-registered); where the Holm-adjusted p over the
    contrasts is not below 0.05 (Q3 visual_expert - mlp: raw p 0.0498, Holm 0.2), the abstract's
    one-line macro says so, and says nothing where the correction keeps it."""
    from fusionbench.report import comparison_numbers, comparisons, prepare

    contrasts = [{"name": "edge", "a": "mlp", "b": "blind"}]
    good, bad = "1" * 80 + "0" * 20, "1" * 40 + "0" * 60
    cmp = comparisons(prepare(pd.DataFrame(_contrast_rows(contrasts, {"mlp": {0: good}, "blind": {0: bad}}))))
    assert cmp.iloc[0]["verdict"] == "supported" and cmp.iloc[0]["p_holm"] < 0.05
    assert "Holm" not in _macro_line(comparison_numbers(cmp, tmp_path)[0], "fbCmpEdgeBrief")
    cmp.loc[0, "p_holm"] = 0.2
    brief = _macro_line(comparison_numbers(cmp, tmp_path)[0], "fbCmpEdgeBrief")
    assert brief.startswith("\\newcommand{\\fbCmpEdgeBrief}{supported (preliminary: 1 seed), $+0.400$ [")
    assert brief.endswith("] (Holm-adjusted $p = 0.2$)}")


def _macro_line(tex: Path, name: str) -> str:
    [line] = [x for x in tex.read_text().splitlines() if x.startswith(f"\\newcommand{{\\{name}}}")]
    return line


def test_forgetting_contrasts_pair_prose_chunks_and_the_paper_macros_state_each_verdict(tmp_path):
    """Delta log-ppl and accuracy drops are compared chunk by chunk / item by item (per-chunk NLL
    after minus before: their mean is the row's value), not over 3 seed means; every contrast gets a
    \\fbCmp...Summary sentence, also before its rows exist."""
    from fusionbench.report import comparison_numbers, comparisons, item_values, prepare

    contrasts = [{"name": "ft forgets", "a": "ft", "b": "mlp", "metric": "forgetting/austen/delta_log_ppl"},
                 {"name": "ft drops", "a": "ft", "b": "mlp", "metric": "forgetting/t1/acc_drop"},
                 {"name": "pending", "a": "lora", "b": "mlp", "metric": "forgetting/austen/delta_log_ppl"}]
    rng = np.random.default_rng(0)
    base = rng.uniform(3.0, 4.0, 40)
    rows = _contrast_rows(contrasts, {"ft": {0: "1" * 10, 1: "1" * 10}, "mlp": {0: "1" * 10, 1: "1" * 10}})
    for r in rows:
        shift = 0.05 + 0.02 * rng.standard_normal(40) if r["strategy"] == "ft" else np.zeros(40)
        r["base/text/austen/chunk_nll"] = json.dumps(list(base))
        r["text/austen/tokens"] = 40 * 511  # whole chunks of equal length
        r["text/austen/chunk_nll"] = json.dumps(list(base + shift))
        r["forgetting/austen/delta_log_ppl"] = float(np.mean(base + shift) - np.mean(base))
        r["base/text/t1/items"] = "1" * 30
        r["text/t1/items"] = ("0" * 10 + "1" * 20) if r["strategy"] == "ft" else "1" * 30
        r["forgetting/t1/acc_drop"] = 1 / 3 if r["strategy"] == "ft" else 0.0
    for r in rows:
        for metric in ("forgetting/austen/delta_log_ppl", "forgetting/t1/acc_drop"):
            assert item_values(r, metric).mean() == pytest.approx(r[metric])
    # chunks of unequal length: their plain mean is not the per-token value, so no per-chunk pairing
    assert item_values({**rows[0], "text/austen/tokens": 40 * 511 - 3}, "forgetting/austen/delta_log_ppl") is None
    cmp = comparisons(prepare(pd.DataFrame(rows))).set_index("contrast")
    assert cmp.loc["ft forgets", "items"] == 40 and cmp.loc["ft forgets", "verdict"] == "supported"
    assert 0.03 < cmp.loc["ft forgets", "ci_lo"] < cmp.loc["ft forgets", "diff"] < cmp.loc["ft forgets", "ci_hi"] < 0.07
    assert cmp.loc["ft drops", "items"] == 30 and cmp.loc["ft drops", "diff"] == pytest.approx(1 / 3)
    tex = comparison_numbers(cmp.reset_index(), tmp_path)[0].read_text()
    assert re.search(r"\\newcommand\{\\fbCmpFtForgetsSummary\}\{\\emph\{supported\}: \$\+0\.0\d\d\$ \[", tex)
    assert "2 seeds $\\times$ 40 items" in tex
    assert "\\newcommand{\\fbCmpPendingSummary}{no verdict yet (no rows of lora)}" in tex
    assert "\\newcommand{\\fbCmpPendingBrief}{no verdict yet}" in tex


def test_a_contrast_side_may_come_from_another_table_scored_on_the_same_items():
    """Compute-matched runs are compared with the main study's rows (b_table: main); rows of that
    table scored on other items (an older protocol) never enter the pairing."""
    from fusionbench.report import comparisons, prepare

    good, bad = "1" * 80 + "0" * 20, "1" * 40 + "0" * 60
    cm = _contrast_rows([{"name": "cm", "a": "ve", "b": "mlp", "b_table": "main"}], {"ve": {0: good, 1: good}})
    for r in cm:
        r["table"] = "cm"
    main_rows = _contrast_rows([], {"mlp": {0: bad, 1: bad}})
    old = _contrast_rows([], {"mlp": {0: good}})
    old[0].update({"config_hash": "old0", "point_hash": "oldmlp", "git_sha": "0000000", "mm/choice/test_hash": "t0"})
    df = prepare(pd.DataFrame(cm + main_rows + old))
    r = comparisons(df, "cm").iloc[0]
    assert r["verdict"] == "supported" and r["diff"] == pytest.approx(0.4) and r["seeds"] == 2
    assert r["b"] == "mlp (main)"
    assert comparisons(df, "main").empty  # main declares none
    lone = prepare(pd.DataFrame(cm))
    assert comparisons(lone, "cm").iloc[0]["why"] == "no rows of mlp (main)"
    elsewhere = prepare(pd.DataFrame(cm + old))  # main has mlp rows, but only on other items
    assert comparisons(elsewhere, "cm").iloc[0]["why"] == "no rows of mlp (main) on the same test items"


def test_contrasts_are_validated_before_compute(tmp_path, capsys):
    assert _run(tmp_path, "contrasts=[{a: mlp}]") == 2
    assert "contrasts[0]" in capsys.readouterr().err
    assert _run(tmp_path, "contrasts=[{a: mlp, b: linear, expect: bigger}]") == 2
    assert _run(tmp_path, "contrasts=[{a: mlp, b: linear, a_table: x, b_table: y}]") == 2
    assert "expect" in capsys.readouterr().err
    # the tiny test set (24 items, 8 spatial) cannot detect 5 points; a question type left out has none
    assert _run(tmp_path, "contrasts=[{a: mlp, b: linear, metric: mm/choice/spatial/acc, mde: 0.05}]") == 2
    err = capsys.readouterr().err
    assert "needs >= 942 paired test items" in err and "gives 8" in err
    assert _run(tmp_path, "data.qtypes=[count]", "contrasts=[{a: mlp, b: linear, metric: mm/choice/spatial/acc}]") == 2
    assert "leaves them out" in capsys.readouterr().err
    assert _run(tmp_path, "contrasts=[{a: mlp, b: linear, metric: mm/choice/colour/acc}]") == 2
    assert "question type 'colour'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_items_needed_for_a_paired_accuracy_difference():
    from fusionbench.stats import MDE_Z, items_needed

    # (2.8016 / 0.05)^2 * 0.3 = 941.9 -> 942 (seeds see the same items: no seed term lowers it)
    assert items_needed(0.05) == 942
    assert items_needed(0.1, discordance=1.0) == int(np.ceil((MDE_Z / 0.1) ** 2))
    with pytest.raises(ValueError):
        items_needed(0.0)


def test_results_reader_keeps_per_item_strings_and_exact_floats(tmp_path):
    """pd.read_json turned "0110..." into a float and read 0.4375 as 0.43749999...; rows are read
    with json: strings stay strings, floats are exact, integral columns are integers."""
    from fusionbench.results import append_row, read_results

    path = tmp_path / "r.jsonl"
    append_row(path, {"mm/choice/items": "0011", "acc": 0.4375, "n": 4.0, "maybe": None})
    append_row(path, {"mm/choice/items": "1100", "acc": 0.5, "n": 5.0, "maybe": 1.0})
    df = read_results(path)
    assert list(df["mm/choice/items"]) == ["0011", "1100"]
    assert df["acc"].iloc[0] == 0.4375 and f"{df['acc'].mean():.4f}" == "0.4688"
    assert df["n"].dtype == "int64" and df["maybe"].isna().iloc[0]


def test_a_selection_table_marks_each_strategys_best_value():
    """Val-only tables (the learning-rate sweep) say which point of each strategy the study takes."""
    from fusionbench.report import table_frame

    s = pd.DataFrame({"label": ["mlp lr=1", "mlp lr=2", "ve lr=1", "ve lr=2"], "strategy": ["mlp", "mlp", "ve", "ve"],
                      "val/choice_acc_final": [0.4, 0.5, 0.45, np.nan], "seeds": [1, 1, 1, 1]})
    t = table_frame(s, latex=False)
    assert list(t["best of its strategy"]) == ["", "yes", "yes", ""]
    # a two-stage point (the co-upcycled MoE) is chosen by its last stage, never by its dense stage
    moe = pd.DataFrame({"label": ["moe lr=1 [dense]", "moe lr=1", "moe lr=2 [dense]", "moe lr=2"], "strategy": "moe",
                        "final": [False, True, False, True], "val/choice_acc_final": [0.6, 0.4, 0.6, 0.5], "seeds": 1})
    assert list(table_frame(moe, latex=False)["best of its strategy"]) == ["", "", "", "yes"]


def test_a_learning_rate_sweep_gets_its_curves_with_wilson_intervals(tmp_path):
    """A val-only table with several rates per strategy is drawn as val accuracy against the rate
    (fig_lr_sweep), with 95% Wilson intervals over the val items; a table of single points is not."""
    from scipy.stats import binomtest

    from fusionbench.report import _is_lr_selection, _wilson, fig_table

    low, high = _wilson(pd.Series([0.3, 0.5]), 400)
    for p, lo, hi in zip([0.3, 0.5], low, high):
        ref = binomtest(round(p * 400), 400).proportion_ci(method="wilson")
        assert p - lo == pytest.approx(ref.low, abs=1e-9) and p + hi == pytest.approx(ref.high, abs=1e-9)
    assert not _wilson(pd.Series([0.3]), None)[0].any()
    s = pd.DataFrame({"label": ["mlp lr=1e-3", "mlp lr=4e-3", "ve lr=1e-3"], "strategy": ["mlp", "mlp", "ve"],
                      "lr": [1e-3, 4e-3, 1e-3], "final": True, "val/choice_acc_final": [0.4, 0.5, 0.45],
                      "val/chance_final": 0.3, "seeds": [1, 1, 1]})
    assert _is_lr_selection(s)
    assert not _is_lr_selection(s.iloc[[0, 2]])  # one rate per strategy: not a sweep
    assert not _is_lr_selection(s.assign(**{"mm/choice/acc": 0.5}))  # scored on test: a study table
    written = fig_table(s, tmp_path, "ablation_lr", val_items=400)
    assert [p.name for p in written] == ["ablation_lr.pdf", "ablation_lr.png"] and all(p.stat().st_size for p in written)


def test_convergence_table_reads_each_points_own_val_curve(tmp_path):
    """convergence.md: per point and stage (the MoE's dense stage on its own line), the val curve
    averaged over seeds: end and best accuracy, changes over the last third, and how many seeds the
    stated loss criterion calls converged; the val_curves figure draws the same curves."""
    from fusionbench.report import convergence_table, fig_val_curves

    def curve(accs, losses):
        return json.dumps([{"step": 100 * (i + 1), "val/choice_acc": a, "val/lm_loss": l, "val/chance": 0.3}
                           for i, (a, l) in enumerate(zip(accs, losses))])

    rows = pd.DataFrame({
        "table": "main", "origin": "", "point_hash": ["a", "a", "b"], "stage": ["dense", "dense", "main"],
        "source": "run", "label": ["moe [dense]", "moe [dense]", "mlp"], "strategy": ["moe", "moe", "mlp"],
        "final": [False, False, True], "frozen_text": True, "seed": [0, 1, 0],
        "val_curve": [curve([0.3, 0.4, 0.5, 0.5, 0.52, 0.5], [1.0, 0.8, 0.7, 0.69, 0.69, 0.689]),
                      curve([0.3, 0.4, 0.5, 0.5, 0.50, 0.5], [1.0, 0.8, 0.7, 0.60, 0.59, 0.58]),
                      curve([0.3, 0.35, 0.4], [1.0, 0.9, 0.8])],
        "converged": [True, False, False]})
    s = summarise(rows)
    written = convergence_table(s, tmp_path)
    md = (tmp_path / "convergence.md").read_text().splitlines()
    assert [p.name for p in written] == ["convergence.tex", "convergence.md"] and len(md) == 4
    head = [c.strip() for c in md[0].strip("|").split("|")]
    dense = dict(zip(head, [c.strip() for c in md[2].strip("|").split("|")]))
    mlp = dict(zip(head, [c.strip() for c in md[3].strip("|").split("|")]))
    # seeds averaged: accuracies 0.3 0.4 0.5 0.5 0.51 0.5; the last third is steps 400-600
    assert dense["point"] == "moe [dense]" and dense["val acc (end)"] == "0.500" and dense["best (step)"] == "0.510 (500)"
    assert dense["acc change, last third"] == "+0.000" and dense["converged (seeds)"] == "1 of 2"
    assert dense["loss change, last third"] == f"{(0.6345 - 0.645) / 0.645:+.1%}"
    assert mlp["acc change, last third"] == "+0.050" and mlp["converged (seeds)"] == "0 of 1"
    figs = fig_val_curves(s, tmp_path)
    assert [p.name for p in figs] == ["val_curves.pdf", "val_curves.png"] and all(p.stat().st_size for p in figs)
    assert convergence_table(s.drop(columns="val_curve"), tmp_path / "none") == []


def test_the_runs_table_lists_every_seed_as_it_landed_with_its_controls_and_provenance(tmp_path):
    """main_runs.md: one line per training row, grouped by point in landing order and by seed
    within it, with commit, short CPU name, resume step, accuracy beside shuffled images and chance,
    the image gain's interval, spatial (shuffled), convergence and wall minutes; missing values read
    "--" instead of being invented; eval rows and other tables are left out."""
    from fusionbench.report import runs_table

    base = {"table": "main", "source": "run", "stage": "main", "git_sha": "abcdef123456", "train_s": 1920.0,
            "eval_s": 1470.0, "mm/choice/chance": 0.294, "converged": False}
    rows = pd.DataFrame([
        {**base, "label": "mlp", "seed": 1, "device": "cpu:AMD EPYC x2", "resumed_from_step": 450.0,
         "mm/choice/acc": 0.576, "mm/choice/acc_shuffled": 0.291, "mm/choice/image_gain": 0.285,
         "mm/choice/image_gain_ci_lo": 0.266, "mm/choice/image_gain_ci_hi": 0.305,
         "mm/choice/spatial/acc": 0.524, "mm/choice/spatial/acc_shuffled": 0.383},
        {**base, "label": "blind (mlp)", "seed": 0, "device": "cpu:Intel(R) Xeon(R) Processor x2",
         "mm/choice/acc": 0.306, "converged": True},
        {**base, "label": "mlp", "seed": 0, "device": None, "train_s": None},
        {**base, "label": "mlp", "seed": 2, "source": "eval", "mm/choice/acc": 0.9},
        {**base, "table": "pilot", "label": "mlp", "seed": 3, "mm/choice/acc": 0.9},
    ])
    assert [p.name for p in runs_table(rows, tmp_path, "main")] == ["main_runs.tex", "main_runs.md"]
    md = (tmp_path / "main_runs.md").read_text().splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    lines = [dict(zip(head, [c.strip() for c in line.strip("|").split("|")])) for line in md[2:]]
    assert [(r["point"], r["seed"]) for r in lines] == [("mlp", "0"), ("mlp", "1"), ("blind (mlp)", "0")]
    mlp0, mlp1, blind = lines
    assert mlp1 == {"point": "mlp", "seed": "1", "commit": "abcdef1", "CPU": "AMD EPYC", "resumed from step": "450",
                    "choice acc": "0.576", "shuffled images": "0.291", "chance": "0.294",
                    "image gain [95% CI]": "+0.285 [+0.266, +0.305]", "spatial (shuffled)": "0.524 (0.383)",
                    "converged": "no", "train min": "32", "eval min": "24"}
    assert blind["CPU"] == "Intel Xeon" and blind["image gain [95% CI]"] == "--" and blind["converged"] == "yes"
    assert mlp0["CPU"] == "not recorded" and mlp0["train min"] == "--" and mlp0["choice acc"] == "--"
    assert "\\begin{tabular}" in (tmp_path / "main_runs.tex").read_text()
    assert runs_table(rows, tmp_path / "none", "quickstart") == []
