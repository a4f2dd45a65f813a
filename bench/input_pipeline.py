"""Input pipeline, both decode modes: CPU-seconds per image by process class, object-store bytes, decode limit.

    python bench/input_pipeline.py [--quick] [--images N] [--epochs E] [--cores C] [--share-rows S]
                                   [--shard-size K] [--no-dashboard]

On a synthetic ImageNet-like dataset (~500x375 raw JPEGs ingested to
shorter-side-256 shards of `shard_size` images, ingest's default 1,000 as
for ImageNet; cached under data/bench/), a local Ray cluster of
`cores` CPUs runs, for each mode (data.decode=cpu and =device), one lane's
`lane_dataset` per epoch (Lane(0, 1): one replica, one tower; shares of
`share_rows` rows; `cores` read tasks; the lane's object-store budget as
training sets it), and this process consumes it as a tower does:
`iter_shares` -> `ShareLoader(source, cpu)` (device mode: nvImageCodec's CPU
backend decodes, as `data.decode=device` does on a CPU-only cluster). One
warm-up epoch, then `epochs` measured epochs; the modes alternate epoch by
epoch so both see the same machine state.

What is measured (CPU-seconds = user + system, psutil, per process; robust
to the other load on a shared machine, unlike wall-clock rates):

- process classes, over this process and every process under it (the local
  Ray cluster is started here, so raylet, GCS, dashboard and the workers
  are its descendants):
    read tasks  Ray worker processes (`ray::...`/default_worker.py): the
                read tasks (cpu mode: read + params + decode + crop; device
                mode: read + params)
    consumer    this process, split into
                  decode   (device mode) nvImageCodec's decode call: the
                           calling thread's CPU time around the call plus
                           the CPU of the threads the decoder started
                  prepare  the rest of `ShareLoader` (crop copies, flip;
                           torch on one thread, so all on the calling
                           thread); on a GPU this is device work
                  deliver  all else: Ray Data's executor, `iter_batches`,
                           fetching blocks from the object store
    ray system  every other process of the cluster (raylet, gcs_server,
                dashboard and its agents, log monitor)
  "steady" = from the moment the epoch's first share has been prepared to
  the end of the epoch, over the images after the first share (the epoch's
  start-up and first-share latency excluded); "epoch" = the whole epoch,
  dataset creation included, over all its images: both are printed;
- the idle cluster's CPU (every class, over `--idle-seconds` after the
  warm-up epoch with nothing running), and how much of each mode's steady
  per-image total it accounts for at that mode's rate: a fixed cost that a
  faster pipeline spreads thinner;
- wall-clock images/s over the same windows;
- object-store bytes per image: the sum over the epoch of Ray Data's output
  block sizes of the read operator (`ds.get_stats_summary()`, the figures
  behind `ds.stats()`'s "output size bytes"), next to the sum of the consumed
  shares' buffer sizes (numpy nbytes, plus the bytes objects' lengths in
  device mode) and the stored JPEG bytes per image;
- the decode limit, in a separate plain Python process (no Ray, no other
  threads): cpu mode `CpuDecoder.train_crop` (simplejpeg decode + crop into
  a row), device mode nvImageCodec's CPU backend on batches of `share_rows`
  + the crop copy; CPU-seconds per image and one-process images/s, measured
  before the first and after the last epoch (medians).

The ratio "steady/cores / decode limit" is printed with its CPU-bound
ceiling (decode+crop CPU / all-process CPU per image): the wall-clock ratio
on a shared machine cannot exceed it, and the ceiling does not move with
the machine's load.

Prints the table and the issue's targets with PASS/FAIL read off it; writes
bench/results/input_pipeline.json (config, git revision, every epoch's
figures). Not a test. ~3 minutes with --quick, ~6-8 without (plus the
one-off data generation).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.process_cpu import ProcessTree, TimedDecoder, cpu_delta  # noqa: E402
from bench.record import git_revision, machine  # noqa: E402
from service.config import DataConfig  # noqa: E402
from service.data import storage  # noqa: E402
from service.data.epochs import DataSource, Lane, open_source  # noqa: E402
from service.data.ingest import IngestConfig, run_ingest  # noqa: E402
from service.data.synthetic import SynthConfig, generate  # noqa: E402

IMAGE_SIZE, RESIZE = 224, 256
MODES = ("cpu", "device")
CLASSES = ("read tasks", "consumer: decode", "consumer: prepare", "consumer: deliver", "ray system")
# Issue #15's targets.
DEVICE_OVERHEAD_MS = 0.1
DEVICE_STORE_RATIO = 1.3
CPU_TOTAL_RATIO = 1.25
CPU_STEADY_RATIO = 0.7


def prepare_data(num_images: int, cores: int, shard_size: int, log) -> str:
    """Raw synthetic JPEGs and their ingested shards (cached under data/bench/); the shard root."""
    classes = 10
    per_class = max(1, num_images // classes)
    base = ROOT / "data" / "bench" / f"input_pipeline-{classes}x{per_class}"
    raw, shards = str(base / "raw"), str(base / f"shards-{shard_size}")
    if not os.path.isfile(os.path.join(raw, "synth_manifest.json")):
        start = time.time()
        storage.delete_prefix(raw)
        generate(SynthConfig(out=raw, classes=classes, images_per_class=per_class, val_per_class=2,
                             layout="imagefolder", seed=0, size_scale=1.0, workers=cores))
        log(f"generated {classes * per_class} raw images in {time.time() - start:.0f} s -> {raw}")
    run_ingest(IngestConfig(source=raw, dest=shards, resize_size=RESIZE, shard_size=shard_size), log=log)
    return shards


def shard_jpegs(source: DataSource, limit: int = 0) -> list[tuple[str, bytes]]:
    """(key, stored JPEG bytes) of the training images, in stored order (the first `limit`; 0: all)."""
    import pyarrow.parquet as pq

    out: list[tuple[str, bytes]] = []
    for rel in source.meta.shards["train"]:
        table = pq.read_table(storage.join(source.root, rel), columns=["key", "jpeg"])
        out += list(zip(table.column("key").to_pylist(), table.column("jpeg").to_pylist()))
        if limit and len(out) >= limit:
            return out[:limit]
    return out


# --- the decode limit, in a process of its own ---------------------------------------------------

def decode_limit(root: str, images: int, share_rows: int) -> dict:
    """Decode + crop alone in this process: CPU-seconds per image and images/s, both decoders.
    Run through `--decode-limit` in a fresh process, so no Ray thread shares its CPU time."""
    import torch

    from service.data.decode import CpuDecoder, jpeg_size
    from service.data.device_decode import nvimgcodec_decoder
    from service.data.params import train_params

    torch.set_num_threads(1)
    source = open_source(DataConfig(root=root, resize_size=RESIZE, shuffle_seed=0), IMAGE_SIZE, 1)
    jpegs = shard_jpegs(source, images)
    params = [train_params(source, key, 0, *jpeg_size(data)) for key, data in jpegs]
    out = np.empty((share_rows, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)

    def timed(run) -> dict:
        run(jpegs[:share_rows], params[:share_rows])  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        for lo in range(0, len(jpegs), share_rows):
            run(jpegs[lo:lo + share_rows], params[lo:lo + share_rows])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return {"cpu_ms_per_image": cpu / len(jpegs) * 1e3, "images_per_s": len(jpegs) / wall}

    decoder = CpuDecoder()

    def simplejpeg_crop(part, part_params):
        for row, ((_key, data), p) in enumerate(zip(part, part_params)):
            decoder.train_crop(data, p, IMAGE_SIZE, "paper", out[row])

    nvimgcodec = nvimgcodec_decoder(torch.device("cpu"))
    target = torch.from_numpy(out)

    def nvimgcodec_decode(part, _params):
        return nvimgcodec.decode([data for _key, data in part])

    def nvimgcodec_crop(part, part_params):
        for row, (image, p) in enumerate(zip(nvimgcodec_decode(part, part_params), part_params)):
            top, left, height, width = p.box
            target[row] = torch.as_tensor(np.asarray(image.cpu()))[top:top + height, left:left + width]

    return {"cpu": timed(simplejpeg_crop), "device_decode_only": timed(nvimgcodec_decode),
            "device": timed(nvimgcodec_crop), "images": len(jpegs)}


def run_decode_limit(root: str, images: int, share_rows: int) -> dict:
    """`decode_limit` in a fresh Python process."""
    result = subprocess.run([sys.executable, __file__, "--decode-limit", root, "--images", str(images),
                             "--share-rows", str(share_rows)], capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise RuntimeError(f"decode-limit process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def share_nbytes(share: dict) -> int:
    """Bytes of one consumed share's buffers (device mode: the JPEGs' lengths)."""
    total = 0
    for value in share.values():
        array = None if isinstance(value, list) else np.asarray(value)
        total += sum(len(v) for v in value) if array is None or array.dtype == object else array.nbytes
    return total


def store_bytes(dataset) -> float:
    """Sum of the read operator's output block sizes, from Ray Data's execution stats
    (`Dataset.get_stats_summary`, the figures behind `ds.stats()`); NaN if absent."""
    try:
        summary = dataset.get_stats_summary()
    except Exception:  # noqa: BLE001 - a developer API: a missing figure is NaN, not a crash
        return float("nan")
    for op in reversed(summary.operators_stats):
        if "MapBatches" in op.operator_name and op.output_size_bytes is not None:
            return float(op.output_size_bytes.sum)
    return float("nan")


def run_epoch(source: DataSource, epoch: int, tree: ProcessTree, loader, decoder_threads: set[int],
              share_rows: int, tasks: int, budget: float) -> dict:
    """One epoch of one lane, consumed as a tower does; CPU-seconds by class and rates."""
    from service.data.pipeline import iter_shares, lane_dataset

    timed = loader._decoder if isinstance(loader._decoder, TimedDecoder) else None
    start_snap, start_threads, start = tree.snapshot(), tree.thread_times(), time.perf_counter()
    dataset = lane_dataset(source, "train", epoch, Lane(0, 1), share_rows, concurrency=tasks,
                           object_store_bytes=budget)
    images = consumed = 0
    prepare = decode_call = 0.0
    steady: dict = {}
    for share in iter_shares(dataset, share_rows, source.decode):
        n = len(share["label"])
        consumed += share_nbytes(share)
        before_decode = timed.seconds if timed else 0.0
        cpu = time.thread_time()
        loader(share, "train")
        spent = time.thread_time() - cpu
        in_decode = (timed.seconds if timed else 0.0) - before_decode
        images += n
        if not steady:  # the first share marks the start of the steady part
            steady = {"snap": tree.snapshot(), "threads": tree.thread_times(), "time": time.perf_counter(),
                      "images": images, "prepare": prepare + spent - in_decode, "decode_call": decode_call + in_decode}
        prepare += spent - in_decode
        decode_call += in_decode
    end_snap, end_threads, end = tree.snapshot(), tree.thread_times(), time.perf_counter()

    def split(before_snap, before_threads, prepare_s, decode_call_s) -> tuple[dict[str, float], int]:
        by_class, ended = cpu_delta(before_snap, end_snap)
        pool = sum(end_threads.get(t, 0.0) - before_threads.get(t, 0.0) for t in decoder_threads)
        consumer = by_class.pop("consumer", 0.0)
        by_class["consumer: decode"] = decode_call_s + pool
        by_class["consumer: prepare"] = prepare_s
        by_class["consumer: deliver"] = consumer - by_class["consumer: decode"] - prepare_s
        return by_class, ended

    epoch_cpu, epoch_ended = split(start_snap, start_threads, prepare, decode_call)
    steady_cpu, steady_ended = split(steady["snap"], steady["threads"], prepare - steady["prepare"],
                                     decode_call - steady["decode_call"])
    steady_images = images - steady["images"]
    return {
        "images": images, "steady_images": steady_images,
        "epoch_s": end - start, "first_share_s": steady["time"] - start, "steady_s": end - steady["time"],
        "epoch_images_per_s": images / (end - start),
        "steady_images_per_s": steady_images / max(end - steady["time"], 1e-9),
        "epoch_cpu_ms_per_image": {k: v / images * 1e3 for k, v in epoch_cpu.items()},
        "steady_cpu_ms_per_image": {k: v / max(steady_images, 1) * 1e3 for k, v in steady_cpu.items()},
        "processes_ended": {"epoch": epoch_ended, "steady": steady_ended},
        "store_bytes_per_image": store_bytes(dataset) / images,
        "consumed_bytes_per_image": consumed / images,
    }


def make_loaders(sources: dict[str, DataSource], tree: ProcessTree) -> dict[str, tuple[object, set[int]]]:
    """Per mode: the tower-side ShareLoader on the CPU device (its decoder timed) and the threads
    its decoder started. torch runs on one thread here, so the loader's tensor work (crop
    copies, flip) is all on the calling thread and its thread CPU time accounts for it exactly.
    One share is read and prepared in cpu mode first, so pyarrow's and torch's threads exist
    before the decoder is made; the threads new after the device loader's first share are
    then the decoder's own."""
    import torch

    from service.data.device_decode import ShareLoader
    from service.data.pipeline import iter_lane_local

    torch.set_num_threads(1)
    out = {}
    for mode in ("cpu", "device"):
        share = next(iter_lane_local(sources[mode], "train", 0, Lane(0, 1), 32))
        before = set(tree.thread_times())
        loader = ShareLoader(sources[mode], torch.device("cpu"))
        if loader._decoder is not None:
            loader._decoder = TimedDecoder(loader._decoder)
        loader(share, "train")
        out[mode] = (loader, set(tree.thread_times()) - before)
    return out


