"""Efficiency of every registered fusion strategy, side by side in one process (so ratios hold on a
noisy machine): same backbones, same batch of real data, same number of text tokens.

    .venv/bin/python benchmarks/efficiency.py experiments/base.yaml --steps 2 --out /tmp/eff.jsonl

Per strategy, with the options of its experiment YAML (``experiments/fusion/<strategy>.yaml``, the
configurations the experiments run; ``--options registry`` for the strategy's built-in defaults),
on one training batch of the config (``trainer.batch_size`` items):

* parameters and FLOPs from :func:`fusionbench.evaluation.efficiency.efficiency` (every ``eff/*``
  key, definitions in that module: forward and training-step FLOPs, per text token, per image
  token / per image);
* ``step_s``: median seconds of a full training step (forward, backward, AdamW step, zero_grad)
  over ``--steps`` timed steps after one warm-up step, with the optimizer training builds
  (``trainer.optimizer_impl``); ``fwd_s`` / ``bwd_s`` / ``opt_s``: medians of its three parts;
  ``ratio_to_linear``: ``step_s`` over ``linear``'s; ``step_min_s`` / ``ratio_to_linear_min``: the
  same with the fastest timed step (robust on a shared machine, where noise only adds time);
  ``paired_ratio_to_linear``: each timed step runs right after one step of the ``linear`` model
  (kept alive), the median of the per-pair ratios — the comparison least affected by the machine's
  speed drifting while strategies are measured one after another (``--unpaired``: off); ``tokens_per_s``: attention-mask positions of
  the batch (text and image placeholders) per second; ``images_per_s``;
* peak memory of a steady-state training step (after the warm-up step, so AdamW's state exists):
  ``peak_mem_bytes`` = ``mem_static_bytes`` (distinct tensor storages live before the step:
  parameters, buffers, optimizer state, the batch) + ``mem_step_peak_bytes`` (the high-water mark of
  tensor storages created during the step and not yet freed: activations saved for backward,
  gradients, temporaries). The step-time part is counted by :class:`LiveTensorBytes`, a dispatch
  mode that sees every tensor an ATen op allocates and its release; it measures tensor bytes
  (what the model needs), not allocator caching or fragmentation, and not the Python heap, on
  every device alike, so it is per strategy even in one process (unlike the process-wide,
  monotone ``ru_maxrss``). On CUDA also ``cuda_max_memory_allocated_bytes`` (the caching
  allocator's peak over the same step, after ``reset_peak_memory_stats``);
* ``flops_step_as_run``: FLOPs of one training step as it runs (torch's FLOP counter; the prompt-prefix
  KV cache and the feature cache skip work that ``eff/flops_train_step`` counts);
  ``achieved_flops_per_s`` = ``flops_step_as_run / step_s`` and ``mfu`` = that over
  ``matmul_peak_flops_per_s``, a matmul peak measured on this device at start (CUDA: bf16 8192^3
  matmuls in a loop, CUDA events; CPU: fp32 2048^3). The training step FLOPs exclude the optimizer
  (not matmuls);
* with ``--profile``: ``profile_matmul_s`` / ``profile_matmul_share`` (matmul self time in one
  profiled step), ``matmul_flops_per_s`` (the matmuls' own rate) and ``profile_top`` (top ops).

Measures ``linear`` first and appends each strategy's row with provenance to ``--out`` as soon as it
is measured; prints a table at the end.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_flatten

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusionbench.config import load_config  # noqa: E402
from fusionbench.evaluation.efficiency import efficiency  # noqa: E402
from fusionbench.fusion import FUSIONS  # noqa: E402
from fusionbench.model import VisionLanguageModel  # noqa: E402
from fusionbench.results import append_row, provenance  # noqa: E402


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages that ATen ops allocate while the mode is active, live at once.

    An op's output storage counts when it is new (not one of the op's inputs' storages, so views
    and in-place ops count nothing) and stops counting when the storage is freed (a weak
    reference on the storage). ``current`` / ``peak`` are relative to entering the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, ptr: int, nbytes: int) -> None:
        if self._live.pop(ptr, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and ptr not in inputs and ptr not in self._live:
                self._live[ptr] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, ptr, nbytes)
        return out


def storage_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensor storages in ``objects`` (tensors, or nested containers)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tree_flatten(list(objects))[0]:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def matmul_peak_flops(device: torch.device, size: int | None = None, iters: int | None = None) -> float:
    """Measured matmul FLOP/s of the device in its training dtype (best of three timed loops):
    bf16 8192^3 on CUDA, fp32 2048^3 on CPU (this machine's reference for ``mfu``)."""
    if device.type != "cuda":
        size, iters = size or 2048, iters or 4
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(iters):
                a @ b
            best = max(best, 2 * size ** 3 * iters / (time.perf_counter() - t))
        return best
    size, iters = size or 8192, iters or 20
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        best = max(best, 2 * size ** 3 * iters / (start.elapsed_time(end) / 1e3))
    del a, b
    torch.cuda.empty_cache()
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")


def profile_step(step, matmul_flops: float, top: int = 8) -> dict[str, Any]:
    """One step under ``torch.profiler``: where its time goes. ``profile_matmul_s``: self time of
    the matmul ops (mm, addmm, bmm, baddbmm); ``matmul_flops_per_s``: their FLOPs over it (how
    close the matmuls run to the device's peak); ``profile_top``: the ``top`` ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    cuda = torch.cuda.is_available()

    def self_s(e) -> float:
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6

    total = sum(self_s(e) for e in events)
    mm = sum(self_s(e) for e in events if e.key.split("::")[-1] in MATMUL_OPS)
    ranked = sorted(events, key=self_s, reverse=True)[:top]
    return {"profile_total_s": total, "profile_matmul_s": mm, "profile_matmul_share": mm / total if total else None,
            "matmul_flops_per_s": matmul_flops / mm if mm else None,
            "profile_top": {e.key: round(self_s(e), 4) for e in ranked}}


def measure(point, device: torch.device, steps: int, autocast: str | None = None,
            compile_layers: bool = False, profile: bool = False, reference=None,
            keep: list | None = None) -> dict[str, Any]:
    """One strategy: FLOPs, memory of one step, median step time. With ``reference`` (the
    ``linear`` step), each timed step follows one reference step: ``paired_ratio_to_linear`` is the
    median of their ratios, immune to the machine's speed drifting between strategies. ``keep``
    (a list) receives this strategy's step function, to serve as the reference."""
    from fusionbench.assets.lm import load_lm
    from fusionbench.assets.vision import load_vision
    from fusionbench.training.datamodule import FusionDataModule

    vision = load_vision(point.vision, seed=point.seed)  # fresh backbones: strategies inject into the LM
    lm, tok = load_lm(point.lm, seed=point.seed)
    model = VisionLanguageModel.from_config(point, backbones=(vision, lm, tok)).to(device)
    data = FusionDataModule(point.data, point.trainer, tok, vision.preprocess, model.num_image_tokens, seed=point.seed)
    data.setup()
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in next(iter(data.train_dataloader())).items()}

    t = time.perf_counter()
    eff = efficiency(model, batch)
    count_s = time.perf_counter() - t

    from fusionbench.training.module import make_optimizer

    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], point.trainer)  # as training builds it
    model.train()
    if compile_layers:
        from fusionbench.runner import compile_decoder_layers

        compile_decoder_layers(model)
    import contextlib

    cast = (torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast
            else contextlib.nullcontext())

    def step() -> tuple[float, float, float]:
        """One training step; seconds of its forward, backward and optimizer parts."""
        t0 = time.perf_counter()
        with cast:
            out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
        _sync(device)
        t1 = time.perf_counter()
        out.loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    t = time.perf_counter()
    step()  # warm-up: allocates AdamW's state (and compiles, with --compile)
    warmup_s = time.perf_counter() - t
    _sync(device)
    row: dict[str, Any] = {}
    static = storage_bytes(list(model.parameters()), list(model.buffers()),
                           [p.grad for p in model.parameters() if p.grad is not None], list(opt.state.values()),
                           [v for v in batch.values() if isinstance(v, torch.Tensor)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with LiveTensorBytes() as live:
        step()
    _sync(device)
    if device.type == "cuda":
        row["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)

    times, parts, paired = [], [], []
    for _ in range(steps):
        if reference is not None:
            _sync(device)
            t = time.perf_counter()
            reference()
            _sync(device)
            ref_s = time.perf_counter() - t
        _sync(device)
        t = time.perf_counter()
        parts.append(step())
        times.append(time.perf_counter() - t)
        if reference is not None:
            paired.append(times[-1] / ref_s)
    if paired:
        row["paired_ratio_to_linear"] = statistics.median(paired)
    step_s = statistics.median(times)
    step_min_s = min(times)  # noise on a shared machine only adds time: the fastest step is the most robust
    fwd_s, bwd_s, opt_s = (statistics.median(p[i] for p in parts) for i in range(3))
    tokens = int(batch["attention_mask"].sum())
    b = int(batch["input_ids"].shape[0])
    # FLOPs of the step as it runs (prompt-prefix KV cache, off under --compile, and feature cache), which
    # is what the hardware does; eff/flops_train_step counts the whole prompt and the encoder
    with FlopCounterMode(display=False) as counter:
        step()
    counts = counter.get_flop_counts().get("Global", {})
    row["flops_step_as_run"] = counter.get_total_flops()
    row["matmul_flops_step_as_run"] = sum(v for op, v in counts.items() if str(op).split(".")[1] in MATMUL_OPS)
    if profile:
        row.update(profile_step(step, row["matmul_flops_step_as_run"]))
    row.update({
        "step_s": step_s, "step_min_s": step_min_s, "fwd_s": fwd_s, "bwd_s": bwd_s, "opt_s": opt_s, "steps_timed": steps,
        "optimizer_impl": point.trainer.optimizer_impl, "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "images_per_s": b / step_s, "count_s": count_s, "warmup_s": warmup_s,
        "autocast": autocast or "none", "compile": compile_layers,
        "feature_cache": bool(getattr(model, "feature_cache", False)),
        "cache_text_prefix": bool(getattr(model, "cache_text_prefix", False)),  # off once compiled
        "mem_static_bytes": static, "mem_step_peak_bytes": live.peak, "peak_mem_bytes": static + live.peak,
        "peak_mem_method": "live_tensor_storages", **eff,
    })
    if keep is not None:
        keep.append(step)  # its closure keeps this model, batch and optimizer alive
    else:
        del model, opt, batch, data, vision, lm, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


FUSION_YAMLS = Path(__file__).resolve().parent.parent / "experiments" / "fusion"


def strategy_override(name: str) -> str:
    """The ``fusion=`` override of the strategy with the options of its own experiment YAML
    (``experiments/fusion/<name>.yaml``, as the experiments run it); its defaults without one."""
    path = FUSION_YAMLS / f"{name}.yaml"
    fusion = OmegaConf.to_container(OmegaConf.load(path).get("fusion", {})) if path.exists() else {}
    if not isinstance(fusion, dict) or fusion.get("name", name) != name:
        fusion = {}
    return f"fusion={json.dumps({**fusion, 'name': name})}"


def _g(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per strategy (after one warm-up step)")
    ap.add_argument("--strategies", nargs="*", default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    ap.add_argument("--out", default=None, help="results table to append rows to")
    ap.add_argument("--autocast", default=None, choices=["bfloat16", "float16"],
                    help="mixed precision for the forward (bf16 on a GPU)")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the decoder blocks")
    ap.add_argument("--unpaired", action="store_true",
                    help="do not interleave each strategy's timed steps with linear steps (saves time, "
                         "loses the drift-free paired_ratio_to_linear)")
    ap.add_argument("--profile", action="store_true",
                    help="one more step under torch.profiler per strategy: matmul time share and FLOP/s, top ops")
    ap.add_argument("--options", default="yaml", choices=["yaml", "registry"],
                    help="strategy options: yaml = experiments/fusion/<strategy>.yaml's fusion block (the "
                         "configurations the experiments run; default), registry = the strategy's defaults")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from fusionbench.memory import retain_freed_memory

    malloc = "retain" if retain_freed_memory() else "default"  # as training runs (fusionbench.memory)
    strategies = args.strategies or FUSIONS.names()
    for name in strategies:
        FUSIONS.get(name)  # unknown names fail before any compute
    # linear first (the ratio's reference), so each row is complete and written as soon as measured
    strategies = sorted(strategies, key=lambda name: name != "linear")
    prov = provenance()
    peak = matmul_peak_flops(device)
    rows = []
    reference: list = []  # linear's step function, kept alive to pair every strategy's steps with
    for name in strategies:
        fusion = strategy_override(name) if args.options == "yaml" else f"fusion={name}"
        point = load_config(args.config, ["grid={}", "stages=[]", *args.overrides, fusion])
        row = {"benchmark": "efficiency", "strategy": name, "batch_size": point.trainer.batch_size, "malloc": malloc,
               "options": args.options, "fusion": OmegaConf.to_container(point.fusion),
               "lm": point.lm.source, "vision": point.vision.source, "device_type": device.type,
               **measure(point, device, args.steps, args.autocast, args.compile, args.profile,
                         reference=reference[0] if reference else None,
                         keep=reference if name == "linear" and not args.unpaired else None)}
        if name == "linear" and not args.unpaired:
            row["paired_ratio_to_linear"] = 1.0
        row["matmul_peak_flops_per_s"] = peak
        row["achieved_flops_per_s"] = row["flops_step_as_run"] / row["step_s"]
        row["mfu"] = row["achieved_flops_per_s"] / peak
        base = next((r for r in [*rows, row] if r["strategy"] == "linear"), None)
        row["ratio_to_linear"] = row["step_s"] / base["step_s"] if base else None
        row["ratio_to_linear_min"] = row["step_min_s"] / base["step_min_s"] if base else None
        rows.append(row)
        if args.out:
            append_row(args.out, {**row, **prov})
        print(f"{name:<14} {row['step_s']:7.3f} s/step  {row['tokens_per_s']:8.1f} tok/s  "
              f"train step {_g(row['eff/flops_train_step'])} GFLOP  peak mem {row['peak_mem_bytes'] / 2**20:,.0f} MiB",
              flush=True)
    print("\nGFLOP; per-token and per-image values in MFLOP; memory in MiB")
    print(f"{'strategy':<14} {'trainable':>11} {'step_s':>7} {'x linear':>8} {'tok/s':>7} {'peak mem':>8} "
          f"{'fwd':>7} {'train':>7} {'/text tok':>9} {'/img tok':>9} {'/image':>9}  mfu")
    for r in rows:
        per_tok = r.get("eff/flops_fwd_per_image_token")
        print(f"{r['strategy']:<14} {int(r['eff/params_trainable']):>11,} {r['step_s']:7.3f} "
              f"{r.get('paired_ratio_to_linear') or r['ratio_to_linear'] or float('nan'):8.2f} {r['tokens_per_s']:7.1f} "
              f"{r['peak_mem_bytes'] / 2**20:8.0f} {_g(r['eff/flops_fwd']):>7} {_g(r['eff/flops_train_step']):>7} "
              f"{r['eff/flops_fwd_per_text_token'] / 1e6:9.1f} {'-' if per_tok is None else f'{per_tok / 1e6:9.1f}':>9} "
              f"{r['eff/flops_fwd_per_image'] / 1e6:9.1f}  {r['mfu']:.3f}")
    return rows


if __name__ == "__main__":
    main()
