"""Training-step throughput: tower-parallel (one process per tower, gloo)
against the single-process reference, on the same cores, in one run.

    python bench/towers_cpu.py [--steps 8] [--warmup 2] [--rounds 3] [--quick] [--profile]

Both sides are the service's wiring: the towers are built by
`service.train.build.build_training` on a 1 x 2 layout (two processes joined by
gloo, `run_on_processes`); the reference is the same network in one process
(`ReferenceAlexNet`, grouped convs) in the same `TowerStep`, built by
`bench.step_rate.reference_training` from the same parts. Each step is the
production one: uint8 NHWC batch -> normaliser -> forward, loss, backward,
SGD update. The batch is already on every rank (the sibling's broadcast from
tower 0 is not timed).

The reference uses all cores as intra-op threads; each tower process gets
cores/towers threads, so the comparison is at equal core count. The two sides
alternate for `--rounds` rounds (A B A B ...), so a drift in machine speed
hits both; each round gives a ratio of medians and the table reports the
median round. `--profile` adds the time of each exchange's collective alone on
the same processes (gloo on loopback), to show what communication costs per
step, and the reference at the towers' thread count, which splits the ratio
into the reference's thread scaling and the tower split's efficiency. Writes bench/results/towers_cpu.json.
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
import torch.distributed as dist  # noqa: E402

from bench.projection import exchanges  # noqa: E402
from bench.step_rate import MEAN, STD, reference_training  # noqa: E402
from service.config import RecipeConfig  # noqa: E402
from service.model import alexnet_spec  # noqa: E402
from service.parallel.exchange import _all_gather_single, _reduce_scatter_single, reduce_scatter_slots  # noqa: E402
from service.parallel.layout import ParallelLayout  # noqa: E402
from service.parallel.local import run_on_processes  # noqa: E402
from service.train.build import TrainingOptions, build_training, rank_groups  # noqa: E402

TOWERS = 2
CONFIGS = {
    # name: (spec kwargs, batch)
    "small (alexnet_small, 64px, width 0.25)": (dict(num_classes=100, image_size=64, width_mult=0.25, init="kaiming"), 128),
    "paper (224px, 1000 classes)": (dict(num_classes=1000, image_size=224, width_mult=1.0), 32),
}


def _options(spec_kwargs: dict, layout: ParallelLayout) -> TrainingOptions:
    return TrainingOptions(spec=alexnet_spec(towers=TOWERS, **spec_kwargs), layout=layout, recipe=RecipeConfig(),
                           base_lr=0.01, steps_per_epoch=100, epochs=1, seed=0, mean=MEAN, std=STD)


def _batch(spec_kwargs: dict, batch: int):
    generator = torch.Generator().manual_seed(0)
    size = spec_kwargs["image_size"]
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, spec_kwargs["num_classes"], (batch,), generator=generator)
    return images, labels


def _step_times(training, images, labels, steps: int, warmup: int) -> list[float]:
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        training.step(training.normalizer(images), labels)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def reference_step_times(spec_kwargs: dict, batch: int, steps: int, warmup: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    training = reference_training(_options(spec_kwargs, ParallelLayout(1, 1)), torch.device("cpu"))
    return _step_times(training, *_batch(spec_kwargs, batch), steps, warmup)


def _tower_worker(rank: int, world_size: int, spec_kwargs: dict, batch: int, steps: int, warmup: int, out: str):
    options = _options(spec_kwargs, ParallelLayout.from_world_size(world_size, TOWERS))
    training = build_training(options, rank_groups(options.layout), torch.device("cpu"))
    images, labels = _batch(spec_kwargs, batch)
    dist.barrier()  # start together; the steps' own collectives keep them in lockstep
    times = _step_times(training, images, labels, steps, warmup)
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def tower_step_times(spec_kwargs: dict, batch: int, steps: int, warmup: int, threads: int) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.json")
        run_on_processes(_tower_worker, TOWERS, spec_kwargs, batch, steps, warmup, out, threads=threads)
        return json.loads(Path(out).read_text())


def _collective_worker(rank: int, world_size: int, spec_kwargs: dict, batch: int, repeats: int, out: str):
    """Median time of each exchange's collective alone (fp32, the CPU dtype)."""
    spec = alexnet_spec(towers=TOWERS, **spec_kwargs)
    rows = []
    for item in exchanges(spec):
        slot = torch.randn(batch * item.elements_per_image // TOWERS)
        gathered = torch.empty(TOWERS * slot.numel())
        timings = {}
        for name, run in (("all_gather", lambda: _all_gather_single(gathered, slot)),
                          # as the exchange's backward runs it (an all-to-all on gloo) ...
                          ("reduce_scatter", lambda: reduce_scatter_slots(slot, gathered, dist.group.WORLD)),
                          # ... and gloo's own reduce-scatter, which it replaces
                          ("gloo_reduce_scatter", lambda: _reduce_scatter_single(slot, gathered))):
            if name.endswith("reduce_scatter") and not item.backward:
                continue
            samples = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            timings[name + "_ms"] = statistics.median(samples) * 1000
        rows.append({"exchange": item.name, "bytes_per_tower": slot.numel() * 4, **timings})
    dist.barrier()
    # An empty collective: the fixed cost of one round trip through gloo.
    tiny = torch.zeros(1)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce(tiny)
        samples.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({"exchanges": rows, "empty_all_reduce_ms": statistics.median(samples) * 1000}))


