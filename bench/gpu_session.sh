#!/usr/bin/env bash
# The GPU session's one command (issue 15 point 1; docs/benchmarks.md, "Reference canvas at context 1024").
#
# The device image has python3 and torch but not what `slmb train --no-track` imports besides torch and numpy;
# .whl (git-ignored, carried to the device) holds those wheels and, under .whl/shared, the request and dataset.
# This installs the wheels ($SLMB_WHEELS, default .whl) into $SLMB_SITE (default /tmp/site), points slmb at
# .whl/shared and runs bench/gpu_training.py (arguments pass through); the table, the JSON and each run's logs
# land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
SITE=${SLMB_SITE:-/tmp/site}
WHEELS=${SLMB_WHEELS:-.whl}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SLMB_SHARED_DIR=${SLMB_SHARED_DIR:-$PWD/.whl/shared}
export SLMB_DATA_DIR=${SLMB_DATA_DIR:-$SLMB_SHARED_DIR/datasets}
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,memory.total --format=csv \
    > "$OUT/gpu.csv" 2>&1 || true
fi
python3 bench/gpu_training.py --json "$OUT/gpu_training.json" --logs "$OUT/logs" "$@" 2>&1 | tee "$OUT/gpu_training.md"
