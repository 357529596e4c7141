"""``fusionbench run`` end to end on the tiny tier: rows, provenance, checkpoints, forgetting, and
bad input that fails with one clear message before compute, leaving the results table untouched."""
import json

import pytest
import torch

from fusionbench.cli import main
from fusionbench.evaluation.text_suite import TextSuite, forgetting, score_text_suite
from fusionbench.model import lm_logits_at
from fusionbench.results import read_results
from tests.helpers import TINY, tiny_cfg, tiny_model, train_a_few_steps

PROVENANCE = {"git_sha", "code_hash", "device", "config_hash", "seed", "version_torch", "version_transformers",
              "version_lightning", "params_total", "params_trainable", "train_s", "eval_s", "strategy", "stage"}


def _run(tmp_path, *overrides):
    return main(["run", str(TINY), f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'res.jsonl'}",
                 *overrides])


def test_run_appends_one_row_per_grid_point_with_provenance(tmp_path):
    assert _run(tmp_path, "grid={fusion: [linear, mlp]}") == 0
    df = read_results(tmp_path / "res.jsonl")
    assert list(df.strategy) == ["linear", "mlp"] and list(df.stage) == ["main", "main"]
    assert PROVENANCE <= set(df.columns)
    assert (df.params_trainable > 0).all() and (df.params_trainable < df.params_total).all()
    assert df.config_hash.nunique() == 2
    # where the evaluation time went: one entry per listed evaluator, together within eval_s
    per = [f"eval_s/{name}" for name in json.loads(df.config[0])["eval"]["metrics"]]
    assert set(per) <= set(df.columns) and (df[per] >= 0).all().all()
    assert (df[per].sum(axis=1) <= df.eval_s + 0.1).all()
    for col in ("mm/acc", "mm/attribute/acc", "mm/attribute/acc_majority", "mm/attribute/acc_text_only"):
        assert df[col].between(0, 1).all(), col
    run_dir = df.run_dir[1]
    ckpt = torch.load(f"{run_dir}/checkpoints/main/last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"model.fusion.projector.0.weight", "model.fusion.projector.0.bias",
                                       "model.fusion.projector.2.weight", "model.fusion.projector.2.bias"}
    assert (tmp_path / "runs" / "tiny").exists()
    assert json.loads(df.config[0])["fusion"]["name"] == "linear"


def test_multi_stage_recipe_writes_a_row_per_stage(tmp_path):
    stages = ("stages=[{name: dense, trainer: {max_steps: 2}}, "
              "{name: upcycle, trainer: {max_steps: 3, lr: 0.001}, data: {qtypes: [spatial]}}]")
    assert _run(tmp_path, "fusion=moe", stages) == 0
    df = read_results(tmp_path / "res.jsonl")
    assert list(df.stage) == ["dense", "upcycle"] and list(df.steps) == [2, 3] and list(df.lr) == [0.01, 0.001]
    assert df.params_trainable[1] > df.params_trainable[0]  # 4 experts + router after upcycling
    assert df["mm/attribute/acc"].isna().tolist() == [False, True]  # stage 2 evaluated on its own data
    ckpts = sorted(p.parent.name for p in (tmp_path / "runs").glob("**/last.ckpt"))
    assert ckpts == ["dense", "upcycle"]
    up = torch.load(next((tmp_path / "runs").glob("**/upcycle/last.ckpt")), weights_only=False)
    assert up["fusionbench_stage"] == "upcycle" and any(".experts." in k for k in up["state_dict"])
    assert not any(k.startswith("model.lm.") or k.startswith("model.vision.") for k in up["state_dict"])


def test_bad_stage_is_caught_before_any_stage_trains(tmp_path, capsys):
    stages = "stages=[{name: dense, trainer: {max_steps: 2}}, {name: upcycle, data: {qtypez: [spatial]}}]"
    assert _run(tmp_path, "fusion=moe", stages) == 2
    assert "unknown config key 'data.qtypez' in stages[1] (upcycle)" in capsys.readouterr().err
    assert not list(tmp_path.glob("runs/**/*.ckpt")) and not (tmp_path / "res.jsonl").exists()


