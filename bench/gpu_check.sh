#!/usr/bin/env bash
# Everything GPU-side in one prepared run of under 8 minutes (bench/gpu_check.py says what).
#
#   bash bench/gpu_check.sh --prepare     here, once: the faiss-cpu wheel for Python 3.12 and a
#                                         subset of Imagenette, in .whl/ and .gpu-data/ (both
#                                         listed in .git/info/exclude, never committed)
#   bash bench/gpu_check.sh               on the GPU machine (carry .whl and .gpu-data): checks
#                                         for a GPU first, installs the project --no-deps over
#                                         the torch that is there, runs the checks
#
# Results: $OUT/gpu_check.json and $OUT/gpu_check.md (OUT defaults to ./gpu-check-out). Without
# a CUDA device it stops at once with one line and exit status 2, having run nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
DATA=.gpu-data/imagenette
FAISS_VERSION=${FAISS_VERSION:-1.15.1}
PER_CLASS=${PER_CLASS:-150}

if [[ "${1:-}" == "--prepare" ]]; then
  SOURCE=${2:-../shared/datasets/imagenette2-224/val}
  for folder in /.whl/ /.gpu-data/; do
    grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >>.git/info/exclude
  done
  rm -rf .whl "$DATA"
  mkdir -p .whl "$DATA"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "faiss-cpu==$FAISS_VERSION" || { echo "gpu_check: cannot download faiss-cpu" >&2; exit 1; }
  for class in "$SOURCE"/*/; do
    name=$(basename "$class")
    mkdir -p "$DATA/$name"
    find "$class" -type f | sort | head -n "$PER_CLASS" | xargs -I{} cp {} "$DATA/$name/"
  done
  du -sh .whl "$DATA" >&2
  echo "prepared: carry .whl and .gpu-data (together $(du -sch .whl .gpu-data | tail -1 | cut -f1))"
  exit 0
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then
  echo "gpu_check: no CUDA device visible to torch ($PY); nothing run" >&2
  exit 2
fi
if [[ ! -d "$DATA" ]]; then
  echo "gpu_check: no $DATA (run 'bash bench/gpu_check.sh --prepare' and carry .gpu-data)" >&2
  exit 2
fi

SECONDS=0
if ! "$PY" -c 'import faiss' 2>/dev/null; then
  if compgen -G ".whl/faiss_cpu-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/faiss_cpu-*.whl || { echo "gpu_check: faiss wheel did not install" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: no faiss and no .whl/faiss_cpu-*.whl; index steps will fail" >&2
  fi
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null ||
  { echo "gpu_check: the project did not install (--no-deps -e .)" >&2; exit 1; }
echo "gpu_check: installed in ${SECONDS}s; $(nvidia-smi --query-gpu=name,driver_version \
  --format=csv,noheader 2>/dev/null | head -1)" >&2

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout 460 "$PY" bench/gpu_check.py --data "$DATA" --out "$OUT" --budget 430 "$@" \
  2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check: finished in ${SECONDS}s with status $status" >&2
exit "$status"
