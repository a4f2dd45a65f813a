"""Giving every tower of a replica the same batch.

Only tower 0 of each replica reads data (the input pipeline is split by
replica, never by world rank); it moves each batch to its device and
broadcasts it to the sibling towers over the tower group. A small header
announces the batch's shape, and a header with count 0 ends the epoch, so
uneven or empty epochs cannot leave a tower waiting forever.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from service.parallel.groups import RankGroups

Batch = dict[str, torch.Tensor]
_HEADER_LEN = 7  # count, crops (0 = none), height, width, channels, has_lighting, pad


def _header(batch: Optional[Batch], device: torch.device) -> torch.Tensor:
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
    if batch is not None:
        image = batch["image"]
        crops = image.shape[1] if image.dim() == 5 else 0
        header[0] = image.shape[0]
        header[1] = crops
        header[2:5] = torch.tensor(image.shape[-3:])
        header[5] = int("lighting" in batch)
    return header


_DTYPES = {"image": torch.uint8, "label": torch.int64, "lighting": torch.float32}


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Move the known keys to `device` with the dtypes the receivers expect."""
    return {
        key: torch.as_tensor(batch[key]).to(device, dtype, non_blocking=True)
        for key, dtype in _DTYPES.items()
        if key in batch
    }


def replica_batches(
    source: Optional[Iterable[Batch]], groups: RankGroups, device: torch.device
) -> Iterator[Batch]:
    """Yield identical batches on every tower of this replica.

    `source` is read on tower 0 only (pass None elsewhere). Batches hold
    `image` (uint8, [N, H, W, C] or [N, crops, H, W, C]), `label` (int64) and
    optionally `lighting` (float32 [N, 3]).
    """
    if groups.tower_group is None:
        for batch in source:
            if len(batch["label"]):
                yield _to_device(batch, device)
        return
    leader = groups.tower_leader_rank
    group = groups.tower_group
    if groups.tower == 0:
        for batch in source:
            if not len(batch["label"]):
                continue  # an empty batch would read as end-of-epoch
            batch = _to_device(batch, device)
            dist.broadcast(_header(batch, device), src=leader, group=group)
            for key in ("image", "label", "lighting"):
                if key in batch:
                    dist.broadcast(batch[key].contiguous(), src=leader, group=group)
            yield batch
        dist.broadcast(_header(None, device), src=leader, group=group)
        return
    while True:
        header = _header(None, device)
        dist.broadcast(header, src=leader, group=group)
        count, crops, height, width, channels, has_lighting, _ = header.tolist()
        if count == 0:
            return
        shape = (count, crops, height, width, channels) if crops else (count, height, width, channels)
        batch = {
            "image": torch.empty(shape, dtype=torch.uint8, device=device),
            "label": torch.empty(count, dtype=torch.int64, device=device),
        }
        if has_lighting:
            batch["lighting"] = torch.empty((count, 3), dtype=torch.float32, device=device)
        for key in ("image", "label", "lighting"):
            if key in batch:
                dist.broadcast(batch[key], src=leader, group=group)
        yield batch
