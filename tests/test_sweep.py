"""``fusionbench sweep``: skips finished points, goes on past a failed one, resumes a killed sweep
from its Lightning checkpoints without redoing finished points, and runs a point with Lightning's
``ddp`` strategy on 2 CPU processes (rank 0 alone writes the rows). Also: every config under
``experiments/`` expands into valid points, and compute-matched step counts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fusionbench.sweep as sweep_mod
from fusionbench.cli import main
from fusionbench.config import grid_points, load_config
from fusionbench.results import read_results
from tests.helpers import ROOT, TINY, tiny_cfg

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _args(tmp_path, *overrides):
    return [str(TINY), f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'res.jsonl'}", *overrides]


def test_sweep_skips_finished_points_and_goes_on_past_a_failure(tmp_path, monkeypatch, capsys):
    real = sweep_mod.run_point

    def flaky(point, **kw):
        if point.fusion.name == "mlp" and point.seed == 1:
            raise RuntimeError("simulated crash in one point")
        return real(point, **kw)

    monkeypatch.setattr(sweep_mod, "run_point", flaky)
    args = ["sweep", *_args(tmp_path, "grid={fusion: [linear, mlp]}", "seeds=[0,1]")]
    assert main(args) == 1  # one point failed: non-zero exit, the others ran
    df = read_results(tmp_path / "res.jsonl")
    assert sorted(zip(df.strategy, df.seed)) == [("linear", 0), ("linear", 1), ("mlp", 0)]
    status = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "sweep.jsonl").read_text().splitlines()]
    failed = [s for s in status if s["status"] == "failed"]
    assert len(failed) == 1 and "simulated crash" in failed[0]["error"] and "Traceback" in failed[0]["traceback"]
    assert failed[0]["label"] == {"fusion": "mlp"} and failed[0]["seed"] == 1

    # second run: the three finished points are skipped (no new rows for them), the failed one runs
    monkeypatch.setattr(sweep_mod, "run_point", real)
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") >= 3 and "1 run, 3 skipped, 0 failed" in err
    df = read_results(tmp_path / "res.jsonl")
    assert len(df) == 4 and df.config_hash.is_unique
    assert set(df.grid_point) == {'{"fusion": "linear"}', '{"fusion": "mlp"}'}
    # seeds of one point share a point hash; different points do not
    assert df.groupby("point_hash").seed.nunique().tolist() == [2, 2]


def test_dry_run_lists_points_and_their_state(tmp_path, capsys):
    assert main(["run", *_args(tmp_path, "fusion=linear")]) == 0
    capsys.readouterr()
    assert main(["sweep", "--dry-run", *_args(tmp_path, "grid={fusion: [linear, mlp]}")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("done") and lines[1].endswith("todo")
    # --only: the points with that label, nothing else (a label no point has: one clear error)
    assert main(["sweep", "--dry-run", "--only", "mlp", *_args(tmp_path, "grid={fusion: [linear, mlp]}")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and '"mlp"' in lines[0] and lines[0].endswith("todo")
    # an override after an option is still an override (seeds: two lines); a stray word is an error
    cfg, *overrides = _args(tmp_path, "grid={fusion: [linear, mlp]}")
    assert main(["sweep", "--dry-run", cfg, "--only", "mlp", *overrides, "seeds=[0,1]"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all('"mlp"' in line for line in lines)
    with pytest.raises(SystemExit):
        main(["sweep", "--dry-run", cfg, "--only", "mlp", *overrides, "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    assert main(["sweep", "--only", "mpl", *_args(tmp_path, "grid={fusion: [linear, mlp]}")]) == 2
    assert "no grid point has that label" in capsys.readouterr().err


def test_dry_run_says_where_an_unfinished_point_resumes(tmp_path, capsys):
    """A multi-day sweep's unfinished point: --dry-run names the step its newest checkpoint holds
    (the sweep continues there), or that only its evaluation is left."""
    import torch

    from fusionbench.runner import run_dir_of

    args = _args(tmp_path, "grid={fusion: [linear, mlp]}", "trainer.max_steps=6")
    points = [p for _, p in grid_points(load_config(args[0], args[1:]))]
    for point, step in zip(points, (3, 6)):
        ckpt = run_dir_of(point) / "checkpoints" / "main" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        torch.save({"global_step": step}, ckpt)
    assert main(["sweep", "--dry-run", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("todo (main: checkpoint at step 3 of 6; resumes there)")
    assert lines[1].endswith("todo (main: trained, 6 steps; evaluation left)")
    (run_dir_of(points[0]) / "checkpoints" / "main" / "last.ckpt").write_bytes(b"cut short by a kill")
    assert main(["sweep", "--dry-run", *args]) == 0
    assert capsys.readouterr().out.strip().splitlines()[0].endswith("todo")


def _wait_for(predicate, proc, timeout=240.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_killed_sweep_resumes_without_redoing_finished_points(tmp_path):
    """A real kill (SIGKILL) in the middle of the second point's training; the restarted sweep skips
    the first point, continues the second from its newest checkpoint and finishes."""
    args = _args(tmp_path, "fusion=linear", "seeds=[0,1]", "trainer.max_steps=300",
                 "trainer.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=1000")
    cmd = [sys.executable, "-m", "fusionbench.cli", "sweep", *args]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    runs = tmp_path / "runs" / "tiny"
    second = lambda: next(iter(runs.glob("linear-*-s1/checkpoints/main/last.ckpt")), None)  # noqa: E731
    try:
        assert _wait_for(lambda: (tmp_path / "res.jsonl").exists() and second() is not None, proc), \
            (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it was killed, not finished
    log.close()
    before = read_results(tmp_path / "res.jsonl")
    assert list(before.seed) == [0]  # the first point finished, the second had not
    first_row = (tmp_path / "res.jsonl").read_text()

    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 run, 1 skipped, 0 failed" in out.stderr
    assert "resuming from step" in out.stderr
    after = read_results(tmp_path / "res.jsonl")
    assert list(after.seed) == [0, 1] and after.config_hash.is_unique
    assert (tmp_path / "res.jsonl").read_text().startswith(first_row)  # finished row untouched
    resumed = after.iloc[1]
    assert resumed["resumed_from_step"] >= 10 and resumed["steps"] == 300
    # the restarted process trained only the remaining steps of the second point
    metrics = (second().parent.parent.parent / "logs" / "main" / "metrics.csv")
    assert metrics.exists()


def test_ddp_with_two_cpu_processes(tmp_path):
    """``trainer.strategy: ddp`` with 2 CPU processes: both ranks train each point (Lightning
    launches the second process by re-running the command), rank 0 alone evaluates and writes."""
    cmd = [sys.executable, "-m", "fusionbench.cli", "sweep",
           *_args(tmp_path, "grid={fusion: [linear, mlp]}", "trainer.strategy=ddp", "trainer.devices=2",
                  "trainer.accelerator=cpu")]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr + out.stdout
    df = read_results(tmp_path / "res.jsonl")
    assert sorted(df.strategy) == ["linear", "mlp"]  # one row per point, not one per rank
    for run_dir in df.run_dir:
        assert (Path(run_dir) / "checkpoints" / "main" / "last.ckpt").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_config_expands_into_valid_points(path):
    cfg = load_config(path)
    points = grid_points(cfg)
    assert points
    hashes = {json.dumps(label, sort_keys=True, default=str) + str(p.seed) for label, p in points}
    assert len(hashes) == len(points)  # distinct labels: the report can tell the points apart
    if path.name != "base.yaml":
        assert path.read_text().startswith("# Question"), f"{path}: its first comment says which question it answers"


@pytest.mark.parametrize("other, differs", [
    ("ablations/compute_matched.yaml", {"name", "results_file", "contrasts", "trainer.flops_budget"}),
    ("main_gpu.yaml", None)])
def test_derived_studies_run_the_main_study_points(other, differs):
    """compute_matched.yaml runs main.yaml's points with only a FLOPs budget added (its contrasts
    compare with main's own mlp rows), and main_gpu.yaml has main's variants, in main's order: a
    learning rate or option changed in main.yaml and not there fails here."""
    from omegaconf import OmegaConf

    def flat(cfg, prefix=""):
        out = {}
        for k, v in (cfg.items() if isinstance(cfg, dict) else []):
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("fusion",) else {f"{prefix}{k}": v})
        return out

    main = {(json.dumps(label), p.seed): p for label, p in grid_points(load_config(ROOT / "experiments" / "main.yaml"))}
    points = grid_points(load_config(ROOT / "experiments" / other))
    if differs is None:  # the GPU study: same variants (same options, same learning rate), same order
        key = lambda p: (p.fusion, p.trainer.lr, p.data.images, [(s.name, s.trainer.get("lr")) for s in p.stages])  # noqa: E731
        assert list(dict.fromkeys(json.dumps(label) for label, _ in points)) == list(dict.fromkeys(k for k, _ in main))
        for label, p in points:
            ref = main[(json.dumps(label), 0)]
            assert str(key(p)) == str(key(ref)), label
        return
    for label, p in points:
        ref = main[(json.dumps(label), p.seed)]
        a, b = flat(OmegaConf.to_container(p)), flat(OmegaConf.to_container(ref))
        assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= differs, label


def test_variant_axis_applies_a_bundle_of_keys():
    cfg = tiny_cfg("grid={variant: [{fusion: linear}, {label: two-stage, fusion: {name: moe, num_experts: 2},"
                   " stages: [{name: dense}, {name: upcycle, trainer: {max_steps: 2}}]}, {fusion: mlp, trainer.lr: 0.5}]}")
    points = grid_points(cfg)
    assert [label["variant"] for label, _ in points] == ["linear", "two-stage", "mlp"]
    assert points[1][1].fusion.num_experts == 2 and [s.name for s in points[1][1].stages] == ["dense", "upcycle"]
    assert points[2][1].trainer.lr == 0.5 and points[0][1].trainer.lr == cfg.trainer.lr
    assert not points[0][1].stages


def test_compute_matched_steps_follow_the_flops_budget(tmp_path):
    from fusionbench.evaluation.efficiency import train_step_flops
    from fusionbench.runner import Prepared, steps_for_budget

    prep = Prepared(tiny_cfg("fusion=mlp", tmp_path=tmp_path), text_suite=False)
    batch = prep.data.collator()([prep.data.train_ds[i] for i in range(8)])
    per_step = train_step_flops(prep.model, batch)
    assert per_step > 0
    budget = load_config(TINY, [f"trainer.flops_budget={per_step * 7.5}"]).trainer
    steps, counted = steps_for_budget(prep.model, prep.data, budget)
    assert counted == per_step and steps == 7
    assert main(["run", *_args(tmp_path, "fusion=linear", f"trainer.flops_budget={per_step * 5}")]) == 0
    row = read_results(tmp_path / "res.jsonl").iloc[0]
    assert row["flops_budget"] == per_step * 5 and row["steps"] >= 5  # linear's step is cheaper than mlp's
    assert row["steps"] == int(per_step * 5 // row["flops_per_train_step"])


def test_gpu_study_script_runs_its_config_at_tiny_scale_on_cpu(tmp_path):
    """scripts/study_gpu.sh (make study-gpu) on experiments/main_gpu.yaml, shrunk to the tiny tier and
    forced onto the CPU: the same sweep -> efficiency (skipped without CUDA) -> report path, with the
    config's bf16 autocast; every point writes a row that records it."""
    from helpers import ROOT

    from fusionbench.results import read_results

    res, paper = tmp_path / "results", tmp_path / "paper"
    tiny = ["lm.source=tiny", "vision.source=tiny_cnn", "vision.image_size=32", "vision.depth=3", "vision.width=32",
            "vision.pool_tokens=0", "data.train_size=32", "data.val_size=16", "data.test_size=24", "data.image_size=32",
            "trainer.warmup_steps=0", "trainer.batch_size=8", "trainer.max_length=256",
            "trainer.accelerator=cpu", "trainer.compile=false",
            "trainer.val_every_n_steps=0", "trainer.checkpoint_every_n_steps=0", "eval.batch_size=8",
            "eval.val_items=8", "eval.mm_items=8", "eval.text_suite=false", "eval.probes=false", "seeds=[0]",
            # the steps in the grid: an override of trainer.max_steps is refused where a variant's stages set theirs
            "contrasts=[]", "grid={variant: [{fusion: {name: mlp, hidden_size: 0}, trainer.max_steps: 2}, {label: moe, fusion: {name: moe, "
            "num_experts: 2, top_k: 1}, stages: [{name: dense, trainer: {max_steps: 1}}, {name: upcycle, "
            "trainer: {max_steps: 1}}]}]}", f"output_dir={tmp_path / 'runs'}", f"results_file={res / 'main_gpu.jsonl'}"]
    env = {**os.environ, "FB": f"{sys.executable} -m fusionbench.cli", "PY": sys.executable,
           "REPORT_ARGS": f"--results {res} --paper {paper}", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "study_gpu.sh"), *tiny], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device; skipping" in proc.stderr
    rows = read_results(res / "main_gpu.jsonl")
    assert list(rows["stage"]) == ["main", "dense", "upcycle"]
    assert all(json.loads(c)["trainer"]["precision"] == "bf16-mixed" for c in rows["config"])
    assert (paper / "tables" / "main.md").exists()