def idle_cpu(tree: ProcessTree, seconds: float) -> dict[str, float]:
    """CPU-seconds per wall second of each class while nothing runs: the cluster's background
    (Ray's daemons, idle workers' and this process's Ray threads), which a per-image figure
    spreads over however many images pass in that time."""
    before, start = tree.snapshot(), time.perf_counter()
    time.sleep(seconds)
    by_class, _ = cpu_delta(before, tree.snapshot())
    wall = time.perf_counter() - start
    return {kind: value / wall for kind, value in by_class.items()}


def median(values: list[float]) -> float:
    """Median, NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


def summarise(runs: list[dict], limits: list[dict], mode: str, jpeg_bytes: float, cores: int,
              idle: dict[str, float]) -> dict:
    """Medians over the measured epochs, the totals and the targets' ratios of one mode."""
    steady = {k: median([r["steady_cpu_ms_per_image"].get(k, 0.0) for r in runs]) for k in CLASSES}
    epoch = {k: median([r["epoch_cpu_ms_per_image"].get(k, 0.0) for r in runs]) for k in CLASSES}
    limit_ms = median([lim[mode]["cpu_ms_per_image"] for lim in limits])
    limit_rate = median([lim[mode]["images_per_s"] for lim in limits])
    out = {
        "steady_cpu_ms_per_image": steady, "epoch_cpu_ms_per_image": epoch,
        "steady_total_ms": sum(steady.values()), "epoch_total_ms": sum(epoch.values()),
        "steady_outside_decode_ms": sum(steady.values()) - steady["consumer: decode"],
        "steady_pipeline_ms": steady["read tasks"] + steady["consumer: deliver"] + steady["ray system"],
        "steady_images_per_s": median([r["steady_images_per_s"] for r in runs]),
        "epoch_images_per_s": median([r["epoch_images_per_s"] for r in runs]),
        "first_share_s": median([r["first_share_s"] for r in runs]),
        "store_bytes_per_image": median([r["store_bytes_per_image"] for r in runs]),
        "consumed_bytes_per_image": median([r["consumed_bytes_per_image"] for r in runs]),
        "jpeg_bytes_per_image": jpeg_bytes,
        "decode_limit_cpu_ms_per_image": limit_ms, "decode_limit_images_per_s_1core": limit_rate,
    }
    # The part of the steady per-image figures the idle cluster would have burnt anyway.
    per_image_s = median([r["steady_s"] / max(r["steady_images"], 1) for r in runs])
    out["idle_cpu_ms_per_image"] = sum(idle.values()) * per_image_s * 1e3
    out["store_vs_jpeg"] = out["store_bytes_per_image"] / jpeg_bytes
    out["total_vs_decode_limit"] = out["steady_total_ms"] / limit_ms
    out["steady_vs_decode_limit_per_core"] = out["steady_images_per_s"] / cores / limit_rate
    # What the steady ratio would be if the cores did nothing but this pipeline: the wall-clock
    # ratio on a shared machine cannot exceed it, and it does not move with the machine's load.
    out["cpu_bound_ratio_ceiling"] = limit_ms / out["steady_total_ms"]
    return out


