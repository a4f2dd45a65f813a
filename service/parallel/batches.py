"""Every tower reads its share; the towers all-gather the replica's batch.

Tower t of a replica reads and prepares (decodes, crops, flips) only its
own 1/T of every batch, on its own device, then the towers all-gather the
shares over the tower group (NCCL on GPU, gloo on CPU): every tower holds
the same full batch, shares concatenated in tower order. No process
carries its replica's whole input.

Before each gather the towers swap a small header (their share's row count
and shape) over the tower group's CPU twin: a count of 0 means that
tower's lane has ended, and when every count is 0 the epoch ends, so uneven
lanes (validation) cannot leave a tower waiting. Uneven shares are padded
to the largest for the gather and cut back after it. The header comes from
host shapes and travels over gloo: no rank reads a device tensor to learn a
batch size.

On CUDA the preparation and the gather of the next `depth` batches are
issued on a side stream, each followed by an event; the compute stream
waits on the event of its own batch only (not on the whole side stream,
which also holds later batches' work). On CPU everything runs in order.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from service.parallel.groups import RankGroups

Batch = dict[str, torch.Tensor]
# A host share -> this tower's device batch (image uint8, label int64, lighting float32 [n, 3]).
Prepare = Callable[[object], Batch]
_MAX_DIMS = 5  # image [n, crops, H, W, C] at most


def _header(batch: Optional[Batch]) -> torch.Tensor:
    """CPU int64 [1 + _MAX_DIMS]: ndim, then the image shape (zeros: no share)."""
    header = torch.zeros(1 + _MAX_DIMS, dtype=torch.int64)
    if batch is not None:
        shape = batch["image"].shape
        header[0] = len(shape)
        header[1:1 + len(shape)] = torch.tensor(shape)
    return header


def _swap_headers(batch: Optional[Batch], groups: RankGroups) -> list[torch.Size]:
    """Every tower's share shape (count 0: its lane has ended), over the CPU group."""
    mine = _header(batch)
    headers = [torch.empty_like(mine) for _ in range(groups.layout.towers)]
    dist.all_gather(headers, mine, group=groups.header_group)
    return [torch.Size(h[1:1 + int(h[0])].tolist()) if h[0] else torch.Size([0]) for h in headers]


# torch 2.13 renamed all_gather_into_tensor (deprecated there); 2.11 (the GPU bench machine) has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather(local: torch.Tensor, counts: list[int], largest: int, group) -> torch.Tensor:
    """All towers' rows of `local` in tower order (padded to `largest` for the collective)."""
    local = local.contiguous()
    if all(count == largest for count in counts):  # training: equal shares, gathered in place
        out = local.new_empty((largest * len(counts), *local.shape[1:]))
        _all_gather_single(out, local, group=group)
        return out
    padded = torch.cat([local, local.new_zeros((largest - local.shape[0], *local.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_shares(batch: Optional[Batch], groups: RankGroups, device: torch.device) -> Optional[Batch]:
    """The replica's full batch from every tower's share (None: every lane has ended).
    `batch` is this tower's share, or None once its lane has ended."""
    if groups.tower_group is None:
        return batch
    shapes = _swap_headers(batch, groups)
    counts = [shape[0] for shape in shapes]
    if not any(counts):
        return None
    largest = max(counts)
    if batch is None:  # this lane has ended, the others go on: send an empty share
        image_shape = next(shape for shape in shapes if shape[0])[1:]
        batch = {"image": torch.empty((0, *image_shape), dtype=torch.uint8, device=device),
                 "label": torch.empty(0, dtype=torch.int64, device=device),
                 "lighting": torch.empty((0, 3), dtype=torch.float32, device=device)}
    # label and lighting travel together: one collective for the small columns.
    rows = torch.cat([batch["label"].to(torch.float32).view(-1, 1), batch["lighting"]], dim=1)
    rows = _gather(rows, counts, largest, groups.tower_group)
    return {"image": _gather(batch["image"], counts, largest, groups.tower_group),
            "label": rows[:, 0].to(torch.int64), "lighting": rows[:, 1:].contiguous()}


def tower_batches(shares: Iterable, prepare: Prepare, groups: RankGroups, device: torch.device,
                  depth: int = 2) -> Iterator[Batch]:
    """Yield the replica's full batches, the same on every tower of the replica.

    `shares` are this tower's host shares in plan order; `prepare` turns one
    into its device batch. Empty shares are skipped.
    """
    if device.type != "cuda":
        for batch in _gathered(shares, prepare, groups, device):
            yield batch
        return
    side = torch.cuda.Stream(device=device)
    pending: deque = deque()
    batches = _gathered(shares, prepare, groups, device, side)
    while True:
        with torch.cuda.stream(side):
            batch = next(batches, None)  # prepared and gathered on the side stream
            ready = torch.cuda.Event()
            ready.record(side)
        if batch is not None:
            pending.append((batch, ready))
        if pending and (batch is None or len(pending) > depth):
            yield _handed_over(*pending.popleft(), device)
        elif batch is None:
            return


def _gathered(shares: Iterable, prepare: Prepare, groups: RankGroups, device: torch.device,
              side: Optional["torch.cuda.Stream"] = None) -> Iterator[Batch]:
    """Prepare each share and gather the replica's batch, until every lane has ended."""
    local = iter(shares)
    while True:
        share = next(local, None)
        while share is not None and len(share["label"]) == 0:
            share = next(local, None)
        batch = prepare(share) if share is not None else None
        full = gather_shares(batch, groups, device)
        if full is None:
            return
        yield full


def _handed_over(batch: Batch, ready: "torch.cuda.Event", device: torch.device) -> Batch:
    """The compute stream waits for this batch's own event, and the allocator is told
    the tensors are used there, so it does not recycle them while the step runs."""
    compute = torch.cuda.current_stream(device)
    compute.wait_event(ready)
    for value in batch.values():
        value.record_stream(compute)
    return batch
