"""The paper network on one GPU, through the service's wiring, in under 6 minutes.

    bash bench/gpu.sh                      (OUT=<dir> bash bench/gpu.sh: JSON into <dir>)
    python bench/gpu_bench.py [--budget-s 290] [--no-compile] [--compile-batches 256]
    python bench/gpu_bench.py --dry-run    (CPU, tiny: checks the script, measures nothing)

Measures, in this order (a failed row is recorded with its error and the
others still run):
1. JPEG decode + the paper's augmentation, images/s on one core and with
   N processes at once on this machine's CPUs (bench/decode_rate.py);
2. host -> device copy of uint8 [256, 224, 224, 3] batches: pageable, pinned,
   and the service's share loader + prefetcher (bench/copy_rate.py); then
   batched decode of shorter-side-256 JPEGs on the device at batch 128 and
   256 (bench/device_decode_rate.py): nvImageCodec's hardware (NVJPG) and
   CUDA backends, and torchvision's decode_jpeg, images/s (~10 s);
3. the one-rank collective check (bench/one_rank_check.py): the exchanges,
   DDP's bf16 hook and the batch split/gather on NCCL in a world of one,
   each against plain torch on the same GPU, pass/fail and seconds (<= 20 s);
4. the training step (bench/step_rate.py): alexnet T=1 and the two-tower
   reference at batch 128/256/512, fp32 vs bf16+channels_last(+TF32,
   cudnn.benchmark) vs +torch.compile; median step time from CUDA events
   after warm-up, images/s, MFU = train FLOPs per image x images/s / peak;
   and one tower of T=2/4/8 alone (bf16+cl, the middle batch): the compute
   per tower that bench/project.py adds modelled exchange times to.

Time budget (H100/H200): imports ~10 s, decode ~25 s, copies ~5 s, the
one-rank check <= 20 s, the 15
eager rows ~1 min (cuDNN autotuning included), each compile row ~1-1.5 min
(cold Inductor cache; they need a C compiler and the Python headers, and
are recorded as skipped without them). Compile runs at batch 256 only by default
(`--compile-batches`), after every eager row; a row that would not fit in
what is left of `--budget-s` is skipped and recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sysconfig
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import copy_rate, decode_rate, device_decode_rate, one_rank_check  # noqa: E402
from bench.step_rate import MODELS, MODES, PAPER, TOWER_MODELS, RowPlan, Shape, measure_row  # noqa: E402

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets: bf16
# tensor cores, TF32 tensor cores, fp32 CUDA cores. First substring match of
# the device name wins, so the specific names come first. The H200 is the
# H100's chip with more memory: same peaks.
PEAKS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 (and GH200)
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
)
# Which peak a mode is measured against: fp32 rows run with TF32 off.
MODE_PEAK = {"fp32": "fp32", "bf16+cl": "bf16", "bf16+cl+compile": "bf16"}
# Seconds a row is expected to need at most (skipped when less is left).
EAGER_ROW_S, COMPILE_ROW_S = 15.0, 100.0


# The dry run's network: the same code paths on a network small enough for a CPU
# (the paper network's 62M parameters alone make a CPU step take seconds).
DRY_SHAPE = Shape(image_size=64, num_classes=100, width_mult=0.25)


def device_peaks(name: str) -> tuple[dict | None, str]:
    """Peak TFLOP/s for a device name and which datasheet entry was used."""
    for key, peaks in PEAKS:
        if key.lower() in name.lower():
            return peaks, f"{key} datasheet (dense)"
    return None, f"unknown device {name!r}: pass --peak-bf16-tflops/--peak-fp32-tflops for MFU"


def c_compiler() -> str | None:
    """The C compiler Triton would build its launcher with ($CC, else cc/gcc/clang), if any."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for found in map(shutil.which, candidates) if found), None)


def compile_toolchain_problem() -> str | None:
    """Why compile rows cannot run here, or None: Inductor builds a launcher
    (Triton on GPU, C++ on CPU) at run time, which needs a compiler and Python.h."""
    if not c_compiler():
        return "skipped: no C compiler (set CC or install gcc)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"skipped: no Python headers ({headers} missing: install python3-dev)"
    return None