def targets(summary: dict[str, dict]) -> list[tuple[str, float, str, bool]]:
    """(target, measured value, bound, met) for each of the issue's input targets. Device mode's
    overhead is given twice: without and with the tower's crop copies and flip, which run on
    the GPU in a GPU run but are CPU work here."""
    device, cpu = summary["device"], summary["cpu"]
    return [
        ("device: read, params, transport, delivery, Ray; ms/image", device["steady_pipeline_ms"],
         f"<= {DEVICE_OVERHEAD_MS}", device["steady_pipeline_ms"] <= DEVICE_OVERHEAD_MS),
        ("device: the same + crop/flip on the CPU device; ms/image", device["steady_outside_decode_ms"],
         f"<= {DEVICE_OVERHEAD_MS}", device["steady_outside_decode_ms"] <= DEVICE_OVERHEAD_MS),
        ("device: object-store bytes / stored JPEG bytes", device["store_vs_jpeg"],
         f"<= {DEVICE_STORE_RATIO}", device["store_vs_jpeg"] <= DEVICE_STORE_RATIO),
        ("cpu: all-process CPU / decode+crop alone", cpu["total_vs_decode_limit"],
         f"<= {CPU_TOTAL_RATIO}", cpu["total_vs_decode_limit"] <= CPU_TOTAL_RATIO),
        ("cpu: steady img/s per core / decode limit per core", cpu["steady_vs_decode_limit_per_core"],
         f">= {CPU_STEADY_RATIO}", cpu["steady_vs_decode_limit_per_core"] >= CPU_STEADY_RATIO),
    ]


