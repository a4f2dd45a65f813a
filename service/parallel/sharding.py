"""Conversion between the reference state dict and per-tower shards.

Every tower parameter is the tower's chunk, along dim 0, of the reference
parameter with the same name (grouped convs store [out, in/groups, k, k], so
the chunk of the output channels carries the right input slice with it).
The one exception is fc8 when the classes do not divide by the towers: then
every tower holds a full replica. The same rule shards optimizer buffers.
"""

from __future__ import annotations

from typing import Mapping

import torch

from service.model.spec import AlexNetSpec

REPLICATED_WHEN_UNSLICED = ("fc8.weight", "fc8.bias")


def is_replicated(name: str, spec: AlexNetSpec) -> bool:
    """True for parameters every tower holds in full (fc8 when not sliced)."""
    return spec.towers > 1 and not spec.fc8_sliced and name in REPLICATED_WHEN_UNSLICED


def shard_tensor(name: str, tensor: torch.Tensor, spec: AlexNetSpec, tower: int) -> torch.Tensor:
    if spec.towers == 1 or is_replicated(name, spec):
        return tensor.clone()
    return tensor.chunk(spec.towers, dim=0)[tower].clone()


def reference_to_tower(
    reference_state: Mapping[str, torch.Tensor], spec: AlexNetSpec, tower: int
) -> dict[str, torch.Tensor]:
    """Tower `tower`'s shard of a reference state dict."""
    return {name: shard_tensor(name, t, spec, tower) for name, t in reference_state.items()}


def towers_to_reference(
    tower_states: list[Mapping[str, torch.Tensor]], spec: AlexNetSpec
) -> dict[str, torch.Tensor]:
    """Reassemble the reference state dict from all towers' shards (in order)."""
    if len(tower_states) != spec.towers:
        raise ValueError(f"expected {spec.towers} tower shards, got {len(tower_states)}")
    names = list(tower_states[0])
    for index, state in enumerate(tower_states[1:], start=1):
        if list(state) != names:
            raise ValueError(f"tower {index} shard has keys {sorted(state)}, tower 0 has {sorted(names)}")
    merged = {}
    for name in names:
        parts = [state[name] for state in tower_states]
        if spec.towers == 1 or is_replicated(name, spec):
            merged[name] = parts[0].clone()
        else:
            merged[name] = torch.cat(parts, dim=0)
    return merged
