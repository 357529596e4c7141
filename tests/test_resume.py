"""A killed point resumes as if it had never stopped: the same batches in the same order (across an
epoch boundary, the current epoch's consumed batches skipped), the same dropout draws, the same
validation and forgetting curves, hence the same weights and the same row."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from fusionbench.runner import run_point
from fusionbench.training.module import FusionModule
from tests.helpers import tiny_cfg

# 64 training scenes / batch 8 = 8 batches an epoch; checkpoints every 5 steps; killed at step 12,
# so the restart continues from step 10: epoch 1, its first 2 batches already trained
OVERRIDES = ["fusion=lora", "fusion.dropout=0.2", "trainer.max_steps=14", "trainer.checkpoint_every_n_steps=5",
             "trainer.val_every_n_steps=3", "trainer.limit_val_batches=1", "eval.val_items=8",
             "trainer.log_every_n_steps=1", "trainer.lr=0.005"]


class Killed(RuntimeError):
    pass


def _kill_at(monkeypatch, step: int) -> None:
    """Training raises :class:`Killed` when it reaches ``step`` (after the checkpoints before it)."""
    record = FusionModule.training_step

    def die(self, batch, batch_idx):
        if self.trainer.global_step == step:
            raise Killed
        return record(self, batch, batch_idx)
    monkeypatch.setattr(FusionModule, "training_step", die)


def _run_killed_at(monkeypatch, cfg, step: int) -> None:
    """``run_point(cfg)`` killed when training reaches ``step``; training then works again."""
    record = FusionModule.training_step
    _kill_at(monkeypatch, step)
    with pytest.raises(Killed):
        run_point(cfg)
    monkeypatch.setattr(FusionModule, "training_step", record)


def _trained(run_dir):
    ckpt = torch.load(next(run_dir.glob("**/checkpoints/main/last.ckpt")), map_location="cpu", weights_only=False)
    return ckpt["global_step"], ckpt["state_dict"]


def _batches_seen(monkeypatch):
    seen = []
    step = FusionModule.training_step

    def record(self, batch, batch_idx):
        seen.append((self.trainer.global_step, batch["input_ids"].sum().item()))
        return step(self, batch, batch_idx)
    monkeypatch.setattr(FusionModule, "training_step", record)
    return seen


def test_resumed_point_equals_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    whole = tiny_cfg(*OVERRIDES, tmp_path=tmp_path / "whole")
    seen_whole = _batches_seen(monkeypatch)
    [row_whole] = run_point(whole)
    monkeypatch.undo()

    cut = tiny_cfg(*OVERRIDES, tmp_path=tmp_path / "cut")
    seen_cut = _batches_seen(monkeypatch)
    record = FusionModule.training_step
    _kill_at(monkeypatch, 12)
    with pytest.raises(Killed):
        run_point(cut)
    assert _trained(tmp_path / "cut")[0] == 10
    seconds_before = _clock(tmp_path / "cut")
    monkeypatch.setattr(FusionModule, "training_step", record)
    [row_cut] = run_point(cut)

    # the restart trained steps 10..13 on the batches the uninterrupted run used there
    assert [s for s, _ in seen_cut] == list(range(12)) + list(range(10, 14))
    assert seen_cut[12:] == seen_whole[10:]
    assert row_cut["resumed_from_step"] == 10 and row_cut["resume_exact"] is True
    assert "stage main: the resume was exact" in capsys.readouterr().err  # beside Lightning's warning
    assert "resumed_from_step" not in row_whole
    step_whole, weights_whole = _trained(tmp_path / "whole")
    step_cut, weights_cut = _trained(tmp_path / "cut")
    assert step_whole == step_cut == 14 and weights_whole.keys() == weights_cut.keys()
    for name, w in weights_whole.items():
        assert torch.equal(w, weights_cut[name]), name
    assert json.loads(row_cut["val_curve"]) == json.loads(row_whole["val_curve"])
    assert row_cut["mm/choice/acc"] == row_whole["mm/choice/acc"]
    assert row_cut["train_loss_final"] == row_whole["train_loss_final"]
    # the first session's training log (steps 0-11, killed at 12) survives the restart beside the
    # restart's own (steps 10-13, from the checkpoint); Lightning's CSV logger would delete it
    logs = next((tmp_path / "cut").glob("**/logs/main"))
    assert sorted(p.name for p in logs.glob("metrics*.csv")) == ["metrics.1.csv", "metrics.csv"]
    steps = {name: [int(r["step"]) for r in csv.DictReader(open(logs / name)) if r.get("train/loss")]
             for name in ("metrics.1.csv", "metrics.csv")}
    assert steps == {"metrics.1.csv": list(range(12)), "metrics.csv": list(range(10, 14))}
    # train_s counts the first session's seconds up to its checkpoint too, not only the restart's
    assert seconds_before > 0 and "train_s_from_step" not in row_cut
    assert row_cut["train_s"] > seconds_before


def test_a_resume_at_a_validation_step_keeps_that_validation(tmp_path, monkeypatch):
    """The main study validates and checkpoints at the same steps (every 150): the validation at a
    checkpoint's step runs after the checkpoint is written, so a point resumed from it re-runs that
    validation before training on. Its val curve, and the random draws (dropout) after it, are then
    those of the uninterrupted run."""
    overrides = [o for o in OVERRIDES if not o.startswith("trainer.val_every_n_steps")] + ["trainer.val_every_n_steps=5"]
    [row_whole] = run_point(tiny_cfg(*overrides, tmp_path=tmp_path / "whole"))
    cut = tiny_cfg(*overrides, tmp_path=tmp_path / "cut")
    _run_killed_at(monkeypatch, cut, 12)
    [row_cut] = run_point(cut)
    assert [p["step"] for p in json.loads(row_whole["val_curve"])] == [5, 10]
    cut_curve, whole_curve = json.loads(row_cut["val_curve"]), json.loads(row_whole["val_curve"])
    assert [p["step"] for p in cut_curve] == [5, 10]
    for a, b in zip(cut_curve, whole_curve):
        assert a == pytest.approx(b, rel=1e-5), (a, b)
    assert row_cut["resume_exact"] is True
    _, weights_whole = _trained(tmp_path / "whole")
    _, weights_cut = _trained(tmp_path / "cut")
    for name, w in weights_whole.items():
        assert torch.equal(w, weights_cut[name]), name


def _clock(run_dir) -> float:
    """The training seconds a checkpoint carries (fusionbench.training.callbacks.TrainClock)."""
    ckpt = torch.load(next(run_dir.glob("**/checkpoints/main/last.ckpt")), map_location="cpu", weights_only=False)
    return ckpt["callbacks"]["TrainClock"]["train_s"]


def test_a_point_killed_while_evaluating_keeps_how_it_trained(tmp_path, monkeypatch):
    """Training finished, evaluation was cut short (the 1-hour evaluation of a CPU point outlives a
    session): the restart loads the trained stage instead of training it again, and its row still
    has the validation curve, the plateau verdict, the final loss, the steps and the training
    seconds of the session that trained it (the stage's trained.json), not the restart's."""
    import fusionbench.runner as runner

    overrides = ["fusion=linear", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=5",
                 "trainer.val_every_n_steps=2", "trainer.limit_val_batches=1", "eval.val_items=8"]
    [whole] = run_point(tiny_cfg(*overrides, tmp_path=tmp_path / "whole"))

    cut = tiny_cfg(*overrides, tmp_path=tmp_path / "cut")
    evaluate = runner.evaluate_model

    def die(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(runner, "evaluate_model", die)
    with pytest.raises(Killed):
        run_point(cut)
    record = json.loads(next((tmp_path / "cut").glob("**/checkpoints/main/trained.json")).read_text())
    assert record["steps"] == 6 and record["train_s"] > 0 and len(json.loads(record["val_curve"])) == 3
    trained = FusionModule.training_step

    def no_training(self, batch, batch_idx):
        raise AssertionError("the trained stage was trained again")
    monkeypatch.setattr(FusionModule, "training_step", no_training)
    monkeypatch.setattr(runner, "evaluate_model", evaluate)
    [row] = run_point(cut)
    monkeypatch.setattr(FusionModule, "training_step", trained)

    assert row["steps"] == 6 and row["resumed_from_step"] == 6
    assert row["train_s"] == round(record["train_s"], 2)
    assert json.loads(row["val_curve"]) == json.loads(whole["val_curve"])
    assert row["converged"] == whole["converged"] and row["train_loss_final"] == whole["train_loss_final"]
    assert row["mm/choice/acc"] == whole["mm/choice/acc"]


def test_a_point_resumed_on_another_machine_says_where_each_session_trained(tmp_path, monkeypatch):
    """Across sessions a point resumes on whichever machine the next session gets, and machines
    compute different numbers: the checkpoint carries where each session trained (from which step),
    so the row lists both machines, not only the one that finished it."""
    import fusionbench.results as results

    cfg = tiny_cfg("fusion=linear", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=5", "eval.val_items=0",
                   tmp_path=tmp_path)
    first = results.cpu_identity()
    monkeypatch.setattr(results, "cpu_identity", lambda: {**first, "cpu_capability": "OTHER"})
    _run_killed_at(monkeypatch, cfg, 5)
    monkeypatch.setattr(results, "cpu_identity", lambda: dict(first))
    [row] = run_point(cfg)
    machines = json.loads(row["train_machines"])
    assert [m["from_step"] for m in machines] == [0, 5] and row["resumed_from_step"] == 5
    assert [m["cpu_capability"] for m in machines] == ["OTHER", first["cpu_capability"]]
    assert machines[1]["device"] == row["device"] and machines[1]["cpu_model"] == row["cpu_model"]
    [whole] = run_point(tiny_cfg("fusion=linear", "trainer.max_steps=6", "eval.val_items=0", tmp_path=tmp_path / "w"))
    assert [m["from_step"] for m in json.loads(whole["train_machines"])] == [0]


def test_a_checkpoint_of_another_training_order_is_refused(tmp_path, monkeypatch):
    cfg = tiny_cfg("fusion=linear", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=5", tmp_path=tmp_path)
    _kill_at(monkeypatch, 5)
    with pytest.raises(Killed):
        run_point(cfg)
    monkeypatch.undo()
    ckpt = next(tmp_path.glob("**/last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["FusionDataModule"]["train_size"] += 1
    torch.save(state, ckpt)
    from fusionbench.errors import FusionBenchError
    with pytest.raises(FusionBenchError, match="another training order"):
        run_point(cfg)


def test_a_checkpoint_that_other_code_trained_is_not_reused_silently(tmp_path, monkeypatch, capsys):
    """After the code changes (e.g. a strategy edited), a run directory's finished or partial
    checkpoint is one error before any compute instead of being evaluated as if this code had
    trained it; FUSIONBENCH_RESUME_OTHER_CODE=1 continues from it and the row records which code
    trained it. A checkpoint of the same code is reused as before."""
    import fusionbench.runner as runner
    from fusionbench.errors import FusionBenchError
    from fusionbench.results import code_hash, read_rows

    cfg = tiny_cfg("fusion=linear", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "eval.val_items=0",
                   tmp_path=tmp_path)
    _kill_at(monkeypatch, 3)
    with pytest.raises(Killed):
        run_point(cfg)
    monkeypatch.undo()
    ckpt = next(tmp_path.glob("**/checkpoints/main/last.ckpt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["fusionbench_code_hash"] == code_hash()
    monkeypatch.setattr(runner, "code_hash", lambda: "edited000000")
    prepared = []
    monkeypatch.setattr(runner, "Prepared", lambda *a, **k: prepared.append(1))
    with pytest.raises(FusionBenchError, match=r"trained by other code \(code_hash \w+; this code is edited000000\).*"
                                               r"FUSIONBENCH_RESUME_OTHER_CODE=1"):
        run_point(cfg)
    assert not prepared  # before any compute
    monkeypatch.undo()
    monkeypatch.setattr(runner, "code_hash", lambda: "edited000000")
    monkeypatch.setenv("FUSIONBENCH_RESUME_OTHER_CODE", "1")
    [row] = run_point(cfg)
    assert row["trained_code_hash"] == code_hash() and row["resumed_from_step"] == 2
    assert "continuing from a checkpoint trained by other code" in capsys.readouterr().err
    assert read_rows(cfg.results_file)[0]["trained_code_hash"] == code_hash()
    monkeypatch.undo()
    # the same code: a finished checkpoint is evaluated again without complaint, and no trained_code_hash
    [again] = run_point(cfg)
    assert "trained_code_hash" not in again
    # `fusionbench eval` of it after the code changed: new measurements, the row says which code trained it
    from fusionbench.cli import main

    run_dir = next((tmp_path / "runs").glob("*/linear-*"))
    trained_by = code_hash()
    monkeypatch.setattr(runner, "code_hash", lambda: "edited000000")
    assert main(["eval", str(run_dir), "--results-file", str(tmp_path / "eval.jsonl")]) == 0
    assert read_rows(tmp_path / "eval.jsonl")[0]["trained_code_hash"] == trained_by
    assert "was trained by other code" in capsys.readouterr().err


def test_curves_travel_in_the_checkpoint():
    """The forgetting and validation curves keep their earlier points across a resume, and the
    forgetting curve's step-0 point (scored at ``on_train_start``) is not scored again mid-run."""
    from fusionbench.training.callbacks import ForgettingCurve, ValidationCurve

    class Trainer:
        global_step, loggers = 10, []

    scored = []
    curve = ForgettingCurve(suite=None, base={}, tokenizer=None, every_n_steps=4, batch_size=2)
    curve._score = lambda trainer, module: scored.append(trainer.global_step)
    curve.load_state_dict({"points": [{"step": 0}, {"step": 4}, {"step": 8}]})
    curve.on_train_start(Trainer(), None)
    assert scored == [] and [p["step"] for p in curve.state_dict()["points"]] == [0, 4, 8]
    fresh = ForgettingCurve(suite=None, base={}, tokenizer=None, every_n_steps=4, batch_size=2)
    fresh._score = curve._score
    fresh.on_train_start(Trainer(), None)
    assert scored == [10]
    val = ValidationCurve(None, None, batch_size=2)
    val.load_state_dict({"points": [{"step": 3, "val/lm_loss": 1.0}]})
    assert val.state_dict() == {"points": [{"step": 3, "val/lm_loss": 1.0}]}


def test_rows_count_the_steps_taken_and_eval_refuses_a_partial_checkpoint(tmp_path, monkeypatch, capsys):
    """`steps` is the optimizer steps actually taken; `fusionbench eval` on a run killed at step 5
    of 8 says so, and with --allow-partial records step 5."""
    from fusionbench.cli import main
    from fusionbench.results import read_rows

    cfg = tiny_cfg("fusion=linear", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=5", tmp_path=tmp_path)
    _kill_at(monkeypatch, 6)
    with pytest.raises(Killed):
        run_point(cfg)
    monkeypatch.undo()
    run_dir = next((tmp_path / "runs").glob("*/linear-*"))
    out = tmp_path / "eval.jsonl"
    assert main(["eval", str(run_dir), "--results-file", str(out)]) == 2
    assert "is from step 5 of 8: the run did not finish" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--results-file", str(out), "--allow-partial"]) == 0
    assert [r["steps"] for r in read_rows(out)] == [5]
    [row] = run_point(cfg)  # resumes and finishes
    assert row["steps"] == 8 and row["resumed_from_step"] == 5


def test_a_compute_matched_checkpoint_is_judged_by_its_budgets_steps(tmp_path, monkeypatch, capsys):
    """A compute-matched stage trains for the steps its FLOPs budget allows, not trainer.max_steps:
    the checkpoint records them, so `sweep --dry-run` says where it stands and `fusionbench eval`
    refuses it unfinished (it used to skip that check) and accepts it finished."""
    import fusionbench.runner as runner
    from fusionbench.cli import main
    from fusionbench.sweep import describe

    monkeypatch.setattr(runner, "steps_for_budget", lambda model, data, tcfg: (6, 1.0e9))
    cfg = tiny_cfg("fusion=linear", "trainer.max_steps=20", "trainer.flops_budget=6e9", "trainer.warmup_steps=0",
                   "trainer.checkpoint_every_n_steps=3", "eval.val_items=0", tmp_path=tmp_path)
    _run_killed_at(monkeypatch, cfg, 4)
    [line] = describe(cfg)
    assert line.endswith("todo (main: checkpoint at step 3 of 6; resumes there)"), line
    run_dir = next((tmp_path / "runs").glob("*/linear-*"))
    out = tmp_path / "eval.jsonl"
    assert main(["eval", str(run_dir), "--results-file", str(out)]) == 2
    assert "is from step 3 of 6: the run did not finish" in capsys.readouterr().err
    [row] = run_point(cfg)
    assert row["steps"] == 6 and row["resumed_from_step"] == 3
    assert main(["eval", str(run_dir), "--results-file", str(out)]) == 0  # finished at 6 of 20 nominal steps
