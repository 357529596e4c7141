"""Parameters, FLOPs per text / image token, and the efficiency benchmark (tiny tier)."""
import importlib.util
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fusionbench.evaluation.efficiency import efficiency, flop_counter_mode, text_only_batch
from fusionbench.fusion import FUSIONS
from fusionbench.model import IGNORE_INDEX, IMAGE_TOKEN_ID, lm_head
from tests.helpers import ROOT, TINY, image_batch, tiny_cfg, tiny_model


def _fresh_lm(*overrides):
    from fusionbench.assets.lm import load_lm

    cfg = tiny_cfg(*overrides)
    return load_lm(cfg.lm, seed=cfg.seed)[0]


@pytest.mark.parametrize("name", FUSIONS.names())
def test_flops_positive_and_consistent(name):
    model = tiny_model(name)
    batch, _ = image_batch(model, n=3)
    eff = efficiency(model, batch)
    n = model.num_image_tokens
    assert eff["eff/params_total"] >= eff["eff/params_trainable"] > 0
    for key in ("flops_fwd", "flops_fwd_text", "flops_fwd_vision", "flops_fwd_lm", "flops_train_step",
                "flops_fwd_per_text_token", "flops_fwd_per_image", "flops_vision_per_image"):
        assert eff[f"eff/{key}"] > 0, key
    assert eff["eff/flops_fwd"] == eff["eff/flops_fwd_vision"] + eff["eff/flops_fwd_lm"] + eff["eff/flops_fwd_connector"]
    assert eff["eff/flops_fwd_connector"] >= 0
    assert eff["eff/flops_train_step"] > eff["eff/flops_fwd"]  # a training step counts more than a forward
    assert eff["eff/flops_fwd_per_image"] > eff["eff/flops_vision_per_image"]  # encoder + connector + LM
    assert eff["eff/image_tokens_per_image"] == n
    assert eff["eff/positions"] == eff["eff/text_positions"] + 3 * n
    if n:
        assert eff["eff/flops_fwd_per_image_token"] == pytest.approx(eff["eff/flops_fwd_per_image"] / n)
    else:  # flamingo, prefix: the image has no tokens, its cost is per image only
        assert "eff/flops_fwd_per_image_token" not in eff


def test_text_only_batch_drops_exactly_the_image_placeholders():
    model = tiny_model("linear")
    batch, _ = image_batch(model, n=3)
    text = text_only_batch(batch)
    n = model.num_image_tokens
    assert text["pixel_values"] is None
    assert text["input_ids"].shape == (3, batch["input_ids"].shape[1] - n)
    assert not (text["input_ids"] == IMAGE_TOKEN_ID).any()
    keep = batch["input_ids"] != IMAGE_TOKEN_ID
    for row in range(3):
        assert torch.equal(text["input_ids"][row], batch["input_ids"][row][keep[row]])
        assert torch.equal(text["labels"][row], batch["labels"][row][keep[row]])
        assert torch.equal(text["attention_mask"][row], batch["attention_mask"][row][keep[row]])


@pytest.mark.parametrize("name", [n for n in FUSIONS.names()
                                  if FUSIONS.get(n).text_invariant_for(FUSIONS.get(n).default_options())])
