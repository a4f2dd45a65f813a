"""Input-pipeline throughput: the epoch datasets vs a DataLoader baseline vs the decode limit.

    python bench/input_pipeline.py [--quick] [--images N] [--runs R] [--cores C] [--no-s3]

Measures, on the same synthetic ImageNet-like images (~500x375 raw JPEGs,
ingested to 256-px shards), on the same cores, the median images/s over
`runs` epochs after one warm-up epoch:

- pipeline (local / s3): `epoch_dataset` (paper augmentation, 224 crops,
  decode concurrency = all `cores`, as data.decode_concurrency=0 sizes it
  when nothing else runs), one dataset per epoch as the training worker
  builds it, iterated in batches of 128; "epoch" includes the per-epoch
  start-up, "steady" starts at the first batch;
- baseline: torch DataLoader (`cores` workers) over the raw JPEG files, PIL
  decode + RandomResizedCrop(224) + flip + normalise to float CHW (the
  common recipe; torchvision's maths in PIL/numpy/torch);
- decode limit: PIL decode alone of the shard JPEGs, one process;
- decode + augment: `decode.train_image` (what one decode task does per
  image), one process: the per-core rate that sizes decode CPUs per GPU;
- local iterator: `iter_epoch_local`, one process (the no-Ray path).

Prints a table and the ratios against the targets (pipeline/baseline per
core >= 2, steady pipeline/decode limit per core >= 0.7); writes
bench/results/input_pipeline.json with the config and git revision.
Generated data is cached under data/bench/ (gitignored). Not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.config import DataConfig  # noqa: E402
from service.data import storage, transforms  # noqa: E402
from service.data.decode import train_image  # noqa: E402
from service.data.epochs import DataSource, open_source  # noqa: E402
from service.data.ingest import IngestConfig, run_ingest  # noqa: E402
from service.data.pipeline import epoch_dataset, iter_epoch_local  # noqa: E402
from service.data.synthetic import SynthConfig, generate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, RESIZE, BATCH = 224, 256, 128


def git_revision() -> dict:
    """Commit and dirty flag of the checkout that ran the benchmark."""
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {"commit": run("git", "rev-parse", "HEAD") or "none", "dirty": bool(run("git", "status", "--porcelain"))}


def prepare_data(num_images: int, cores: int, log) -> tuple[str, str]:
    """Raw synthetic JPEGs and their ingested shards (cached)."""
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


def shard_jpegs(source: DataSource) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes) of every training image."""
    import pyarrow.parquet as pq

    out = []
    for rel in source.meta.shards["train"]:
        table = pq.read_table(storage.join(source.root, rel), columns=["key", "jpeg"])
        out += list(zip(table.column("key").to_pylist(), table.column("jpeg").to_pylist()))
    return out


def bench_one_process(source: DataSource, images: list[tuple[str, bytes]], runs: int) -> dict[str, list[float]]:
    """Decode alone, decode + paper augmentation, and iter_epoch_local, in one process,
    alternated run by run so all see the same machine state (this VM's speed drifts)."""
    from PIL import Image

    def decode() -> float:
        start = time.perf_counter()
        for _key, data in images:
            Image.open(io.BytesIO(data)).load()  # shards are RGB already: no convert
        return len(images) / (time.perf_counter() - start)

    def augment() -> float:
        start = time.perf_counter()
        for key, data in images:
            train_image(source, data, key, 0)
        return len(images) / (time.perf_counter() - start)

    def local() -> float:
        start, seen = time.perf_counter(), 0
        for batch in iter_epoch_local(source, "train", 1, 0, 1, batch_size=BATCH):
            seen += len(batch["label"])
        return seen / (time.perf_counter() - start)

    decode(), augment()  # warm-up
    rows = [(decode(), augment(), local()) for _ in range(runs)]
    return {"decode_limit_1core": [r[0] for r in rows], "decode_augment_1core": [r[1] for r in rows],
            "iter_epoch_local_1core": [r[2] for r in rows]}


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
    """DataLoader epochs over the raw files (one warm-up)."""
    import torch

    train = os.path.join(raw, "train")
    paths, labels = [], []
    for label, wnid in enumerate(sorted(os.listdir(train))):
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

    once()
    return [once() for _ in range(runs)]


def bench_pipeline(source: DataSource, cores: int, runs: int) -> dict[str, list[float]]:
    """Epochs of `epoch_dataset` (a new dataset per epoch, as the worker builds them)."""
    out: dict[str, list[float]] = {"epoch": [], "steady": [], "first_batch_s": []}
    for epoch in range(runs + 1):
        start = time.perf_counter()
        first_at, first_n, seen = None, 0, 0
        ds = epoch_dataset(source, "train", epoch, 0, 1, concurrency=cores)
        for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=2):
            seen += len(batch["label"])
            if first_at is None:
                first_at, first_n = time.perf_counter(), seen
        end = time.perf_counter()
        if epoch:  # epoch 0 is the warm-up
            out["epoch"].append(seen / (end - start))
            out["steady"].append((seen - first_n) / max(end - first_at, 1e-9))
            out["first_batch_s"].append(first_at - start)
    return out