def environment(device: torch.device) -> dict:
    """Device, software versions and git revision, recorded with every result."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "driver": _driver_version() if cuda else None,
        "c_compiler": c_compiler(),
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "git_revision": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        return None
    return out.splitlines()[0] if out else None


def plan_rows(batches: list[int], compile_batches: list[int], compile_on: bool, tower_batch: int) -> list[RowPlan]:
    """Every eager row first (model x batch x numerics, then lone towers), then the compile rows."""
    rows = [RowPlan(model, batch, mode) for model in MODELS for batch in batches for mode in ("fp32", "bf16+cl")]
    rows += [RowPlan(model, tower_batch, "bf16+cl") for model in TOWER_MODELS]
    if compile_on:
        rows += [RowPlan(model, batch, "bf16+cl+compile") for batch in compile_batches for model in MODELS]
    return rows


def add_mfu(row: dict, peaks: dict | None) -> None:
    """MFU of a measured row against the peak its numerics run at."""
    kind = MODE_PEAK[row["mode"]]
    if "achieved_tflops" not in row or not peaks or not peaks.get(kind):
        return
    row["peak_tflops"], row["peak_kind"] = peaks[kind], kind
    row["mfu"] = row["achieved_tflops"] / peaks[kind]


def run_steps(plans: list[RowPlan], device: torch.device, args, deadline: float, log, on_row) -> None:
    """Measure each planned row (or record it as skipped) and hand it to `on_row`."""
    toolchain = compile_toolchain_problem() if any(MODES[plan.mode][1] for plan in plans) else None
    for plan in plans:
        compiled = MODES[plan.mode][1]
        need = COMPILE_ROW_S if compiled else EAGER_ROW_S
        left = deadline - time.monotonic()
        reason = toolchain if compiled and toolchain else None
        if not reason and not args.dry_run and left < need:
            reason = f"time budget: {left:.0f} s left, a {plan.mode} row needs up to {need:.0f} s"
        if reason:
            on_row({"model": plan.model, "batch": plan.batch, "mode": plan.mode, "skipped": reason})
            log(f"skip  {plan.model:<14} batch {plan.batch:>4} {plan.mode}: {reason}")
            continue
        row = measure_row(plan, device, args.steps, args.warmup, args.shape)
        on_row(row)
        status = row.get("error") or f"{row['step_ms']:.2f} ms, {row['images_per_s']:.0f} img/s"
        log(f"step  {plan.model:<14} batch {plan.batch:>4} {plan.mode:<16} {status} ({row['wall_s']:.0f} s)")


def _section(name: str, fn, log) -> dict:
    """Run one section; its failure is recorded, not raised."""
    began = time.perf_counter()
    try:
        result = {"result": fn()}
    except Exception as error:  # noqa: BLE001 - keep the other sections
        result = {"error": f"{type(error).__name__}: {error}"}
        log(f"{name}: FAILED {result['error']}")
    result["wall_s"] = time.perf_counter() - began
    return result


def print_tables(record: dict) -> None:
    env = record["environment"]
    print(f"\n{env['device']} | torch {env['torch']} | CUDA {env['cuda']} | driver {env['driver']}"
          f" | git {env['git_revision'][:10]}"
          f" | peak: {record['peak_source']}")
    steps = record["steps"]
    clock = "host clock, CPU dry run" if record["dry_run"] else "CUDA events"
    print(f"\ntraining step, {record['config']['shape']} (median of {record['config']['steps']} after {record['config']['warmup']} warm-up, {clock})")
    header = f"{'model':<14} {'batch':>5} {'mode':<16} {'step ms':>8} {'img/s':>9} {'vs fp32':>8} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}"
    print(header + "\n" + "-" * len(header))
    for row in steps:
        label = f"{row['model']:<14} {row['batch']:>5} {row['mode']:<16}"
        if "images_per_s" not in row:
            print(f"{label} {row.get('error') or row.get('skipped')}")
            continue
        base = next((r for r in steps if r["model"] == row["model"] and r["batch"] == row["batch"]
                     and r["mode"] == "fp32" and "images_per_s" in r), None)
        ratio = f"{row['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        memory = f"{row['max_memory_gib']:.1f}" if row.get("max_memory_gib") is not None else "-"
        print(f"{label} {row['step_ms']:>8.2f} {row['images_per_s']:>9.0f} {ratio:>8} {row['achieved_tflops']:>8.1f} {mfu:>6} {memory:>6}")
    check = record["one_rank"]
    if "result" in check:
        result = check["result"]
        print(f"\none-rank {result['backend']} check ({result['wall_s']:.1f} s): {'PASS' if result['passed'] else 'FAIL'}")
        for row in result["checks"]:
            print(f"  {row['name']:<26} {'pass' if row['passed'] else 'FAIL'} {row['seconds']:>6.2f} s  "
                  f"{row.get('detail') or row.get('error')}")
    else:
        print(f"\none-rank check: FAILED {check['error']}")
    copies = record["copy"]
    print(f"\nhost -> device, {record['config']['copy_batch']} (CUDA events; the prefetcher on the host clock)")
    for row in copies.get("result", []):
        print(f"  {row['method']:<52} {row['gb_per_s']:>7.1f} GB/s {row['batches_per_s']:>8.0f} batches/s")
    if "error" in copies:
        print(f"  FAILED: {copies['error']}")
    if "result" in record["device_decode"]:
        print()
        device_decode_rate.print_table(record["device_decode"]["result"])
    else:
        print(f"\ndevice decode: FAILED {record['device_decode']['error']}")
    decode = record["decode"]
    if "result" in decode:
        result = decode["result"]
        print(f"\nJPEG decode + paper augmentation ({result['transform_code']}; mean JPEG {result['mean_jpeg_bytes'] / 1e3:.0f} kB)")
        print(f"  1 process: {result['per_core_images_per_s']:.0f} img/s per core")
        for row in result["scaling"]:
            print(f"  {row['processes']:>3} processes: {row['images_per_s']:>8.0f} img/s  ({row['images_per_s'] / row['processes']:.0f} per process)")
    else:
        print(f"\nJPEG decode: FAILED {decode['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, batch 4, 2 steps, no compile: checks the script only")
    parser.add_argument("--budget-s", type=float, default=290.0, help="stop starting rows after this many seconds")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", default="128,256,512")
    parser.add_argument("--compile-batches", default="256")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile", action="store_true", help="with --dry-run: include a compile row")
    parser.add_argument("--decode-seconds", type=float, default=3.0)
    parser.add_argument("--peak-bf16-tflops", type=float, default=0.0)
    parser.add_argument("--peak-fp32-tflops", type=float, default=0.0)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"),
                        help="folder for the JSON (default: $OUT, else bench/results)")
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + args.budget_s

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    if args.dry_run:
        device = torch.device("cpu")
        args.steps, args.warmup, args.decode_seconds = 2, 1, 0.5
        batches, compile_batches, compile_on = [4], [4], args.compile
        args.shape = DRY_SHAPE
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: this benchmark needs a GPU (use --dry-run to check the script on CPU)")
        device = torch.device("cuda")
        batches = [int(b) for b in args.batches.split(",") if b]
        compile_batches = [int(b) for b in args.compile_batches.split(",") if b]
        compile_on = not args.no_compile
        args.shape = PAPER
    # Decode first: its worker processes fork from this one before CUDA is touched.
    processes = [1, 2] if args.dry_run else None
    decode = _section("decode", lambda: decode_rate.measure(32 if args.dry_run else 256, processes, args.decode_seconds), log)
    log("decode done")
    env = environment(device)
    peaks, peak_source = device_peaks(env["device"])
    if args.peak_bf16_tflops or args.peak_fp32_tflops:
        peaks = {"bf16": args.peak_bf16_tflops or None, "fp32": args.peak_fp32_tflops or None}
        peak_source = "given on the command line"
    log(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, driver {env['driver']}")
    copy_batch = 8 if args.dry_run else 256
    record = {
        "benchmark": "gpu_bench",
        "dry_run": args.dry_run,
        "complete": False,
        "environment": env,
        "peak_source": peak_source,
        "peaks_tflops": peaks,
        "config": {"steps": args.steps, "warmup": args.warmup, "batches": batches, "shape": asdict(args.shape),
                   "compile_batches": compile_batches if compile_on else [], "budget_s": args.budget_s,
                   "flops_convention": "forward MACs x 2 x 3 (fwd + bwd)",
                   "copy_batch": f"uint8 [{copy_batch}, 224, 224, 3] ({copy_batch * 224 * 224 * 3 / 1e6:.1f} MB)"},
        "steps": [],
    }
    out = Path(args.out) / ("gpu_bench_dry_run.json" if args.dry_run else "gpu_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # After every section and row: a run killed by an outer timeout keeps what it measured.
        record["total_s"] = time.monotonic() - started
        out.write_text(json.dumps(record, indent=2, default=str))

    record["decode"] = decode
    save()
    record["copy"] = _section("copy", lambda: copy_rate.measure(device, batch=copy_batch, copies=3 if args.dry_run else 20), log)
    save()
    log("copies done")
    record["device_decode"] = _section(
        "device_decode", lambda: device_decode_rate.measure(device, [8] if args.dry_run else [128, 256],
                                                            2 if args.dry_run else 10), log)
    save()
    log("device decode done")
    record["one_rank"] = _section("one_rank", lambda: one_rank_check.one_rank_check(device), log)
    save()
    log(f"one-rank check: {'pass' if record['one_rank'].get('result', {}).get('passed') else 'FAIL'}")

    def on_row(row: dict) -> None:
        add_mfu(row, peaks)
        record["steps"].append(row)
        save()

    run_steps(plan_rows(batches, compile_batches, compile_on, batches[len(batches) // 2]), device, args, deadline, log, on_row)
    record["complete"] = True
    save()
    print_tables(record)
    print(f"\ntotal {record['total_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
