#!/usr/bin/env bash
# The one prepared GPU check: the paper network on one GPU through the
# service's wiring (step rates, MFU, host->device copies, JPEG decode per
# core) and the one-rank NCCL check. Needs only torch, numpy and Pillow (the
# device machines have no Ray, MLflow or Hydra). About 4-5 minutes on an H100/H200; rows that would not fit
# in --budget-s (default 290 s) are skipped, and the hard timeout below keeps
# the JSON written so far (it is saved after every row).
#   OUT=/some/dir bash bench/gpu.sh      -> $OUT/gpu_bench.json (else bench/results/)
#   bash bench/gpu.sh --no-compile       extra arguments go to bench/gpu_bench.py
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
# Every figure below is only as good as the build it ran on: say which.
"${PYTHON:-python}" -c 'import torch; cuda = torch.cuda.is_available()
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version() if cuda else None,
      "| device", torch.cuda.get_device_name() if cuda else "cpu (no CUDA device)")'
out=${OUT:-bench/results}
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=15 340 "${PYTHON:-python}" bench/gpu_bench.py --out "$out" "$@"
