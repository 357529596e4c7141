"""Training step time of every registered fusion strategy, side by side in one process (so ratios
hold on a noisy machine): same backbones, same batch of real data, same number of tokens.

    .venv/bin/python benchmarks/step_time.py experiments/base.yaml --steps 3 --out results/step_time.jsonl

Writes one row per strategy (median step seconds, ratio to ``linear``, tokens per second,
trainable parameters) with provenance; prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusionbench.config import load_config
from fusionbench.fusion import FUSIONS
from fusionbench.model import VisionLanguageModel
from fusionbench.results import append_row, provenance
from fusionbench.training.datamodule import FusionDataModule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per strategy (after one warm-up step)")
    ap.add_argument("--strategies", nargs="*", default=None)
    ap.add_argument("--out", default=None, help="results table to append rows to")
    args = ap.parse_args()
    cfg = load_config(args.config, ["grid={}", "stages=[]", *args.overrides])
    from fusionbench.assets.lm import load_lm
    from fusionbench.assets.vision import load_vision

    strategies = args.strategies or FUSIONS.names()
    rows = []
    for name in strategies:
        point = load_config(args.config, ["grid={}", "stages=[]", *args.overrides, f"fusion={name}"])
        vision = load_vision(point.vision, seed=point.seed)  # fresh backbones: strategies inject into the LM
        lm, tok = load_lm(point.lm, seed=point.seed)
        model = VisionLanguageModel.from_config(point, backbones=(vision, lm, tok))
        data = FusionDataModule(point.data, point.trainer, tok, vision.preprocess, model.num_image_tokens, seed=point.seed)
        data.setup()
        batch = next(iter(data.train_dataloader()))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        times = []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t)
        step = statistics.median(times)
        tokens = int(batch["attention_mask"].sum())
        rows.append({"benchmark": "step_time", "strategy": name, "step_s": step, "tokens_per_step": tokens,
                     "tokens_per_s": tokens / step, "steps_timed": args.steps,
                     "batch_size": point.trainer.batch_size, "lm": point.lm.source, "vision": point.vision.source,
                     **model.param_counts()})
        print(f"{name:<14} {step:7.3f} s/step  {tokens / step:8.1f} tok/s  trainable {rows[-1]['params_trainable']:,}",
              flush=True)
    base = next((r["step_s"] for r in rows if r["strategy"] == "linear"), None)
    prov = provenance()
    print("\nstrategy        step_s  ratio_to_linear")
    for r in rows:
        r["ratio_to_linear"] = r["step_s"] / base if base else None
        print(f"{r['strategy']:<14} {r['step_s']:7.3f}  {r['ratio_to_linear']:.2f}" if base else r["strategy"])
        if args.out:
            append_row(args.out, {**r, **prov})


if __name__ == "__main__":
    main()
