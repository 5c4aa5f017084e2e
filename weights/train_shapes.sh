#!/usr/bin/env bash
# Reproduces weights/shapes.pt (the bundled `shapes` model, card: weights/shapes.json) from scratch
# with the project's own `train` command, on fresh generated scenes (circle, square, triangle, 256 px).
# About 55 min on a 2-core CPU with the machine to itself; any device works (--device auto).
#   bash weights/train_shapes.sh [RUN_DIR]        # re-run with the same RUN_DIR after a stop: it resumes
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR="${1:-runs/shapes-bundled}"
PY="${PYTHON:-.venv/bin/python}"
RESUME=()
[ -f "$RUN_DIR/checkpoint.pt" ] && RESUME=(--resume)
"$PY" -m mrcnn train --model light --arch '{"depths": [1, 1, 1, 1]}' \
  --data shapes:1000000:1:256 --val shapes:100:777:256 --val-num 100 \
  --steps 2500 --batch-size 8 --lr 0.02 --warmup-steps 100 --schedule cosine \
  --weight-decay 0.0001 --clip-grad-norm 10 --seed 0 --threads "${THREADS:-2}" \
  --log-every 10 --checkpoint-every 100 \
  --export weights/shapes.pt --out "$RUN_DIR" "${RESUME[@]}"
# then: python -m mrcnn shapes --out /tmp/heldout --num 500 --seed 12345 --size 256
#       python -m mrcnn evaluate --model weights/shapes.pt --data /tmp/heldout --json
