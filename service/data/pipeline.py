"""The training input: one Ray Dataset per (epoch, replica), exact and resumable.

    driver:  source = open_source(data_cfg, image_size, num_replicas)   # meta.json, checks
    worker:  for epoch ...:
                 ds = epoch_dataset(source, "train", epoch, replica, replicas, skip_rows, concurrency)
                 for batch in ds.iter_batches(batch_size=..., batch_format="numpy"): ...

The rows and their order come from the epoch plan (`service.data.epochs`):
a pure function of (shuffle_seed, epoch, replica, replicas), so a resumed
run sees exactly what an uninterrupted one would. `skip_rows` drops rows of
the plan before anything is read or decoded. Each image's augmentation is a
pure function of (seed, epoch, key) (`service.data.decode`).

Ray Data graph: `from_items(read units)` (no task) -> `map_batches(decode)`
with `concurrency` tasks of 1 CPU each; each task reads its shard slice
itself (Parquet, column projection) and yields decoded batches. There is
no separate read or listing stage: a 1-CPU listing task can starve once
training workers and decode tasks hold every CPU (seen on 2 cores), and a
0-CPU stage could land on a GPU-less head started with --num-cpus 0.
Output order is the plan's order (`preserve_order`).

`iter_epoch_local` yields the same rows, order and pixels without Ray
(tests, benchmarks, a GPU machine without Ray).

Normalisation is not done here: batches cross the wire as uint8 and the
training step casts on the device, adds `lighting` (0-255 units), subtracts
`meta.mean` and divides by `meta.std` (both 0-255 units).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from service.data.decode import decode_unit
from service.data.epochs import DataSource, ReadUnit, epoch_units, open_source, replica_rows
from service.data.meta import DatasetMeta

# Rows a decode task yields at a time (one Ray Data block).
DECODE_BATCH_ROWS = 64
# Smallest shard slice worth a task of its own (Ray's per-task overhead).
MIN_ROWS_PER_TASK = 64


def decode_tasks_per_replica(decode_concurrency: int, free_cpus: float, replicas: int) -> int:
    """Concurrent decode tasks for each replica's dataset.

    `decode_concurrency` is data.decode_concurrency for the whole job (an
    explicit number wins); 0 = auto: the CPUs not reserved by training
    workers (`free_cpus`). Split evenly over replicas, at least 1 each.
    """
    total = decode_concurrency if decode_concurrency > 0 else int(free_cpus)
    return max(1, total // max(1, replicas))


def _rows_per_task(source: DataSource, split: str, replicas: int, concurrency: int) -> int:
    """Whole shards when there are plenty of them; smaller slices when a
    replica's part holds too few shards to keep `concurrency` tasks busy."""
    rows = replica_rows(source, split, 0, replicas)
    return max(MIN_ROWS_PER_TASK, math.ceil(rows / max(1, 2 * concurrency)))


def _decode_units(batch: dict[str, np.ndarray], source: DataSource) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: the read units of one input block -> decoded batches."""
    for i in range(len(batch["shard"])):
        unit = ReadUnit(split=str(batch["split"][i]), epoch=int(batch["epoch"][i]), shard=int(batch["shard"][i]),
                        start=int(batch["start"][i]), stop=int(batch["stop"][i]))
        yield from decode_unit(source, unit, DECODE_BATCH_ROWS)


def epoch_dataset(source: DataSource, split: str, epoch: int, replica: int, replicas: int,
                  skip_rows: int = 0, concurrency: int = 1):
    """A Ray Dataset of replica `replica`'s rows of epoch `epoch`, in plan order.

    Rows: image uint8 [S, S, 3] (val 10-crop: [crops, S, S, 3]), label int64,
    lighting float32 [3] (0-255 units; zeros for val), key str, bad_shard
    int32 (-1; see `service.data.decode`). `concurrency` decode tasks of 1
    CPU each run at once.
    """
    import ray.data

    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    units = epoch_units(source, split, epoch, replica, replicas, skip_rows,
                        _rows_per_task(source, split, replicas, concurrency))
    ds = ray.data.from_items([asdict(u) for u in units], override_num_blocks=max(1, len(units)))
    # Rows in plan order, whichever task finishes first (public execution option).
    ds.context.execution_options.preserve_order = True
    # One decoded batch per block: a task's rows stream out as they are decoded
    # instead of waiting for the default 128 MiB block (the whole shard slice).
    crops = source.eval_crop_count if split == "val" else 1
    ds.context.target_max_block_size = DECODE_BATCH_ROWS * crops * source.image_size ** 2 * 3
    return ds.map_batches(_decode_units, fn_kwargs={"source": source}, batch_size=1, batch_format="numpy",
                          num_cpus=1, compute=ray.data.TaskPoolStrategy(size=min(concurrency, max(1, len(units)))))


def iter_epoch_local(source: DataSource, split: str, epoch: int, replica: int, replicas: int,
                     skip_rows: int = 0, batch_size: int = 128) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `epoch_dataset`, same order and pixels, decoded in this
    process (no Ray), in batches of `batch_size` (the last may be smaller)."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for unit in epoch_units(source, split, epoch, replica, replicas, skip_rows):
        for batch in decode_unit(source, unit, DECODE_BATCH_ROWS):
            pending.append(batch)
            held += len(batch["label"])
            while held >= batch_size:
                merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
                yield {k: v[:batch_size] for k, v in merged.items()}
                pending = [{k: v[batch_size:] for k, v in merged.items()}]
                held -= batch_size
    if held:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


@dataclass
class TrainingData:
    """Epoch-0 datasets over every replica's rows (evaluation, benchmarks)."""

    meta: DatasetMeta
    source: DataSource
    # -- rows as `epoch_dataset`; all training rows of epoch 0 in plan order.
    train: Any  # ray.data.Dataset
    # -- every validation image once.
    val: Any  # ray.data.Dataset


def build_pipeline(data_cfg: Any, image_size: int, num_replicas: int, concurrency: int = 0) -> TrainingData:
    """Whole-dataset (one replica) epoch-0 train and val datasets over `data_cfg.root`.

    `num_replicas` is checked against the dataset size. `concurrency`
    decode tasks (0: data.decode_concurrency, or when that is 0 too, the
    cluster's CPUs). Training uses `epoch_dataset` per (epoch, replica).
    """
    import ray

    source = open_source(data_cfg, image_size, num_replicas)
    if concurrency <= 0:
        free = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
        concurrency = decode_tasks_per_replica(data_cfg.decode_concurrency, free, 1)
    return TrainingData(meta=source.meta, source=source,
                        train=epoch_dataset(source, "train", 0, 0, 1, concurrency=concurrency),
                        val=epoch_dataset(source, "val", 0, 0, 1, concurrency=concurrency))