def _toy_suite(tok) -> TextSuite:
    import datasets

    rows = [{"task": "toy", "item": i, "context": f"Q: what is {i} plus one?\nA:", "continuation": f" {c}",
             "correct": c == i + 1} for i in range(4) for c in (i + 1, i + 2, i + 5)]
    return TextSuite(choices=datasets.Dataset.from_list(rows), prose=["It was a truth universally acknowledged."] * 2,
                     tasks=["toy"], prose_tokens=32)


@pytest.mark.parametrize("strategy", ["linear", "mlp", "full_finetune"])
def test_forgetting_is_exactly_zero_for_frozen_lm_projectors(strategy):
    """Base LM scored before fusion, the trained model's text-only path after: frozen-LM
    projectors give bit-identical scores (forgetting exactly 0); full finetune does not."""
    cfg = tiny_cfg(f"fusion={strategy}")
    from fusionbench.assets.lm import load_lm

    base_lm, tok = load_lm(cfg.lm, seed=cfg.seed)
    suite = _toy_suite(tok)
    base = score_text_suite(suite, base_lm, tok, batch_size=5)
    model = tiny_model(strategy)
    train_a_few_steps(model)
    after = score_text_suite(suite, model, tok, batch_size=5, reference=base_lm)
    fg = forgetting(base, after)
    assert set(fg) == {"forgetting/toy/acc_drop", "forgetting/toy/acc_drop_ci_lo", "forgetting/toy/acc_drop_ci_hi",
                       "forgetting/mc_acc_drop", "forgetting/austen/delta_log_ppl",
                       "forgetting/austen/delta_log_ppl_ci_lo", "forgetting/austen/delta_log_ppl_ci_hi"}
    assert fg["forgetting/toy/acc_drop"] == base["text/toy/acc"] - after["text/toy/acc"]  # absolute points
    if strategy == "full_finetune":
        assert fg["forgetting/austen/delta_log_ppl"] != 0.0 and after["text/kl"] > 0
    else:  # the token KL to the base LM is exactly 0, not merely small
        assert after["text/kl"] == 0.0 and after["text/kl_ci_hi"] == 0.0
        assert {k: v for k, v in after.items() if not k.startswith("text/kl") and "chunk_kl" not in k} == base
        assert all(v == 0.0 for v in fg.values())


def test_positions_logits_match_full_logits():
    model = tiny_model("mlp")
    tok = model.tokenizer
    enc = tok(["The cat sat on the mat.", "Hi"], return_tensors="pt", padding=True)
    pos = enc.attention_mask.bool()
    with torch.no_grad():
        full = model.logits(enc.input_ids, enc.attention_mask)[pos]
        part = model.logits(enc.input_ids, enc.attention_mask, positions=pos)
    assert torch.allclose(full, part, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["fusion=mpl"], "unknown fusion strategy 'mpl'. Did you mean 'mlp'?"),
    (["trainer.max_stpes=3"], "unknown config key 'trainer.max_stpes'"),
    (["lm.source=some-org/not-a-model"], "cannot load language model 'some-org/not-a-model'"),
    (["vision.source=some-org/not-a-vit"], "cannot load vision encoder 'some-org/not-a-vit'"),
    (["data.train_size=0"], "data.train_size=0 is out of range: it must be >= 1"),
    (["data.name=nope"], "unknown dataset 'nope'"),
    (["trainer.max_length=40"], "over trainer.max_length=40"),
    (["fusion={name: visual_expert, layers: [0, 9]}"], "layer 9 does not exist"),
    (["fusion={name: lora, target_modules: [nope_proj]}"], "nope_proj"),
    (["fusion={name: moe, vision_moe: true}"], "MLP blocks"),
    (["fusion=mlp", "stages=[{name: upcycle}]"], "not a stage of strategy 'mlp'"),
])
def test_bad_input_is_one_clear_error_and_no_row(tmp_path, capsys, overrides, message):
    results = tmp_path / "res.jsonl"
    results.write_text('{"earlier": "row"}\n')
    assert _run(tmp_path, *overrides) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fusionbench: error:")
    assert results.read_text() == '{"earlier": "row"}\n'  # nothing written is lost, no partial row
    assert not list(tmp_path.glob("runs/**/*.ckpt"))  # failed before training started


