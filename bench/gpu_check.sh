#!/usr/bin/env bash
# Everything GPU-side in one prepared run of under 7 minutes (bench/gpu_check.py says what).
#
#   bash bench/gpu_check.sh --prepare [--python 3.12] [--data DIR]
#       here, once: the wheels the bare GPU machine lacks (bench/gpu_env.py WHEELS: click, tqdm,
#       pytest and its four, faiss-cpu; pure Python but faiss) for that Python in .whl/, and a
#       subset of Imagenette in .gpu-data/ (both in .git/info/exclude, never committed); says
#       the size and refuses above 60 MiB (the machine takes 64 MiB of carried files).
#   bash bench/gpu_check.sh
#       on the GPU machine (carry .whl and .gpu-data): installs from .whl only what does not
#       import, a preflight says in one line what is missing, then the steps in order, each
#       under a hard time limit, each writing its part of $OUT/gpu_check.json and .md as it ends.
#   PYTHON=/bare/python3.X TORCH_FROM=VENV bash bench/gpu_check.sh --rehearse
#       here, after --prepare --python 3.X: the machine's situation (a fresh virtual environment
#       that sees only torch, torchvision and their requirements, linked from VENV, default
#       .venv; the network cut off with unshare -n) up to where a GPU is needed: install,
#       preflight, the CUDA tests collected without error; exit 0. tests/test_gpu_check.py runs it.
#
# OUT defaults to ./gpu-check-out. Without a CUDA device the full run stops after the preflight
# with one line and exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
WHEELS=.whl
DATA=.gpu-data/imagenette
SITE=${GPU_SITE:-${TMPDIR:-/tmp}/gpu-check-site}
FAISS_VERSION=${FAISS_VERSION:-1.15.1}
PER_CLASS=${PER_CLASS:-150}
LIMIT_MIB=60
BUDGET=${BUDGET:-395}  # seconds for the steps; with install and preflight, under 7 minutes

say() { echo "gpu_check: $*" >&2; }

carried_mib() { du -scm "$WHEELS" .gpu-data 2>/dev/null | tail -1 | cut -f1; }

