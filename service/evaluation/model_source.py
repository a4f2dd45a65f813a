"""Which weights to evaluate, from wherever they are.

- a checkpoint folder (local, file:// or s3://): consolidated to the
  single-process reference layout by `service.train.checkpoint`;
- `runs:/<id>/model`, `models:/<name>@<alias>`, `models:/<name>/<version>`:
  the model files `log_trained_model` logged (weights, class list,
  normalisation, resize side), and the LoggedModel id to attach results to;
- `weights=<torchvision .pth>`: torchvision's AlexNet as `alexnet_owt`,
  normalised with torchvision's ImageNet mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from service.data.meta import DatasetMeta
from service.evaluation.config import EvaluateConfig
from service.model import AlexNetSpec


@dataclass
class ModelToEvaluate:
    """The weights and what the model itself says about its inputs (None: take the dataset's)."""

    spec: AlexNetSpec
    state: dict[str, torch.Tensor]
    description: str
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    resize_size: Optional[int] = None
    wnids: Optional[list[str]] = None
    # -- The MLflow LoggedModel these weights are (results are attached to it).
    model_id: Optional[str] = None
    # -- The training run that produced them, when known.
    source_run_id: Optional[str] = None


def _download_folder(uri: str, destination: Path, data_cfg) -> Path:
    """An s3:// (or file://) checkpoint folder copied to local disk."""
    import pyarrow.fs as pafs

    from service.data import storage

    filesystem, base = storage.arrow_filesystem(uri, storage.S3Settings.from_fields(data_cfg))
    info = filesystem.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"model_uri={uri}: no such checkpoint folder")
    destination.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(base, str(destination), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    return destination


def _from_checkpoint(uri: str, workdir: Path, data_cfg) -> ModelToEvaluate:
    from service.train.checkpoint import load_reference_state, read_progress

    if uri.startswith("s3://"):
        folder = _download_folder(uri, workdir / "checkpoint", data_cfg)
    else:
        folder = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"model_uri={uri}: no such checkpoint folder; give a folder holding progress.json and "
                "tower_<t>.pt, runs:/<run id>/model or models:/<name>@<alias>"
            )
    progress = read_progress(folder)
    spec, state = load_reference_state(folder)
    return ModelToEvaluate(
        spec, state, f"checkpoint {uri} (epoch {progress.get('epoch')}, step {progress.get('step')})",
        resize_size=progress.get("resize_size"), source_run_id=progress.get("mlflow_run_id"),
    )


def load_model_to_evaluate(cfg: EvaluateConfig, tracking_uri: str, workdir: Path) -> ModelToEvaluate:
    """The weights `cfg.model_uri` or `cfg.weights` names, with what the model knows about its inputs."""
    if cfg.weights:
        from service.model.torchvision_weights import IMAGENET_MEAN_255, IMAGENET_STD_255, load_torchvision_file

        converted_spec, state = load_torchvision_file(cfg.weights, cfg.model.image_size)
        spec = _configured_spec(cfg, converted_spec.num_classes)
        _check_shapes(spec, state, cfg.weights)
        return ModelToEvaluate(spec, state, f"torchvision AlexNet weights {cfg.weights} as {spec.name}",
                               mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255)
    uri = cfg.model_uri
    if uri.startswith(("runs:/", "models:/")):
        from service.tracking.registry import fetch_model_files

        card, state, model_id = fetch_model_files(uri, tracking_uri, str(workdir / "model"))
        return ModelToEvaluate(
            card.spec, state, f"{uri} ({card.spec.name}, {card.spec.towers} tower(s), epoch "
            f"{card.provenance.get('epoch')})", mean=card.mean, std=card.std, resize_size=card.resize_size,
            wnids=card.wnids, model_id=model_id, source_run_id=card.provenance.get("run_id"),
        )
    return _from_checkpoint(uri, workdir, cfg.data)


def _configured_spec(cfg: EvaluateConfig, num_classes: int) -> AlexNetSpec:
    """The spec `model=...` describes, one tower (torchvision's layout)."""
    from service.train.build import spec_for  # the one place that turns a ModelConfig into a spec

    return spec_for(cfg.model, 1, num_classes)


def _check_shapes(spec: AlexNetSpec, state: dict[str, torch.Tensor], source: str) -> None:
    from service.model import ReferenceAlexNet

    for key, tensor in ReferenceAlexNet(spec).state_dict().items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source}: {key} has shape {list(state[key].shape)} but model={spec.name} with these model.* "
                f"settings expects {list(tensor.shape)}; torchvision's weights fit model.width_mult=1.0"
            )


def check_fits_dataset(model: ModelToEvaluate, meta: DatasetMeta) -> None:
    """The model's classes must be the dataset's, in the same order."""
    if model.spec.num_classes != meta.num_classes:
        raise ValueError(
            f"the model has {model.spec.num_classes} classes but the dataset has {meta.num_classes}; "
            "evaluate it on the dataset it was trained for"
        )
    if model.wnids is not None and list(model.wnids) != list(meta.wnids):
        differ = next(i for i, (a, b) in enumerate(zip(model.wnids, meta.wnids)) if a != b)
        raise ValueError(
            f"the model's class {differ} is {model.wnids[differ]} but the dataset's is {meta.wnids[differ]}: "
            "not the class list it was trained on"
        )
