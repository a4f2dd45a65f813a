"""The paper-config training step on one GPU: fp32 vs bf16 autocast +
channels_last, batch 128 and 256, timed with CUDA events after warm-up.

    python bench/gpu_step.py [--steps 20] [--warmup 5] [--out bench/results/gpu_step.json]

Steps the paper's reference network (conv2/4/5 with groups=2, as on the two
GPUs) through the service's own `TowerStep` in a 1 × 1 layout. Needs only torch: the device
machines have no Ray, MLflow or Hydra. Images are uint8 NHWC on the device and
normalised there, as in training. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from service.model import ReferenceAlexNet, alexnet_owt_spec, alexnet_spec  # noqa: E402
from service.parallel.groups import single_process_groups  # noqa: E402
from service.parallel.layout import ParallelLayout  # noqa: E402
from service.train.setup import build_optimizer  # noqa: E402
from service.train.step import Normalizer, StepOptions, TowerStep  # noqa: E402


def measure(spec, batch: int, bf16: bool, channels_last: bool, steps: int, warmup: int, device_name: str = "cuda") -> dict:
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = ReferenceAlexNet(spec).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, 0.01, 0.9, 5e-4)
    # The reference is one "tower" of a 1-tower layout; loss scaling by
    # spec.towers would be wrong for it, so give the step a towers=1 view.
    step = TowerStep(model, optimizer, spec.with_towers(1), single_process_groups(ParallelLayout(1, 1)),
                     StepOptions(bf16=bf16, channels_last=channels_last))
    normalizer = Normalizer([124, 116, 104], [58, 57, 57], device, channels_last)
    images = torch.randint(0, 256, (batch, spec.image_size, spec.image_size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, spec.num_classes, (batch,), device=device)
    times = []
    for index in range(warmup + steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(normalizer(images), labels)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:  # a CPU dry run of the script itself
            begin = time.perf_counter()
            step(normalizer(images), labels)
            elapsed = time.perf_counter() - begin
        if index >= warmup:
            times.append(elapsed)
    median = statistics.median(times)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"step_ms": median * 1000, "images_per_s": batch / median, "max_memory_gib": memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_step.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = {"alexnet (paper, 2 groups)": alexnet_spec(towers=2), "alexnet_owt": alexnet_owt_spec(towers=1)}
    rows = []
    for name, spec in models.items():
        for batch in (128, 256):
            for label, bf16, channels_last in (("fp32", False, False), ("bf16+channels_last", True, True)):
                result = measure(spec, batch, bf16, channels_last, args.steps, args.warmup)
                rows.append({"model": name, "batch": batch, "numerics": label, **result})
                torch.cuda.reset_peak_memory_stats()
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'model':<26} {'batch':>5} {'numerics':<20} {'step ms':>8} {'img/s':>9} {'vs fp32':>8}")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"] and r["numerics"] == "fp32")
        print(f"{row['model']:<26} {row['batch']:>5} {row['numerics']:<20} {row['step_ms']:>8.2f} "
              f"{row['images_per_s']:>9.0f} {row['images_per_s'] / base['images_per_s']:>7.2f}x")
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "git_revision": revision,
                                          "steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