@pytest.mark.parametrize("overrides, messages", [
    (["trainer.precision=17"], ["Lightning does not accept trainer.precision=17: "
                                "Precision '17' is invalid. Allowed precision values:"]),
    (["trainer.strategy=dpp"], ["Lightning does not accept trainer.strategy=dpp: You selected an invalid strategy name"]),
    (["trainer.accelerator=gpu"], ["Lightning does not accept trainer.accelerator=gpu", "No supported gpu backend"]),
    (["fusion=mlp", "stages=[{name: main, trainer: {strategy: fsdp}}]"],
     ["stages[0] (main): Lightning does not accept trainer.strategy=fsdp: ", "requires a GPU accelerator"]),
])
def test_lightning_settings_it_rejects_are_one_error_before_any_asset_loads(tmp_path, capsys, overrides, messages):
    if any(o in overrides[-1] for o in ("accelerator=gpu", "fsdp")) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: accelerator=gpu is valid here, and fsdp is refused only with "
                    "tiny.yaml's accelerator=cpu (the combination test covers that error)")
    assert _run(tmp_path, *overrides) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err
    assert "Traceback" not in err and "preparing" not in err
    assert "trainer.accelerator=cpu" not in err and "trainer.num_nodes" not in err  # only the offending setting
    assert err.strip().splitlines()[-1].startswith("fusionbench: error:")
    # a sweep refuses the whole grid before its first point (the bad one is the second)
    grid = ["grid={trainer.precision: [32-true, '17']}"]
    assert main(["sweep", str(TINY), f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'res.jsonl'}",
                 *grid]) == 2
    err = capsys.readouterr().err
    assert "Precision '17' is invalid" in err and "sweep 1/2" not in err and not (tmp_path / "res.jsonl").exists()


def test_lightning_error_names_the_combination_when_no_setting_is_refused_alone(monkeypatch):
    """Lightning's message does not say which setting it objects to: the error names the settings
    refused on their own, else every changed one (here a refusal only of cpu with fsdp, as on a GPU
    machine); a setting left at its default is never named."""
    from omegaconf import OmegaConf

    from fusionbench import runner
    from fusionbench.config import TrainConfig
    from fusionbench.errors import FusionBenchError

    def refuses(kw, quiet=False):
        return ValueError("fsdp needs a GPU") if (kw["accelerator"], kw["strategy"]) == ("cpu", "fsdp") else None

    monkeypatch.setattr(runner, "_trainer_refuses", refuses)
    tcfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"accelerator": "cpu", "strategy": "fsdp", "devices": 1})
    with pytest.raises(FusionBenchError) as e:
        runner.check_hardware(tcfg, "stages[1] (x): ")
    assert str(e.value) == ("stages[1] (x): Lightning does not accept trainer.accelerator=cpu with trainer.strategy=fsdp: "
                            "fsdp needs a GPU")


@pytest.mark.parametrize("precision, native, warned", [("bf16-mixed", False, True), ("bf16-mixed", True, False),
                                                      ("32-true", False, False)])
def test_bf16_is_warned_of_only_on_a_cpu_without_native_bf16(monkeypatch, capsys, precision, native, warned):
    """bf16 autocast on a CPU that emulates it (no AVX512-BF16 / AMX) runs tens of times slower than
    float32: a CPU-forced main_gpu.yaml says so, where the CPU has no native bf16, and nowhere else."""
    import lightning as L
    from omegaconf import OmegaConf

    from fusionbench import runner
    from fusionbench.config import TrainConfig

    monkeypatch.setattr(runner, "cpu_has_native_bf16", lambda: native)
    tcfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"accelerator": "cpu", "precision": precision})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **runner.hardware_kwargs(tcfg))
    runner._warn_slow_cpu_bf16(trainer, tcfg)
    err = capsys.readouterr().err
    assert ("without native bf16" in err and f"trainer.precision={precision}" in err) == warned, err