prepare() {
  local python=3.12 source=../shared/datasets/imagenette2-224/val
  while [[ $# -gt 0 ]]; do
    case $1 in
      --python) python=$2; shift 2 ;;
      --data) source=$2; shift 2 ;;
      *) say "unknown --prepare option $1"; exit 2 ;;
    esac
  done
  local exclude
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) || exclude=.git/info/exclude
  mkdir -p "$(dirname "$exclude")"
  for folder in /.whl/ /.gpu-data/; do
    grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
  done
  local wanted
  wanted=$("$PY" - "$python" <<'EOF'
import sys
sys.path.insert(0, "bench")
from gpu_env import wheels_for
major, minor = map(int, sys.argv[1].split("."))
print(" ".join(wheels_for((major, minor)).values()))
EOF
) || { say "cannot read bench/gpu_env.py's wheel list"; exit 1; }
  wanted=${wanted/faiss-cpu/faiss-cpu==$FAISS_VERSION}
  rm -rf "$WHEELS" "$DATA"
  mkdir -p "$WHEELS" "$DATA"
  # --no-deps with the whole list: numpy and Pillow come with torchvision on the machine.
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$python" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" $wanted ||
    { say "cannot download the wheels for Python $python ($wanted)"; exit 1; }
  echo "$python" >"$WHEELS/PYTHON"
  if [[ -d "$source" ]]; then
    for class in "$source"/*/; do
      name=$(basename "$class")
      mkdir -p "$DATA/$name"
      find "$class" -type f | sort | head -n "$PER_CLASS" | xargs -I{} cp {} "$DATA/$name/"
    done
  else
    say "no data under $source: .gpu-data holds none (the indexing and training steps fail)"
  fi
  local total
  total=$(carried_mib)
  du -sh "$WHEELS" .gpu-data >&2
  if ((total > LIMIT_MIB)); then
    say "carried folders take ${total} MiB, more than ${LIMIT_MIB}: lower PER_CLASS"
    exit 1
  fi
  echo "prepared for Python $python: carry $WHEELS and .gpu-data (together ${total} MiB)"
}

# Install what does not import, from the carried wheels only; then the one-line preflight.
setup() {
  [[ -d "$WHEELS" ]] || { say "no $WHEELS (run --prepare here and carry it)"; exit 1; }
  local want have
  want=$(cat "$WHEELS/PYTHON" 2>/dev/null)
  have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
    { say "$PY does not run"; exit 1; }
  if [[ "$want" != "$have" ]]; then
    say "$WHEELS holds wheels for Python ${want:-?}, $PY is $have: --prepare --python $have"
    exit 1
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  "$PY" bench/gpu_env.py install --wheels "$WHEELS" --site "$SITE" >&2 || exit 1
  "$PY" bench/gpu_env.py preflight >&2 || exit 1
}

cuda_test_files() { grep -l "mark.cuda" tests/test_*.py; }

until_gpu() {
  setup
  local listing
  # shellcheck disable=SC2046
  listing=$("$PY" -m pytest --collect-only -q -m cuda -p no:cacheprovider $(cuda_test_files) 2>&1)
  local status=$?
  if ((status != 0)); then  # 2: a collection error, 5: nothing collected
    tail -15 <<<"$listing" >&2
    say "the CUDA tests did not collect (pytest status $status)"
    exit 1
  fi
  say "collected: $(tail -1 <<<"$listing")"
  [[ -n "$(find "$DATA" -type f 2>/dev/null | head -1)" ]] || { say "no images in $DATA"; exit 1; }
  say "carried: $(carried_mib) MiB; stopping where a GPU is needed"
}

rehearse() {
  local source=${TORCH_FROM:-.venv}
  [[ -n "${PYTHON:-}" ]] || { say "--rehearse: set PYTHON to the bare interpreter"; exit 2; }
  [[ -x "$source/bin/python" ]] || { say "no $source/bin/python to take torch from (TORCH_FROM)"; exit 2; }
  work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-rehearsal.XXXXXX")  # global: the EXIT trap reads it
  trap 'rm -rf "$work"' EXIT
  "$source/bin/python" bench/gpu_env.py link --into "$work/links" torch torchvision >&2 || exit 1
  "$PY" -m venv "$work/venv" || { say "$PY -m venv failed"; exit 1; }
  local site
  site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$work/links" >"$site/torch-only.pth"
  # The machine's situation: no network (a new network namespace holds only a down loopback).
  unshare -n env PYTHON="$work/venv/bin/python" GPU_SITE="$work/site" bash -c '
    links=$(awk "NR > 2 {print \$1}" /proc/net/dev | tr -d : | tr "\n" " ")
    [[ "$links" == "lo " ]] || { echo "gpu_check: not cut off (interfaces: $links)" >&2; exit 1; }
    echo "gpu_check: network cut off (interfaces: $links)" >&2
    exec bash bench/gpu_check.sh --until-gpu'
}

run_steps() {
  setup
  # GPU_CHECK_SMOKE=1 (tests/test_gpu_check.py): the steps on the CPU at toy sizes, and
  # GPU_CHECK_STEPS / GPU_CHECK_LIMIT_CAP pick steps and cap their limits, to test this loop.
  if [[ "${GPU_CHECK_SMOKE:-}" != 1 ]] &&
    ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "no CUDA device visible to torch ($PY); nothing run"
    exit 2
  fi
  [[ -d "$DATA" ]] || { say "no $DATA (run --prepare here and carry .gpu-data)"; exit 2; }
  mkdir -p "$OUT/steps"
  rm -f "$OUT"/steps/*.json
  say "ready in ${SECONDS}s; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  local started=$SECONDS name limit left status plan line
  mapfile -t plan < <("$PY" bench/gpu_check.py plan)
  for line in "${plan[@]}"; do
    read -r name limit <<<"$line"
    [[ -z "${GPU_CHECK_STEPS:-}" || " $GPU_CHECK_STEPS " == *" $name "* ]] || continue
    ((limit <= ${GPU_CHECK_LIMIT_CAP:-$limit})) || limit=$GPU_CHECK_LIMIT_CAP
    left=$((BUDGET - (SECONDS - started)))
    ((left >= 10)) || break # the report marks the rest as not reached
    ((limit <= left)) || limit=$left
    say "step $name (at most ${limit}s)"
    timeout -k 5 "$limit" "$PY" bench/gpu_check.py step "$name" --data "$DATA" --out "$OUT" \
      --limit "$limit" </dev/null 2>&1 | tee -a "$OUT/gpu_check.log"
    status=${PIPESTATUS[0]}
    if ((status == 124 || status == 137)); then
      "$PY" bench/gpu_check.py mark "$name" --out "$OUT" --status "timed out" --limit "$limit"
    elif [[ ! -f "$OUT/steps/$name.json" ]]; then
      "$PY" bench/gpu_check.py mark "$name" --out "$OUT" --status "crashed (exit $status)" \
        --limit "$limit"
    fi
    "$PY" bench/gpu_check.py report --out "$OUT"
  done
  "$PY" bench/gpu_check.py report --out "$OUT" --final
}

case "${1:-}" in
  --prepare) shift; prepare "$@" ;;
  --rehearse) rehearse ;;
  --until-gpu) until_gpu ;;
  "") run_steps ;;
  *) say "unknown option $1 (--prepare, --rehearse, or nothing on the GPU machine)"; exit 2 ;;
esac
