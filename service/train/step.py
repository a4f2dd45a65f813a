"""One training step of one tower, and evaluation.

Runs under any initialised process group (gloo on CPU, NCCL on GPU) or none
at all (1 replica x 1 tower). No Ray here.

Nothing in a step reads a device tensor on the host: the loss and the top-1
hits come back as device tensors, and the loop decides when to read them
(logging steps and epoch ends only), so the host can queue steps ahead of
the GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from service.model.spec import AlexNetSpec
from service.parallel.gradients import sum_replicated_over_towers, wrap_data_parallel
from service.parallel.groups import RankGroups


@dataclass(frozen=True)
class StepOptions:
    """Numerics and speed switches of the step."""

    # bf16 autocast (GPU): activations and exchanges in bf16; weights, the loss
    # and the update stay fp32.
    bf16: bool = False
    # NHWC activations; the uint8 NHWC batch becomes channels_last for free.
    channels_last: bool = False
    label_smoothing: float = 0.0
    # torch.compile the tower (the exchanges stay outside the compiled graphs).
    compile: bool = False
    # Replica gradient all-reduce payload: "none" (fp32) or "bf16".
    grad_compression: str = "none"


class Normalizer:
    """uint8 NHWC batch on the device -> normalised float NCHW.

    Lighting (PCA noise, in 0-255 pixel units) is added before the mean is
    subtracted; `mean`/`std` are per-channel RGB in 0-255 units.
    """

    def __init__(self, mean, std, device: torch.device, channels_last: bool):
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.channels_last = channels_last

    def __call__(self, image: torch.Tensor, lighting: Optional[torch.Tensor] = None) -> torch.Tensor:
        # permute is a view: NHWC memory read as NCHW is exactly channels_last.
        x = image.permute(0, 3, 1, 2).float()
        if lighting is not None:
            x = x + lighting.view(-1, 3, 1, 1)
        x = (x - self.mean) / self.std
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op context otherwise."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TowerStep:
    """Forward, loss, backward, gradient sync and SGD update for one tower.

    `model` is the plain tower (its state dict is the checkpoint shard). The
    step trains through a wrapper: DDP on the tower's data-parallel group
    when there are several replicas (its all-reduce overlaps backward), and
    torch.compile on top when `options.compile` is set.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        spec: AlexNetSpec,
        groups: RankGroups,
        options: StepOptions = StepOptions(),
    ):
        self.model = model
        self.optimizer = optimizer
        self.spec = spec
        self.groups = groups
        self.options = options
        trained = wrap_data_parallel(model, groups, options.grad_compression)
        self.data_parallel = trained is not model
        self.trained = torch.compile(trained) if options.compile else trained

    def zero_grad(self) -> None:
        """Clear the gradients for the next step.

        Under DDP each `.grad` is a view into an all-reduce bucket
        (`gradient_as_bucket_view`); setting it to None would drop the view,
        and every backward would allocate a fresh gradient and copy it into
        the bucket. So there they are zeroed in place; without DDP they are
        dropped (no memset, and backward writes rather than accumulates).
        """
        self.optimizer.zero_grad(set_to_none=not self.data_parallel)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits (device tensors); leaves global gradients in `.grad`."""
        self.model.train()
        with autocast(images.device, self.options.bf16):
            logits = self.trained(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.options.label_smoothing)
        # Every tower computes this same loss; the exchanges' backward sums over
        # towers, so scale by 1/towers to get the true gradient (see exchange.py).
        (loss / self.spec.towers).backward()
        sum_replicated_over_towers(self.model, self.spec, self.groups)
        return loss.detach(), logits.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.zero_grad()
        loss, logits = self.forward_backward(images, labels)
        self.optimizer.step()
        return loss, logits


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """How many labels are in the top-k predictions, for each k (a device tensor)."""
    k_max = min(max(ks), logits.shape[1])
    hits = logits.topk(k_max, dim=1).indices.eq(labels.view(-1, 1))
    return torch.stack([hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    normalizer: Normalizer,
    groups: RankGroups,
    bf16: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 error and loss over this replica's batches, summed over
    all replicas (exact: counts are all-reduced, not averaged). One host read,
    at the end.

    A batch image of shape [N, crops, H, W, C] is evaluated crop by crop and
    the softmax averaged over crops (the paper's 10-crop testing).
    """
    model.eval()
    device = normalizer.mean.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # count, top1, top5, loss_sum
    for batch in batches:
        image, labels = batch["image"], batch["label"]
        crops = image.shape[1] if image.dim() == 5 else 1
        flat = image.reshape(-1, *image.shape[-3:])
        with autocast(device, bf16):
            logits = model(normalizer(flat)).float()
        probs = logits.softmax(dim=1).view(len(labels), crops, -1).mean(dim=1)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        totals[0] += len(labels)
        totals[1:3] += topk_hits(probs, labels)
        totals[3] += loss
    if groups.data_parallel_group is not None:
        dist.all_reduce(totals, group=groups.data_parallel_group)
    count, top1, top5, loss_sum = totals.tolist()
    if count == 0:
        raise RuntimeError("evaluation saw no images: is the validation split empty?")
    return {
        "val_top1_error": 1.0 - top1 / count,
        "val_top5_error": 1.0 - top5 / count,
        "val_loss": loss_sum / count,
        "val_images": count,
    }
