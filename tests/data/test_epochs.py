"""The epoch plan and local iteration, without Ray: exact, replayable, resumable epochs,
every tower reading its own lane."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from service.config import DataConfig
from service.data import epochs
from service.data.decode import train_image
from service.data.device_decode import ShareLoader
from service.data.epochs import Lane
from service.data.pipeline import decode_tasks_per_lane, iter_lane_local
from service.data.read import BadShardError, binary_views, lane_keys, skipped_shards
from tests.data.shards import write_dataset

NUM_TRAIN, NUM_VAL = 41, 11  # odd, so replicas do not divide them


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("epochs"))
    write_dataset(path, num_train=NUM_TRAIN, num_val=NUM_VAL, shard_size=6)
    return path


def _source(root: str, replicas: int = 1, decode: str = "cpu", **overrides) -> epochs.DataSource:
    cfg = DataConfig(root=root, resize_size=48, shuffle_seed=overrides.pop("seed", 11), **overrides)
    return epochs.open_source(cfg, 32, replicas, decode=decode)


def _local(source, split, epoch, lane: Lane, skip_shares=0, share_rows=5):
    """(keys, final host pixels as training sees them, shares) of one lane."""
    shares = list(iter_lane_local(source, split, epoch, lane, share_rows, skip_shares, with_keys=True))
    loader = ShareLoader(source, torch.device("cpu"))
    keys = [str(k) for s in shares for k in s["key"]]
    images = torch.cat([loader(s, split)["image"] for s in shares]).numpy() if shares else np.zeros((0,))
    return keys, images, shares


WHOLE = Lane(0, 1)


def test_same_seed_and_epoch_give_the_same_keys_and_pixels(root):
    source = _source(root)
    keys, images, batches = _local(source, "train", 2, WHOLE)
    keys_again, images_again, _ = _local(source, "train", 2, WHOLE, share_rows=8)
    assert keys[:40] == keys_again == lane_keys(source, "train", 2, WHOLE, 8)
    assert np.array_equal(images[:40], images_again), "pixels do not depend on share boundaries"
    other_keys, other_images, _ = _local(source, "train", 3, WHOLE)
    assert other_keys != keys and len(set(other_keys) & set(keys)) >= len(keys) - 5, \
        "a new order each epoch, the same images but for the left-over share"
    assert lane_keys(_source(root, seed=12), "train", 2, WHOLE, 5) != keys, "the seed matters"
    by_key = dict(zip(keys, images))
    assert any(not np.array_equal(by_key[k], img) for k, img in zip(other_keys, other_images)), \
        "augmentation differs between epochs"
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["label"].dtype == np.int64
    assert batches[0]["lighting"].shape == (5, 3) and np.any(batches[0]["lighting"])
    assert set(batches[0]) == {"image", "label", "resize", "box", "flip", "lighting", "key", "bad_shard"}
    device = next(iter_lane_local(_source(root, decode="device"), "train", 2, WHOLE, 5))
    assert set(device) == {"jpeg", "resize", "box", "label", "flip", "lighting", "bad_shard"}, \
        "device mode ships bytes and parameters, no pixels and no key"
    for key, image in zip(keys[:5], images[:5]):  # the host reference of one image, flip included
        jpeg = _jpeg_of(source, key)
        assert np.array_equal(train_image(source, jpeg, key, 2)[0], image)


def _jpeg_of(source, key: str) -> bytes:
    from service.data.read import read_shard

    for shard in range(len(source.meta.shards["train"])):
        table = read_shard(source, "train", shard, ["key", "jpeg"])
        keys = table.column("key").to_pylist()
        if key in keys:
            return table.column("jpeg")[keys.index(key)].as_py()
    raise KeyError(key)


@pytest.mark.parametrize("replicas,towers", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 4)])
def test_lanes_are_disjoint_equal_and_cover_the_epoch(root, replicas, towers):
    source = _source(root, replicas)
    share = 2
    lanes = [Lane(r, replicas, t, towers) for r in range(replicas) for t in range(towers)]
    for epoch in (0, 1):
        train = [lane_keys(source, "train", epoch, lane, share) for lane in lanes]
        steps = epochs.steps_per_epoch(source, replicas, towers, share * towers)
        assert [len(k) for k in train] == [steps * share] * len(lanes), "equal steps on every lane"
        union = [k for part in train for k in part]
        assert len(set(union)) == len(union), "disjoint"
        assert NUM_TRAIN - len(union) < replicas * towers * share + replicas
        val = [lane_keys(source, "val", epoch, lane, share) for lane in lanes]
        assert sorted(k for part in val for k in part) == sorted(lane_keys(source, "val", 0, WHOLE))
        assert len({k for part in val for k in part}) == NUM_VAL, "every val image exactly once"
        assert max(map(len, val)) - min(map(len, val)) <= 1
        assert [epochs.replica_rows(source, "val", r, replicas) for r in range(replicas)] == \
            [sum(len(v) for lane, v in zip(lanes, val) if lane.replica == r) for r in range(replicas)]
    # With one tower, a replica's lane is its whole part (the plan before towers existed).
    assert epochs.lane_range(source, "train", Lane(0, replicas)) == epochs.replica_range(source, "train", 0, replicas)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_skip_shares_resumes_exactly_without_reading_the_skipped_rows(root, decode):
    source = _source(root, 2, decode=decode)
    lane = Lane(1, 2, 1, 2)
    full_keys = lane_keys(source, "train", 4, lane, 2)
    _, full_images, _ = _local(_source(root, 2), "train", 4, lane, share_rows=2)
    for skip in (0, 1, 3, len(full_keys) // 2):
        shares = list(iter_lane_local(source, "train", 4, lane, 2, skip, with_keys=True))
        loader = ShareLoader(source, torch.device("cpu"))
        keys = [str(k) for s in shares for k in s["key"]]
        assert keys == full_keys[2 * skip:] == lane_keys(source, "train", 4, lane, 2, skip)
        if shares:
            images = torch.cat([loader(s, "train")["image"] for s in shares]).numpy()
            assert np.array_equal(images, full_images[2 * skip:]), "same pixels after a resume, either mode"
    # Units after a skip start later: rows before it are never read.
    units = epochs.share_units(source, "train", 4, lane, 2, skip_shares=3)
    assert sum(u.rows()[1] - u.rows()[0] for u in units) == len(full_keys) - 6
    with pytest.raises(ValueError, match="skip_shares"):
        epochs.share_units(source, "train", 4, lane, 2, skip_shares=len(full_keys) // 2 + 1)


def test_hflip_off_never_mirrors(root):
    """The generated images get brighter from left to right; a mirrored crop gets darker."""
    def slopes(source, split):
        _keys, images, _ = _local(source, split, 0, WHOLE)
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
        Lane(2, 2)
    with pytest.raises(ValueError, match="tower=2 must be in"):
        Lane(0, 1, 2, 2)
    with pytest.raises(ValueError, match="decode='gpu'; choose one of"):
        _source(root, decode="gpu")
    with pytest.raises(ValueError, match="does not divide over 4 towers"):
        epochs.steps_per_epoch(_source(root), 1, 4, 6)
    shown = repr(_source(root, s3_secret_key="sekrit-value", s3_access_key="key-id-value"))
    assert "sekrit-value" not in shown and "key-id-value" not in shown


def test_decode_concurrency_auto_and_explicit():
    assert decode_tasks_per_lane(0, free_cpus=30, lanes=4) == 7
    assert decode_tasks_per_lane(6, free_cpus=30, lanes=4) == 1
    assert decode_tasks_per_lane(0, free_cpus=0, lanes=2) == 1


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
        _local(source, "train", 0, WHOLE)
    assert info.value.uri == source.shard_uri("train", 2)


def test_skip_bad_shards_keeps_the_row_count_and_counts_them(damaged_root):
    for replicas in (1, 2):
        source = _source(damaged_root, replicas, skip_bad_shards=True)
        stood_in = 0
        for replica in range(replicas):
            keys, _images, batches = _local(source, "train", 0, Lane(replica, replicas), share_rows=1)
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


@pytest.mark.parametrize("large", [False, True])
def test_binary_views_are_the_values_of_a_sliced_array_without_a_copy(large):
    import pyarrow as pa

    array = pa.array([b"ab", b"", b"cde", b"f"], pa.large_binary() if large else pa.binary()).slice(1, 3)
    views = binary_views(array)
    assert [bytes(v) for v in views] == [b"", b"cde", b"f"]
    assert all(v.dtype == np.uint8 and not v.flags.owndata for v in views), "views of Arrow's buffer"
