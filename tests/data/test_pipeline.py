"""The Ray Data epoch datasets on a real local Ray: the same rows, order and pixels as
the plan and the local iterator; bad shards stop with their name or are stood in for."""

from __future__ import annotations

import os

import numpy as np
import pytest

from service.config import DataConfig
from service.data import epochs
from service.data.decode import BadShardError
from service.data.pipeline import build_pipeline, epoch_dataset, iter_epoch_local
from tests.data.shards import write_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("pipeline"))
    write_dataset(path, num_train=45, num_val=9, shard_size=8)
    return path


def _rows(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _local_rows(*args) -> dict[str, np.ndarray]:
    batches = list(iter_epoch_local(*args, batch_size=16))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_epoch_dataset_equals_the_plan_and_the_local_iterator(ray_local, root):
    source = epochs.open_source(DataConfig(root=root, resize_size=48, shuffle_seed=3), 32, 2)
    seen = []
    for replica, skip in ((0, 0), (1, 5)):
        rows = _rows(epoch_dataset(source, "train", 1, replica, 2, skip_rows=skip, concurrency=2))
        local = _local_rows(source, "train", 1, replica, 2, skip)
        assert list(rows["key"]) == epochs.epoch_keys(source, "train", 1, replica, 2, skip) == list(local["key"])
        for column in ("image", "label", "lighting", "bad_shard"):
            assert np.array_equal(rows[column], local[column]), column
        assert rows["image"].shape[1:] == (32, 32, 3) and rows["image"].dtype == np.uint8
        assert rows["label"].dtype == np.int64 and rows["lighting"].dtype == np.float32
        seen.append(list(rows["key"]))
    assert len(seen[0]) == 22 and len(seen[1]) == 22 - 5 and not set(seen[0]) & set(seen[1])


def test_val_ten_crops_every_image_once_over_replicas(ray_local, root):
    source = epochs.open_source(DataConfig(root=root, resize_size=48, eval_crops=10), 32, 2)
    parts = [_rows(epoch_dataset(source, "val", 0, replica, 2, concurrency=2)) for replica in range(2)]
    keys = [k for part in parts for k in part["key"]]
    assert sorted(keys) == sorted(epochs.epoch_keys(source, "val", 0, 0, 1)) and len(set(keys)) == 9
    assert all(part["image"].shape[1:] == (10, 32, 32, 3) for part in parts)
    assert all(not np.any(part["lighting"]) for part in parts)


def test_build_pipeline_gives_whole_epoch_zero(ray_local, root):
    data = build_pipeline(DataConfig(root=root, resize_size=48, decode_concurrency=2), 32, 1)
    assert data.meta.num_train == 45 and data.train.count() == 45
    assert sorted(_rows(data.val)["key"]) == sorted(epochs.epoch_keys(data.source, "val", 0, 0, 1))


def test_bad_shard_through_ray_names_it_or_is_stood_in_for(ray_local, tmp_path):
    meta = write_dataset(str(tmp_path), num_train=24, num_val=4, shard_size=8)
    shard = os.path.join(str(tmp_path), meta.shards["train"][1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    source = epochs.open_source(DataConfig(root=str(tmp_path), resize_size=48), 32, 1)
    # Ray raises RayTaskError(BadShardError): an instance of BadShardError too.
    with pytest.raises(BadShardError, match="bad shard .*part-00001.parquet"):
        _rows(epoch_dataset(source, "train", 0, 0, 1, concurrency=2))
    skipping = epochs.open_source(DataConfig(root=str(tmp_path), resize_size=48, skip_bad_shards=True), 32, 1)
    rows = _rows(epoch_dataset(skipping, "train", 0, 0, 1, concurrency=2))
    assert len(rows["key"]) == 24 and int(np.sum(rows["bad_shard"] == 1)) == 8