def test_main_study_trains_each_strategy_at_its_lr_sweeps_winner():
    """The learning rates in experiments/main.yaml are the ones experiments/ablations/lr.yaml chose:
    for every strategy whose sweep has a row for each of its values and whose best value (val choice
    accuracy, last stage) lies inside its range (the edge rule is satisfied), main.yaml trains that
    strategy (its last stage: the co-upcycled MoE's upcycle stage) at that value. A winner that lands
    and is not copied into main.yaml, or a placeholder left in place, fails here before a grid point
    runs at it. Strategies whose sweep is unfinished are not checked yet (listed in the message)."""
    sweep = grid_points(load_config(ROOT / "experiments" / "ablations" / "lr.yaml"))
    rows = read_results(ROOT / "results" / "ablation_lr.jsonl")
    last_stage = lambda p: p.stages[-1].name if p.stages else "main"  # noqa: E731
    stage_lr = lambda p: (p.stages[-1].trainer.get("lr") if p.stages else None) or p.trainer.lr  # noqa: E731
    acc = {}
    for label, p in sweep:
        hit = rows[(rows.grid_point == json.dumps(label)) & (rows.stage == last_stage(p))]
        acc.setdefault(p.fusion.name, []).append((float(stage_lr(p)), float(hit["val/choice_acc_final"].iloc[-1]) if len(hit) else None))
    main_lr = {p.fusion.name: float(stage_lr(p)) for label, p in grid_points(load_config(ROOT / "experiments" / "main.yaml"))
               if p.seed == 0 and p.data.images == "real"}
    checked, unfinished = [], []
    for strategy, values in acc.items():
        if any(a is None for _, a in values):
            unfinished.append(strategy)
            continue
        best = max(a for _, a in values)
        winners = [lr for lr, a in values if a == best]
        lrs = sorted(lr for lr, _ in values)
        if all(w in (lrs[0], lrs[-1]) for w in winners):
            unfinished.append(strategy)  # at the edge of its range: the edge rule adds the next value
            continue
        assert main_lr[strategy] in winners, (strategy, main_lr[strategy], values)
        checked.append(strategy)
    assert {"mlp", "visual_expert", "flamingo"} <= set(checked), (checked, unfinished)


