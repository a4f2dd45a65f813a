"""Input-pipeline throughput: this Ray Data pipeline vs a DataLoader baseline vs the decode limit.

    python bench/input_pipeline.py [--quick] [--images N] [--runs R] [--cores C]

Measures, on the same synthetic ImageNet-like images (~500x375 raw JPEGs,
ingested to 256-px shards) and the same cores, median images/s over `runs`
epochs after one warm-up epoch:

- pipeline (local / s3): `build_pipeline` (paper augmentation, 224 crops,
  `cores` decode actors) from shards in a local folder and in a local
  moto S3 server, iterated as a trainer does (one streaming_split iterator,
  batches of 128), epoch time including Ray Data's per-epoch start-up;
  "steady" excludes the time to the first batch;
- baseline: torch DataLoader (`cores` workers) over the raw JPEG files, PIL
  decode + RandomResizedCrop(224) + flip + normalise to float CHW, the common
  recipe (torchvision is not used; the same maths in PIL/numpy/torch);
- decode limit: PIL decode alone of the shard JPEGs in one process (1 core);
- stages: Parquet read alone through Ray Data, and decode+augment alone in
  one process (the per-core capacity of a decode actor).

Prints a table and the bottleneck stage; writes bench/results/input_pipeline.json
with the config and git revision. Generated data is cached under
data/bench/ (gitignored). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.config import DataConfig  # noqa: E402
from service.data import storage, transforms  # noqa: E402
from service.data.pipeline import build_pipeline, split_for_replicas  # noqa: E402
from service.data.ingest import IngestConfig, run_ingest  # noqa: E402
from service.data.meta import load_meta  # noqa: E402
from service.data.pipeline import TrainTransform  # noqa: E402
from service.data.synthetic import SynthConfig, generate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, RESIZE, BATCH = 224, 256, 128


def git_revision() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {"commit": run("git", "rev-parse", "HEAD") or "none", "dirty": bool(run("git", "status", "--porcelain"))}


def prepare_data(num_images: int, cores: int, log) -> tuple[str, str]:
    classes = 10
    per_class = max(1, num_images // classes)
    base = os.path.join(REPO, "data", "bench", f"input_pipeline-{classes}x{per_class}")
    raw, shards = os.path.join(base, "raw"), os.path.join(base, "shards")
    if not os.path.isfile(os.path.join(raw, "synth_manifest.json")):
        start = time.time()
        storage.delete_prefix(raw)
        generate(SynthConfig(out=raw, classes=classes, images_per_class=per_class, val_per_class=2,
                             layout="imagefolder", seed=0, size_scale=1.0, workers=cores))
        log(f"generated {classes * per_class} raw images in {time.time() - start:.0f} s -> {raw}")
    run_ingest(IngestConfig(source=raw, dest=shards, resize_size=RESIZE, shard_size=500), log=log)
    return raw, shards


def shard_jpegs(root: str) -> list[bytes]:
    import pyarrow.parquet as pq

    meta = load_meta(root)
    out = []
    for rel in meta.shards["train"]:
        out += pq.read_table(os.path.join(root, rel), columns=["jpeg"]).column("jpeg").to_pylist()
    return out


def timed(fn, runs: int) -> list[float]:
    """`runs` measurements after one warm-up call."""
    fn()  # warm-up
    return [fn() for _ in range(runs)]


def bench_decode_and_transform(jpegs: list[bytes], meta, runs: int) -> tuple[list[float], list[float]]:
    """Decode alone and decode + paper augmentation, one process, alternated run by run
    so that both see the same machine state (this VM's speed drifts)."""
    from PIL import Image

    transform = TrainTransform(IMAGE_SIZE, RESIZE, "paper", 0.1, meta.eigval, meta.eigvec)
    batches = [np.array(jpegs[i:i + 128], dtype=object) for i in range(0, len(jpegs), 128)]

    def decode() -> float:
        start = time.perf_counter()
        for data in jpegs:
            Image.open(io.BytesIO(data)).load()  # shards are RGB already: no convert
        return len(jpegs) / (time.perf_counter() - start)

    def augment() -> float:
        start = time.perf_counter()
        for b in batches:
            transform({"jpeg": b, "label": np.zeros(len(b), np.int64)})
        return len(jpegs) / (time.perf_counter() - start)

    decode(), augment()  # warm-up
    pairs = [(decode(), augment()) for _ in range(runs)]
    return [d for d, _ in pairs], [a for _, a in pairs]


class RawImageDataset:
    """The baseline: raw JPEG files -> RandomResizedCrop(224) + flip + normalise, float32 CHW."""

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths, self.labels = paths, labels
        self.mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
        self.std = np.array([0.229, 0.224, 0.225], np.float32) * 255

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        rng = np.random.default_rng()
        img = Image.open(self.paths[index]).convert("RGB")
        top, left, h, w = transforms.random_resized_crop_box(rng, img.height, img.width)
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.asarray(img, dtype=np.float32))
        tensor = ((tensor - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)).permute(2, 0, 1)
        return tensor, self.labels[index]


