"""The checkpoint folder format (torch only; Ray Train just uploads folders).

    tower_<t>.pt     tower t's shard: model, optimizer and schedule state
    progress.json    epoch, step, layout, spec, config hash, MLflow run id, metrics

Replica 0's towers each write their own shard (replicas hold identical
weights after every step); rank 0 writes progress.json. `load_reference_state`
reassembles the single-process model from any such folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from service.model.spec import AlexNetSpec, ConvSpec
from service.parallel.sharding import towers_to_reference

PROGRESS_FILE = "progress.json"


def shard_file(tower: int) -> str:
    return f"tower_{tower}.pt"


def config_hash(config: dict) -> str:
    """Stable short hash of a config dict (recorded, and checked on resume)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_to_dict(spec: AlexNetSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(data: dict) -> AlexNetSpec:
    fields = dict(data)
    fields["convs"] = tuple(ConvSpec(**conv) for conv in fields["convs"])
    fields["fc_widths"] = tuple(fields["fc_widths"])
    return AlexNetSpec(**fields)


def write_tower_shard(directory: Path, tower: int, state: dict) -> None:
    torch.save(state, Path(directory) / shard_file(tower))


def write_progress(directory: Path, progress: dict) -> None:
    (Path(directory) / PROGRESS_FILE).write_text(json.dumps(progress, indent=2, sort_keys=True))


def read_progress(directory: Path) -> dict:
    path = Path(directory) / PROGRESS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a checkpoint written by this service")
    return json.loads(path.read_text())


def read_tower_shard(directory: Path, tower: int, map_location="cpu") -> dict:
    path = Path(directory) / shard_file(tower)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_reference_state(directory: Path) -> tuple[AlexNetSpec, dict[str, torch.Tensor]]:
    """The consolidated (single-process reference layout) weights of a checkpoint."""
    progress = read_progress(directory)
    spec = spec_from_dict(progress["spec"])
    shards = [read_tower_shard(directory, t)["model"] for t in range(spec.towers)]
    return spec, towers_to_reference(shards, spec)
