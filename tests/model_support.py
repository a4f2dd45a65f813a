"""Images and references for the serving and evaluation tests.

Three synthetic classes (red, green, blue photos with noise and a dark
block) written as JPEGs, for the preprocessing tests; and training's own
validation of given weights on an ingested dataset, the reference that
evaluation and serving must match.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from service.data.meta import DatasetMeta
from service.parallel.groups import single_process_groups
from service.parallel.layout import ParallelLayout
from service.train.step import Normalizer, evaluate

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


def validation_batches(root: str, crops: int, resize_size: int, image_size: int, batch_size: int = 7):
    """(meta, the validation set as training's loop sees it: uint8 batches from the pipeline)."""
    from dataclasses import replace

    from service.config import DataConfig
    from service.evaluation.inference import validation_dataset

    data_cfg = replace(DataConfig(), root=root, resize_size=resize_size, eval_crops=crops, decode_concurrency=2)
    meta, val = validation_dataset(data_cfg, image_size)
    images = val.select_columns(["image", "label"])
    return meta, list(images.iter_torch_batches(batch_size=batch_size, drop_last=False))


def training_validation(network, mean, std, root: str, crops: int, resize_size: int) -> dict:
    """The val_* figures training's loop (`service.train.step.evaluate`) gives for
    `network`'s weights on the dataset at `root`: the reference evaluation and
    serving are compared with."""
    _, batches = validation_batches(root, crops, resize_size, network.spec.image_size)
    normalizer = Normalizer(mean, std, torch.device("cpu"), channels_last=False)
    return evaluate(network.eval(), batches, normalizer, single_process_groups(ParallelLayout(1, 1)))