def collective_profile(spec_kwargs: dict, batch: int, threads: int, repeats: int = 30) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "collectives.json")
        run_on_processes(_collective_worker, TOWERS, spec_kwargs, batch, repeats, out, threads=threads)
        profile = json.loads(Path(out).read_text())
    profile["per_step_ms"] = sum(r.get("all_gather_ms", 0) + r.get("reduce_scatter_ms", 0) for r in profile["exchanges"])
    profile["collectives_per_step"] = sum(1 + ("reduce_scatter_ms" in r) for r in profile["exchanges"])
    return profile


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
    parser.add_argument("--profile", action="store_true", help="also time each exchange's collective alone")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "towers_cpu.json"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    configs = dict(list(CONFIGS.items())[:1]) if args.quick else CONFIGS
    steps = 4 if args.quick else args.steps
    rounds = 1 if args.quick else args.rounds
    load_before = os.getloadavg()[0]
    rows = []
    for name, (spec_kwargs, batch) in configs.items():
        measured = []
        for _ in range(rounds):
            reference = statistics.median(reference_step_times(spec_kwargs, batch, steps, args.warmup, cores))
            towers = statistics.median(tower_step_times(spec_kwargs, batch, steps, args.warmup, max(1, cores // TOWERS)))
            measured.append((reference / towers, reference, towers))
        ratio, reference, towers = sorted(measured)[len(measured) // 2]  # the median round
        row = {
            "config": name,
            "batch": batch,
            "reference_step_s": reference,
            "towers_step_s": towers,
            "reference_images_per_s": batch / reference,
            "towers_images_per_s": batch / towers,
            "ratio": ratio,
            "round_ratios": [m[0] for m in measured],
        }
        if args.profile:
            row["collectives"] = collective_profile(spec_kwargs, batch, max(1, cores // TOWERS))
            # The ratio, taken apart: how well the reference uses `cores` threads
            # vs cores/towers, and how close the towers come to 1/towers of the
            # reference's work each at the same thread count (less sensitive to
            # other load: a busy machine hurts multi-threaded OpenMP most).
            narrow = statistics.median(reference_step_times(spec_kwargs, batch, steps, args.warmup, max(1, cores // TOWERS)))
            row["reference_step_s_at_tower_threads"] = narrow
            row["reference_thread_scaling"] = narrow / reference
            row["tower_split_efficiency"] = narrow / (TOWERS * towers)
        rows.append(row)
    header = f"{'config':<42} {'batch':>5} {'reference img/s':>16} {'2 towers img/s':>15} {'ratio':>6}"
    print(f"\ntower-parallel (2 processes, gloo, build_training) vs reference (1 process, TowerStep), {cores} cores, "
          f"median of {steps} steps, median of {rounds} alternating rounds; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['config']:<42} {row['batch']:>5} {row['reference_images_per_s']:>16.1f} "
              f"{row['towers_images_per_s']:>15.1f} {row['ratio']:>6.2f}"
              f"   rounds: {', '.join(f'{r:.2f}' for r in row['round_ratios'])}")
        if "collectives" in row:
            profile = row["collectives"]
            print(f"    {profile['collectives_per_step']} collectives per step take {profile['per_step_ms']:.1f} ms alone "
                  f"(empty all-reduce {profile['empty_all_reduce_ms']:.2f} ms); tower step {1000 * row['towers_step_s']:.1f} ms, "
                  f"half the reference step {500 * row['reference_step_s']:.1f} ms")
            print(f"    reference at {max(1, cores // TOWERS)} thread(s) {1000 * row['reference_step_s_at_tower_threads']:.1f} ms: "
                  f"thread scaling x{row['reference_thread_scaling']:.2f}, tower split efficiency {row['tower_split_efficiency']:.2f} "
                  f"(ratio ~ {TOWERS} x efficiency / scaling)")
            for item in profile["exchanges"]:
                backward = (f", reduce-scatter {item['reduce_scatter_ms']:.2f} ms (gloo's own "
                            f"{item['gloo_reduce_scatter_ms']:.2f} ms)") if "reduce_scatter_ms" in item else ""
                print(f"      {item['exchange']:<20} {item['bytes_per_tower'] / 1e3:>8.1f} kB: all-gather {item['all_gather_ms']:.2f} ms{backward}")
    print("target: ratio >= 0.90")
    result = {
        "benchmark": "towers_cpu",
        "git_revision": git_revision(),
        "cores": cores,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
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
