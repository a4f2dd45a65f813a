"""The model in MLflow: log the servable pyfunc, register it, keep the alias on the best.

`log_trained_model` turns a checkpoint folder (the run's best, by validation
error) into the pyfunc of `service.tracking.pyfunc`, logs it as the run's
LoggedModel "model" at its checkpoint's step (MLflow then shows that step's
metrics, the epoch's validation figures, on the model), registers a version
and moves the alias (default "best") to the version with the lowest
`val_top1_error`. `fetch_model_files` does the reverse for evaluation: any
`runs:/`, `models:/` URI -> the card, the weights and the LoggedModel id.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from service.config import TrackingConfig
from service.tracking.mlflow_tracker import RunHandle, client_for
from service.verbosity import verbose

VAL_ERROR_TAG = "val_top1_error"
MODEL_NAME = "model"  # the LoggedModel's name in its run: runs:/<run id>/model
MODEL_METRICS = ("val_top1_error", "val_top5_error", "val_loss")


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not load the model in a subprocess to infer
    # them. The `service` package itself must be importable where the model
    # is served (`--env-manager local` in the project's venv).
    import mlflow
    import numpy
    import pandas
    import PIL
    import torch

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pandas.__version__}",
        f"pillow=={PIL.__version__}",
    ]


def log_trained_model(
    handle: RunHandle,
    checkpoint_folder: str,
    meta,
    tracking: TrackingConfig,
    metrics: Optional[dict] = None,
    *,
    resize_size: int,
    crops: int = 1,
) -> Optional[str]:
    """Log the checkpoint as the run's servable model; register it and move the alias.

    `meta`: the dataset's `DatasetMeta` (class list, mean/std). `metrics`:
    the checkpoint's validation metrics (default: those in its
    progress.json). `resize_size`/`crops`: the evaluation geometry
    (data.resize_size, data.eval_crops). Returns the registered version, or
    None when `tracking.registered_model` is empty.
    """
    import mlflow

    from service.serving.classifier import ModelCard, save_model_files
    from service.tracking import pyfunc
    from service.train.checkpoint import load_reference_state, read_progress

    spec, state = load_reference_state(checkpoint_folder)
    progress = read_progress(checkpoint_folder)
    metrics = dict(progress.get("metrics", {}) if metrics is None else metrics)
    provenance = {"run_id": handle.run_id, "epoch": progress.get("epoch"), "step": progress.get("step"),
                  "metrics": {k: v for k, v in metrics.items() if k in MODEL_METRICS}}
    card = ModelCard(spec, list(meta.wnids), list(meta.names), list(meta.mean), list(meta.std),
                     resize_size, crops, provenance)
    mlflow.set_tracking_uri(handle.tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        files = save_model_files(Path(folder) / pyfunc.MODEL_FILES, card, state)
        # Fluent API: pyfunc.log_model logs into the active run. Leaving the
        # block ends the run (FINISHED); the caller's finish_run agrees.
        with mlflow.start_run(run_id=handle.run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                # A path: a model from code, nothing pickled (see pyfunc_model.py).
                python_model=pyfunc.MODEL_CODE,
                artifacts={pyfunc.MODEL_FILES: str(files)},
                signature=pyfunc.signature(),
                input_example=pyfunc.input_example(),
                pip_requirements=_pip_requirements(),
                params={"architecture": spec.name, "towers": str(spec.towers), "num_classes": str(spec.num_classes),
                        "image_size": str(spec.image_size), "resize_size": str(resize_size), "crops": str(crops)},
                # MLflow attaches the run's metrics at this step (the epoch's
                # validation figures) to the LoggedModel.
                step=int(progress.get("step") or 0),
            )
    if not tracking.registered_model:
        return None
    with _registration_quiet():
        version = str(mlflow.register_model(info.model_uri, tracking.registered_model).version)
    client = client_for(handle.tracking_uri)
    error = metrics.get("val_top1_error")
    if error is not None:
        client.set_model_version_tag(tracking.registered_model, version, VAL_ERROR_TAG, f"{error:.6f}")
    if _is_best(client, tracking, error):
        client.set_registered_model_alias(tracking.registered_model, tracking.best_alias, version)
    return version


@contextmanager
def _registration_quiet():
    """MLflow prints "Successfully registered model ..." / "Created version ..." straight to
    its event stream (not through a logger a level could quiet); the run summary says
    "registered <name> v<k>" instead. ALEXNET_RAY_VERBOSE=1 shows them. Only the
    registration call is wrapped, so MLflow's warnings about the logged model still show."""
    from mlflow.utils.logging_utils import disable_logging, enable_logging

    if verbose():
        yield
        return
    disable_logging()
    try:
        yield
    finally:
        enable_logging()


def _is_best(client, tracking: TrackingConfig, error: Optional[float]) -> bool:
    try:
        current = client.get_model_version_by_alias(tracking.registered_model, tracking.best_alias)
    except Exception:  # noqa: BLE001 - no version holds the alias yet
        return True
    if error is None:
        return False
    best = current.tags.get(VAL_ERROR_TAG)
    return best is None or error <= float(best)


def resolve_model_id(model_uri: str, tracking_uri: str) -> Optional[str]:
    """The LoggedModel id behind `models:/name@alias`, `models:/name/version`,
    `models:/m-...` or `runs:/<run id>/model` (None when there is none)."""
    client = client_for(tracking_uri)
    if model_uri.startswith("models:/"):
        target = model_uri[len("models:/"):].strip("/")
        if "@" in target:
            name, alias = target.split("@", 1)
            return _version_model_id(client.get_model_version_by_alias(name, alias))
        if "/" in target:
            name, version = target.split("/", 1)
            return _version_model_id(client.get_model_version(name, version))
        return target  # models:/<model id>
    if model_uri.startswith("runs:/"):
        run_id, _, name = model_uri[len("runs:/"):].partition("/")
        run = client.get_run(run_id)
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name or MODEL_NAME}'",
            max_results=1,
        )
        return models[0].model_id if models else None
    return None


def _version_model_id(version) -> Optional[str]:
    # A version registered from a LoggedModel has source "models:/<model id>";
    # the server does not always fill in `model_id` itself.
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def fetch_model_files(model_uri: str, tracking_uri: str, destination: str):
    """(card, state dict, LoggedModel id) of a model logged by `log_trained_model`."""
    import mlflow

    from service.serving.classifier import load_model_files
    from service.tracking.pyfunc import MODEL_FILES

    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=destination)
        model_id = resolve_model_id(model_uri, tracking_uri)
    except MlflowException as error:
        raise FileNotFoundError(f"model_uri={model_uri}: {error.message.splitlines()[0]}") from None
    folder = Path(local) / "artifacts" / MODEL_FILES
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{model_uri} has no {MODEL_FILES} artifact: it was not logged by this service's log_trained_model "
            "(older runs logged a bare PyTorch model); evaluate its checkpoint folder instead"
        )
    card, state = load_model_files(folder)
    return card, state, model_id
