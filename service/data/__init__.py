"""The data layer: raw ImageNet layouts -> Parquet shards -> Ray Data training batches.

Public API (see docs/data.md):

- `build_pipeline(data_cfg, image_size, num_replicas) -> TrainingData`
- `split_for_replicas(ds, num_replicas, equal=True)`
- `generate_demo_dataset(out_dir, classes, images_per_class, val_per_class, seed, image_side) -> root`
- `load_meta(root, s3) -> DatasetMeta`, `S3Settings`
"""

from service.data.demo import generate_demo_dataset
from service.data.meta import DatasetMeta, load_meta
from service.data.pipeline import TrainingData, build_pipeline, split_for_replicas
from service.data.storage import S3Settings

__all__ = [
    "DatasetMeta",
    "S3Settings",
    "TrainingData",
    "build_pipeline",
    "generate_demo_dataset",
    "load_meta",
    "split_for_replicas",
]
