"""JPEG decode + the paper's training augmentation, images/s per CPU core.

    python bench/decode_rate.py [--images 256] [--processes 1,2,4] [--seconds 3]

What one Ray Data decode task does per image (`service.data.pipeline.TrainTransform`,
"paper" recipe): decode a shard JPEG (shorter side 256), take the central
square, a random 224 crop, a horizontal flip with probability 1/2, PCA
lighting, into a uint8 HWC array. The JPEGs are made in-process the way
ingest stores them (shorter side 256, quality 90).

The maths comes from `service.data.transforms` (numpy + Pillow only); the
per-image loop is a copy of TrainTransform's, because `service.data.pipeline`
imports Ray and the GPU machines have none. Used by bench/gpu_bench.py (on
the GPU machine) and bench/project.py (when no measured rate is on disk).

Scaling: the same work in N forked processes at once, aggregate images/s
and images/s per process; a per-core figure that holds only at N=1 would
overstate what a busy node decodes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESIZE, CROP = 256, 224
# ImageNet's RGB eigenpairs (0-1 units), as meta.json holds them; only their
# cost matters here.
_EIGVAL = [0.2175, 0.0188, 0.0045]
_EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]


def _local_jpeg(rng: np.random.Generator) -> bytes:
    """A photo-like image (smooth gradient, shapes, sensor noise) stored as ingest would."""
    width, height = int(rng.integers(400, 520)), int(rng.integers(300, 400))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3) + np.stack([x / width, y / height, (x + y) / (width + height)], -1) * rng.uniform(-120, 120, 3)
    for _ in range(4):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        base[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = rng.uniform(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    scale = RESIZE / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def make_jpegs(count: int, seed: int = 0) -> tuple[list[bytes], str]:
    """`count` shard-like JPEGs and where they came from.

    Prefers the project's own generator + ingest re-encode (the images
    `make demo` and the input-pipeline benchmark decode); falls back to a local
    generator if service.data does not import here (it is being reworked, and
    must not take this benchmark down with it).
    """
    try:
        from service.data.formats import normalize_image
        from service.data.synthetic import render_image

        jpegs = []
        for index in range(count):
            raw = io.BytesIO()
            render_image(seed, "train", index % 10, index, 1.0).save(raw, "JPEG", quality=90)
            jpegs.append(normalize_image(raw.getvalue(), RESIZE).jpeg)
        return jpegs, "service.data.synthetic.render_image + service.data.formats.normalize_image (ingest at 256)"
    except Exception as error:  # noqa: BLE001 - any import/API drift: fall back, and say so
        rng = np.random.default_rng(seed)
        return [_local_jpeg(rng) for _ in range(count)], f"local generator (service.data unavailable: {error!r})"


def _augment_fn():
    """decode + paper augmentation of one JPEG -> uint8 [224, 224, 3] and a lighting offset."""
    try:
        from service.data import transforms

        def augment(jpeg: bytes, rng: np.random.Generator) -> np.ndarray:
            img = transforms.decode_short_side(jpeg, RESIZE)
            left, top, _right, _bottom = transforms.center_square_box(*img.size)
            side = min(img.size)
            dy, dx = transforms.random_crop_bounds(rng, side, side, CROP)
            patch = img.crop((left + dx, top + dy, left + dx + CROP, top + dy + CROP))
            if rng.random() < 0.5:
                patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            transforms.pca_lighting_offset(rng, _EIGVAL, _EIGVEC, 0.1, 1)
            return np.asarray(patch)

        return augment, "service.data.transforms"
    except Exception as error:  # noqa: BLE001 - same fallback as make_jpegs
        def augment(jpeg: bytes, rng: np.random.Generator) -> np.ndarray:
            img = Image.open(io.BytesIO(jpeg)).convert("RGB")
            side = min(img.size)
            left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
            dy, dx = int(rng.integers(0, side - CROP + 1)), int(rng.integers(0, side - CROP + 1))
            patch = img.crop((left + dx, top + dy, left + dx + CROP, top + dy + CROP))
            if rng.random() < 0.5:
                patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            rng.normal(0.0, 0.1, size=(1, 3))
            return np.asarray(patch)

        return augment, f"local equivalent (service.data.transforms unavailable: {error!r})"


def _decode_for(jpegs: list[bytes], seconds: float, seed: int) -> tuple[int, float]:
    """Decode+augment round-robin over `jpegs` for about `seconds`: (images, elapsed)."""
    augment, _ = _augment_fn()
    rng = np.random.default_rng(seed)
    out = np.empty((CROP, CROP, 3), np.uint8)
    done, start = 0, time.perf_counter()
    while True:
        for jpeg in jpegs:
            out[:] = augment(jpeg, rng)
        done += len(jpegs)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done, elapsed


# Fork start: the children need only the JPEG list (inherited) and no torch;
# spawn would re-import the caller's script (torch, CUDA) in every child.
_SHARED: list[bytes] = []


def _child(args: tuple[float, int]) -> tuple[int, float, float, float]:
    seconds, seed = args
    begin = time.time()
    done, elapsed = _decode_for(_SHARED, seconds, seed)
    return done, elapsed, begin, time.time()


def scaling(jpegs: list[bytes], processes: list[int], seconds: float) -> list[dict]:
    """Aggregate decode+augment rate with N processes decoding at once, for each N."""
    global _SHARED
    _SHARED = jpegs
    context = multiprocessing.get_context("fork")
    rows = []
    for count in processes:
        with context.Pool(count) as pool:
            pool.map(_child, [(0.0, seed) for seed in range(count)])  # start-up and first decode, untimed
            results = pool.map(_child, [(seconds, seed) for seed in range(count)])
        images = sum(r[0] for r in results)
        # All children ran concurrently: the wall span from the first start to the last end.
        span = max(r[3] for r in results) - min(r[2] for r in results)
        per_process = statistics.median(r[0] / r[1] for r in results)
        rows.append({"processes": count, "images_per_s": images / span, "images_per_s_per_process": per_process})
    return rows


def measure(num_images: int = 256, processes: list[int] | None = None, seconds: float = 3.0, seed: int = 0) -> dict:
    """Single-process rate (median of 3 runs) and the N-process scaling, as a JSON-able dict."""
    jpegs, source = make_jpegs(num_images, seed)
    _, code = _augment_fn()
    _decode_for(jpegs[:8], 0.0, seed)  # warm-up: imports, first decode
    single = [len_ / elapsed for len_, elapsed in (_decode_for(jpegs, seconds / 3, seed + run) for run in range(3))]
    cores = len(os.sched_getaffinity(0))
    counts = processes or sorted({1, 2, 4, 8, 16, cores} & set(range(1, cores + 1)))
    scaled = scaling(jpegs, counts, seconds)
    widest = scaled[-1]
    return {
        "task": f"decode shard JPEG (short side {RESIZE}) + central square + random {CROP} crop + flip + PCA lighting",
        "jpeg_source": source,
        "transform_code": code,
        "num_images": len(jpegs),
        "mean_jpeg_bytes": float(np.mean([len(j) for j in jpegs])),
        "cpu_cores": cores,
        "per_core_images_per_s": statistics.median(single),
        "per_core_runs": single,
        "scaling": scaled,
        # What each core delivers when all measured processes decode at once.
        "per_core_loaded_images_per_s": widest["images_per_s"] / widest["processes"],
        "loaded_processes": widest["processes"],
    }


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--processes", default="", help="comma-separated process counts (default 1,2,4,... up to the cores)")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    counts = [int(c) for c in args.processes.split(",") if c] or None
    print(json.dumps(measure(args.images, counts, args.seconds), indent=2))


if __name__ == "__main__":
    main()
