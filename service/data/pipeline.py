"""The training input: one Ray Dataset per (epoch, lane), exact and resumable.

    driver:  source = open_source(data_cfg, image_size, num_replicas, decode)   # meta.json, checks
    worker (tower t of replica r), for each epoch:
        ds = lane_dataset(source, "train", epoch, Lane(r, R, t, T), share_rows, skip_shares, tasks)
        for share in iter_shares(ds, share_rows, source.decode): ...   # this tower's 1/T of each batch

Every tower reads its own lane (`service.data.epochs`): no process carries
its replica's whole input. The rows and their order are a pure function of
(shuffle_seed, epoch, lane), so a resumed run sees exactly what an
uninterrupted one would; `skip_shares` drops whole shares before anything
is read. Each image's augmentation is a pure function of (seed, epoch, key).

Ray Data graph: `from_items(share units)` (no task) -> `map_batches(read)`
with `concurrency` tasks of 1 CPU each; each task reads its shard slices
itself (Parquet, column projection) and yields one batch dict per share.
Blocks hold whole shares: a share of decoded crops (cpu mode, ~5-20 MB) is
a block of its own; JPEG shares (device mode) travel as pyarrow Tables,
many to a block of up to ~16 MB, because Ray's cost in the consuming process
is per block and per batch it formats (measured here, shares of 128: 4 MB
blocks 0.15 ms/image of consumer CPU, 16 MB 0.11, and whole blocks taken as
pyarrow and sliced here 0.08). The consumer slices shares out of blocks
without a copy: no stitching across blocks, no `select_columns` copy. There is no separate read or listing stage: a
1-CPU listing task can starve once training workers and read tasks hold
every CPU (seen on 2 cores), and a 0-CPU stage could land on a GPU-less head
started with --num-cpus 0. Output order is the plan's (`preserve_order`).

Each lane's executor is capped (`resource_limits`) at its own tasks' CPUs
and its share of the object store, so R x T executors on one node do not
each budget for the whole node.

`iter_lane_local` yields the same shares without Ray (tests, benchmarks, a
GPU machine without Ray). Normalisation is not done here: see
`service.data.device_decode` and `service.train.step.Normalizer`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from service.data.epochs import DataSource, Lane, ShareUnit, lane_range, open_source, share_units
from service.data.meta import DatasetMeta
from service.data.read import read_shares, share_arrays

# Smallest slice worth a task of its own (Ray's per-task overhead).
MIN_ROWS_PER_TASK = 64
# Typical stored JPEG bytes per pixel of the shorter-side-256 shards (~30 KB for 256x341);
# only sizes blocks in device mode, where a share's bytes vary with its images.
JPEG_BYTES_PER_PIXEL = 0.35
# Blocks of about this size carry several JPEG shares (device mode); pixel shares are a block each.
TARGET_BLOCK_BYTES = 16 << 20
# The part of the object store all lanes of a node may fill with shares in flight.
OBJECT_STORE_FRACTION = 0.5


def decode_tasks_per_lane(decode_concurrency: int, free_cpus: float, lanes: int) -> int:
    """Concurrent read tasks for each lane's dataset.

    `decode_concurrency` is data.decode_concurrency for the whole job (an
    explicit number wins); 0 = auto: the CPUs not reserved by training
    workers (`free_cpus`). Split evenly over the job's lanes (replicas x
    towers), at least 1 each.
    """
    total = decode_concurrency if decode_concurrency > 0 else int(free_cpus)
    return max(1, total // max(1, lanes))


def _shares_per_task(source: DataSource, split: str, lane: Lane, share_rows: int, concurrency: int) -> int:
    """Whole shards' worth of shares when there are plenty of them; fewer when the
    lane holds too few rows to keep `concurrency` tasks busy."""
    start, stop = lane_range(source, split, lane)
    rows = max(MIN_ROWS_PER_TASK, math.ceil((stop - start) / max(1, 2 * concurrency)))
    rows = min(rows, max(source.meta.shard_rows[split] or [rows]))
    return max(1, rows // share_rows)


def _read_units(batch: dict[str, np.ndarray], source: DataSource, with_keys: bool) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: the share units of one input block -> one batch per share."""
    for i in range(len(batch["first"])):
        unit = ShareUnit(**{name: (str if name == "split" else int)(batch[name][i])
                            for name in ShareUnit.__dataclass_fields__})
        yield from read_shares(source, unit, with_keys)


def share_bytes(source: DataSource, split: str, share_rows: int) -> int:
    """About how many bytes one share occupies in the object store."""
    crops = source.eval_crop_count if split == "val" else 1
    if source.decode == "cpu":
        pixels = crops * source.image_size ** 2 * 3
    else:
        pixels = JPEG_BYTES_PER_PIXEL * source.meta.resize_size ** 2 * 4 / 3
    return int(share_rows * (pixels + 8 + 24 + 1 + 12 + 4))  # + label, resize/box, flip, lighting, bad_shard


