#!/usr/bin/env bash
# A lent GPU's one long command (the device tool allows at most 10 minutes per command, ~15 minutes of
# device time per session): scripts/gpu_check.sh and main_gpu.yaml's points for SEEDS, one sweep per
# strategy side by side (alone, a step at this model size is bound by kernel launches; six side by
# side kept an H200's SM about 80% busy, 2.1-2.8 steps/s each), all stopped at END (epoch seconds). What
# finished is packed into $OUT/gpu_lease.tar.gz: rows (results/main_gpu.jsonl, the check's row), each
# sweep's log and status file, each point's metrics.csv (also a killed point's: its step times), and
# nvidia-smi's utilisation samples. A point not finished by END is lost with the machine.
#   bash scripts/offline_run.sh PARTS -- env END=$(( $(date +%s) + 560 )) bash scripts/gpu_lease.sh
# ONLY: the strategy labels, comma-separated (default: the contrast strategies with single-stage
# budgets); SEEDS (default [0]); CONFIG (default experiments/main_gpu.yaml); MIN_LEFT (default 60: seconds
# END must leave, or nothing starts); arguments: overrides
# for every point, the check's too (tests/test_sweep.py runs it so at the tiny tier on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
FB=${FB:-.venv/bin/fusionbench}
CONFIG=${CONFIG:-experiments/main_gpu.yaml}
SEEDS=${SEEDS:-[0]}
ONLY=${ONLY:-mlp,blind (mlp),visual_expert,flamingo,full_finetune,lora}
END=${END:-$(( $(date +%s) + 480 ))}
PACK=${OUT:-/tmp}/gpu_lease.tar.gz
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
MIN_LEFT=${MIN_LEFT:-60}
left() { echo $(( END - $(date +%s) )); }
[ "$(left)" -gt "$MIN_LEFT" ] || { echo "gpu_lease: END leaves $(left) s; nothing started" >&2; exit 1; }
W=$(mktemp -d)
mkdir -p "$W/logs"
echo "gpu_lease: $(date -u +%FT%TZ), $(left) s to END, commit $(git describe --always --dirty 2>/dev/null)" | tee "$W/logs/lease.txt"
nvidia-smi -L >> "$W/logs/lease.txt" 2>&1
nvidia-smi dmon -s um -d 10 > "$W/logs/dmon.txt" 2>&1 &
dmon=$!
pids=()
CHECK_DIR=$W/check timeout -k 5 "$(left)" bash scripts/gpu_check.sh "$@" > "$W/logs/gpu_check.log" 2>&1 &
pids+=($!)
IFS=, read -ra labels <<< "$ONLY"
for label in "${labels[@]}"; do
  slug=$(echo "$label" | tr -c 'A-Za-z0-9_\n' '_')
  timeout -k 5 "$(left)" $FB sweep "$CONFIG" --only "$label" "seeds=$SEEDS" "$@" > "$W/logs/sweep_$slug.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; echo "pid $p rc $?" >> "$W/logs/lease.txt"; done
kill "$dmon" 2>/dev/null
read -r results runs < <(${PY:-python3} - "$CONFIG" "$@" <<'PY'
import sys
from pathlib import Path
from fusionbench.config import load_config
c = load_config(sys.argv[1], [*sys.argv[2:], "grid={}"])  # where the points wrote, whatever the grid
print(c.results_file, Path(c.output_dir) / c.name)
PY
)
[ -n "${runs:-}" ] || echo "gpu_lease: could not read $CONFIG's results_file and output_dir; packing logs only" | tee -a "$W/logs/lease.txt" >&2
[ -n "${results:-}" ] && [ -f "$results" ] && cp "$results" "$W/"
[ -f "$W/check/check.jsonl" ] && cp "$W/check/check.jsonl" "$W/"
[ -f "$runs/sweep.jsonl" ] && cp "$runs/sweep.jsonl" "$W/logs/"
for d in ${runs:+"$runs"/*/}; do
  [ -d "$d" ] || continue
  mkdir -p "$W/points/$(basename "$d")"
  cp "$d/config.yaml" "$W/points/$(basename "$d")/" 2>/dev/null
  for stage in "$d"logs/*/; do  # one folder per stage (moe: dense, upcycle)
    [ -d "$stage" ] || continue
    mkdir -p "$W/points/$(basename "$d")/$(basename "$stage")"
    cp "$stage"metrics*.csv "$W/points/$(basename "$d")/$(basename "$stage")/" 2>/dev/null
  done
done
echo "gpu_lease: done $(date -u +%FT%TZ), $(left) s to END" | tee -a "$W/logs/lease.txt"
rm -rf "$W/check/runs"
tar -czf "$PACK" -C "$W" . && echo "gpu_lease: packed $(du -h "$PACK" | cut -f1) into $PACK"
