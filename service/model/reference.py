"""The single-process reference AlexNet.

This is the whole network in one module, with the tower split expressed as
grouped convolutions (conv2, conv4, conv5 use groups=towers) and LRN applied
per group. The tower-parallel model must match it exactly; it is also the
layout of the consolidated model that is logged to MLflow, loadable with no
Ray and no towers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from service.model.layers import GroupedLRN, init_weights, max_pool
from service.model.spec import AlexNetSpec, tower_divisibility_problems

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_NAMES = ("fc6", "fc7")


class ReferenceAlexNet(nn.Module):
    """AlexNet in one process; input NCHW float, output logits [N, classes]."""

    def __init__(self, spec: AlexNetSpec):
        super().__init__()
        problems = tower_divisibility_problems(spec)
        if problems:
            raise ValueError("cannot build this AlexNet: " + "; ".join(problems))
        self.spec = spec
        in_channels = 3
        self.lrns = nn.ModuleDict()
        for name, conv in zip(CONV_NAMES, spec.convs):
            groups = spec.towers if conv.reads == "own" else 1
            layer = nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel, conv.stride, conv.padding, groups=groups
            )
            init_weights(layer, spec, conv.bias_init)
            self.add_module(name, layer)
            if conv.lrn:
                # Every conv's output is split across towers, so LRN is per tower.
                self.lrns[name] = GroupedLRN(spec, spec.towers)
            in_channels = conv.out_channels
        in_features = spec.fc_in_features
        for name, width in zip(FC_NAMES, spec.fc_widths):
            layer = nn.Linear(in_features, width)
            init_weights(layer, spec, spec.fc_bias_init)
            self.add_module(name, layer)
            in_features = width
        self.fc8 = nn.Linear(in_features, spec.num_classes)
        init_weights(self.fc8, spec, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, conv in zip(CONV_NAMES, self.spec.convs):
            x = F.relu(getattr(self, name)(x))
            if name in self.lrns:
                x = self.lrns[name](x)
            if conv.pool:
                x = max_pool(x)
        x = torch.flatten(x, 1)
        for name in FC_NAMES:
            # Dropout on each hidden layer's output (paper section 4.2).
            x = F.dropout(F.relu(getattr(self, name)(x)), self.spec.dropout, self.training)
        return self.fc8(x)
