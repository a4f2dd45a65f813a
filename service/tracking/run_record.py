"""What makes runs comparable in the MLflow UI.

- the dataset a run read, as an MLflow run input: name, source URI, a digest
  of `meta.json` and the ingest report's fingerprint (two runs on the same
  ingest show the same digest), and its counts as the dataset profile;
- the source version: the git commit (`mlflow.source.git.commit`, which the UI
  shows as the run's source version) and, in containers, the image tag from
  $ALEXNET_IMAGE; the exact command, secrets redacted;
- the experiment's kind tag (model training). MLflow 3's UI still opens in
  its GenAI mode in a fresh browser, so printed and documented links carry
  `?workflowType=machine_learning` (mlflow_tracker.UI_MODEL_TRAINING).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from service.tracking.redact import REDACTED, is_secret_key, strip_userinfo

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
SOURCE_NAME_TAG = "mlflow.source.name"
USER_TAG = "mlflow.user"
GIT_DIRTY_TAG = "alexnet.source.dirty"
IMAGE_TAG = "alexnet.image"
COMMAND_TAG = "alexnet.command"
# Set by the container image (docker/Dockerfile*) and, where .git is absent
# (a `ray job submit --working-dir` upload), optionally by the user.
IMAGE_ENV = "ALEXNET_IMAGE"
GIT_COMMIT_ENV = "ALEXNET_GIT_COMMIT"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input-tag key for "training", "evaluation", ...
REPO_ROOT = Path(__file__).resolve().parents[2]


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Command-line words with secret `key=value` overrides and URI credentials masked."""
    out = []
    for word in argv:
        key, sep, value = word.partition("=")
        if sep and is_secret_key(key.lstrip("+~")) and value:
            out.append(f"{key}={REDACTED}")
        elif "://" in word and "@" in word:
            out.append(f"{key}={strip_userinfo(value)}" if sep and "://" in value else strip_userinfo(word))
        else:
            out.append(word)
    return out


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as a user would retype it: `python -m service.train key=value ...`, redacted."""
    argv = list(sys.argv if argv is None else argv)
    program = argv[0] if argv else ""
    path = Path(program)
    if path.name == "__main__.py":
        try:
            module = ".".join(path.resolve().parent.relative_to(REPO_ROOT).parts)
            argv = ["python", "-m", module] + argv[1:]
        except ValueError:
            argv = ["python", program] + argv[1:]
    elif program.endswith(".py"):
        argv = ["python"] + argv
    return shlex.join(redact_argv(argv))


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_tags(argv: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Tags naming the code version, the container image and the exact command."""
    tags = {COMMAND_TAG: command_line(argv)[:5000]}
    program = command_line(argv).split(" ")
    tags[SOURCE_NAME_TAG] = " ".join(program[:3]) if program[:2] == ["python", "-m"] else program[0]
    commit = os.environ.get(GIT_COMMIT_ENV) or (_git("rev-parse", "HEAD") if (REPO_ROOT / ".git").exists() else None)
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        if not os.environ.get(GIT_COMMIT_ENV):
            tags[GIT_DIRTY_TAG] = "true" if _git("status", "--porcelain", "--untracked-files=no") else "false"
    if os.environ.get(IMAGE_ENV):
        tags[IMAGE_TAG] = os.environ[IMAGE_ENV]
    try:
        tags[USER_TAG] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        pass
    return tags


@dataclass(frozen=True)
class DatasetRecord:
    """An ingested dataset as MLflow shows it: name, where it lives, digest, counts."""

    name: str
    source_uri: str
    digest: str
    profile: dict = field(default_factory=dict)


def describe_dataset(root: str, meta_bytes: bytes, report_bytes: Optional[bytes] = None) -> DatasetRecord:
    """The record of the dataset at `root` from its `meta.json` (and ingest report) bytes."""
    meta = json.loads(meta_bytes)
    report = json.loads(report_bytes) if report_bytes else {}
    fingerprint = str(report.get("fingerprint") or "")
    digest = hashlib.sha256(meta_bytes + b"\0" + fingerprint.encode()).hexdigest()[:16]
    counts = report.get("counts", {})
    profile = {
        "num_train": meta.get("num_train"),
        "num_val": meta.get("num_val"),
        "num_classes": meta.get("num_classes"),
        "resize_size": meta.get("resize_size"),
        "layout": meta.get("layout") or report.get("layout"),
        "quarantined": counts.get("quarantined"),
        "converted": counts.get("converted"),
        "ingest_fingerprint": fingerprint or None,
    }
    uri = strip_userinfo(root if "://" in root else str(Path(root).resolve()))
    name = Path(uri.rstrip("/").split("://")[-1]).name or "dataset"
    return DatasetRecord(name, uri, digest, {k: v for k, v in profile.items() if v is not None})


def read_dataset_record(root: str, s3=None) -> DatasetRecord:
    """`describe_dataset` of the ingested dataset at `root` (local or s3://)."""
    from service.data import storage
    from service.data.meta import META_FILE, REPORT_FILE

    s3 = s3 or storage.DEFAULT_S3
    meta_bytes = storage.read_bytes(storage.join(root, META_FILE), s3)
    report_uri = storage.join(root, REPORT_FILE)
    report = storage.read_bytes(report_uri, s3) if storage.exists(report_uri, s3) else None
    return describe_dataset(root, meta_bytes, report)


def dataset_input(record: DatasetRecord, context: str):
    """The `mlflow.entities.DatasetInput` of a record (a metadata-only dataset)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import ColSpec, DataType, Schema

    class ProfiledDataset(MetaDataset):
        # MetaDataset carries no profile; the UI shows a dataset's profile (the counts) beside its digest.
        def to_dict(self) -> dict:
            return {**super().to_dict(), "profile": json.dumps(record.profile)}

    schema = Schema([ColSpec(DataType.binary, "jpeg"), ColSpec(DataType.long, "label")])
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice (schemes "" and "file") and
        # warns that a path "can be interpreted in multiple ways": both are the same class.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        source = resolve_dataset_source(record.source_uri)
    dataset = ProfiledDataset(source, record.name, record.digest, schema)
    return DatasetInput(Dataset(**dataset.to_dict()), tags=[InputTag(DATASET_CONTEXT_TAG, context)])
