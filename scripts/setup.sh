#!/usr/bin/env bash
# Creates .venv with the whole stack, CPU torch pinned. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FUSIONBENCH_VENV:-.venv}
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install -q uv
fi
[ -x "$VENV/bin/python" ] || uv venv -q -p 3.11 "$VENV" 2>/dev/null || uv venv -q "$VENV"
# torch==2.13.0 CPU: a local wheel where one exists, else PyTorch's CPU index.
TORCH_WHL=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$TORCH_WHL" ]; then
  TORCH_SPEC=("$TORCH_WHL")
else
  TORCH_SPEC=("torch==2.13.0" "--index-strategy" "unsafe-best-match" "--extra-index-url" "https://download.pytorch.org/whl/cpu")
fi
uv pip install -q -p "$VENV/bin/python" "${TORCH_SPEC[@]}" -e ".[dev]"
echo "fusionbench installed in $VENV"
