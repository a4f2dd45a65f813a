#!/usr/bin/env bash
# One short, prepared GPU check (the device machines have torch but no Ray,
# MLflow or Hydra): the paper-config training step, fp32 vs bf16+channels_last.
#   bash bench/gpu.sh            (writes bench/results/gpu_step.json, or $OUT/ when set)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
out=${OUT:-bench/results}
PYTHONUNBUFFERED=1 python bench/gpu_step.py --steps 20 --warmup 5 --out "$out/gpu_step.json"