def test_the_cpu_study_queue_runs_every_question_strategy_first_and_names_only_real_points(tmp_path):
    """scripts/study_cpu.sh (the background queue of the CPU study): every label it passes to
    ``--only`` is a point of experiments/main.yaml (a renamed variant fails here, not days into a
    sweep), every side of every pre-registered question is in MAIN_ORDER (all seeds, first), and each
    of those has its own learning rate; so has each of the other strategies it runs (REST_ORDER: seed 0
    only, before the rest of the LR sweep), each of which has exactly its check against the blind
    baseline (printed preliminary) and no other contrast; with DRY_RUN=1 it starts nothing (checked with a stub python that records calls)."""
    import re

    from omegaconf import OmegaConf

    from fusionbench.sweep import select

    script = (ROOT / "scripts" / "study_cpu.sh").read_text()
    order = re.findall(r'"([^"]+)"', re.search(r"^MAIN_ORDER=\((.*)\)$", script, re.M).group(1))
    cfg = load_config(ROOT / "experiments" / "main.yaml")
    points = grid_points(cfg)
    rest = re.findall(r'"([^"]+)"', re.search(r"^REST_ORDER=\((.*)\)$", script, re.M).group(1))
    for label in order + rest:
        assert select(points, [label]), label
    assert not set(rest) & set(order)
    # every side of every contrast runs its 3 seeds, except that a REST_ORDER strategy (seed 0 only)
    # may be checked against the blind baseline: that check is printed preliminary
    for c in cfg.contrasts:
        if c["a"] in rest:
            assert c["b"] == "blind (mlp)" and c.get("metric", "mm/choice/acc") == "mm/choice/acc", c
        else:
            assert c["a"] in order, c
        assert c["b"] in order, c
    # and each REST_ORDER strategy has that check: the strategies waiting for a rate have none yet, so
    # no check without rows enters the Holm family before the strategy's own row lands
    checked = {c["a"] for c in cfg.contrasts if c["b"] == "blind (mlp)"}
    assert set(rest) <= checked, sorted(set(rest) - checked)
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "experiments" / "main.yaml").grid.variant)
    named = {v.get("label", v["fusion"]["name"]): v for v in raw}
    assert all("trainer.lr" in named[label] for label in order + rest), \
        [x for x in order + rest if "trainer.lr" not in named[x]]
    # the queue itself: one sweep per MAIN_ORDER label, then compute_matched.yaml (the contrasts'
    # strategies), then one per REST_ORDER label, then lr.yaml (the other strategies'), all dry runs
    stub = tmp_path / "py"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    stub.chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "study_cpu.sh")], env={**ENV, "PY": str(stub), "DRY_RUN": "1"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == len(order) + len(rest) + 2 and all(c.endswith("--dry-run") for c in calls)
    assert calls[len(order)].startswith("-m fusionbench sweep experiments/ablations/compute_matched.yaml")
    # the other strategies with their rate: seed 0 only, before the rest of the LR sweep
    assert calls[len(order) + 1:-1] == [f"-m fusionbench sweep experiments/main.yaml --only {v} seeds=[0] --dry-run"
                                        for v in rest]
    assert calls[-1].startswith("-m fusionbench sweep experiments/ablations/lr.yaml")


def test_the_cpu_study_queue_moves_another_cpus_base_scores_aside(tmp_path):
    """The worktree's code may key the base LM's cached text scores by the CPU's name only, and two
    "AMD EPYC" models compute different numbers: unless the cache records this machine's CPU identity
    (none recorded, or another one), the queue moves text_base aside before any sweep (the next point
    rescores the base); on the recorded CPU it keeps it. Checked with a stub python that answers the
    identity query."""
    cache = tmp_path / "cache"
    (cache / "text_base").mkdir(parents=True)
    (cache / "text_base" / "abc.json").write_text("{}")
    stub = tmp_path / "py"
    stub.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then echo \"$STUB_CPU\"; exit 0; fi\n"
                    f"echo \"$@\" >> {tmp_path / 'calls'}\n")
    stub.chmod(0o755)

    env = {k: v for k, v in ENV.items() if k not in ("WORKTREE", "DRY_RUN", "RUNS_DIR")}

    def queue(cpu):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "study_cpu.sh")],
                           env={**env, "PY": str(stub), "FUSIONBENCH_CACHE": str(cache), "STUB_CPU": cpu},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    # no record of the CPU that computed them: moved aside, this CPU recorded
    assert "(no record): moved them to" in queue("AVX512 25/17")
    assert not (cache / "text_base").exists() and len(list(cache.glob("text_base.other-cpu.*/abc.json"))) == 1
    assert (cache / "cpu_identity").read_text().strip() == "AVX512 25/17"
    sweeps = len((tmp_path / "calls").read_text().splitlines())
    (cache / "text_base").mkdir()
    (cache / "text_base" / "def.json").write_text("{}")
    assert "moved" not in queue("AVX512 25/17")  # the same CPU: kept
    assert (cache / "text_base" / "def.json").exists()
    out = queue("AVX2 25/1")
    assert "not recorded as the one the cached base LM scores came from (AVX512 25/17)" in out
    assert not (cache / "text_base").exists() and len(list(cache.glob("text_base.other-cpu.*/def.json"))) == 1
    assert (cache / "cpu_identity").read_text().strip() == "AVX2 25/1"
    assert len((tmp_path / "calls").read_text().splitlines()) == 3 * sweeps > 0  # every sweep ran, each time