def test_text_only_flops_equal_the_bare_base_lm(name):
    """Frozen text path: the text forward's FLOPs are exactly a fresh base LM's on the same text
    (decoder, then the output layer on the labelled positions, as the training forward does)."""
    model = tiny_model(name)
    batch, _ = image_batch(model, n=3)
    eff = efficiency(model, batch)
    text = text_only_batch(batch)
    lm = _fresh_lm()
    select = text["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad(), flop_counter_mode() as base:
        hidden = lm.get_decoder()(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                  use_cache=False).last_hidden_state
        lm_head(lm, hidden[:, :-1][select])
    assert base.get_total_flops() > 0
    assert eff["eff/flops_fwd_text"] == base.get_total_flops()
    assert eff["eff/flops_fwd_text_lm"] == base.get_total_flops()


def test_cpu_attention_is_counted():
    """torch's table has no CPU SDPA kernel; ours adds it (full S x S scores, torch's formula)."""
    lm = _fresh_lm()
    assert lm.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        lm.get_decoder()(input_ids=ids, use_cache=False)
    with torch.no_grad(), flop_counter_mode() as ours:
        lm.get_decoder()(input_ids=ids, use_cache=False)
    c = lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = c.num_hidden_layers * 2 * (2 * 2 * c.num_attention_heads * 12 * 12 * head_dim)  # QK^T and PV
    assert ours.get_total_flops() - plain.get_total_flops() == attention


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_visual_expert_flops_per_token_equal_mlp(arch):
    """Experts replace, never add, matmuls: the LM part costs exactly what it costs with ``mlp``
    (the same projector), per token, with and without images."""
    ve = tiny_model("visual_expert", f"lm.tiny.arch={arch}")
    mlp = tiny_model("mlp", f"lm.tiny.arch={arch}")
    batch, _ = image_batch(ve, n=3)
    a, b = efficiency(ve, batch), efficiency(mlp, batch)
    for key in ("flops_fwd_lm", "flops_fwd_lm_per_token", "flops_fwd_per_token", "flops_fwd_per_text_token",
                "flops_fwd_per_image_token", "flops_fwd"):
        assert a[f"eff/{key}"] == b[f"eff/{key}"], key
    assert a["eff/params_trainable"] > b["eff/params_trainable"]


def test_full_finetune_train_step_counts_lm_weight_gradients():
    linear, full = tiny_model("linear"), tiny_model("full_finetune")
    batch, _ = image_batch(linear, n=3)
    a, b = efficiency(linear, batch), efficiency(full, batch)
    assert a["eff/flops_fwd_lm"] == b["eff/flops_fwd_lm"]
    # full finetuning adds one weight-gradient matmul per LM matmul: about one more LM forward
    extra = b["eff/flops_train_step"] - a["eff/flops_train_step"]
    assert extra > 0.5 * a["eff/flops_fwd_lm"]
    assert b["eff/flops_train_step_over_fwd"] > a["eff/flops_train_step_over_fwd"]


@pytest.mark.parametrize("name", ["full_finetune", "flamingo", "moe"])
def test_counting_leaves_the_model_untouched(name):
    model = tiny_model(name)
    batch, _ = image_batch(model, n=3)
    model.train()
    model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss.backward()
    model.eval()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: g.clone() for n, g in grads.items() if g is not None}
    assert grad_values
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    with torch.no_grad():  # as inside an evaluation
        efficiency(model, batch)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.grad is grads[n], n
        if grads[n] is not None:
            assert torch.equal(p.grad, grad_values[n]), n
        assert p.requires_grad == requires[n], n
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


