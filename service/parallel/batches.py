"""Giving every tower of a replica the same batch, on the device, without
stalling the host.

Only tower 0 of each replica reads data (the input pipeline is split by
replica, never by world rank). For each batch it sends a small header (the
batch's shape) to its siblings over the replica's CPU header group, copies
the batch to its device and broadcasts it over the tower group. A header
with count 0 ends the epoch, so uneven or empty epochs cannot leave a tower
waiting forever. The header is built from the host batch's shape and travels
over gloo, so no rank ever reads a device tensor to learn a batch size.

Host -> device: from pinned host memory, on a side CUDA stream, `depth`
batches ahead of the step (`prefetch_to_device`), so the copy overlaps the
previous step's compute. On CPU both are plain pass-throughs.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from service.parallel.groups import RankGroups

Batch = dict[str, torch.Tensor]
_HEADER_LEN = 6  # count, crops (0 = none), height, width, channels, has_lighting
_DTYPES = {"image": torch.uint8, "label": torch.int64, "lighting": torch.float32}


def _header(batch: Optional[Batch]) -> torch.Tensor:
    """A CPU int64 header describing `batch` (all zeros: end of epoch)."""
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    if batch is not None:
        image = batch["image"]
        crops = image.shape[1] if image.dim() == 5 else 0
        header[:] = torch.tensor([image.shape[0], crops, *image.shape[-3:], int("lighting" in batch)])
    return header


def _host_batch(batch: Batch) -> Batch:
    """The known keys as CPU tensors with the dtypes every tower expects."""
    return {key: torch.as_tensor(batch[key]).to(dtype=dtype) for key, dtype in _DTYPES.items() if key in batch}


def prefetch_to_device(batches: Iterable[Batch], device: torch.device, depth: int = 2) -> Iterator[Batch]:
    """Copy host batches to `device` `depth` batches ahead, off the compute stream.

    On CUDA each copy is issued from pinned memory on a side stream; before a
    batch is handed out the compute stream waits for its copy (an event, not a
    host sync) and the tensors are marked as used there so the allocator does
    not recycle them early.
    """
    if device.type != "cuda":
        for batch in batches:
            yield {key: value.to(device) for key, value in batch.items()}
        return
    copy_stream = torch.cuda.Stream(device=device)
    pending: deque = deque()

    def issue(batch: Batch) -> None:
        with torch.cuda.stream(copy_stream):
            moved = {
                key: (value if value.is_pinned() else value.pin_memory()).to(device, non_blocking=True)
                for key, value in batch.items()
            }
        pending.append(moved)

    for batch in batches:
        issue(batch)
        if len(pending) > depth:
            yield _ready(pending.popleft(), copy_stream)
    while pending:
        yield _ready(pending.popleft(), copy_stream)


def _ready(batch: Batch, copy_stream: "torch.cuda.Stream") -> Batch:
    compute = torch.cuda.current_stream(copy_stream.device)
    compute.wait_stream(copy_stream)
    for value in batch.values():
        value.record_stream(compute)
    return batch


def replica_batches(
    source: Optional[Iterable[Batch]], groups: RankGroups, device: torch.device, prefetch_depth: int = 2
) -> Iterator[Batch]:
    """Yield identical device batches on every tower of this replica.

    `source` (host batches: `image` uint8 [N, H, W, C] or [N, crops, H, W, C],
    `label` int64, optionally `lighting` float32 [N, 3]) is read on tower 0
    only; pass None elsewhere. Empty batches are skipped.
    """
    if groups.tower == 0:
        host = (_host_batch(batch) for batch in source if len(batch["label"]))
        yield from _lead(prefetch_to_device(host, device, prefetch_depth), groups)
    else:
        yield from _follow(groups, device)


def _lead(batches: Iterator[Batch], groups: RankGroups) -> Iterator[Batch]:
    if groups.tower_group is None:
        yield from batches
        return
    leader = groups.tower_leader_rank
    for batch in batches:
        dist.broadcast(_header(batch), src=leader, group=groups.header_group)
        for key in _DTYPES:
            if key in batch:
                dist.broadcast(batch[key], src=leader, group=groups.tower_group)
        yield batch
    dist.broadcast(_header(None), src=leader, group=groups.header_group)


def _follow(groups: RankGroups, device: torch.device) -> Iterator[Batch]:
    leader = groups.tower_leader_rank
    while True:
        header = _header(None)
        dist.broadcast(header, src=leader, group=groups.header_group)
        count, crops, height, width, channels, has_lighting = header.tolist()  # a CPU tensor: no device sync
        if count == 0:
            return
        image_shape = (count, crops, height, width, channels) if crops else (count, height, width, channels)
        batch = {
            "image": torch.empty(image_shape, dtype=torch.uint8, device=device),
            "label": torch.empty(count, dtype=torch.int64, device=device),
        }
        if has_lighting:
            batch["lighting"] = torch.empty((count, 3), dtype=torch.float32, device=device)
        for key in _DTYPES:
            if key in batch:
                dist.broadcast(batch[key], src=leader, group=groups.tower_group)
        yield batch
