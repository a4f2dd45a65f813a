"""A tiny AlexNet that really learns, for the serving, registry and evaluation tests.

Three very distinct synthetic classes (red, green, blue photos with noise and
a dark block), written as JPEGs by the test, preprocessed exactly as the
served model preprocesses them, and learned in a few seconds on CPU with the
project's own torch-only training step (`build_tower` + `TowerStep`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from service.data.meta import DatasetMeta
from service.model import alexnet_spec
from service.parallel.groups import single_process_groups
from service.parallel.layout import ParallelLayout
from service.serving.classifier import crop_probabilities
from service.serving.preprocess import preprocess
from service.train import checkpoint as ckpt
from service.train.build import build_optimizer, build_tower
from service.train.step import Normalizer, TowerStep, topk_hits

COLORS = [(210, 50, 40), (40, 190, 60), (50, 60, 210)]
WNIDS = ["n00000001", "n00000002", "n00000003"]
NAMES = ["red thing", "green thing", "blue thing"]
RESIZE_SIZE, IMAGE_SIZE = 72, 64
MEAN, STD = [120.0, 110.0, 115.0], [70.0, 65.0, 72.0]


def class_photo(label: int, seed: int, size=(96, 80)) -> np.ndarray:
    """uint8 [H, W, 3]: the class colour, per-pixel noise and a randomly placed dark block."""
    rng = np.random.default_rng(seed * 31 + label)
    width, height = size
    image = np.clip(rng.normal(COLORS[label], 25, size=(height, width, 3)), 0, 255).astype(np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] //= 4
    return image


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def class_jpegs(per_class: int, first_seed: int = 0) -> tuple[list[bytes], list[int]]:
    """`per_class` JPEGs of each class, and their labels."""
    images, labels = [], []
    for label in range(len(COLORS)):
        for seed in range(first_seed, first_seed + per_class):
            images.append(jpeg(class_photo(label, seed)))
            labels.append(label)
    return images, labels


def tiny_meta() -> DatasetMeta:
    return DatasetMeta(num_classes=len(WNIDS), wnids=list(WNIDS), names=list(NAMES), mean=list(MEAN),
                       std=list(STD), eigval=[0.0] * 3, eigvec=[[0.0] * 3] * 3, num_train=0, num_val=0,
                       resize_size=RESIZE_SIZE)


def train_checkpoint(folder: Path, steps: int = 40, seed: int = 0) -> dict:
    """Train the tiny three-colour AlexNet and write a checkpoint folder; returns its metrics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only contend (20x slower on a busy 2-core machine)
    try:
        return _train_checkpoint(Path(folder), steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_checkpoint(folder: Path, steps: int, seed: int) -> dict:
    spec = alexnet_spec(num_classes=len(COLORS), image_size=IMAGE_SIZE, towers=1, width_mult=0.25,
                        dropout=0.0, init="kaiming")
    groups = single_process_groups(ParallelLayout(1, 1))
    tower = build_tower(spec, groups, seed, torch.device("cpu"))
    step = TowerStep(tower, build_optimizer(tower, 0.01, 0.9, 5e-4), spec, groups)
    normalizer = Normalizer(MEAN, STD, torch.device("cpu"), channels_last=False)
    train_jpegs, train_labels = class_jpegs(16)
    images = torch.from_numpy(preprocess(train_jpegs, RESIZE_SIZE, IMAGE_SIZE, 1)[:, 0])
    labels = torch.tensor(train_labels)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(labels), (16,), generator=generator)
        step(normalizer(images[pick]), labels[pick])
    val_jpegs, val_labels = class_jpegs(8, first_seed=100)
    val = torch.from_numpy(preprocess(val_jpegs, RESIZE_SIZE, IMAGE_SIZE, 1))
    probs = crop_probabilities(tower.eval(), normalizer, val)
    top1, top5 = topk_hits(probs, torch.tensor(val_labels)).tolist()
    metrics = {"val_top1_error": 1 - top1 / len(val_labels), "val_top5_error": 1 - top5 / len(val_labels)}
    folder.mkdir(parents=True, exist_ok=True)
    shard = ckpt.write_tower_shard(folder, 0, {"model": tower.state_dict()})
    ckpt.write_progress(folder, {"epoch": 1, "step": steps, "replicas": 1, "towers": 1, "shards": [shard],
                                 "spec": ckpt.spec_to_dict(spec), "metrics": metrics})
    return metrics
