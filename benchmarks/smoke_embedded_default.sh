#!/usr/bin/env bash
# Every registered strategy through `fusionbench run` on the embedded default (SmolLM2-135M +
# EfficientNet-Lite0), from its own experiments/fusion/<key>.yaml, shortened to a few steps and a few
# eval items: proves each trains, evaluates (multimodal + text suite + forgetting) and writes rows.
# Rows go to results/smoke/ (not read by `fusionbench report`). Extra arguments are overrides for every run
# (not trainer.max_steps: moe's stages set their own, and an override every stage overrides is refused).
set -euo pipefail
cd "$(dirname "$0")/.."
FB=${FB:-.venv/bin/fusionbench}
OUT=${OUT:-results/smoke/embedded_default.jsonl}
SHORT=(trainer.warmup_steps=0 data.train_size=64 data.val_size=32 eval.mm_items=16
       eval.text.n_per_task=10 eval.text.ppl_chunks=4 "results_file=$OUT" output_dir=runs/smoke)
for key in $($FB list | sed -n 's/^fusion strategies: //p' | tr -d ','); do
  steps=(trainer.max_steps=4)
  if [ "$key" = moe ]; then  # its stages set their own steps (a trainer.max_steps override is refused)
    steps=("stages=[{name: dense, trainer: {max_steps: 2}}, {name: unfreeze, trainer: {max_steps: 2}}, {name: upcycle, trainer: {max_steps: 2}}]")
  fi
  echo "=== $key"
  $FB run "experiments/fusion/$key.yaml" "${steps[@]}" "${SHORT[@]}" "$@"
done
