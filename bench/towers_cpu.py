"""Training-step throughput: tower-parallel (one process per tower, gloo)
against the single-process reference, on the same cores, in one run.

    python bench/towers_cpu.py [--steps 8] [--warmup 2] [--rounds 3] [--quick]

Both sides run the identical step (forward, loss, backward, SGD update) on
the same synthetic batch. The reference uses all cores as intra-op threads;
each tower process gets cores/towers threads, so the comparison is at equal
core count. The two sides alternate for `--rounds` rounds (A B A B ...), so
a drift in machine speed hits both; each round gives a ratio of medians and
the table reports the median round. Writes bench/results/towers_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from service.model import ReferenceAlexNet, alexnet_spec  # noqa: E402
from service.parallel.layout import ParallelLayout  # noqa: E402
from service.parallel.local import run_on_processes  # noqa: E402
from service.train.setup import build_optimizer, build_tower, rank_groups  # noqa: E402
from service.train.step import TowerStep  # noqa: E402

CONFIGS = {
    # name: (spec kwargs, batch)
    "small (alexnet_small, 64px, width 0.25)": (dict(num_classes=100, image_size=64, width_mult=0.25, init="kaiming"), 128),
    "paper (224px, 1000 classes)": (dict(num_classes=1000, image_size=224, width_mult=1.0), 32),
}


def _batch(spec_kwargs: dict, batch: int):
    generator = torch.Generator().manual_seed(0)
    size = spec_kwargs["image_size"]
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, spec_kwargs["num_classes"], (batch,), generator=generator)
    return images, labels


def reference_step_times(spec_kwargs: dict, batch: int, steps: int, warmup: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ReferenceAlexNet(alexnet_spec(towers=2, **spec_kwargs))
    optimizer = build_optimizer(model, 0.01, 0.9, 5e-4)
    images, labels = _batch(spec_kwargs, batch)
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _tower_worker(rank: int, world_size: int, spec_kwargs: dict, batch: int, steps: int, warmup: int, out: str):
    layout = ParallelLayout.from_world_size(world_size, 2)
    groups = rank_groups(layout)
    spec = alexnet_spec(towers=2, **spec_kwargs)
    model = build_tower(spec, groups, 0, torch.device("cpu"))
    step = TowerStep(model, build_optimizer(model, 0.01, 0.9, 5e-4), spec, groups)
    images, labels = _batch(spec_kwargs, batch)
    torch.distributed.barrier()  # start together; the steps' own collectives keep them in lockstep
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step(images, labels)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def tower_step_times(spec_kwargs: dict, batch: int, steps: int, warmup: int, threads: int) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.json")
        run_on_processes(_tower_worker, 2, spec_kwargs, batch, steps, warmup, out, threads=threads)
        return json.loads(Path(out).read_text())


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small config only, 4 steps, 1 round")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "towers_cpu.json"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    configs = dict(list(CONFIGS.items())[:1]) if args.quick else CONFIGS
    steps = 4 if args.quick else args.steps
    rounds = 1 if args.quick else args.rounds
    rows = []
    for name, (spec_kwargs, batch) in configs.items():
        measured = []
        for _ in range(rounds):
            reference = statistics.median(reference_step_times(spec_kwargs, batch, steps, args.warmup, cores))
            towers = statistics.median(tower_step_times(spec_kwargs, batch, steps, args.warmup, max(1, cores // 2)))
            measured.append((reference / towers, reference, towers))
        ratio, reference, towers = sorted(measured)[len(measured) // 2]  # the median round
        rows.append(
            {
                "config": name,
                "batch": batch,
                "reference_step_s": reference,
                "towers_step_s": towers,
                "reference_images_per_s": batch / reference,
                "towers_images_per_s": batch / towers,
                "ratio": ratio,
                "round_ratios": [m[0] for m in measured],
            }
        )
    header = f"{'config':<42} {'batch':>5} {'reference img/s':>16} {'2 towers img/s':>15} {'ratio':>6}"
    print(f"\ntower-parallel (2 processes, gloo) vs reference (1 process), {cores} cores, median of {steps} steps, median of {rounds} alternating rounds")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['config']:<42} {row['batch']:>5} {row['reference_images_per_s']:>16.1f} "
            f"{row['towers_images_per_s']:>15.1f} {row['ratio']:>6.2f}"
            f"   rounds: {', '.join(f'{r:.2f}' for r in row['round_ratios'])}"
        )
    print("target: ratio >= 0.90")
    result = {
        "benchmark": "towers_cpu",
        "git_revision": git_revision(),
        "cores": cores,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "steps": steps,
        "warmup": args.warmup,
        "rounds": rounds,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