#: main_gpu.yaml's points at the tiny tier, forced onto the CPU (the GPU scripts' tests)
GPU_CONFIG_ON_TINY_CPU = ["lm.source=tiny", "vision.source=tiny_cnn", "vision.image_size=32", "vision.depth=3",
                          "vision.width=32", "vision.pool_tokens=0", "data.image_size=32", "trainer.batch_size=8",
                          "trainer.max_length=256", "trainer.accelerator=cpu", "trainer.compile=false",
                          "eval.batch_size=8"]


def test_gpu_check_script_runs_the_gpu_configs_paths_shrunk(tmp_path):
    """scripts/gpu_check.sh (a GPU session's first command) on experiments/main_gpu.yaml, forced onto
    the CPU at the tiny tier: the shrunk point trains, validates with its controls, scores the
    forgetting curve, evaluates and writes one row into the scratch folder, not results/."""
    from helpers import ROOT

    from fusionbench.results import read_results

    tiny = GPU_CONFIG_ON_TINY_CPU
    env = {**os.environ, "FB": f"{sys.executable} -m fusionbench.cli", "CHECK_DIR": str(tmp_path / "check"),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *tiny], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpu_check: passed" in proc.stderr and "gpu_check: trained on cpu:" in proc.stderr
    row = read_results(tmp_path / "check" / "check.jsonl").iloc[0]
    config = row["config"] if isinstance(row["config"], dict) else json.loads(row["config"])
    assert row["steps"] == 20 and config["trainer"]["precision"] == "bf16-mixed"  # main_gpu's own
    assert [p["step"] for p in json.loads(row["val_curve"])] == [10, 20]
    assert "val/acc_shuffled" in json.loads(row["val_curve"])[-1]  # the image control, during training
    assert [p["step"] for p in json.loads(row["curve"])] == [0, 10, 20]  # the forgetting curve


