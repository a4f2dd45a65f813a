"""`<root>/meta.json`: what the training side needs to know about a dataset.

Written last by `service.ingest` (its presence means the shards it lists are
complete). Fields:

- `num_classes`, `wnids` (sorted; label i is wnids[i]), `names` (human names);
- `mean`, `std`: per-channel RGB statistics of the training set in 0-255
  pixel units, over every pixel of the stored (shorter side `resize_size`)
  training images;
- `eigval`, `eigvec`: PCA of the RGB covariance of the same pixels scaled to
  [0, 1] (eigenvalues descending; `eigvec[r][i]` is component r of
  eigenvector i, i.e. eigenvectors are the columns). The paper's lighting
  offset in 0-255 units is `255 * eigvec @ (alpha * eigval)`, alpha ~ N(0, 0.1);
- `num_train`, `num_val`; `resize_size` (shorter side of stored images);
- `shards`: {"train": [...], "val": [...]} paths relative to the root, with
  `shard_rows` the row count of each;
- `layout`, `source`, `ingest_report` (relative path of the report), `created`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from service.data import storage

META_FILE = "meta.json"
REPORT_FILE = "ingest_report.json"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1


@dataclass
class DatasetMeta:
    """Class list, normalisation statistics and counts of an ingested dataset."""

    num_classes: int
    wnids: list[str]
    names: list[str]
    # -- Per-channel RGB mean and std, 0-255 units.
    mean: list[float]
    std: list[float]
    # -- PCA of the RGB covariance in [0, 1] units; eigenvectors are columns.
    eigval: list[float]
    eigvec: list[list[float]]
    num_train: int
    num_val: int
    # -- Shorter side of the stored images.
    resize_size: int = 256
    shards: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": []})
    shard_rows: dict[str, list[int]] = field(default_factory=lambda: {"train": [], "val": []})
    layout: str = ""
    source: str = ""
    ingest_report: str = REPORT_FILE
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DatasetMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def load_meta(root: str, s3: storage.S3Settings = storage.DEFAULT_S3) -> DatasetMeta:
    """Read `<root>/meta.json`; a clear error when the dataset was never ingested."""
    uri = storage.join(root, META_FILE)
    if not storage.exists(uri, s3):
        raise FileNotFoundError(
            f"{uri} not found: ingest the raw dataset first "
            f"(python -m service.ingest source=<raw> dest={root})"
        )
    return DatasetMeta.from_dict(storage.read_json(uri, s3))


def save_meta(root: str, meta: DatasetMeta, s3: storage.S3Settings = storage.DEFAULT_S3) -> None:
    """Write `<root>/meta.json`."""
    storage.write_json(storage.join(root, META_FILE), meta.to_dict(), s3)
