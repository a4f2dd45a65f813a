"""The Ray Data lane datasets on a real local Ray: the same shares, order and content as
the plan and the local iterator, one block per share; both decode modes cut the same
boxes and flips with pixels within the decoders' tolerance; bad shards stop with their
name or are stood in for."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch

from service.config import DataConfig
from service.data import epochs
from service.data.device_decode import ShareLoader
from service.data.epochs import Lane
from service.data.pipeline import (
    OBJECT_STORE_FRACTION, build_pipeline, iter_lane_local, iter_shares, lane_dataset, object_store_budget,
)
from service.data.read import BadShardError, lane_keys
from tests.data.shards import write_dataset

pytestmark = pytest.mark.integration

SHARE = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("pipeline"))
    write_dataset(path, num_train=45, num_val=9, shard_size=8)
    return path


def _source(root: str, decode: str = "cpu", resize_size: int = 48, **overrides) -> epochs.DataSource:
    return epochs.open_source(DataConfig(root=root, resize_size=resize_size, shuffle_seed=3, **overrides), 32, 2,
                              decode=decode)


def _concat(shares: list[dict]) -> dict:
    """The shares' columns end to end (device mode's `jpeg` is a list of views)."""
    return {k: sum((list(s[k]) for s in shares), []) if isinstance(shares[0][k], list)
            else np.concatenate([s[k] for s in shares]) for k in shares[0]}


def test_lane_dataset_equals_the_plan_and_the_local_iterator_in_blocks_of_whole_shares(ray_local, root):
    for decode in ("cpu", "device"):
        source = _source(root, decode)
        for lane, skip in ((Lane(0, 2, 0, 2), 0), (Lane(1, 2, 1, 2), 1)):
            ds = lane_dataset(source, "train", 1, lane, SHARE, skip_shares=skip, concurrency=2, with_keys=True)
            shares = list(iter_shares(ds, SHARE, decode))
            local = list(iter_lane_local(source, "train", 1, lane, SHARE, skip, with_keys=True))
            assert [len(s["label"]) for s in shares] == [SHARE] * len(local)
            rows, expected = _concat(shares), _concat(local)
            assert list(rows["key"]) == lane_keys(source, "train", 1, lane, SHARE, skip) == list(expected["key"])
            for column in expected:
                if column == "jpeg":
                    assert [bytes(b) for b in rows[column]] == [bytes(b) for b in expected[column]]
                else:
                    assert np.array_equal(rows[column], expected[column]), (decode, column)
        # Blocks of whole shares (one per block for pixels, a few for JPEGs): nothing is stitched.
        # Each lane's executor is capped at its own read tasks and its share of the object store
        # (so R x T executors on a node do not each budget for the whole node).
        budget = object_store_budget(num_lanes=4)
        ds = lane_dataset(source, "train", 1, Lane(0, 2, 0, 2), SHARE, concurrency=2, object_store_bytes=budget)
        limits = ds.context.execution_options.resource_limits
        # CPUs: its read tasks (at most the 2 asked for; fewer when the lane has fewer units).
        assert limits.cpu in (1, 2) and limits.object_store_memory == pytest.approx(budget, abs=1), limits
        store = ray.available_resources()["object_store_memory"]
        assert 0 < budget == pytest.approx(OBJECT_STORE_FRACTION * store / 4, rel=0.05), (budget, store)
        blocks = [len(batch["label"]) for batch in ds.iter_batches(batch_size=None, batch_format="numpy")]
        assert blocks and all(rows % SHARE == 0 for rows in blocks), (decode, blocks)


@pytest.mark.parametrize("resize_size,max_mean,max_abs", [(48, 0.0, 0), (40, 0.1, 2)])
def test_both_decode_modes_give_the_same_batch(ray_local, root, resize_size, max_mean, max_abs):
    """Same crop boxes and flip bits; pixels equal where nothing is rescaled (both decoders are
    libjpeg-turbo), within the resamplers' difference (PIL vs torch antialiased bilinear) where
    shards are stored larger than data.resize_size (measured: mean 0.04, max 1 level)."""
    lane = Lane(1, 2, 0, 2)
    results = {}
    for decode in ("cpu", "device"):
        source = _source(root, decode, resize_size)
        loader = ShareLoader(source, torch.device("cpu"))
        shares = list(iter_shares(lane_dataset(source, "train", 2, lane, SHARE, concurrency=2), SHARE, decode))
        batches = [loader(share, "train") for share in shares]
        results[decode] = (_concat([{k: v for k, v in s.items() if k != "jpeg"} for s in shares]),
                           torch.cat([b["image"] for b in batches]).int())
    (cpu_params, cpu_pixels), (device_params, device_pixels) = results["cpu"], results["device"]
    for column in ("resize", "box", "flip", "lighting", "label"):
        assert np.array_equal(cpu_params[column], device_params[column]), column
    assert cpu_params["flip"].any() and not cpu_params["flip"].all(), "the batch exercises both flip states"
    diff = (cpu_pixels - device_pixels).abs().float()
    assert diff.mean().item() <= max_mean and diff.max().item() <= max_abs, (diff.mean().item(), diff.max().item())


def test_val_ten_crops_every_image_once_over_lanes(ray_local, root):
    parts = []
    for decode in ("cpu", "device"):
        source = _source(root, decode, eval_crops=10)
        loader = ShareLoader(source, torch.device("cpu"))
        for lane in [Lane(r, 2, t, 2) for r in range(2) for t in range(2)]:
            shares = list(iter_shares(lane_dataset(source, "val", 0, lane, SHARE, concurrency=2, with_keys=True),
                                      SHARE, decode))
            images = torch.cat([loader(s, "val")["image"] for s in shares])
            assert images.shape[1:] == (10, 32, 32, 3) and not np.any(_concat(shares)["lighting"])
            parts.append((decode, lane, list(_concat(shares)["key"]), images))
    for decode in ("cpu", "device"):
        keys = [k for d, _, ks, _ in parts if d == decode for k in ks]
        assert sorted(keys) == sorted(lane_keys(_source(root), "val", 0, Lane(0, 1))) and len(set(keys)) == 9
    for (_, _, keys_cpu, cpu), (_, _, keys_device, device) in zip(parts[:4], parts[4:]):
        assert keys_cpu == keys_device and torch.equal(cpu, device), "10-crop geometry is the same in both modes"


def test_build_pipeline_gives_whole_epoch_zero(ray_local, root):
    data = build_pipeline(DataConfig(root=root, resize_size=48, decode_concurrency=2), 32, 1, share_rows=8)
    assert data.meta.num_train == 45 and data.train.count() == 40, "whole shares of 8 rows: 5 left over"
    assert sorted(_concat(list(iter_shares(data.val, 8, "cpu")))["key"]) == \
        sorted(lane_keys(data.source, "val", 0, Lane(0, 1)))


def test_bad_shard_through_ray_names_it_or_is_stood_in_for(ray_local, tmp_path):
    meta = write_dataset(str(tmp_path), num_train=24, num_val=4, shard_size=8)
    shard = os.path.join(str(tmp_path), meta.shards["train"][1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    source = epochs.open_source(DataConfig(root=str(tmp_path), resize_size=48), 32, 1)
    # Ray raises RayTaskError(BadShardError): an instance of BadShardError too.
    with pytest.raises(BadShardError, match="bad shard .*part-00001.parquet"):
        list(iter_shares(lane_dataset(source, "train", 0, Lane(0, 1), SHARE, concurrency=2), SHARE, "cpu"))
    skipping = epochs.open_source(DataConfig(root=str(tmp_path), resize_size=48, skip_bad_shards=True), 32, 1)
    dataset = lane_dataset(skipping, "train", 0, Lane(0, 1), SHARE, concurrency=2)
    rows = _concat(list(iter_shares(dataset, SHARE, "cpu")))
    assert len(rows["label"]) == 24 and int(np.sum(rows["bad_shard"] == 1)) == 8
