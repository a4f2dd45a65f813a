"""Resuming a run by name, decided on the driver before any worker starts.

Checkpoints live in `<storage.path>/<run.name>/checkpoint_e<epoch>_s<step>/`
(the name the workers give Ray Train). The driver lists them itself and takes
the newest *complete* one (see `service.train.checkpoint.missing_parts`):
Ray Train's own record of the last checkpoint is written by its controller
after the workers' uploads, so a driver killed in between would resume from
an older checkpoint than the one the workers already finished, and the
metrics logged since would be logged twice. Workers (re)starting inside a
run look again the same way (`service.ray_train`).

Before resuming, the saved run's configuration is compared with this one:
a key that changes the training (model, layout, recipe, batch, data
classes and augmentation) stops the job naming the keys; run-management keys
(epochs, logging, tracking, storage, credentials, cluster sizing, a moved
data root) may change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.fs as pafs

from service.config import ConfigError
from service.tracking.redact import flatten
from service.train.checkpoint import PROGRESS_FILE, IncompleteCheckpoint, missing_parts, parse_progress

CHECKPOINT_DIR = re.compile(r"^checkpoint_e(\d+)_s(\d+)$")

# Keys that may differ between the saved run and the resumed one.
MAY_CHANGE = (
    "train.epochs", "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.max_steps", "train.eval_every_epochs", "train.compile",
    "data.root", "data.generated_dir", "data.s3_", "data.decode_concurrency", "data.skip_bad_shards",
    "data.eval_crops", "parallel.allow_cross_node_towers", "parallel.grad_compression",
    "tracking.", "cluster.", "run.", "storage.", "experiment",
)


def checkpoint_dir_name(epoch: int, step: int) -> str:
    """The folder a checkpoint after `epoch` completed epochs and `step` steps is written to."""
    return f"checkpoint_e{epoch:04d}_s{step:09d}"


@dataclass(frozen=True)
class ResumePoint:
    """The newest complete checkpoint of a run."""

    # -- Folder path inside `filesystem`.
    path: str
    filesystem: Any
    progress: dict

    @property
    def step(self) -> int:
        return int(self.progress["step"])


def find_resume_point(filesystem: pafs.FileSystem, run_dir: str, log=print) -> Optional[ResumePoint]:
    """The newest complete checkpoint under `run_dir`, or None. Incomplete
    ones (an upload cut short) are skipped with a line saying why."""
    try:
        folders = checkpoint_folders(filesystem, run_dir)
    except OSError as error:
        raise ConfigError(f"cannot list checkpoints under {run_dir}: {error}") from None
    for path in reversed(folders):
        files = filesystem.get_file_info(pafs.FileSelector(path))
        sizes = {info.base_name: info.size for info in files if info.type == pafs.FileType.File}
        try:
            if PROGRESS_FILE not in sizes:
                raise IncompleteCheckpoint(f"{PROGRESS_FILE} is missing")
            with filesystem.open_input_stream(f"{path}/{PROGRESS_FILE}") as stream:
                progress = parse_progress(stream.read().decode("utf-8"), path)
            problems = missing_parts(progress, sizes)
            if problems:
                raise IncompleteCheckpoint("; ".join(problems))
        except IncompleteCheckpoint as error:
            log(f"[resume] skipping incomplete checkpoint {path}: {error}")
            continue
        return ResumePoint(path, filesystem, progress)
    return None


def checkpoint_folders(filesystem: pafs.FileSystem, run_dir: str) -> list[str]:
    """Every checkpoint folder under `run_dir` (complete or not), oldest first."""
    entries = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    found = [(int(m.group(2)), int(m.group(1)), e.path) for e in entries
             if e.type == pafs.FileType.Directory and (m := CHECKPOINT_DIR.match(e.base_name))]
    return [path for _step, _epoch, path in sorted(found)]


def remove_untracked_checkpoints(filesystem: pafs.FileSystem, run_dir: str, tracked: list[str]) -> list[str]:
    """Delete the checkpoint folders of a finished run that Ray Train's checkpoint
    manager no longer tracks; returns their paths.

    Ray Train prunes to train.keep_checkpoints only what its manager knows. A
    driver killed mid-run leaves folders it never pruned (and its workers may
    finish one more after it died); the resumed job's manager, restored from
    its snapshot, does not know them. They were resume points; once the run
    has finished they are only storage."""
    keep = {path.rstrip("/").rsplit("/", 1)[-1] for path in tracked}  # folder names: all under run_dir
    if not keep:  # nothing tracked (no checkpoint reported): nothing to compare with, nothing removed
        return []
    removed = [path for path in checkpoint_folders(filesystem, run_dir) if path.rsplit("/", 1)[-1] not in keep]
    for path in removed:
        filesystem.delete_dir(path)
    return removed


def changed_training_keys(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key that differs and may not change."""
    old, new = flatten(saved), flatten(current)
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(MAY_CHANGE):
            changed.append(f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}")
    return changed


def check_resume(point: Optional[ResumePoint], mode: str, run_name: str, config: dict, facts: dict) -> None:
    """Raise ConfigError when resuming `point` (None: no checkpoint) would
    break `run.resume=mode` or change the training.

    `config` is this run's redacted config as plain dicts; `facts` holds what
    the data decides (num_classes, classes digest, steps_per_epoch), compared
    with what the checkpoint recorded.
    """
    if point is None:
        if mode == "require":
            raise ConfigError(
                f"run.resume=require but run.name={run_name} has no complete checkpoint under storage.path; "
                "check run.name and storage.path, or use run.resume=auto to start it"
            )
        return
    if mode == "never":
        raise ConfigError(
            f"run.name={run_name} already has a checkpoint at step {point.step} ({point.path}) and run.resume=never; "
            "choose a new run.name, or use run.resume=auto to continue it"
        )
    changed = changed_training_keys(point.progress.get("config", {}), config)
    for key, value in facts.items():
        saved = point.progress.get(key)
        if saved is not None and saved != value:
            changed.append(f"{key}: {saved} -> {value}")
    if changed:
        raise ConfigError(
            f"run.name={run_name} would resume from step {point.step} with a different training setup: "
            + "; ".join(changed)
            + ". Restore those values, or start a new run with another run.name"
        )