def bench_baseline(raw: str, cores: int, runs: int) -> list[float]:
    import torch

    train = os.path.join(raw, "train")
    wnids = sorted(os.listdir(train))
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        for name in sorted(os.listdir(os.path.join(train, wnid))):
            paths.append(os.path.join(train, wnid, name))
            labels.append(label)
    torch.set_num_threads(1)

    def once() -> float:
        loader = torch.utils.data.DataLoader(RawImageDataset(paths, labels), batch_size=BATCH, shuffle=True,
                                             num_workers=cores)
        start, seen = time.perf_counter(), 0
        for images, _labels in loader:
            seen += len(images)
        return seen / (time.perf_counter() - start)

    return timed(once, runs)


def bench_pipeline(root: str, cores: int, runs: int, s3: storage.S3Settings) -> tuple[list[float], list[float], list[float]]:
    cfg = DataConfig(root=root, resize_size=RESIZE, decode_concurrency=cores, shuffle_seed=0,
                     s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
    data = build_pipeline(cfg, IMAGE_SIZE, 1)
    iterator = split_for_replicas(data.train, 1)[0]
    epoch, steady, first_batch = [], [], []
    for run in range(runs + 1):
        start = time.perf_counter()
        first_at, first_n, seen = None, 0, 0
        for batch in iterator.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=2):
            seen += len(batch["label"])
            if first_at is None:
                first_at, first_n = time.perf_counter(), seen
        end = time.perf_counter()
        if run:  # run 0 is the warm-up
            epoch.append(seen / (end - start))
            steady.append((seen - first_n) / max(end - first_at, 1e-9))
            first_batch.append(first_at - start)
    return epoch, steady, first_batch


def bench_read_only(root: str, runs: int, s3: storage.S3Settings) -> list[float]:
    import ray.data

    meta = load_meta(root, s3)
    fs, base = storage.arrow_filesystem(root, s3)
    paths = [f"{base}/{rel}" for rel in meta.shards["train"]]

    def once() -> float:
        """Steady read rate: from the first batch to the last (start-up excluded)."""
        first_at, first_n, seen = None, 0, 0
        ds = ray.data.read_parquet(paths, filesystem=fs, num_cpus=0).select_columns(["jpeg", "label"])
        for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
            seen += len(batch["label"])
            if first_at is None:
                first_at, first_n = time.perf_counter(), seen
        return (seen - first_n) / max(time.perf_counter() - first_at, 1e-9)

    return timed(once, runs)


