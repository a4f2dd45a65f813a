"""Small building blocks shared by the reference model and the towers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from service.model.spec import AlexNetSpec


class GroupedLRN(nn.Module):
    """Local response normalisation inside each of `groups` channel groups.

    On the paper's two GPUs each tower normalised across its own maps only, so
    the single-process reference must not let the 5-map window straddle the
    boundary between towers. `alpha` is the paper's (1e-4); PyTorch's
    `LocalResponseNorm` divides its alpha by `size`, so we hand it
    `alpha * size` to compute exactly a / (k + alpha * sum(a^2))^beta.
    """

    def __init__(self, spec: AlexNetSpec, groups: int):
        super().__init__()
        self.groups = groups
        self.lrn = nn.LocalResponseNorm(
            spec.lrn_size, alpha=spec.lrn_alpha * spec.lrn_size, beta=spec.lrn_beta, k=spec.lrn_k
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast runs LRN's pow/div in fp32; casting back keeps bf16
        # activations bf16 downstream (pooling, and the exchange before conv3).
        if self.groups == 1:
            return self.lrn(x).to(x.dtype)
        batch, channels, height, width = x.shape
        grouped = x.reshape(batch * self.groups, channels // self.groups, height, width)
        return self.lrn(grouped).reshape(batch, channels, height, width).to(x.dtype)


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """Overlapping pooling: 3x3 windows, stride 2 (paper section 3.4)."""
    return F.max_pool2d(x, kernel_size=3, stride=2)


def init_weights(module: nn.Module, spec: AlexNetSpec, bias_value: float) -> None:
    """Initialise one conv/linear layer.

    "paper": weights N(0, 0.01), biases 0 or 1 as in section 5 (the ones keep
    early ReLUs active). "kaiming": He-normal weights and zero biases, which a
    narrow CPU-sized AlexNet needs to leave chance level in a few epochs.
    """
    if spec.init == "paper":
        nn.init.normal_(module.weight, mean=0.0, std=0.01)
        nn.init.constant_(module.bias, bias_value)
    elif spec.init == "kaiming":
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)
    else:
        raise ValueError(f"unknown init {spec.init!r}; expected 'paper' or 'kaiming'")
