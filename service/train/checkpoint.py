"""The checkpoint folder format (torch only; Ray Train just uploads folders).

    tower_<t>.pt     tower t's shard: model, optimizer and schedule state
    progress.json    epoch, step, layout, spec, the run's redacted config,
                     MLflow run id, metrics, the size and SHA-256 of every
                     shard, and (service runs) the metric points MLflow had
                     not confirmed when it was written

Replica 0's towers each write their own shard (replicas hold identical
weights after every step); rank 0 writes progress.json. A checkpoint is
*complete* once progress.json and every shard it lists are present with the
recorded size: an upload cut short (a killed worker, a lost node) leaves an
incomplete folder that resume skips. Shards load with `weights_only=True`.
`load_reference_state` reassembles the single-process model from any layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Mapping

import torch

from service.model.spec import AlexNetSpec, ConvSpec
from service.parallel.sharding import towers_to_reference

PROGRESS_FILE = "progress.json"


class IncompleteCheckpoint(FileNotFoundError):
    """A checkpoint folder lacks progress.json or a shard, or a shard is cut short."""


def shard_file(tower: int) -> str:
    return f"tower_{tower}.pt"


def spec_to_dict(spec: AlexNetSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(data: dict) -> AlexNetSpec:
    fields = dict(data)
    fields["convs"] = tuple(ConvSpec(**conv) for conv in fields["convs"])
    fields["fc_widths"] = tuple(fields["fc_widths"])
    return AlexNetSpec(**fields)


def write_tower_shard(directory: Path, tower: int, state: dict) -> dict:
    """Save tower `tower`'s state; returns {"file", "bytes", "sha256"} for progress.json."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    (Path(directory) / shard_file(tower)).write_bytes(data)
    return {"file": shard_file(tower), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_progress(directory: Path, progress: dict) -> None:
    (Path(directory) / PROGRESS_FILE).write_text(json.dumps(progress, indent=2, sort_keys=True))


def parse_progress(text: str, where: str) -> dict:
    """progress.json's content; IncompleteCheckpoint when it was cut short."""
    try:
        progress = json.loads(text)
    except json.JSONDecodeError as error:
        raise IncompleteCheckpoint(f"{where}/{PROGRESS_FILE} is truncated or corrupt ({error})") from None
    if not isinstance(progress, dict) or "step" not in progress:
        raise IncompleteCheckpoint(f"{where}/{PROGRESS_FILE} is not a progress record of this service")
    return progress


def read_progress(directory: Path) -> dict:
    path = Path(directory) / PROGRESS_FILE
    if not path.is_file():
        raise IncompleteCheckpoint(f"{path} is missing: not a complete checkpoint of this service")
    return parse_progress(path.read_text(), str(directory))


def missing_parts(progress: dict, sizes: Mapping[str, int]) -> list[str]:
    """What a folder with files `sizes` (name -> bytes) lacks to be the complete
    checkpoint `progress` describes (empty when complete)."""
    problems = []
    for shard in progress.get("shards", []):
        size = sizes.get(shard["file"])
        if size is None:
            problems.append(f"{shard['file']} is missing")
        elif size != shard["bytes"]:
            problems.append(f"{shard['file']} has {size} bytes, expected {shard['bytes']}")
    if not progress.get("shards"):
        problems.append("progress.json lists no shards")
    return problems


def load_shard(data: bytes, tower: int, progress: dict, where: str, map_location="cpu") -> dict:
    """Tower `tower`'s state from the shard's bytes, verified against the
    digest progress.json recorded; tensors and plain values only."""
    expected = next((s for s in progress.get("shards", []) if s["file"] == shard_file(tower)), None)
    if expected is None or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise IncompleteCheckpoint(f"{where}/{shard_file(tower)} does not match the digest recorded in {PROGRESS_FILE}")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def read_tower_shard(directory: Path, tower: int, progress: dict, map_location="cpu") -> dict:
    """Tower `tower`'s state from a local checkpoint folder."""
    path = Path(directory) / shard_file(tower)
    if not path.is_file():
        raise IncompleteCheckpoint(f"{path} is missing: the checkpoint is incomplete")
    return load_shard(path.read_bytes(), tower, progress, str(directory), map_location)


def load_reference_state(directory: Path) -> tuple[AlexNetSpec, dict[str, torch.Tensor]]:
    """The consolidated (single-process reference layout) weights of a checkpoint."""
    progress = read_progress(directory)
    spec = spec_from_dict(progress["spec"])
    shards = [read_tower_shard(directory, t, progress=progress)["model"] for t in range(spec.towers)]
    return spec, towers_to_reference(shards, spec)
