#!/usr/bin/env bash
# The main study at GPU scale in one command (experiments/main_gpu.yaml): the resumable sweep, the
# GPU efficiency benchmark (bf16 autocast, MFU) into results/throughput_cuda.jsonl, then the report.
#   bash scripts/study_gpu.sh [overrides...]        # or: make study-gpu
# CONFIG=... picks another experiment; extra arguments are overrides for every point. Without CUDA
# the efficiency benchmark is skipped (said on stderr); the sweep runs wherever its config says.
set -euo pipefail
cd "$(dirname "$0")/.."
FB=${FB:-.venv/bin/fusionbench}
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-experiments/main_gpu.yaml}
$FB sweep "$CONFIG" "$@"
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY benchmarks/efficiency.py experiments/base.yaml --device cuda --autocast bfloat16 --steps 10 \
      --out "${THROUGHPUT_OUT:-results/throughput_cuda.jsonl}"
else
  echo "study_gpu: no CUDA device; skipping benchmarks/efficiency.py --autocast bfloat16" >&2
fi
$FB report ${REPORT_ARGS:-}
