#!/usr/bin/env bash
# A short end-to-end check of experiments/main_gpu.yaml on the machine it is meant for, before its
# sweep: one point (mlp, seed 0), a few steps, and every path the full run takes. That covers
# training on the accelerator with its bf16 and compile settings, the validation callback with its
# image controls, the forgetting curve, checkpoints, and the test-set evaluation (on the training
# device: eval.device auto) with the text suite and the depth probes.
# Small data, into a scratch folder, not results/. Minutes, not hours: run it first in a GPU session
# (a device bug then costs minutes, not a sweep).
#   bash scripts/gpu_check.sh [overrides...]      # CHECK_DIR: scratch folder (default /tmp/fusionbench-gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
FB=${FB:-.venv/bin/fusionbench}
DIR=${CHECK_DIR:-/tmp/fusionbench-gpu-check}
rm -rf "$DIR"
start=$(date +%s)
$FB sweep "${CONFIG:-experiments/main_gpu.yaml}" 'seeds=[0]' --only mlp 'contrasts=[]' \
  trainer.max_steps=20 trainer.warmup_steps=2 trainer.val_every_n_steps=10 trainer.checkpoint_every_n_steps=10 \
  eval.curve_every_n_steps=10 data.train_size=640 data.val_size=48 data.test_size=240 eval.val_items=24 \
  eval.mm_items=8 eval.text.n_per_task=8 eval.text.ppl_chunks=2 eval.probe_train=32 eval.probe_test=16 \
  "results_file=$DIR/check.jsonl" "output_dir=$DIR/runs" "$@"
[ -s "$DIR/check.jsonl" ] || { echo "gpu_check: the point wrote no row ($DIR)" >&2; exit 1; }
# evaluated where it trained (eval.device: auto): on a GPU machine the GPU, not the CPU Lightning leaves the model on
PYTHON=${PYTHON:-$(dirname "${FB%% *}")/python}
[ -x "$PYTHON" ] || PYTHON=python3
"$PYTHON" - "$DIR/check.jsonl" <<'PY' || exit 1
import json, sys
row = json.loads(open(sys.argv[1]).readline())
print(f"gpu_check: trained on {row['device']}, evaluated on {row['eval_device']}", file=sys.stderr)
sys.exit(0 if row["eval_device"] == row["device"] else f"gpu_check: evaluated on {row['eval_device']}, trained on {row['device']}")
PY
echo "gpu_check: passed in $(( $(date +%s) - start )) s; row in $DIR/check.jsonl" >&2
