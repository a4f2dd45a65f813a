"""One AlexNet tower: the slice of every layer that one worker (GPU) holds.

Tower `t` of `T` holds output channels/neurons [t*C/T, (t+1)*C/T) of every
layer (fc8 too when classes divide by T; otherwise a full replica). Where the
paper's GPUs talked (before conv3, fc6, fc7, fc8) the tower calls
`exchange(x, replicated_after)`, which must return the concatenation of all
towers' `x` along dim 1 in tower order. `replicated_after` tells it that
everything downstream is computed identically on every tower (so the
gradients coming back are identical too, and need no communication). The exchange is passed in, so this module knows nothing
of how towers communicate: identity for one tower, an all-gather over a
process group for several (see `service.parallel.exchange`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from service.model.layers import GroupedLRN, max_pool
from service.model.reference import CONV_NAMES, FC_NAMES
from service.model.spec import AlexNetSpec, tower_divisibility_problems

Exchange = Callable[..., torch.Tensor]


def identity_exchange(x: torch.Tensor, replicated_after: bool = False) -> torch.Tensor:
    """The exchange of a single tower: it already holds everything."""
    return x


class AlexNetTower(nn.Module):
    """Tower `tower_index` of `spec.towers`.

    Parameter names equal the reference model's, and each tensor is the
    tower's chunk along dim 0, so sharding is a plain `chunk` (see
    `service.parallel.sharding`). Weights are not initialised here: they come
    from a reference model's state dict so every layout starts identical.
    """

    def __init__(self, spec: AlexNetSpec, tower_index: int, exchange: Exchange = identity_exchange):
        super().__init__()
        problems = tower_divisibility_problems(spec)
        if problems:
            raise ValueError("cannot split this AlexNet into towers: " + "; ".join(problems))
        if not 0 <= tower_index < spec.towers:
            raise ValueError(f"tower_index={tower_index} outside 0..{spec.towers - 1}")
        self.spec = spec
        self.tower_index = tower_index
        self.exchange = exchange
        towers = spec.towers
        own_in = 3
        full_in = 3
        self.lrns = nn.ModuleDict()
        for name, conv in zip(CONV_NAMES, spec.convs):
            # "own" convs read this tower's maps only; others read every tower's.
            in_channels = own_in if conv.reads == "own" else full_in
            out = conv.out_channels // towers
            self.add_module(name, nn.Conv2d(in_channels, out, conv.kernel, conv.stride, conv.padding))
            if conv.lrn:
                self.lrns[name] = GroupedLRN(spec, groups=1)
            own_in, full_in = out, conv.out_channels
        in_features = spec.fc_in_features
        for name, width in zip(FC_NAMES, spec.fc_widths):
            self.add_module(name, nn.Linear(in_features, width // towers))
            in_features = width
        classes = spec.num_classes // towers if spec.fc8_sliced else spec.num_classes
        self.fc8 = nn.Linear(in_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch in, full logits [N, classes] out (identical on every tower)."""
        for name, conv in zip(CONV_NAMES, self.spec.convs):
            if conv.reads == "all" and name != "conv1":
                x = self.exchange(x)  # exchange 1: conv3 reads every tower's conv2 maps
            x = F.relu(getattr(self, name)(x))
            if name in self.lrns:
                x = self.lrns[name](x)
            if conv.pool:
                x = max_pool(x)
        # exchange 2: fc6 reads all of pool5. Gather before flattening so the
        # feature order (channel-major) matches the reference's flatten.
        x = torch.flatten(self.exchange(x), 1)
        for name in FC_NAMES:
            # Dropout on this tower's own neurons before the exchange, so every
            # tower sees the same (already dropped) activations afterwards.
            x = F.dropout(F.relu(getattr(self, name)(x)), self.spec.dropout, self.training)
            # exchanges 3 and 4: fc7 and fc8 read all of fc6 / fc7. A replicated
            # fc8 makes everything after the fc7 exchange identical per tower.
            x = self.exchange(x, replicated_after=name == FC_NAMES[-1] and not self.spec.fc8_sliced)
        logits = self.fc8(x)
        return self.exchange(logits, replicated_after=True) if self.spec.fc8_sliced else logits
