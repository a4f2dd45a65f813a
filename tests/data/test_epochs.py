"""The epoch plan and local iteration, without Ray: exact, replayable, resumable epochs."""

from __future__ import annotations

import os
import numpy as np
import pytest

from service.config import DataConfig
from service.data import epochs
from service.data.decode import BadShardError, skipped_shards
from service.data.pipeline import decode_tasks_per_replica, iter_epoch_local
from tests.data.shards import write_dataset

NUM_TRAIN, NUM_VAL = 41, 11  # odd, so replicas do not divide them


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("epochs"))
    write_dataset(path, num_train=NUM_TRAIN, num_val=NUM_VAL, shard_size=6)
    return path


def _source(root: str, replicas: int = 1, **overrides) -> epochs.DataSource:
    cfg = DataConfig(root=root, resize_size=48, shuffle_seed=overrides.pop("seed", 11), **overrides)
    return epochs.open_source(cfg, 32, replicas)


def _local(source, split, epoch, replica, replicas, skip_rows=0, batch_size=5):
    batches = list(iter_epoch_local(source, split, epoch, replica, replicas, skip_rows, batch_size))
    keys = [str(k) for b in batches for k in b["key"]]
    images = np.concatenate([b["image"] for b in batches]) if batches else np.zeros((0,))
    return keys, images, batches


