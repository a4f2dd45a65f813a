#!/usr/bin/env bash
# The one prepared GPU check: the paper network on one GPU through the
# service's wiring (step rates, MFU, host->device copies, JPEG decode per
# core). Needs only torch, numpy and Pillow (the device machines have no Ray,
# MLflow or Hydra). About 4-5 minutes on an H100/H200; rows that would not fit
# in --budget-s (default 290 s) are skipped, and the hard timeout below keeps
# the JSON written so far (it is saved after every row).
#   OUT=/some/dir bash bench/gpu.sh      -> $OUT/gpu_bench.json (else bench/results/)
#   bash bench/gpu.sh --no-compile       extra arguments go to bench/gpu_bench.py
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
out=${OUT:-bench/results}
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=15 340 "${PYTHON:-python}" bench/gpu_bench.py --out "$out" "$@"