def _benchmark():
    spec = importlib.util.spec_from_file_location("bench_efficiency", ROOT / "benchmarks" / "efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_tensor_bytes_counts_allocations_and_frees():
    bench = _benchmark()
    x = torch.randn(100, 100, requires_grad=True)
    with bench.LiveTensorBytes() as live:
        y = (x @ x).relu()  # the matmul output dies once relu has run (relu saves its output)
        assert live.current == 4 * 100 * 100 and live.peak == 2 * 4 * 100 * 100
        y.view(-1).add_(1)  # views and in-place ops allocate nothing
        assert live.current == 4 * 100 * 100
        del y
        assert live.current == 0
    assert bench.storage_bytes([x, x.t()], {"a": x}) == 4 * 100 * 100


def test_benchmark_runs_two_strategies_and_writes_rows(tmp_path):
    bench = _benchmark()
    out = tmp_path / "eff.jsonl"
    rows = bench.main([str(TINY), "--steps", "1", "--strategies", "flamingo", "linear", "--device", "cpu",
                       "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["strategy"] for r in written] == ["linear", "flamingo"] == [r["strategy"] for r in rows]
    for r in written:
        assert r["benchmark"] == "efficiency" and r["git_sha"] and r["device"]
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["images_per_s"] > 0
        assert r["peak_mem_bytes"] == r["mem_static_bytes"] + r["mem_step_peak_bytes"]
        assert r["mem_step_peak_bytes"] > 0 and r["mem_static_bytes"] >= 4 * r["eff/params_total"]
        assert r["eff/flops_train_step"] > r["eff/flops_fwd"] > 0
        # MFU against this device's measured matmul peak (CPU: fp32), from the FLOPs as run
        assert 0 < r["mfu"] < 1 and r["matmul_peak_flops_per_s"] > 0
        assert r["achieved_flops_per_s"] == pytest.approx(r["flops_step_as_run"] / r["step_s"])
        assert 0 < r["matmul_flops_step_as_run"] <= r["flops_step_as_run"]
    assert written[0]["ratio_to_linear"] == 1.0
    assert written[0]["ratio_to_linear_min"] == 1.0 and 0 < written[1]["step_min_s"] <= written[1]["step_s"]
    # flamingo's steps were interleaved with linear's (drift-free ratio)
    assert written[0]["paired_ratio_to_linear"] == 1.0 and written[1]["paired_ratio_to_linear"] > 0
    assert "profile_top" not in written[0]
    # strategy options come from experiments/fusion/<strategy>.yaml (as the experiments run them)
    assert written[1]["options"] == "yaml" and written[1]["fusion"]["num_latents"] == 16
    assert written[1]["fusion"]["cross_attention_every"] == 4
    assert written[0]["optimizer_impl"] == "fused" and written[0]["opt_s"] >= 0
    assert written[0]["fwd_s"] + written[0]["bwd_s"] + written[0]["opt_s"] <= written[0]["step_s"] * 1.01
    assert "eff/flops_fwd_per_image_token" in written[0] and "eff/flops_fwd_per_image_token" not in written[1]


def test_benchmark_profile_and_prefix_cache_in_flops_as_run(tmp_path):
    """--profile says where the step's time goes; the FLOPs as run drop when the prompt-prefix KV
    cache skips the shared system prompt (and the feature cache the encoder), and stay below
    eff/flops_train_step, which labels every text position (the output layer runs everywhere)."""
    bench = _benchmark()
    rows = bench.main([str(TINY), "--steps", "1", "--strategies", "linear", "--device", "cpu", "--profile"])
    r = rows[0]
    assert 0 < r["profile_matmul_s"] <= r["profile_total_s"] and 0 < r["profile_matmul_share"] <= 1
    assert r["matmul_flops_per_s"] > 0 and len(r["profile_top"]) == 8
    assert r["flops_step_as_run"] < r["eff/flops_train_step"]
    off = bench.main([str(TINY), "trainer.cache_text_prefix=false", "vision.feature_cache=false", "--steps", "1",
                      "--strategies", "linear", "--device", "cpu"])[0]
    assert r["flops_step_as_run"] < off["flops_step_as_run"] < off["eff/flops_train_step"]
    assert (r["cache_text_prefix"], off["cache_text_prefix"]) == (True, False)  # each row says which
    assert off["eff/flops_train_step"] == r["eff/flops_train_step"]  # counting ignores both caches


def test_freed_memory_is_retained_unless_switched_off():
    """fusionbench.memory: on glibc the mallopt setting takes effect in a training process, and
    FUSIONBENCH_MALLOC=default leaves malloc alone (each in a fresh interpreter: it is per process)."""
    import os
    import subprocess
    import sys

    code = "from fusionbench.memory import retain_freed_memory as r; print(r(), r())"
    env = {k: v for k, v in os.environ.items() if k != "FUSIONBENCH_MALLOC"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "FUSIONBENCH_MALLOC": "default"})
    assert on.stdout.split() == ["True", "True"] and off.stdout.split() == ["False", "False"]
