"""Autograd-aware activation exchange between the towers of one replica.

Forward: all-gather every tower's slice and concatenate along the channel
(or feature) dimension in tower order. Backward: each tower receives the
*sum* over towers of the gradient w.r.t. its slice (a reduce-scatter),
because every tower's downstream layers read that slice.

Memory layout: the gather runs on a buffer whose leading dimension is the
tower, laid out so that the caller's tensor is a free view of one slot: a
channels_last [N, C, H, W] map is gathered as [towers, N, H, W, C] and comes
back channels_last, an NCHW map as [towers, N, C, H, W]. The only copy is
the final interleave of the tower slots along channels, so channels_last
activations never round-trip through NCHW. The dtype travels as it is: under
bf16 autocast the exchanges move bf16.

Note on the loss: after the last exchange every tower holds the same logits
and computes the same loss, so the summed gradient is `towers` times too
large. The training step divides the loss by `towers` before backward (see
`service.train.step`), and sums gradients of replicated parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch >= 2.13 renamed the single-tensor collectives; older releases (the GPU
# machines run 2.11) only have the *_into_tensor/*_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def reduce_scatter_slots(own: torch.Tensor, slots: torch.Tensor, group: dist.ProcessGroup) -> None:
    """`own` <- the sum over ranks of their slot [rank] of `slots` ([towers * N, ...]).

    gloo (the CPU backend) runs its reduce-scatter 2-4x slower than an
    all-to-all of the same bytes for the activation sizes of a CPU run
    (bench/towers_cpu.py --profile times both), so on gloo it is an
    all-to-all of the slots and a local sum in rank order; NCCL's
    reduce-scatter is used as it is.
    """
    if dist.get_backend(group) != "gloo":
        _reduce_scatter_single(own, slots, group=group)
        return
    received = torch.empty_like(slots)
    dist.all_to_all_single(received, slots, group=group)
    torch.sum(received.view(-1, *own.shape), dim=0, out=own)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _slot_view(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous tensor with channels last in memory (a view when possible)."""
    return x.permute(0, 2, 3, 1).contiguous() if _is_channels_last(x) else x.contiguous()


def _interleave(buffer: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """[towers, N, ...] tower slots -> the concatenation along channels."""
    towers = buffer.shape[0]
    if channels_last:  # [T, N, H, W, C] -> [N, H, W, T*C] -> NCHW view, channels_last memory
        _, n, h, w, c = buffer.shape
        return buffer.permute(1, 2, 3, 0, 4).reshape(n, h, w, towers * c).permute(0, 3, 1, 2)
    n, c = buffer.shape[1], buffer.shape[2]
    return buffer.transpose(0, 1).reshape(n, towers * c, *buffer.shape[3:])


def _split_slots(grad: torch.Tensor, towers: int, channels_last: bool) -> torch.Tensor:
    """Inverse of `_interleave`: the concatenated gradient as [towers, N, ...] slots."""
    if channels_last:
        n, _, h, w = grad.shape
        nhwc = grad.permute(0, 2, 3, 1).reshape(n, h, w, towers, -1)
        return nhwc.permute(3, 0, 1, 2, 4).contiguous()
    n = grad.shape[0]
    return grad.reshape(n, towers, -1, *grad.shape[2:]).transpose(0, 1).contiguous()


def _from_slot(slot: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return slot.permute(0, 3, 1, 2) if channels_last else slot


class _AllGatherChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, replicated_after: bool) -> torch.Tensor:
        ctx.group = group
        ctx.towers = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.replicated_after = replicated_after
        ctx.channels_last = _is_channels_last(x)
        slot = _slot_view(x)
        # The concatenated form [towers * N, ...] (gloo accepts no other), seen as slots.
        buffer = torch.empty((ctx.towers * slot.shape[0], *slot.shape[1:]), dtype=slot.dtype, device=slot.device)
        _all_gather_single(buffer, slot, group=group)
        return _interleave(buffer.view(ctx.towers, *slot.shape), ctx.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.replicated_after:
            # Every tower computed the same thing downstream, so every tower
            # holds this same gradient: the sum over towers is towers x ours,
            # and no collective is needed (one fewer per step). Our channels
            # are one contiguous range of dim 1 in either memory layout, so
            # they are read in place rather than through a copy of every slot.
            width = grad.shape[1] // ctx.towers
            return grad.narrow(1, ctx.rank * width, width) * ctx.towers, None, None
        slots = _split_slots(grad, ctx.towers, ctx.channels_last)
        own = torch.empty_like(slots[0])
        reduce_scatter_slots(own, slots.flatten(0, 1), ctx.group)
        return _from_slot(own, ctx.channels_last), None, None


class TowerExchange:
    """Callable exchange bound to one replica's tower group."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group

    def __call__(self, x: torch.Tensor, replicated_after: bool = False) -> torch.Tensor:
        if self.group is None:
            return x
        return _AllGatherChannels.apply(x, self.group, replicated_after)


def excluded_from_compile(exchange: TowerExchange):
    """`exchange`, kept out of torch.compile graphs.

    A collective inside a compiled graph would need tracing support for
    process groups; excluding the exchange keeps torch.compile to the
    per-tower compute between exchanges (graph breaks at each exchange).
    Applied only to towers that compile: `torch.compiler.disable` imports
    torch._dynamo, ~1.3 s of start-up in every process that never compiles.
    A lone tower (T=1) is wrapped too, although its exchange is the identity
    and the breaks cost it four graphs: in one graph, Inductor (torch 2.13,
    CPU) returns zero gradients for every conv layer, because it miscompiles
    conv -> relu -> max_pool2d -> flatten -> linear backward; the break
    before fc6 keeps pool5 and fc6 in separate graphs.
    tests/test_gpu_path_review.py holds the minimal case (strict xfail): when
    a torch release fixes it, that test fails and the wrapper can go for T=1.
    """
    return torch.compiler.disable(exchange)