def print_table(summary: dict[str, dict], cores: int, share_rows: int) -> None:
    """The per-image table, both modes side by side, then the targets."""
    cpu, device = summary["cpu"], summary["device"]
    print(f"\nCPU ms per image by process class (steady part; whole epoch in brackets), {cores} cores, "
          f"shares of {share_rows} rows")
    print(f"{'':<34} {'decode=cpu':>22} {'decode=device':>22}")
    for name in CLASSES:
        print(f"{name:<34} {cpu['steady_cpu_ms_per_image'][name]:>11.3f} ({cpu['epoch_cpu_ms_per_image'][name]:>7.3f})"
              f" {device['steady_cpu_ms_per_image'][name]:>11.3f} ({device['epoch_cpu_ms_per_image'][name]:>7.3f})")
    rows = [
        ("total, all processes", "steady_total_ms", "epoch_total_ms", "{:.3f}"),
        ("  of which the idle cluster's CPU", "idle_cpu_ms_per_image", None, "{:.3f}"),
        ("read + delivery + Ray (no decode/prep)", "steady_pipeline_ms", None, "{:.3f}"),
        ("outside the consumer's decode", "steady_outside_decode_ms", None, "{:.3f}"),
        ("decode limit: decode + crop alone", "decode_limit_cpu_ms_per_image", None, "{:.3f}"),
        ("images/s (steady, epoch)", "steady_images_per_s", "epoch_images_per_s", "{:.0f}"),
        ("decode limit images/s, 1 process", "decode_limit_images_per_s_1core", None, "{:.0f}"),
        ("steady/cores / decode limit (CPU bound)", "steady_vs_decode_limit_per_core", "cpu_bound_ratio_ceiling",
         "{:.2f}"),
        ("seconds to the first share", "first_share_s", None, "{:.2f}"),
        ("object-store bytes/image (Ray Data)", "store_bytes_per_image", None, "{:,.0f}"),
        ("consumed share bytes/image", "consumed_bytes_per_image", None, "{:,.0f}"),
        ("stored JPEG bytes/image", "jpeg_bytes_per_image", None, "{:,.0f}"),
    ]
    for label, key, bracket, fmt in rows:
        cells = []
        for mode in (cpu, device):
            text = fmt.format(mode[key]) + (f" ({fmt.format(mode[bracket])})" if bracket else "")
            cells.append(f"{text:>22}")
        print(f"{label:<34} {' '.join(cells)}")
    print("\ntargets (issue #15), read off the table:")
    for name, value, bound, met in targets(summary):
        print(f"  {name:<52} {value:8.3f}  {bound:<7} {'PASS' if met else 'FAIL'}")
    for mode in MODES:
        steady = summary[mode]["steady_cpu_ms_per_image"]
        top = max(steady, key=steady.get)
        print(f"  {mode} mode: largest steady cost is {top} ({steady[top]:.3f} ms/image of "
              f"{summary[mode]['steady_total_ms']:.3f})")


