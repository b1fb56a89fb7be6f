#!/usr/bin/env bash
# AlexNet trained from scratch on Imagenette (train -> val), evaluated as a classifier and as a
# retrieval system, with the Figure-4 grid: the README's Imagenette numbers come from this.
#
#   bash bench/imagenette.sh [DATA_DIR] [OUT_DIR]     (make imagenette)
#
# On a GPU: the paper's recipe at 224 px. On a CPU: the one-cycle recipe at 64 px (AlexNet's
# smallest input), 20 epochs, so that a 2-core machine finishes in well under an hour.
# Every command's JSON goes to OUT_DIR/*.json; the summary is printed at the end.
set -euo pipefail

DATA=${1:-../shared/datasets/imagenette2-224}
OUT=${2:-imagenette-out}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"

if "$BIN/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  TRAIN=(--recipe paper --image-size 224 --epochs "${EPOCHS:-90}")  # the paper: 90 epochs
else
  TRAIN=(--recipe onecycle --image-size 64 --epochs "${EPOCHS:-20}")
fi

echo "machine: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)" >&2
echo "training: ${TRAIN[*]}" >&2
SECONDS=0
"$BIN/retrieve" train "$DATA" -o "$OUT/model.pt" "${TRAIN[@]}" --json > "$OUT/train.json"
TRAIN_S=$SECONDS
"$BIN/retrieve" evaluate "$DATA" --weights "$OUT/model.pt" --json > "$OUT/classify.json"
"$BIN/retrieve" index "$DATA/train" --index "$OUT/index" --weights "$OUT/model.pt" --rebuild \
  --json > "$OUT/index.json"
"$BIN/retrieve" evaluate "$DATA/val" --retrieval --index "$OUT/index" -k 6 --json \
  > "$OUT/retrieval.json"
"$BIN/retrieve" grid "$DATA/val" --index "$OUT/index" -o "$OUT/figure4.png" --n 5
TOTAL_S=$SECONDS

"$BIN/python" - "$OUT" "$TRAIN_S" "$TOTAL_S" <<'EOF'
import json, sys
from pathlib import Path

out, train_s, total_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
classify = json.loads((out / "classify.json").read_text())
retrieval = json.loads((out / "retrieval.json").read_text())
print(json.dumps({"classify": classify, "retrieval": retrieval, "train_seconds": train_s,
                  "total_seconds": total_s}, indent=2))
EOF
