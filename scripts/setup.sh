#!/usr/bin/env bash
# Creates .venv with exactly the locked environment (requirements.lock, CPU torch) plus fusionbench
# itself (editable). Idempotent; safe to re-run. FUSIONBENCH_UNLOCKED=1 instead installs the newest
# releases pyproject.toml allows (what `make test-latest` tests against; never used for results).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FUSIONBENCH_VENV:-.venv}
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install -q uv
fi
[ -x "$VENV/bin/python" ] || uv venv -q -p 3.11 "$VENV" 2>/dev/null || uv venv -q "$VENV"
# torch==2.13.0 CPU: the local wheel where it exists, else PyTorch's CPU index.
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  SRC=(--find-links /opt/wheels)
else
  SRC=(--index-strategy unsafe-best-match --extra-index-url https://download.pytorch.org/whl/cpu)
fi
if [ "${FUSIONBENCH_UNLOCKED:-0}" = 1 ]; then
  TORCH_WHL=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
  uv pip install -q -p "$VENV/bin/python" --upgrade "${SRC[@]}" ${TORCH_WHL:+"$TORCH_WHL"} -e ".[dev]"
  echo "fusionbench installed in $VENV with the newest allowed releases (unlocked)"
else
  # exactly the lock's packages and versions (hash-checked); anything else in the venv is removed
  uv pip sync -q -p "$VENV/bin/python" "${SRC[@]}" --require-hashes requirements.lock
  uv pip install -q -p "$VENV/bin/python" --no-deps -e .
  echo "fusionbench installed in $VENV from requirements.lock"
fi