def start_ray(cores: int, dashboard: bool) -> None:
    """A local cluster of `cores` CPUs started from this process (so its processes are our descendants)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = os.path.join(tempfile.mkdtemp(prefix="bench-ray-"), "token")
        with open(token, "w") as f:
            f.write(secrets.token_hex(32))
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    import ray

    ray.init(num_cpus=cores, include_dashboard=dashboard, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def main() -> int:
    """Run every measurement, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2000 images, 1 measured epoch per mode")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per mode (after one warm-up)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--share-rows", type=int, default=128, help="rows per share (batch / towers)")
    parser.add_argument("--shard-size", type=int, default=IngestConfig.shard_size,
                        help="images per ingested shard (ingest's default; a read task reads at most one shard's rows)")
    parser.add_argument("--limit-images", type=int, default=1024, help="images in each decode-limit measurement")
    parser.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="idle-cluster CPU measured over this long")
    parser.add_argument("--decode-limit", metavar="ROOT", help=argparse.SUPPRESS)  # the child process's mode
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "input_pipeline.json"))
    args = parser.parse_args()
    if args.decode_limit:
        print(json.dumps(decode_limit(args.decode_limit, args.images, args.share_rows)))
        return 0
    if args.quick:
        args.images, args.epochs, args.limit_images = 2000, 1, 512
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start_ray(args.cores, not args.no_dashboard)
    import ray

    from service.data.pipeline import object_store_budget

    try:
        root = prepare_data(args.images, args.cores, args.shard_size, log)
        cfg = DataConfig(root=root, resize_size=RESIZE, augmentation="paper", shuffle_seed=0)
        sources = {mode: open_source(cfg, IMAGE_SIZE, 1, decode=mode) for mode in MODES}
        jpegs = shard_jpegs(sources["cpu"])
        jpeg_bytes = float(np.mean([len(data) for _key, data in jpegs]))
        tree = ProcessTree()
        loaders = make_loaders(sources, tree)
        budget = object_store_budget(1)
        limits = [run_decode_limit(root, args.limit_images, args.share_rows)]
        log(f"decode limit (1 process): {json.dumps(limits[0])}")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        idle: dict[str, float] = {}
        for epoch in range(args.epochs + 1):  # epoch 0 warms up Ray's workers and both modes' code
            if epoch == 1:
                idle = idle_cpu(tree, args.idle_seconds)
                log("idle cluster, CPU-s per s: " + ", ".join(f"{k} {v:.3f}" for k, v in idle.items()))
            for mode in MODES:
                loader, threads = loaders[mode]
                row = run_epoch(sources[mode], epoch, tree, loader, threads, args.share_rows, args.cores, budget)
                log(f"epoch {epoch} {mode}: {row['steady_images_per_s']:.0f} img/s steady, "
                    f"{sum(row['steady_cpu_ms_per_image'].values()):.3f} CPU ms/image"
                    + (" (warm-up)" if epoch == 0 else ""))
                if epoch:
                    runs[mode].append(row)
        limits.append(run_decode_limit(root, args.limit_images, args.share_rows))
        log(f"decode limit (1 process): {json.dumps(limits[1])}")
    finally:
        ray.shutdown()

    summary = {mode: summarise(runs[mode], limits, mode, jpeg_bytes, args.cores, idle) for mode in MODES}
    print_table(summary, args.cores, args.share_rows)
    record = {
        "benchmark": "input_pipeline", "git": git_revision(), "machine": machine(),
        "config": {"images": len(jpegs), "epochs": args.epochs, "cores": args.cores, "read_tasks": args.cores,
                   "share_rows": args.share_rows, "shard_size": args.shard_size, "image_size": IMAGE_SIZE, "resize_size": RESIZE,
                   "augmentation": "paper", "quick": args.quick, "dashboard": not args.no_dashboard,
                   "object_store_budget_bytes": budget, "decode_limit_images": args.limit_images,
                   "consumer_device": "cpu", "raw_mean_size": "~500x375 synthetic JPEG"},
        "idle_cpu_s_per_s": idle,
        "summary": summary,
        "targets": [{"target": name, "value": value, "bound": bound, "met": met}
                    for name, value, bound, met in targets(summary)],
        "epochs": runs, "decode_limit": limits,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2, default=float)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
