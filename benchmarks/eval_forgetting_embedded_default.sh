#!/usr/bin/env bash
# `fusionbench train` then `fusionbench eval` on the embedded default for a frozen-LM strategy (mlp)
# and full finetuning, with the text suite scored through lm-evaluation-harness (local BIG-bench +
# Austen task configs), the efficiency block and the depth probes. Rows: results/smoke/eval_lm_eval.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
FB=${FB:-.venv/bin/fusionbench}
OUT=${OUT:-results/smoke/eval_lm_eval.jsonl}
for key in mlp full_finetune; do
  $FB train "experiments/fusion/$key.yaml" trainer.max_steps=${STEPS:-30} data.train_size=256 data.val_size=32 \
    output_dir=runs/eval_smoke
  run_dir=$(ls -d runs/eval_smoke/$key/$key-* | tail -n 1)
  $FB eval "$run_dir" eval.text.backend=lm_eval eval.text.gen_tasks=[] eval.text.n_per_task=20 eval.text.ppl_chunks=4 eval.mm_items=32 \
    eval.probes=true eval.probe_train=64 eval.probe_test=32 --results-file "$OUT"
done
