"""Host -> device copy of training batches: pinned vs pageable vs the service's path.

One batch is what the input pipeline hands a trainer: uint8 [256, 224, 224, 3]
(38.5 MB). Three ways to move it, timed with CUDA events over `copies` copies
after a warm-up:

- pageable: a plain host tensor `.to(device)` (what a copy of a numpy batch does);
- pinned: a page-locked host tensor `.to(device, non_blocking=True)`;
- service path (decode="cpu"): `service.parallel.batches.tower_batches` with
  the `ShareLoader` a tower uses, fed numpy shares (what Ray Data hands out):
  it pins each share, copies and flips it on a side stream `depth` batches
  ahead, each batch behind its own event; timed on the host clock, share in
  to batch usable on the compute stream, since part of its cost is host work.

On CPU (the dry run) only the code path is exercised; the figures mean nothing.
"""

from __future__ import annotations

import statistics
import time

import torch

import numpy as np

from service.data.device_decode import ShareLoader
from service.parallel.batches import tower_batches
from service.parallel.groups import single_process_groups
from service.parallel.layout import ParallelLayout


class _CpuShares:
    """The few fields of a DataSource that `ShareLoader` reads in cpu mode."""

    decode = "cpu"


def events_time(device: torch.device, fn, repeats: int) -> float:
    """Seconds per call of `fn`, median over `repeats`, from CUDA events (host clock on CPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _row(method: str, seconds_per_batch: float, batch_bytes: int) -> dict:
    return {
        "method": method,
        "ms_per_batch": seconds_per_batch * 1000,
        "gb_per_s": batch_bytes / seconds_per_batch / 1e9,
        "batches_per_s": 1 / seconds_per_batch,
    }


def measure(device: torch.device, batch: int = 256, image_size: int = 224, copies: int = 20, depth: int = 2) -> list[dict]:
    """Rows of copy rates for uint8 [batch, image_size, image_size, 3] batches."""
    shape = (batch, image_size, image_size, 3)
    pageable = torch.randint(0, 256, shape, dtype=torch.uint8)
    nbytes = pageable.numel()
    rows = []
    target = torch.empty(shape, dtype=torch.uint8, device=device)
    events_time(device, lambda: target.copy_(pageable), 2)  # warm-up
    rows.append(_row("pageable .to(device)", events_time(device, lambda: target.copy_(pageable), copies), nbytes))
    if device.type == "cuda":
        pinned = pageable.pin_memory()
        copy_pinned = lambda: target.copy_(pinned, non_blocking=True)  # noqa: E731
        events_time(device, copy_pinned, 2)
        rows.append(_row("pinned .to(device, non_blocking)", events_time(device, copy_pinned, copies), nbytes))
    rows.append(_row(f"service tower_batches(depth={depth}), numpy shares in", _prefetch_time(device, pageable, copies, depth), nbytes))
    return rows


def _prefetch_time(device: torch.device, host: torch.Tensor, copies: int, depth: int) -> float:
    """Host seconds per batch through the service's share loader and prefetcher, steady state."""
    # Fresh numpy shares each batch, as Ray Data would hand them out; made up
    # front so their allocation is not timed.
    n = host.shape[0]
    shares = [{"image": host.numpy().copy(), "label": np.zeros(n, np.int64), "flip": np.arange(n) % 2 == 0,
               "lighting": np.zeros((n, 3), np.float32)} for _ in range(copies + depth + 2)]
    loader = ShareLoader(_CpuShares(), device)
    groups = single_process_groups(ParallelLayout(1, 1))
    stream = tower_batches(iter(shares), lambda share: loader(share, "train"), groups, device, depth)
    for _ in range(depth + 2):  # fill the pipeline and let the pinned allocator warm up
        next(stream)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    count = 0
    for batch in stream:
        if device.type == "cuda":
            # What the step would wait on: the copy is complete on the compute stream.
            torch.cuda.current_stream(device).synchronize()
        count += 1
    return (time.perf_counter() - begin) / max(1, count)