def start_moto(log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                log(f"moto S3 server on {url} (pid {proc.pid})")
                return proc, url
        except OSError:
            time.sleep(0.05)  # poll interval, bounded by the deadline
    proc.kill()
    raise RuntimeError("moto_server did not start")


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1000 images, 2 runs")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 measurement")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "input_pipeline.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs = 1000, 2
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = os.path.join(tempfile.mkdtemp(prefix="bench-ray-"), "token")
        with open(token, "w") as f:
            f.write(secrets.token_hex(32))
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)

    import ray

    ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    try:
        raw, shards = prepare_data(args.images, args.cores, log)
        meta = load_meta(shards)
        jpegs = shard_jpegs(shards)
        results: dict[str, list[float]] = {}
        log("measuring: decode limit and decode + paper augmentation (1 process)")
        results["decode_limit_1core"], results["transform_1core"] = bench_decode_and_transform(jpegs, meta, args.runs)
        log(f"measuring: baseline DataLoader ({args.cores} workers, raw JPEGs)")
        results["baseline_dataloader"] = bench_baseline(raw, args.cores, args.runs)
        log("measuring: Parquet read alone (Ray Data, local)")
        results["read_only_local"] = bench_read_only(shards, args.runs, storage.S3Settings())
        log(f"measuring: pipeline from a local folder ({args.cores} decode actors)")
        results["pipeline_local"], results["pipeline_local_steady"], results["first_batch_s_local"] = bench_pipeline(
            shards, args.cores, args.runs, storage.S3Settings())
        if not args.no_s3:
            proc, url = start_moto(log)
            try:
                s3 = storage.S3Settings(endpoint=url, access_key="bench", secret_key="bench")
                storage.boto3_client(s3).create_bucket(Bucket="bench")
                root = "s3://bench/imagenet"
                for name in ("meta.json", "ingest_report.json"):
                    storage.write_bytes(f"{root}/{name}", storage.read_bytes(os.path.join(shards, name)), s3)
                storage.upload_dir(os.path.join(shards, "shards"), f"{root}/shards", s3)
                log("measuring: Parquet read alone (Ray Data, S3)")
                results["read_only_s3"] = bench_read_only(root, args.runs, s3)
                log("measuring: pipeline from S3")
                results["pipeline_s3"], results["pipeline_s3_steady"], results["first_batch_s_s3"] = bench_pipeline(
                    root, args.cores, args.runs, s3)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        ray.shutdown()

    med = {k: median(v) for k, v in results.items()}
    cores = args.cores
    per_core = {
        "baseline_dataloader": med["baseline_dataloader"] / cores,
        "pipeline_local": med["pipeline_local"] / cores,
        "pipeline_local_steady": med["pipeline_local_steady"] / cores,
        "pipeline_s3": med.get("pipeline_s3", float("nan")) / cores,
        "pipeline_s3_steady": med.get("pipeline_s3_steady", float("nan")) / cores,
        "decode_limit": med["decode_limit_1core"],
        "transform": med["transform_1core"],
    }
    ratios = {
        "pipeline_local_vs_baseline": per_core["pipeline_local"] / per_core["baseline_dataloader"],
        "pipeline_s3_vs_baseline": per_core["pipeline_s3"] / per_core["baseline_dataloader"],
        "pipeline_local_vs_decode_limit": per_core["pipeline_local"] / per_core["decode_limit"],
        "pipeline_local_steady_vs_decode_limit": per_core["pipeline_local_steady"] / per_core["decode_limit"],
        "pipeline_s3_vs_decode_limit": per_core["pipeline_s3"] / per_core["decode_limit"],
        "transform_vs_decode_limit": per_core["transform"] / per_core["decode_limit"],
    }
    # Steady-state capacity of each stage on these cores (images/s).
    stages = {
        "read (Ray Data Parquet, local)": med["read_only_local"],
        "read (Ray Data Parquet, S3)": med.get("read_only_s3", float("inf")),
        f"decode+augment ({cores} cores x 1-process rate)": med["transform_1core"] * cores,
    }
    bottleneck = min(stages, key=lambda k: stages[k])
    epoch_s = len(jpegs) / med["pipeline_local"]

    rows = [
        ("decode limit (PIL decode of shard JPEGs)", med["decode_limit_1core"], 1),
        ("decode + paper augmentation, 1 process", med["transform_1core"], 1),
        (f"baseline: DataLoader raw JPEG + RRC ({cores} workers)", med["baseline_dataloader"], cores),
        ("read only: Ray Data Parquet, local (steady)", med["read_only_local"], cores),
        ("pipeline from local folder (epoch)", med["pipeline_local"], cores),
        ("pipeline from local folder (steady)", med["pipeline_local_steady"], cores),
    ]
    if "pipeline_s3" in med:
        rows += [("read only: Ray Data Parquet, moto S3 (steady)", med["read_only_s3"], cores),
                 ("pipeline from moto S3 (epoch)", med["pipeline_s3"], cores),
                 ("pipeline from moto S3 (steady)", med["pipeline_s3_steady"], cores)]
    print(f"\n{'stage':<52} {'images/s':>10} {'cores':>6} {'per core':>10}")
    for name, value, used in rows:
        print(f"{name:<52} {value:>10.0f} {used:>6} {value / used:>10.0f}")
    print(f"\nseconds to the first batch of an epoch (per-epoch fixed cost): local "
          f"{med['first_batch_s_local']:.2f}, S3 {med.get('first_batch_s_s3', float('nan')):.2f}")
    print("\nratios (per core):")
    for name, value in ratios.items():
        print(f"  {name:<42} {value:6.2f}")
    print(f"\nbottleneck (steady state): {bottleneck} ({stages[bottleneck]:.0f} images/s); the pipeline reaches "
          f"{med['pipeline_local_steady'] / stages[bottleneck]:.0%} of it (the rest: Ray Data and the consuming "
          f"process share the same cores)")
    print(f"per epoch of {len(jpegs)} images: {med['first_batch_s_local']:.1f} s of {epoch_s:.1f} s is the fixed "
          f"start-up cost ({med['first_batch_s_local'] / epoch_s:.0%}); it shrinks relative to larger epochs")

    record = {
        "benchmark": "input_pipeline",
        "git": git_revision(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"images": len(jpegs), "runs": args.runs, "cores": cores, "image_size": IMAGE_SIZE,
                   "resize_size": RESIZE, "batch_size": BATCH, "augmentation": "paper", "quick": args.quick,
                   "raw_mean_size": "~500x375 synthetic JPEG"},
        "images_per_s": {k: {"median": med[k], "runs": v} for k, v in results.items()},
        "per_core": per_core,
        "ratios": ratios,
        "stages": stages,
        "bottleneck": bottleneck,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2, default=float)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