def lane_dataset(source: DataSource, split: str, epoch: int, lane: Lane, share_rows: int,
                 skip_shares: int = 0, concurrency: int = 1, with_keys: bool = False,
                 object_store_bytes: float = 0):
    """A Ray Dataset of the lane's shares of epoch `epoch`, blocks of whole shares,
    in plan order (columns: `service.data.read`). `concurrency` read tasks of 1
    CPU each; `object_store_bytes` (0: no cap) bounds the shares in flight."""
    import ray.data
    from ray.data import ExecutionResources

    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    per_task = _shares_per_task(source, split, lane, share_rows, concurrency)
    units = share_units(source, split, epoch, lane, share_rows, skip_shares, per_task)
    ds = ray.data.from_items([asdict(u) for u in units] or [], override_num_blocks=max(1, len(units)))
    context = ds.context
    context.execution_options.preserve_order = True
    # The output buffer flushes once it holds more than this (after a whole
    # share: each yield is one) and slices a block only past 1.5x this, which
    # `shares_per_block` whole shares never reach.
    per_share = share_bytes(source, split, share_rows)
    shares_per_block = max(1, TARGET_BLOCK_BYTES // per_share)
    context.target_max_block_size = int((shares_per_block - 0.2) * per_share)
    tasks = min(concurrency, max(1, len(units)))
    limits = {"object_store_memory": object_store_bytes} if object_store_bytes else {}
    context.execution_options.resource_limits = ExecutionResources.for_limits(cpu=tasks, **limits)
    return ds.map_batches(_read_units, fn_kwargs={"source": source, "with_keys": with_keys}, batch_size=1,
                          batch_format="numpy", num_cpus=1, compute=ray.data.TaskPoolStrategy(size=tasks))


def iter_shares(dataset, share_rows: int, decode: str, prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """The lane's shares from its dataset (`decode`: the source's mode), as dicts of numpy
    columns. cpu mode: a block is a share, taken as numpy. device mode: whole blocks of JPEG
    shares taken as pyarrow and cut into shares here, without a copy (`share_arrays`)."""
    if decode == "cpu":
        yield from dataset.iter_batches(batch_size=share_rows, batch_format="numpy", prefetch_batches=prefetch)
        return
    import pyarrow as pa

    carry = None  # rows of a share cut by a block boundary (blocks hold whole shares: not expected)
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch):
        if carry is not None:
            block, carry = pa.concat_tables([carry, block]), None
        whole = block.num_rows - block.num_rows % share_rows
        for lo in range(0, whole, share_rows):
            yield share_arrays(block.slice(lo, share_rows))
        if whole < block.num_rows:
            carry = block.slice(whole)
    if carry is not None:  # a validation lane's last, shorter share
        yield share_arrays(carry)


def iter_lane_local(source: DataSource, split: str, epoch: int, lane: Lane, share_rows: int,
                    skip_shares: int = 0, with_keys: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """The shares of `lane_dataset` as `iter_shares` gives them, same order and content,
    read in this process (no Ray)."""
    for unit in share_units(source, split, epoch, lane, share_rows, skip_shares):
        for share in read_shares(source, unit, with_keys):
            yield share if isinstance(share, dict) else share_arrays(share)


def object_store_budget(num_lanes: int) -> float:
    """Object-store bytes one lane's executor may fill: its share of the local
    node's store (0 when Ray is not running)."""
    import ray

    if not ray.is_initialized():
        return 0
    store = ray.available_resources().get("object_store_memory", 0)
    return OBJECT_STORE_FRACTION * store / max(1, num_lanes)


@dataclass
class TrainingData:
    """Epoch-0 datasets over all rows, decoded on the CPU (evaluation, benchmarks)."""

    meta: DatasetMeta
    source: DataSource
    # -- One lane over every training row of epoch 0, in plan order.
    train: Any  # ray.data.Dataset
    # -- Every validation image once (final pixels: crops, no flip).
    val: Any  # ray.data.Dataset


def build_pipeline(data_cfg: Any, image_size: int, num_replicas: int, concurrency: int = 0,
                   share_rows: int = 64) -> TrainingData:
    """Whole-dataset (one lane) epoch-0 train and val datasets over `data_cfg.root`,
    CPU-decoded, with keys.

    `num_replicas` is checked against the dataset size. `concurrency` read
    tasks (0: data.decode_concurrency, or when that is 0 too, the cluster's
    CPUs). Training uses `lane_dataset` per (epoch, lane).
    """
    import ray

    source = open_source(data_cfg, image_size, num_replicas, decode="cpu")
    if concurrency <= 0:
        free = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
        concurrency = decode_tasks_per_lane(data_cfg.decode_concurrency, free, 1)
    whole = Lane(0, 1)
    return TrainingData(meta=source.meta, source=source,
                        train=lane_dataset(source, "train", 0, whole, share_rows, concurrency=concurrency,
                                           with_keys=True),
                        val=lane_dataset(source, "val", 0, whole, share_rows, concurrency=concurrency,
                                         with_keys=True))