# The lease tests test the script, not the numbers: its two processes run side by side with one thread
# each (two cores, no oversubscription), in float32, not main_gpu's bf16, which a CPU without
# AVX512-BF16 emulates tens of times slower, and without the text suite and probes (the check's own
# test above runs them). With two threads each, bf16, text suite and probes, a CI machine (its CPU not recorded)
# took 102 s for the 4 steps this one trains in 6 s and ran past the 840-s deadline.
LEASE_ON_CPU = {"OMP_NUM_THREADS": "1"}
LEASE_LIGHT = ["trainer.precision=32-true", "eval.text_suite=false", "eval.probes=false"]
GPU_CHECK_SIZES = ["data.train_size=640", "data.val_size=48", "data.test_size=240", "eval.val_items=24", "eval.mm_items=8",
                   "eval.text.n_per_task=8", "eval.text.ppl_chunks=2", "eval.probe_train=32", "eval.probe_test=16"]


def test_gpu_lease_runs_the_check_and_the_points_side_by_side_and_packs_them(tmp_path):
    """scripts/gpu_lease.sh (a lent GPU's one long command) in a copy of the tree, on the CPU at the
    tiny tier: the check and one main_gpu point side by side, each one row; the pack holds both rows,
    the point's config and metrics and every process's exit code. A deadline already past starts nothing."""
    import shutil
    import tarfile

    copy = tmp_path / "repo"
    for d in ("fusionbench", "scripts", "experiments"):
        shutil.copytree(ROOT / d, copy / d)
    tiny = [*GPU_CONFIG_ON_TINY_CPU, *LEASE_LIGHT, "trainer.max_steps=4", "trainer.warmup_steps=1",
            "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2", "eval.curve_every_n_steps=2", "contrasts=[]", *GPU_CHECK_SIZES]
    env = {**os.environ, **LEASE_ON_CPU, "FB": f"{sys.executable} -m fusionbench.cli", "PY": sys.executable,
           "OUT": str(tmp_path), "ONLY": "mlp", "CUDA_VISIBLE_DEVICES": "", "END": str(int(time.time()) - 1)}
    late = subprocess.run(["bash", "scripts/gpu_lease.sh", *tiny], env=env, cwd=copy, capture_output=True, text=True)
    assert late.returncode == 1 and "nothing started" in late.stderr and not (tmp_path / "gpu_lease.tar.gz").exists()
    env["END"] = str(int(time.time()) + 840)
    proc = subprocess.run(["bash", "scripts/gpu_lease.sh", *tiny], env=env, cwd=copy, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with tarfile.open(tmp_path / "gpu_lease.tar.gz") as tar:
        tar.extractall(tmp_path / "pack", filter="data")
    pack = tmp_path / "pack"
    lease = (pack / "logs" / "lease.txt").read_text()
    tails = "".join(f"\n--- {log.name}, last lines:\n" + "\n".join(log.read_text().splitlines()[-25:])
                    for log in sorted((pack / "logs").glob("*.log")))
    assert [line.split()[-1] for line in lease.splitlines()
            if line.startswith("pid ")] == ["0", "0"], lease + tails  # the check, the mlp sweep
    check, point = read_results(pack / "check.jsonl").iloc[0], read_results(pack / "main_gpu.jsonl").iloc[0]
    assert check["steps"] == point["steps"] == 4 and point["strategy"] == "mlp" and point["seed"] == 0
    [metrics] = list(pack.glob("points/mlp-*-s0/main/metrics.csv"))  # per stage
    assert (metrics.parent.parent / "config.yaml").is_file() and "val/choice_acc" in metrics.read_text().splitlines()[0].split(",")
    assert (copy / "results" / "main_gpu.jsonl").is_file()  # the sweep's own table, in the tree it ran in


def test_gpu_lease_stops_every_process_at_the_deadline_and_still_packs(tmp_path):
    """The lease's other path: points that cannot finish by END are killed there (the check's and the
    sweep's whole process trees, not just their shells), no row is written, and the logs and exit codes
    still come back in the pack, within seconds of END."""
    import shutil
    import tarfile

    copy = tmp_path / "repo"
    for d in ("fusionbench", "scripts", "experiments"):
        shutil.copytree(ROOT / d, copy / d)
    endless = [*GPU_CONFIG_ON_TINY_CPU, *LEASE_LIGHT, "trainer.max_steps=100000", "trainer.val_every_n_steps=50",
               "trainer.checkpoint_every_n_steps=50", "eval.curve_every_n_steps=50", "contrasts=[]", *GPU_CHECK_SIZES]
    deadline = 25
    env = {**os.environ, **LEASE_ON_CPU, "FB": f"{sys.executable} -m fusionbench.cli", "PY": sys.executable,
           "OUT": str(tmp_path), "ONLY": "mlp", "CUDA_VISIBLE_DEVICES": "", "MIN_LEFT": "5", "END": str(int(time.time()) + deadline)}
    start = time.time()
    proc = subprocess.run(["bash", "scripts/gpu_lease.sh", *endless], env=env, cwd=copy, capture_output=True,
                          text=True, timeout=300)
    took = time.time() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert deadline - 2 <= took <= deadline + 60, took  # stopped at END (kill -9 five seconds after), then packed
    survivors = {int(p.name): (p / "cmdline").read_bytes() for p in Path("/proc").iterdir()
                 if p.name.isdigit() and _cwd_under(p, copy)}
    for pid in survivors:  # a failing run leaves no orphan training behind
        os.kill(pid, signal.SIGKILL)
    assert not survivors, survivors
    with tarfile.open(tmp_path / "gpu_lease.tar.gz") as tar:
        tar.extractall(tmp_path / "pack", filter="data")
    pack = tmp_path / "pack"
    lease = (pack / "logs" / "lease.txt").read_text()
    codes = [line.split()[-1] for line in lease.splitlines() if line.startswith("pid ")]
    assert len(codes) == 2 and set(codes) <= {"124", "137"}, lease  # timeout's codes: TERM, then KILL
    assert "gpu_lease: done" in lease and (pack / "logs" / "sweep_mlp.log").is_file()
    assert not (pack / "main_gpu.jsonl").exists() and not (pack / "check.jsonl").exists()


def _cwd_under(proc: Path, folder: Path) -> bool:
    try:
        return Path(os.readlink(proc / "cwd")).is_relative_to(folder)
    except OSError:  # gone meanwhile, or not ours to read
        return False