def median(values: list[float]) -> float:
    """Median, NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


def with_moto_copy(shards: str, log, measure) -> dict[str, list[float]]:
    """Copy the shards into a moto S3 server on 127.0.0.1 and run `measure(root, s3)` there."""
    from tests.fixtures.s3 import S3Server, _free_port, _wait_ready

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
        _wait_ready(f"{server.endpoint_url}/moto-api/", proc)
        server.create_bucket("bench")
        s3 = server.settings()
        log(f"moto S3 server on {server.endpoint_url} (pid {proc.pid}); copying the shards")
        storage.copy_tree(shards, "s3://bench/imagenet", s3)
        return measure("s3://bench/imagenet", s3)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    """Run every measurement, print the table, write the JSON."""
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

    cores = args.cores
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        raw, shards = prepare_data(args.images, cores, log)
        data_cfg = DataConfig(root=shards, resize_size=RESIZE, augmentation="paper", shuffle_seed=0)
        source = open_source(data_cfg, IMAGE_SIZE, 1)
        images = shard_jpegs(source)
        results: dict[str, list[float]] = {}
        log("measuring: decode limit, decode + paper augmentation, iter_epoch_local (1 process each)")
        results.update(bench_one_process(source, images, args.runs))
        log(f"measuring: baseline DataLoader ({cores} workers, raw JPEGs)")
        results["baseline_dataloader"] = bench_baseline(raw, cores, args.runs)
        log(f"measuring: epoch_dataset from a local folder ({cores} decode tasks)")
        for name, values in bench_pipeline(source, cores, args.runs).items():
            results[f"pipeline_local_{name}"] = values
        if not args.no_s3:
            def on_s3(root: str, s3: storage.S3Settings) -> dict[str, list[float]]:
                s3_source = open_source(DataConfig(root=root, resize_size=RESIZE, **s3.as_fields()), IMAGE_SIZE, 1)
                log("measuring: epoch_dataset from moto S3")
                return bench_pipeline(s3_source, cores, args.runs)

            for name, values in with_moto_copy(shards, log, on_s3).items():
                results[f"pipeline_s3_{name}"] = values
    finally:
        ray.shutdown()

    med = {k: median(v) for k, v in results.items()}
    nan = float("nan")
    per_core = {
        "decode_limit": med["decode_limit_1core"],
        "decode_augment": med["decode_augment_1core"],
        "iter_epoch_local": med["iter_epoch_local_1core"],
        "baseline_dataloader": med["baseline_dataloader"] / cores,
        "pipeline_local": med["pipeline_local_epoch"] / cores,
        "pipeline_local_steady": med["pipeline_local_steady"] / cores,
        "pipeline_s3": med.get("pipeline_s3_epoch", nan) / cores,
        "pipeline_s3_steady": med.get("pipeline_s3_steady", nan) / cores,
    }
    ratios = {
        "pipeline_local_vs_baseline (target >= 2)": per_core["pipeline_local"] / per_core["baseline_dataloader"],
        "pipeline_s3_vs_baseline": per_core["pipeline_s3"] / per_core["baseline_dataloader"],
        "pipeline_local_steady_vs_decode_limit (target >= 0.7)":
            per_core["pipeline_local_steady"] / per_core["decode_limit"],
        "pipeline_local_steady_vs_decode_augment": per_core["pipeline_local_steady"] / per_core["decode_augment"],
        "pipeline_local_vs_decode_limit": per_core["pipeline_local"] / per_core["decode_limit"],
        "decode_augment_vs_decode_limit": per_core["decode_augment"] / per_core["decode_limit"],
    }
    rows = [
        ("decode limit (PIL decode of 256-px shard JPEGs)", med["decode_limit_1core"], 1),
        ("decode + paper augmentation (train_image)", med["decode_augment_1core"], 1),
        ("iter_epoch_local (no Ray)", med["iter_epoch_local_1core"], 1),
        (f"baseline: DataLoader raw JPEG + RRC ({cores} workers)", med["baseline_dataloader"], cores),
        ("epoch_dataset, local folder (epoch)", med["pipeline_local_epoch"], cores),
        ("epoch_dataset, local folder (steady)", med["pipeline_local_steady"], cores),
    ]
    if "pipeline_s3_epoch" in med:
        rows += [("epoch_dataset, moto S3 (epoch)", med["pipeline_s3_epoch"], cores),
                 ("epoch_dataset, moto S3 (steady)", med["pipeline_s3_steady"], cores)]
    print(f"\n{'stage':<52} {'images/s':>10} {'cores':>6} {'per core':>10}")
    for name, value, used in rows:
        print(f"{name:<52} {value:>10.0f} {used:>6} {value / used:>10.0f}")
    print(f"\nseconds to the first batch of an epoch: local {med['pipeline_local_first_batch_s']:.2f}, "
          f"S3 {med.get('pipeline_s3_first_batch_s', nan):.2f}")
    print("\nratios (per core):")
    for name, value in ratios.items():
        print(f"  {name:<56} {value:6.2f}")
    print(f"\nper-core decode + paper augmentation (224 crops of 256-px JPEGs): "
          f"{per_core['decode_augment']:.0f} images/s/core in one process, "
          f"{per_core['pipeline_local_steady']:.0f} images/s/core through Ray Data (steady)")

    record = {
        "benchmark": "input_pipeline",
        "git": git_revision(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"images": len(images), "runs": args.runs, "cores": cores, "image_size": IMAGE_SIZE,
                   "resize_size": RESIZE, "batch_size": BATCH, "augmentation": "paper", "quick": args.quick,
                   "decode_concurrency": cores, "raw_mean_size": "~500x375 synthetic JPEG"},
        "images_per_s": {k: {"median": med[k], "runs": v} for k, v in results.items()},
        "per_core": per_core,
        "ratios": ratios,
        "decode_augment_images_per_s_per_core": per_core["decode_augment"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2, default=float)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
