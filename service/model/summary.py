"""Per-layer table of an AlexNet spec: tower slices, shapes, parameters, MACs.

Shapes are traced through the reference model with a meta-device forward
pass, so the table describes the code that actually runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from service.model.reference import CONV_NAMES, FC_NAMES, ReferenceAlexNet
from service.model.spec import AlexNetSpec


@dataclass
class LayerRow:
    layer: str
    tower_slice: str
    output_shape: tuple[int, ...]
    parameters: int
    macs: int


@dataclass
class Totals:
    parameters: int
    macs: int


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kernel_ops = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return output.numel() // output.shape[0] * kernel_ops
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def _slice(total: int, towers: int, replicated: bool = False) -> str:
    if towers == 1:
        return f"{total}"
    if replicated:
        return f"{total} (replicated x{towers})"
    return f"{total // towers} x {towers}"


def layer_table(spec: AlexNetSpec) -> tuple[list[LayerRow], Totals]:
    """Rows for every conv/pool/fc layer of one image's forward pass."""
    with torch.device("meta"):
        model = ReferenceAlexNet(spec).eval()
    rows: list[LayerRow] = []
    x = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta")
    for index, (name, conv) in enumerate(zip(CONV_NAMES, spec.convs), start=1):
        layer = getattr(model, name)
        x = torch.relu(layer(x))
        params = sum(p.numel() for p in layer.parameters())
        rows.append(LayerRow(name, _slice(conv.out_channels, spec.towers), tuple(x.shape[1:]), params, _macs(layer, x)))
        if conv.pool:
            x = nn.functional.max_pool2d(x, 3, 2)
            rows.append(LayerRow(f"pool{index}", "own maps", tuple(x.shape[1:]), 0, 0))
    x = torch.flatten(x, 1)
    for name in (*FC_NAMES, "fc8"):
        layer = getattr(model, name)
        x = layer(x)
        params = sum(p.numel() for p in layer.parameters())
        replicated = name == "fc8" and not spec.fc8_sliced
        rows.append(LayerRow(name, _slice(layer.out_features, spec.towers, replicated), tuple(x.shape[1:]), params, _macs(layer, x)))
    # A replicated fc8 is stored once per tower; count what the towers hold.
    extra = 0 if spec.fc8_sliced or spec.towers == 1 else (spec.towers - 1) * rows[-1].parameters
    return rows, Totals(sum(r.parameters for r in rows) + extra, sum(r.macs for r in rows))


def forward_macs(model: nn.Module, image_size: int) -> int:
    """MACs of one image's forward pass through `model` (a meta-device module),
    summed over the conv and linear layers it actually runs."""
    macs = 0

    def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal macs
        macs += _macs(module, output)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return macs


def format_table(spec: AlexNetSpec) -> str:
    rows, totals = layer_table(spec)
    header = f"{'layer':<6} {'tower slice':<24} {'output (C,H,W)':<18} {'parameters':>12} {'MACs':>14}"
    lines = [
        f"{spec.name}: {spec.towers} tower(s), {spec.num_classes} classes, {spec.image_size}x{spec.image_size} input",
        header,
        "-" * len(header),
    ]
    for row in rows:
        shape = "x".join(str(d) for d in row.output_shape)
        lines.append(f"{row.layer:<6} {row.tower_slice:<24} {shape:<18} {row.parameters:>12,} {row.macs:>14,}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<6} {'':<24} {'':<18} {totals.parameters:>12,} {totals.macs:>14,}")
    lines.append(f"forward: {totals.macs / 1e9:.3f} GMAC per image ({2 * totals.macs / 1e9:.2f} GFLOP)")
    return "\n".join(lines)
