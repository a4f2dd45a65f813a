"""Autograd-aware activation exchange between the towers of one replica.

Forward: all-gather every tower's slice and concatenate along dim 1 in tower
order. Backward: each tower receives the *sum* over towers of the gradient
w.r.t. its slice (a reduce-scatter), because every tower's downstream layers
read that slice.

Note on the loss: after the last exchange every tower holds the same logits
and computes the same loss, so the summed gradient is `towers` times too
large. The training step divides the loss by `towers` before backward (see
`service.train.step`), and sums gradients of replicated parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _gather_dim1(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        # One fused collective into a [world, ...] buffer, then reorder.
        out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return torch.cat(out.unbind(0), dim=1)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_dim1(
    grad: torch.Tensor, group: dist.ProcessGroup, world: int, rank_in_group: int
) -> torch.Tensor:
    chunks = [c.contiguous() for c in grad.chunk(world, dim=1)]
    if dist.get_backend(group) == "nccl":
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    # gloo has no reduce_scatter: sum everything, keep our slice.
    full = grad.contiguous()
    dist.all_reduce(full, group=group)
    return full.chunk(world, dim=1)[rank_in_group].contiguous()


class _AllGatherChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, replicated_after: bool) -> torch.Tensor:
        ctx.group = group
        ctx.world = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.replicated_after = replicated_after
        return _gather_dim1(x, group, ctx.world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.replicated_after:
            # Every tower computed the same thing downstream, so every tower
            # holds this same gradient: the sum over towers is world × ours,
            # and no collective is needed (one fewer per step).
            own = grad.chunk(ctx.world, dim=1)[ctx.rank] * ctx.world
            return own.contiguous(), None, None
        return _reduce_scatter_dim1(grad, ctx.group, ctx.world, ctx.rank), None, None


class TowerExchange:
    """Callable exchange bound to one replica's tower group."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group

    def __call__(self, x: torch.Tensor, replicated_after: bool = False) -> torch.Tensor:
        if self.group is None:
            return x
        return _AllGatherChannels.apply(x, self.group, replicated_after)
