"""Gradient synchronisation after backward.

Two reductions, in this order:
1. parameters every tower holds in full (fc8 when classes % towers != 0) are
   summed over the tower group: the loss was divided by `towers` before
   backward (see `service.parallel.exchange`), so the sum is the true gradient
   and keeps the replicas of fc8 identical;
2. every gradient is averaged over the tower's data-parallel group
   (the same tower in every replica), in flat buckets to limit collectives.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from service.model.spec import AlexNetSpec
from service.parallel.groups import RankGroups
from service.parallel.sharding import is_replicated

BUCKET_BYTES = 32 * 1024 * 1024


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket, size = [], 0
    for tensor in tensors:
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
        if size >= BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _all_reduce_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup, scale: float) -> None:
    for bucket in _buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        for tensor, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(synced)


def sync_gradients(model: nn.Module, spec: AlexNetSpec, groups: RankGroups) -> None:
    """Make this rank's gradients the global (all replicas, all towers) ones."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if groups.tower_group is not None:
        replicated = [p.grad for n, p in named if is_replicated(n, spec)]
        if replicated:
            _all_reduce_flat(replicated, groups.tower_group, 1.0)
    if groups.data_parallel_group is not None:
        grads = [p.grad for _, p in named]
        _all_reduce_flat(grads, groups.data_parallel_group, 1.0 / groups.layout.replicas)