def test_same_seed_gives_identical_numbers_and_seeds_aggregate_to_a_ci(tmp_path):
    from fusionbench.report import mean_ci, summarise

    assert _run(tmp_path, "fusion=mlp", "seeds=[0, 1, 0]") == 2  # duplicate seeds: one clear error
    assert _run(tmp_path, "fusion=mlp", "seeds=[0, 1]") == 0
    assert _run(tmp_path, "fusion=mlp", "seeds=[0]", "output_dir=" + str(tmp_path / "again")) == 0
    df = read_results(tmp_path / "res.jsonl")
    metrics = [c for c in df.columns if c.startswith("mm/")] + ["train_loss_final", "params_trainable"]
    first, other, again = df.iloc[0], df.iloc[1], df.iloc[2]
    assert (first.seed, other.seed, again.seed) == (0, 1, 0)
    assert all(first[c] == again[c] or (first[c] != first[c] and again[c] != again[c]) for c in metrics)
    assert first.train_loss_final != other.train_loss_final  # a different seed really differs
    mean, half = mean_ci([0.5, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(12.7062 * 0.1, rel=1e-4)  # t(0.975, 1) * sd / sqrt(n)
    assert mean_ci([0.4])[1] != mean_ci([0.4])[1]  # one seed: no interval (NaN)
    line = summarise(df.assign(table="t").iloc[:2]).iloc[0]
    assert line.seeds == 2 and line["mm/acc"] == pytest.approx((first["mm/acc"] + other["mm/acc"]) / 2)


@pytest.mark.parametrize("strategy", ["linear", "full_finetune"])
def test_forgetting_curve_callback(tmp_path, strategy):
    import lightning as L

    from fusionbench.training import FusionDataModule, FusionModule
    from fusionbench.training.callbacks import ForgettingCurve

    cfg = tiny_cfg(f"fusion={strategy}", "trainer.lr=0.01")
    model = tiny_model(strategy)
    tok = model.tokenizer
    from fusionbench.assets.lm import load_lm

    base_lm, _ = load_lm(cfg.lm, seed=cfg.seed)
    suite = _toy_suite(tok).subset(2, 1)
    assert len(suite.choices) == 6 and len(suite.prose) == 1
    base = score_text_suite(suite, base_lm, tok)
    data = FusionDataModule(cfg.data, cfg.trainer, tok, model.vision.preprocess, model.num_image_tokens)
    curve = ForgettingCurve(suite, base, tok, every_n_steps=1, batch_size=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path), callbacks=[curve],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(FusionModule(model, cfg.trainer), datamodule=data)
    assert [p["step"] for p in curve.points] == [0, 1, 2, 3]
    deltas = [p["forgetting/austen/delta_log_ppl"] for p in curve.points]
    assert deltas[0] == 0.0  # before the first update: the base LM
    if strategy == "linear":
        assert all(d == 0.0 for d in deltas)
    else:
        assert all(d != 0.0 for d in deltas[1:])
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "curve/forgetting/austen/delta_log_ppl" in logged


def test_eval_command_re_evaluates_a_trained_run(tmp_path, capsys):
    assert _run(tmp_path, "fusion=mlp") == 0
    [trained] = read_results(tmp_path / "res.jsonl").to_dict("records")
    out = tmp_path / "eval.jsonl"
    assert main(["eval", trained["run_dir"], "eval.mm_items=24", "--results-file", str(out)]) == 0
    [row] = read_results(out).to_dict("records")
    assert row["source"] == "eval" and row["checkpoint"].endswith("checkpoints/main/last.ckpt")
    assert row["config_hash"] == trained["config_hash"]
    # the same trained weights and eval settings give the same measurements
    assert all(row[k] == trained[k] for k in trained if k.startswith("mm/") and trained[k] == trained[k])
    # and the row says how those weights were trained (the stage's trained.json)
    assert row["val_curve"] == trained["val_curve"] and row["train_s"] == trained["train_s"]
    assert row["train_loss_final"] == trained["train_loss_final"] and row["steps"] == trained["steps"]
    assert main(["eval", trained["run_dir"], "trainer.max_steps=9"]) == 2
    assert "only eval.* overrides" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2


def test_rows_carry_the_efficiency_block(tmp_path):
    assert _run(tmp_path, "fusion=visual_expert") == 0
    assert _run(tmp_path, "fusion=mlp") == 0
    ve, mlp = read_results(tmp_path / "res.jsonl").to_dict("records")
    for key in ("eff/flops_fwd", "eff/flops_train_step", "eff/flops_fwd_per_text_token", "eff/flops_fwd_per_image_token"):
        assert ve[key] > 0 and mlp[key] > 0, key
    assert ve["eff/flops_fwd_lm"] == mlp["eff/flops_fwd_lm"]  # experts replace, never add, LM matmuls
    assert ve["eff/params_trainable"] == ve["params_trainable"]


def test_eval_of_a_trained_run_can_add_the_probe_curve(tmp_path):
    assert _run(tmp_path, "fusion=mlp") == 0
    [trained] = read_results(tmp_path / "res.jsonl").to_dict("records")
    assert not any(k.startswith("probe/") for k in trained)
    out = tmp_path / "eval.jsonl"
    assert main(["eval", trained["run_dir"], "eval.probes=true", "eval.probe_train=16", "eval.probe_test=8",
                 "--results-file", str(out)]) == 0
    [row] = read_results(out).to_dict("records")
    layers = row["probe/num_layers"]
    assert layers == 4 and all(0 <= row[f"probe/color/layer_{i}"] <= 1 for i in range(layers + 1))
    assert "probe/cka_img_text/layer_2" in row
    # the floor: the same strategy untrained (rebuilt from the run's config before its checkpoint loads)
    assert all(0 <= row[f"probe/untrained/color/layer_{i}"] <= 1 for i in range(layers + 1))
    assert row["probe/color/gain_over_untrained"] == row["probe/color/best"] - row["probe/color/best_untrained"]


def test_regional_compile_gives_the_same_loss_and_gradients():
    """``trainer.compile``: every decoder block compiled in place (one graph for identical blocks);
    the loss and the connector's gradients match the eager model."""
    from fusionbench.runner import compile_decoder_layers
    from tests.helpers import image_batch

    eager, compiled = tiny_model("visual_expert"), tiny_model("visual_expert")
    batch, _ = image_batch(eager, n=2)
    assert compile_decoder_layers(compiled) == len(eager.lm.model.layers)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    losses = []
    for model in (eager, compiled):
        model.train()
        loss = model(*args).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("strategy", ["mlp", "visual_expert"])
def test_compiled_blocks_do_not_recompile_per_block(strategy):
    """With the decoder blocks compiled, a frozen-text strategy's training forward compiles as many
    graphs for an 8-block LM as for a 4-block one: the shared prompt prefix's KV cache guarded every
    block on its own layer index (on an H200, 22 of 30 blocks fell back to eager past dynamo's
    recompile limit), so compiling turns the prefix cache off. The loss is the eager one."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fusionbench.runner import compile_decoder_layers
    from tests.helpers import image_batch

    graphs = []
    try:
        for depth in (4, 8):
            model = tiny_model(strategy, f"lm.tiny.num_hidden_layers={depth}")
            batch, _ = image_batch(model, n=2)
            args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
            assert model.shared_prefix_length(args[0], args[1], args[3]) > 0  # the path that recompiled
            model.train()
            eager = model(*args).loss
            assert compile_decoder_layers(model, backend="eager") == depth  # (resets dynamo: a new model)
            counters.clear()
            assert model.shared_prefix_length(args[0], args[1], args[3]) == 0
            for _ in range(2):
                loss = model(*args).loss
                loss.backward()
            assert torch.allclose(loss, eager, atol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs[0] == graphs[1] > 0, graphs


def test_compiled_visual_expert_blocks_have_no_graph_break():
    """The image-row plan (a ``nonzero``: a data-dependent shape) is made when the strategy sets
    the image mask, outside the compiled blocks: each block of visual_expert is one graph, with
    the eager loss (before, every block broke in two)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fusionbench.runner import compile_decoder_layers
    from tests.helpers import image_batch

    model = tiny_model("visual_expert")
    batch, _ = image_batch(model, n=2)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    model.train()
    eager = model(*args).loss
    try:
        compile_decoder_layers(model, backend="eager")
        counters.clear()
        loss = model(*args).loss
        loss.backward()
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert not breaks, breaks
    assert torch.allclose(loss, eager, atol=1e-5)


def test_plateau_criterion():
    from fusionbench.training.callbacks import plateaued

    pts = lambda *v: [{"step": i, "val/lm_loss": x} for i, x in enumerate(v)]  # noqa: E731
    assert plateaued(pts(3.0, 2.0)) is None  # too few points to tell
    assert plateaued(pts(3.0, 2.0, 1.5, 1.0, 0.8, 0.6)) is False  # still falling fast
    assert plateaued(pts(3.0, 1.0, 0.9, 0.9, 0.895, 0.894)) is True  # < 2% over the last third
    assert plateaued(pts(3.0, 1.0, 0.9, 0.9, 0.895, 0.894), tol=0.001) is False


def test_validation_curve_in_the_logger_and_the_row(tmp_path):
    assert _run(tmp_path, "fusion=mlp", "trainer.val_every_n_steps=1", "trainer.limit_val_batches=1",
                "eval.val_items=8", "eval.val_controls=true") == 0
    [row] = read_results(tmp_path / "res.jsonl").to_dict("records")
    curve = json.loads(row["val_curve"])
    assert [p["step"] for p in curve] == [1, 2, 3]
    assert all(0 <= p["val/choice_acc"] <= 1 and p["val/lm_loss"] > 0 for p in curve)
    # the image controls on the same val items (eval.val_controls): gain = acc - acc_shuffled
    assert all(p["val/image_gain"] == pytest.approx(p["val/choice_acc"] - p["val/acc_shuffled"])
               and p["val/image_gain_ci_lo"] <= p["val/image_gain"] <= p["val/image_gain_ci_hi"] for p in curve)
    assert row["converged"] in (True, False) and row["val/choice_acc_final"] == curve[-1]["val/choice_acc"]
    assert all(0 < p["val/chance"] < 1 for p in curve) and row["val/chance_final"] == curve[-1]["val/chance"]
    logged = next((tmp_path / "runs").glob("**/logs/main/metrics.csv")).read_text()
    assert "val/choice_acc" in logged.splitlines()[0]


@pytest.mark.parametrize("overrides, message", [
    (["eval.metrics=[choice, chioce]"], "unknown evaluator 'chioce'. Did you mean 'choice'?"),
    (["trainer.logger=tensorboard"], "trainer.logger=tensorboard needs the package 'tensorboard'"),
    (["trainer.logger=neptune"], "trainer.logger must be one of"),
    (["data.images=hidden"], "data.images must be"),
    (["data.test_size=1"], "at least 2 test items"),
    (["data.test_size=0"], "the test split would be empty"),
])
def test_bad_evaluation_input_is_one_clear_error(tmp_path, capsys, overrides, message):
    assert _run(tmp_path, *overrides) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("runs/**/*.ckpt"))  # failed before training started


def test_evaluators_are_picked_by_eval_metrics(tmp_path):
    assert _run(tmp_path, "fusion=linear", "eval.metrics=[choice]") == 0
    [row] = read_results(tmp_path / "res.jsonl").to_dict("records")
    assert "mm/choice/acc" in row and "mm/acc" not in row and "eff/flops_fwd" not in row


def test_provenance_sees_untracked_source_and_hashes_the_code(tmp_path):
    """A new, untracked strategy file makes the SHA '-dirty' (the commit does not contain it) and
    changes code_hash; result tables and untracked files outside the package do not."""
    import shutil
    import subprocess
    import sys

    from helpers import ROOT

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "fusionbench", repo / "fusionbench", ignore=shutil.ignore_patterns("__pycache__"))
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    git("add", "fusionbench")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from fusionbench.results import git_sha, code_hash; "
             "print(git_sha(), code_hash())")
    state = lambda: subprocess.run([sys.executable, "-c", probe, str(repo)], capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.split()
    sha, h = state()
    assert not sha.endswith("-dirty") and len(h) == 12
    (repo / "results").mkdir()
    (repo / "results" / "r.jsonl").write_text("{}\n")
    (repo / "notes.txt").write_text("not code")
    assert state() == [sha, h]
    (repo / "fusionbench" / "fusion" / "my_new_fusion.py").write_text("X = 1\n")
    sha2, h2 = state()
    assert sha2 == sha + "-dirty" and h2 != h


def test_side_by_side_processes_score_the_base_lm_once(monkeypatch):
    """Sweeps started together (one per strategy on a GPU machine) all need the base LM's text
    scores: the first scores it, the others wait for its cached file instead of each scoring it."""
    import threading
    import time as _time
    from types import SimpleNamespace

    from fusionbench import runner

    calls = []

    def slow_scores(cfg, lm, tokenizer, suite, backend=None):
        calls.append(threading.get_ident())
        _time.sleep(0.5)
        return {"text/x": 0.5}

    monkeypatch.setattr(runner, "text_scores", slow_scores)
    prep = SimpleNamespace(cfg=tiny_cfg("eval.text_suite=true"), lm=torch.nn.Linear(1, 1), tokenizer=None)
    got = []
    threads = [threading.Thread(target=lambda: got.append(runner.Prepared._base_text_scores(prep, None)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [{"text/x": 0.5}] * 3
