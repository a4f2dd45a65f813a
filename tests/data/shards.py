"""Small ingested datasets written straight with pyarrow (no Ray), for pipeline tests.

Every image is a left-to-right brightness ramp plus a per-image colour, so a
mirrored crop is recognisable (its ramp runs right-to-left) and every image
differs from every other.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from service.data import formats, storage
from service.data.meta import DatasetMeta, save_meta


def ramp_jpeg(index: int, width: int, height: int) -> bytes:
    """A JPEG whose brightness rises from left to right; its colour depends on `index`."""
    rng = np.random.default_rng(index)
    ramp = np.linspace(10, 245, width)[None, :, None]
    tint = rng.uniform(0.4, 1.0, size=(1, 1, 3))
    image = np.broadcast_to(ramp * tint, (height, width, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_dataset(root: str, num_train: int = 40, num_val: int = 10, shard_size: int = 7, classes: int = 3,
                  side: int = 48, s3: storage.S3Settings = storage.DEFAULT_S3) -> DatasetMeta:
    """Write shards + meta.json under `root` (local or s3://); returns the meta."""
    wnids = [f"n{i:08d}" for i in range(classes)]
    shards: dict[str, list[str]] = {"train": [], "val": []}
    rows: dict[str, list[int]] = {"train": [], "val": []}
    for split, count in (("train", num_train), ("val", num_val)):
        for number, start in enumerate(range(0, count, shard_size)):
            indices = range(start, min(start + shard_size, count))
            table = pa.Table.from_pydict({
                "key": [f"{split}/{wnids[i % classes]}/img_{i:05d}.JPEG" for i in indices],
                "jpeg": [ramp_jpeg(i + (0 if split == "train" else 100_000), side + 16 * (i % 2), side)
                         for i in indices],
                "label": [i % classes for i in indices],
                "wnid": [wnids[i % classes] for i in indices],
                "height": [side] * len(indices),
                "width": [side + 16 * (i % 2) for i in indices],
                "source": ["generated"] * len(indices),
            }, schema=formats.SHARD_SCHEMA)
            rel = f"shards/{split}/part-{number:05d}.parquet"
            fs, path = storage.arrow_filesystem(storage.join(root, rel), s3)
            storage.make_parent_dirs(fs, path)
            pq.write_table(table, path, filesystem=fs)
            shards[split].append(rel)
            rows[split].append(len(indices))
    meta = DatasetMeta(num_classes=classes, wnids=wnids, names=wnids, mean=[120.0] * 3, std=[60.0] * 3,
                       eigval=[0.2, 0.02, 0.005], eigvec=np.eye(3).tolist(), num_train=num_train,
                       num_val=num_val, resize_size=side, shards=shards, shard_rows=rows, layout="generated")
    save_meta(root, meta, s3)
    return meta