def test_same_seed_and_epoch_give_the_same_keys_and_pixels(root):
    source = _source(root)
    keys, images, batches = _local(source, "train", 2, 0, 1)
    keys_again, images_again, _ = _local(source, "train", 2, 0, 1, batch_size=7)
    assert keys == keys_again == epochs.epoch_keys(source, "train", 2, 0, 1)
    assert np.array_equal(images, images_again), "pixels do not depend on batch boundaries"
    other_keys, other_images, _ = _local(source, "train", 3, 0, 1)
    assert sorted(other_keys) == sorted(keys) and other_keys != keys, "a new order each epoch, same images"
    assert epochs.epoch_keys(_source(root, seed=12), "train", 2, 0, 1) != keys, "the seed matters"
    by_key = dict(zip(keys, images))
    assert any(not np.array_equal(by_key[k], img) for k, img in zip(other_keys, other_images)), \
        "augmentation differs between epochs"
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["label"].dtype == np.int64
    assert batches[0]["lighting"].shape == (5, 3) and np.any(batches[0]["lighting"])
    assert set(batches[0]) == {"image", "label", "lighting", "key", "bad_shard"}


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_replicas_are_disjoint_and_cover_the_epoch(root, replicas):
    source = _source(root, replicas)
    for epoch in (0, 1):
        train = [epochs.epoch_keys(source, "train", epoch, r, replicas) for r in range(replicas)]
        assert [len(k) for k in train] == [NUM_TRAIN // replicas] * replicas, "equal steps on every replica"
        union = [k for part in train for k in part]
        assert len(set(union)) == len(union), "disjoint"
        assert NUM_TRAIN - len(union) <= replicas - 1
        val = [epochs.epoch_keys(source, "val", epoch, r, replicas) for r in range(replicas)]
        assert sorted(k for part in val for k in part) == sorted(epochs.epoch_keys(source, "val", 0, 0, 1))
        assert len({k for part in val for k in part}) == NUM_VAL, "every val image exactly once"
        assert max(map(len, val)) - min(map(len, val)) <= 1
        assert [epochs.replica_rows(source, "val", r, replicas) for r in range(replicas)] == list(map(len, val))


def test_skip_rows_resumes_exactly_without_reading_the_skipped_rows(root):
    source = _source(root, 2)
    full_keys, full_images, _ = _local(source, "train", 4, 1, 2)
    for skip in (0, 1, 6, 13, len(full_keys)):
        keys, images, _ = _local(source, "train", 4, 1, 2, skip_rows=skip)
        assert keys == full_keys[skip:] == epochs.epoch_keys(source, "train", 4, 1, 2, skip)
        assert np.array_equal(images, full_images[skip:]) if skip < len(full_keys) else not keys
    # Units after a skip start later: rows before `skip` are never read.
    units = epochs.epoch_units(source, "train", 4, 1, 2, skip_rows=13)
    assert sum(u.stop - u.start for u in units) == len(full_keys) - 13
    with pytest.raises(ValueError, match="skip_rows"):
        epochs.epoch_units(source, "train", 4, 1, 2, skip_rows=len(full_keys) + 1)


def test_hflip_off_never_mirrors(root):
    """The generated images get brighter from left to right; a mirrored crop gets darker."""
    def slopes(source, split):
        _keys, images, _ = _local(source, split, 0, 0, 1)
        gray = images.astype(np.float64).mean(axis=-1)
        return np.sign(np.diff(gray, axis=-1).mean(axis=(-2, -1)))

    for augmentation in ("paper", "rrc"):
        on = slopes(_source(root, augmentation=augmentation), "train")
        off = slopes(_source(root, augmentation=augmentation, hflip=False), "train")
        assert np.all(off > 0), f"{augmentation}: no mirrored image with hflip=false"
        assert np.sum(on < 0) >= NUM_TRAIN // 5, f"{augmentation}: flips happen with hflip=true"
    ten = slopes(_source(root, eval_crops=10), "val")
    five = slopes(_source(root, eval_crops=10, hflip=False), "val")
    assert ten.shape == (NUM_VAL, 10) and np.all(ten[:, :5] > 0) and np.all(ten[:, 5:] < 0)
    assert five.shape == (NUM_VAL, 5) and np.all(five > 0)


def test_open_source_errors_name_the_problem(root, tmp_path):
    with pytest.raises(ValueError, match="data.root=.* holds no meta.json"):
        _source(str(tmp_path))
    with pytest.raises(ValueError, match="cannot be split over 50 replicas"):
        _source(root, 50)
    with pytest.raises(ValueError, match="larger than data.resize_size"):
        epochs.open_source(DataConfig(root=root, resize_size=24), 32, 1)
    with pytest.raises(ValueError, match="replica=2 must be in"):
        epochs.epoch_keys(_source(root), "train", 0, 2, 2)
    shown = repr(_source(root, s3_secret_key="sekrit-value", s3_access_key="key-id-value"))
    assert "sekrit-value" not in shown and "key-id-value" not in shown


def test_decode_concurrency_auto_and_explicit():
    assert decode_tasks_per_replica(0, free_cpus=30, replicas=4) == 7
    assert decode_tasks_per_replica(6, free_cpus=30, replicas=4) == 1
    assert decode_tasks_per_replica(0, free_cpus=0, replicas=2) == 1


@pytest.fixture
def damaged_root(tmp_path) -> str:
    """A dataset whose train shard 2 is truncated (a partial upload)."""
    path = str(tmp_path)
    meta = write_dataset(path, num_train=30, num_val=4, shard_size=6)
    shard = os.path.join(path, meta.shards["train"][2])
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def test_a_bad_shard_stops_with_its_name(damaged_root):
    source = _source(damaged_root)
    with pytest.raises(BadShardError, match="part-00002.parquet") as info:
        _local(source, "train", 0, 0, 1)
    assert info.value.uri == source.shard_uri("train", 2)


def test_skip_bad_shards_keeps_the_row_count_and_counts_them(damaged_root):
    for replicas in (1, 2):
        source = _source(damaged_root, replicas, skip_bad_shards=True)
        stood_in = 0
        for replica in range(replicas):
            keys, _images, batches = _local(source, "train", 0, replica, replicas)
            assert len(keys) == epochs.replica_rows(source, "train", replica, replicas), "replicas stay in step"
            marks = np.concatenate([b["bad_shard"] for b in batches])
            assert np.all((marks == -1) | (marks == 2))
            assert not any(k.startswith("train/") and k in keys for k in _shard_keys(damaged_root, 2))
            skipped = set().union(*(skipped_shards(b, source, "train") for b in batches))
            assert skipped == ({source.shard_uri("train", 2)} if np.any(marks == 2) else set())
            stood_in += int(np.sum(marks == 2))
        assert stood_in == 6, "each of the bad shard's 6 rows is stood in for once (30 rows, no drop)"


def _shard_keys(root: str, shard: int) -> list[str]:
    """Keys the generator put in train shard `shard` (rows shard*6 .. shard*6+5)."""
    return [f"train/n{i % 3:08d}/img_{i:05d}.JPEG" for i in range(shard * 6, shard * 6 + 6)]
