"""A synthetic ImageNet in the real raw layouts, learnable by a small AlexNet.

Each class has a fixed visual identity: a shape (disc, square, triangle, ...),
a hue and a texture (solid, stripes, checks) at a class-specific angle and
frequency. Each image draws 1-2 instances at a random position, scale and
rotation over a random two-colour gradient background with distractor blobs,
colour jitter and Gaussian noise, then saves a JPEG at a random quality.
Image sizes follow ImageNet (about 500×375 on average, several aspect ratios)
times `size_scale`. Every image depends only on (seed, split, class, index),
so output is identical for a seed whatever the order or worker count.

`bad_inputs=True` adds the faults real ImageNet has (CMYK JPEGs, a PNG named
.JPEG, grayscale, EXIF orientation, truncated and zero-byte files, non-image
files, an unknown wnid folder, validation images without ground truth, a
validation label outside the class list) and writes the expected ingest
outcome to `synth_manifest.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from service.config import ConfigError
from service.data.options import LAYOUTS
from service.data.wnids import IMAGENET_SYNSETS

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
TEXTURES = ("solid", "stripes", "checks")
UNKNOWN_WNID = "n99999999"
MANIFEST = "synth_manifest.json"


@dataclass
class SynthConfig:
    """What to generate (the schema of `python -m service.synth`, conf/synth.yaml)."""

    # -- Output folder (required); the raw dataset is written below it.
    out: str = ""
    # -- Number of classes (real ImageNet wnids), 2-99.
    classes: int = 10
    # -- Training images per class.
    images_per_class: int = 50
    # -- Validation images per class.
    val_per_class: int = 10
    # -- Raw layout to write: one of service.data.options.LAYOUTS.
    layout: str = "imagefolder"
    # -- Random seed; the output is identical for a seed.
    seed: int = 0
    # -- Multiplies ImageNet-like sizes (~500×375); 0.32 gives ~160×120.
    size_scale: float = 1.0
    # -- Add CMYK/PNG/grayscale/EXIF/truncated/empty/non-image/unknown-wnid inputs.
    bad_inputs: bool = False
    # -- ilsvrc-tars devkit synsets as "mat" (MATLAB meta.mat, needs scipy) or "txt".
    devkit_meta: str = "mat"
    # -- Range of the JPEG quality drawn per image.
    quality_min: int = 80
    quality_max: int = 95
    # -- Processes rendering images (output is identical for any count).
    workers: int = 1

    def validate(self) -> None:
        """`ConfigError` (a ValueError) naming the first bad key and what is accepted."""
        if not self.out:
            raise ConfigError("out= is required: python -m service.synth out=<folder> [classes=10 ...]")
        if os.path.isfile(self.out):
            raise ConfigError(f"out={self.out} is a file; give a folder")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout={self.layout!r} is not allowed; choose one of {', '.join(LAYOUTS)}")
        if not 2 <= self.classes <= len(IMAGENET_SYNSETS) - 1:
            raise ConfigError(f"classes={self.classes} must be in [2, {len(IMAGENET_SYNSETS) - 1}]")
        if self.images_per_class < 1 or self.val_per_class < 0:
            raise ConfigError("images_per_class must be >= 1 and val_per_class >= 0")
        if self.size_scale <= 0:
            raise ConfigError(f"size_scale={self.size_scale} must be > 0")
        if self.devkit_meta not in ("mat", "txt"):
            raise ConfigError(f"devkit_meta={self.devkit_meta!r} is not allowed; choose one of mat, txt")
        if not 1 <= self.quality_min <= self.quality_max <= 100:
            raise ConfigError(f"quality_min={self.quality_min}, quality_max={self.quality_max}: need "
                             "1 <= quality_min <= quality_max <= 100")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers} must be >= 1")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return 255.0 * np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def class_style(index: int) -> dict:
    """The fixed look of class `index`: shape, hue, texture, angle, frequency."""
    return {
        "shape": SHAPES[index % len(SHAPES)],
        "hue": (index * 0.381966) % 1.0,  # golden-ratio spacing keeps hues apart
        "texture": TEXTURES[(index // len(SHAPES) + index) % len(TEXTURES)],
        "angle": (index * 47) % 180,
        "period": 6 + (index * 5) % 9,
    }


def _image_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    aspect = rng.choice([4 / 3, 3 / 4, 1.0, 3 / 2, 16 / 9], p=[0.5, 0.15, 0.1, 0.15, 0.1])
    long_side = 500 * scale * rng.uniform(0.75, 1.25)
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    return max(16, int(round(w))), max(16, int(round(h)))


def _shape_mask(shape: str, size: tuple[int, int], cx: float, cy: float, r: float, rot: float) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)

    def poly(points: list[tuple[float, float]]) -> None:
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=255)

    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    elif shape == "square":
        poly([(-r, -r), (r, -r), (r, r), (-r, r)])
    elif shape == "diamond":
        poly([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    elif shape == "triangle":
        poly([(0, -r), (r * 0.87, r * 0.5), (-r * 0.87, r * 0.5)])
    elif shape == "bar":
        poly([(-r, -r * 0.3), (r, -r * 0.3), (r, r * 0.3), (-r, r * 0.3)])
    elif shape == "cross":
        poly([(-r, -r * 0.28), (r, -r * 0.28), (r, r * 0.28), (-r, r * 0.28)])
        poly([(-r * 0.28, -r), (r * 0.28, -r), (r * 0.28, r), (-r * 0.28, r)])
    elif shape == "star":
        pts = [((r if k % 2 == 0 else r * 0.45) * math.cos(math.pi * k / 5 - math.pi / 2),
                (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
        poly(pts)
    return mask


def render_image(seed: int, split: str, class_index: int, image_index: int, size_scale: float) -> Image.Image:
    """One RGB image of class `class_index`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, class_index, image_index])
    width, height = _image_size(rng, size_scale)
    style = class_style(class_index)
    # Background: a two-colour gradient along a random direction.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(theta) + yy * math.sin(theta)) / max(width, height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    short = min(width, height)
    # Distractor blobs in random colours (not class evidence).
    for _ in range(int(rng.integers(0, 4))):
        r = rng.uniform(0.05, 0.15) * short
        mask = _shape_mask("disc", (width, height), rng.uniform(0, width), rng.uniform(0, height), r, 0.0)
        m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        canvas = canvas * (1 - m) + rng.uniform(0, 255, 3).astype(np.float32) * m
    # The class object(s): shape + hue + texture, jittered.
    for _ in range(int(rng.integers(1, 3))):
        r = rng.uniform(0.18, 0.38) * short
        cx, cy = rng.uniform(r * 0.5, width - r * 0.5), rng.uniform(r * 0.5, height - r * 0.5)
        mask = _shape_mask(style["shape"], (width, height), cx, cy, r, rng.uniform(-0.5, 0.5))
        hue = (style["hue"] + rng.normal(0, 0.025)) % 1.0
        colour = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
        angle = math.radians(style["angle"] + rng.normal(0, 8))
        period = style["period"] * max(short / 150.0, 0.5)
        u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period
        if style["texture"] == "stripes":
            pattern = (np.floor(u) % 2)[..., None]
        elif style["texture"] == "checks":
            pattern = ((np.floor(u) + np.floor(v)) % 2)[..., None]
        else:
            pattern = np.ones((height, width, 1), np.float32)
        fg = colour.astype(np.float32) * (0.45 + 0.55 * pattern)
        m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        canvas = canvas * (1 - m) + fg * m
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(3, 12))
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, rng: np.random.Generator, cfg: SynthConfig, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(cfg.quality_min, cfg.quality_max + 1)), **kwargs)
    return buf.getvalue()


def _render_jpeg(job: tuple) -> bytes:
    cfg, split, class_index, index = job
    rng = np.random.default_rng([cfg.seed, 2 if split == "train" else 3, class_index, index])
    return _jpeg(render_image(cfg.seed, split, class_index, index, cfg.size_scale), rng, cfg)


def _bad_files(cfg: SynthConfig, wnids: list[str]) -> tuple[list[tuple], dict]:
    """Faulty inputs as (split, wnid_or_None, name, bytes, outcome) and the expected tallies."""
    rng = np.random.default_rng([cfg.seed, 99])
    base = render_image(cfg.seed, "train", 0, 10_000, cfg.size_scale)
    wnid = wnids[0]

    def exif_bytes(orientation: int) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = orientation
        return exif.tobytes()

    png = io.BytesIO()
    base.save(png, format="PNG")
    good = _jpeg(base, rng, cfg)
    # Orientation 6 = "rotate 90° clockwise to display": store it rotated the other way.
    rotated = _jpeg(base.transpose(Image.Transpose.ROTATE_90), rng, cfg, exif=exif_bytes(6))
    files = [
        ("train", wnid, f"{wnid}_90001.JPEG", _jpeg(base.convert("CMYK"), rng, cfg), "mode_cmyk"),
        ("train", wnid, f"{wnid}_90002.JPEG", png.getvalue(), "format_png"),
        ("train", wnid, f"{wnid}_90003.JPEG", _jpeg(base.convert("L"), rng, cfg), "mode_l"),
        ("train", wnid, f"{wnid}_90004.JPEG", rotated, "exif_orientation_6"),
        ("train", wnid, f"{wnid}_90005.JPEG", _jpeg(base, rng, cfg, exif=exif_bytes(9)), "exif_orientation_invalid"),
        ("train", wnid, f"{wnid}_90006.JPEG", good[: len(good) * 6 // 10], "truncated"),
        ("train", wnid, f"{wnid}_90007.JPEG", b"", "empty_file"),
        ("train", wnid, f"{wnid}_90008.JPEG", b"this is not an image\n", "not_an_image"),
        ("train", wnid, "notes.txt", b"download log\n", "not_an_image"),
        ("train", UNKNOWN_WNID, f"{UNKNOWN_WNID}_1.JPEG", good, "unknown_wnid"),
        ("train", UNKNOWN_WNID, f"{UNKNOWN_WNID}_2.JPEG", good, "unknown_wnid"),
        ("val", wnid, "cmyk", _jpeg(base.convert("CMYK"), rng, cfg), "mode_cmyk"),
        ("val", wnid, "truncated", good[: len(good) // 2], "truncated"),
        ("val", None, "no_ground_truth", good, "no_ground_truth"),
        # A validation label naming a real synset that has no training class.
        ("val", "unknown", "unknown_label", good, "unknown_wnid"),
    ]
    converted = Counter(o for _s, _w, _n, _b, o in files if o.startswith(("mode_", "format_", "exif_")))
    quarantined = Counter(o for _s, _w, _n, _b, o in files if not o.startswith(("mode_", "format_", "exif_")))
    return files, {"converted_by_kind": dict(converted), "quarantined_by_reason": dict(quarantined)}


def generate(cfg: SynthConfig) -> dict:
    """Write the dataset under `cfg.out`; returns the manifest (also saved as synth_manifest.json)."""
    cfg.validate()
    synsets = list(IMAGENET_SYNSETS[: cfg.classes])
    extra_wnid, extra_name = IMAGENET_SYNSETS[cfg.classes]  # in the synset list, never trained
    wnids = [w for w, _ in synsets]
    names = dict(IMAGENET_SYNSETS)
    os.makedirs(cfg.out, exist_ok=True)

    train: list[tuple[str, str, bytes]] = []  # (wnid, file name, bytes)
    val: list[tuple[Optional[str], bytes]] = []  # (wnid or None, bytes); names assigned below
    jobs = [(cfg, "train", c, i) for c in range(len(wnids)) for i in range(cfg.images_per_class)]
    jobs += [(cfg, "val", c, i) for c in range(len(wnids)) for i in range(cfg.val_per_class)]
    if cfg.workers > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            encoded = pool.map(_render_jpeg, jobs, chunksize=16)
    else:
        encoded = [_render_jpeg(job) for job in jobs]
    for (_cfg, split, class_index, i), data in zip(jobs, encoded):
        wnid = wnids[class_index]
        if split == "train":
            train.append((wnid, f"{wnid}_{i + 1}.JPEG", data))
        else:
            val.append((wnid, data))

    expected = {"converted_by_kind": {}, "quarantined_by_reason": {}}
    bad_val_no_gt: list[bytes] = []
    if cfg.bad_inputs:
        bad, expected = _bad_files(cfg, wnids)
        for split, wnid, name, data, outcome in bad:
            if split == "train":
                train.append((wnid, name, data))
            elif outcome == "no_ground_truth":
                bad_val_no_gt.append(data)
            elif outcome == "unknown_wnid":
                val.append((extra_wnid if cfg.layout != "imagefolder" else UNKNOWN_WNID, data))
            else:
                val.append((wnid, data))

    # Validation images are numbered in a seeded random class order, as in ILSVRC.
    order = np.random.default_rng([cfg.seed, 4]).permutation(len(val))
    val = [val[i] for i in order]
    val_named = [(w, f"ILSVRC2012_val_{i + 1:08d}.JPEG", b) for i, (w, b) in enumerate(val)]
    no_gt_named = [f"ILSVRC2012_val_{len(val) + 1 + i:08d}.JPEG" for i in range(len(bad_val_no_gt))]

    mapping_wnids = wnids + [extra_wnid]
    writer = {"imagefolder": _write_imagefolder, "ilsvrc-tars": _write_ilsvrc, "kaggle": _write_kaggle}[cfg.layout]
    writer(cfg, train, val_named, list(zip(no_gt_named, bad_val_no_gt)), mapping_wnids, names)

    num_inputs = len(train) + len(val_named) + len(bad_val_no_gt)
    num_quarantined = sum(expected["quarantined_by_reason"].values())
    manifest = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")},
        "wnids": wnids,
        "names": [names[w] for w in wnids],
        "num_inputs": num_inputs,
        "num_train_inputs": len(train),
        "num_val_inputs": len(val_named) + len(bad_val_no_gt),
        "expected": {"written": num_inputs - num_quarantined, **expected},
    }
    with open(os.path.join(cfg.out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_mapping(path: str, wnids: list[str], names: dict[str, str]) -> None:
    with open(path, "w") as f:
        for wnid in sorted(wnids):
            f.write(f"{wnid} {names.get(wnid, wnid)}\n")


def _write_imagefolder(cfg, train, val_named, no_gt, mapping_wnids, names) -> None:
    for wnid, name, data in train:
        _write_file(os.path.join(cfg.out, "train", wnid, name), data)
    for wnid, name, data in val_named:
        _write_file(os.path.join(cfg.out, "val", wnid, name), data)
    for name, data in no_gt:  # a loose file in val/: no folder, so no label
        _write_file(os.path.join(cfg.out, "val", name), data)
    _write_mapping(os.path.join(cfg.out, "LOC_synset_mapping.txt"), mapping_wnids, names)


def _write_kaggle(cfg, train, val_named, no_gt, mapping_wnids, names) -> None:
    base = os.path.join(cfg.out, "ILSVRC", "Data", "CLS-LOC")
    for wnid, name, data in train:
        _write_file(os.path.join(base, "train", wnid, name), data)
    for _wnid, name, data in val_named + [(None, n, d) for n, d in no_gt]:
        _write_file(os.path.join(base, "val", name), data)
    _write_mapping(os.path.join(cfg.out, "LOC_synset_mapping.txt"), mapping_wnids, names)
    with open(os.path.join(cfg.out, "LOC_val_solution.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["ImageId", "PredictionString"])
        for wnid, name, _data in val_named:
            out.writerow([name[: -len(".JPEG")], f"{wnid} 10 10 100 100 {wnid} 20 20 90 90"])


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_300_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_ilsvrc(cfg, train, val_named, no_gt, mapping_wnids, names) -> None:
    # ILSVRC2012_IDs follow WordNet hierarchy order, not sorted wnids: permute them.
    ids = {w: i + 1 for i, w in enumerate(np.random.default_rng([cfg.seed, 5]).permutation(mapping_wnids))}
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for wnid, name, data in train:
        by_class.setdefault(wnid, []).append((name, data))
    with tarfile.open(os.path.join(cfg.out, "ILSVRC2012_img_train.tar"), "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in sorted(by_class):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for name, data in by_class[wnid]:
                    _tar_add(inner, name, data)
            _tar_add(outer, f"{wnid}.tar", inner_buf.getvalue())
    with tarfile.open(os.path.join(cfg.out, "ILSVRC2012_img_val.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        for _wnid, name, data in val_named:
            _tar_add(tar, name, data)
        for name, data in no_gt:  # numbered past the end of the ground-truth file
            _tar_add(tar, name, data)
    data_dir = os.path.join(cfg.out, "ILSVRC2012_devkit_t12", "data")
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        for wnid, _name, _data in val_named:
            f.write(f"{ids[wnid]}\n")
    leaf = sorted(mapping_wnids, key=lambda w: ids[w])
    if cfg.devkit_meta == "mat":
        import scipy.io  # optional dependency, only for the MATLAB devkit file

        # A non-leaf synset, as in the real meta.mat (ids > 1000 have children).
        rows = [(ids[w], w, names.get(w, w), 0) for w in leaf] + [(len(leaf) + 1, "n00001740", "entity", len(leaf))]
        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = np.array([tuple(np.array([[v]]) if isinstance(v, int) else np.array([v]) for v in row)
                            for row in rows], dtype=dtype).reshape(-1, 1)
        scipy.io.savemat(os.path.join(data_dir, "meta.mat"), {"synsets": synsets})
    else:
        with open(os.path.join(data_dir, "synsets.txt"), "w") as f:
            for wnid in leaf:
                f.write(f"{ids[wnid]} {wnid} {names.get(wnid, wnid)}\n")
