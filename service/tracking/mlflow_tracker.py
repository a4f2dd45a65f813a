"""The MLflow adapter, driver side: the run a job logs to.

`check_tracking_reachable` fails fast, naming the URI, before anything starts.
`open_run` creates (or, for a known run name, reopens) the run: redacted
config as params and artifact, the dataset as a run input, source version and
command as tags, the experiment tagged as model training. Workers log through
`service.tracking.worker_tracker`; the model is logged and registered by
`service.tracking.registry`. Nothing else in the service imports MLflow.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from service.config import TrackingConfig
from service.tracking.redact import flatten, redact, strip_userinfo
from service.tracking.run_record import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    DatasetRecord,
    dataset_input,
    source_tags,
)

log = logging.getLogger(__name__)

RUN_NAME_TAG = "alexnet.run_name"
SWEEP_TAG = "alexnet.sweep"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking server does not answer; the message names the URI."""


def resolve_tracking_uri(uri: str) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else ./mlruns.db (absolute,
    so Ray workers with another cwd write to the same store)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path('mlruns.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


# MLflow 3's UI opens in its GenAI mode in a fresh browser (GenAI sidebar; an
# experiment's bare page is the traces overview), whatever the experiment's kind
# tag says. This query selects its "Model training" mode: the runs table, models
# and registry, as checked in headless Chromium against MLflow 3.17.2.
UI_MODEL_TRAINING = "?workflowType=machine_learning"


@dataclass(frozen=True)
class RunHandle:
    """Plain data that identifies the MLflow run (sent to workers)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool = False

    def ui_hint(self) -> str:
        """The command that opens the MLflow UI on this run."""
        url = f"#/experiments/{self.experiment_id}/runs/{self.run_id}{UI_MODEL_TRAINING}"
        if self.tracking_uri.startswith("sqlite:"):
            return (
                f"mlflow ui --backend-store-uri '{self.tracking_uri}' --host 127.0.0.1 --port 5000\n"
                f"  then open http://127.0.0.1:5000/{url}"
            )
        return f"open {strip_userinfo(self.tracking_uri).rstrip('/')}/{url}"


def client_for(tracking_uri: str):
    """An `MlflowClient` on `tracking_uri` (MLflow imported lazily: `import service` stays light)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


@contextmanager
def _quick_http(timeout_s: int):
    """MLflow HTTP calls inside fail after one attempt of at most `timeout_s` seconds."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_tracking_reachable(tracking_uri: str, timeout_s: int = 10) -> None:
    """Raise `TrackingUnreachable` (one line, naming the URI) unless the store answers.

    Call before any worker starts. http(s) servers get one quick request;
    sqlite and file stores need their folder to exist.
    """
    uri = resolve_tracking_uri(tracking_uri)
    shown = strip_userinfo(uri)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        folder = Path(uri.split(":///", 1)[-1] if "://" in uri else uri).parent
        if not folder.is_dir():
            raise TrackingUnreachable(
                f"MLflow store {shown}: folder {folder} does not exist; create it or fix tracking.uri"
            )
        return
    try:
        with _quick_http(timeout_s):
            client_for(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - requests/MLflow errors vary; the message says which
        reason = _reason(error)
        status = getattr(error, "get_http_status_code", lambda: None)()
        if status in (401, 403):
            raise TrackingUnreachable(
                f"MLflow at {shown} refused the credentials (HTTP {status}); set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            ) from None
        raise TrackingUnreachable(
            f"MLflow at {shown} is unreachable ({reason}); start the server, or set "
            "tracking.uri / MLFLOW_TRACKING_URI to one that answers, or tracking.enabled=false"
        ) from None


def _reason(error: Exception) -> str:
    """A short cause for a failed request, with no credentials in it."""
    text = str(error)
    for needle, reason in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                           ("Name or service not known", "host not found"), ("Failed to resolve", "host not found"),
                           ("certificate verify failed", "TLS certificate rejected")):
        if needle in text:
            return reason
    first_line = re.sub(r"://[^/@\s]+@", "://***@", text.splitlines()[0] if text else "")
    return f"{type(error).__name__}: {first_line[:160]}" if first_line else type(error).__name__


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):
        # Beside the database, not relative to whichever cwd a worker has.
        db_path = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (db_path.parent / "mlartifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    except MlflowException as error:
        # Several jobs starting at once race to create it; the loser uses the winner's.
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiment_id_for(tracking: TrackingConfig) -> tuple[str, str]:
    """(tracking URI, experiment id) of `tracking.experiment`, created if needed."""
    uri = resolve_tracking_uri(tracking.uri)
    return uri, _experiment_id(client_for(uri), tracking.experiment, uri)


def _find_run(client, experiment_id: str, tag: str, value: str):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def open_parent_run(tracking: TrackingConfig, sweep_key: str) -> RunHandle:
    """The parent run of a Hydra multirun sweep (found by its sweep folder)."""
    uri, experiment_id = experiment_id_for(tracking)
    client = client_for(uri)
    existing = _find_run(client, experiment_id, SWEEP_TAG, sweep_key)
    if existing is not None:
        return RunHandle(uri, experiment_id, existing.info.run_id, resumed=True)
    tags = {SWEEP_TAG: sweep_key, **source_tags()}
    run = client.create_run(experiment_id, run_name=f"sweep {Path(sweep_key).name}", tags=tags)
    return RunHandle(uri, experiment_id, run.info.run_id)


def open_run(
    tracking: TrackingConfig,
    run_name: str,
    config: dict,
    parent: Optional[RunHandle] = None,
    dataset: Optional[DatasetRecord] = None,
    dataset_context: str = "training",
) -> RunHandle:
    """Create the run for `run_name`, or reopen it when a run of that name
    exists (resume). A new run gets the redacted config (params and
    config.yaml), the dataset as an input, and source/command tags."""
    uri, experiment_id = experiment_id_for(tracking)
    client = client_for(uri)
    existing = _find_run(client, experiment_id, RUN_NAME_TAG, run_name)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        return RunHandle(uri, experiment_id, existing.info.run_id, resumed=True)
    tags = {RUN_NAME_TAG: run_name, **source_tags()}
    if parent is not None:
        tags[PARENT_TAG] = parent.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_config(client, run.info.run_id, config)
    if dataset is not None:
        client.log_inputs(run.info.run_id, datasets=[dataset_input(dataset, dataset_context)])
    return RunHandle(uri, experiment_id, run.info.run_id)


def log_config(client, run_id: str, config: dict) -> None:
    """The config, secrets redacted, as params and as the artifact config.yaml."""
    import mlflow

    safe = redact(config)
    params = [mlflow.entities.Param(key, value[:MAX_PARAM_LENGTH]) for key, value in sorted(flatten(safe).items())]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(safe, sort_keys=False))
        client.log_artifact(run_id, str(path))


def finish_run(handle: RunHandle, failed: bool = False) -> None:
    """Mark the run FINISHED (or FAILED)."""
    client_for(handle.tracking_uri).set_terminated(handle.run_id, status="FAILED" if failed else "FINISHED")


def metric_history(handle: RunHandle, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} sorted by step, for learning-curve figures."""
    client = client_for(handle.tracking_uri)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(handle.run_id, key)) for key in keys
    }


def log_png(handle: RunHandle, png: bytes, artifact_file: str) -> None:
    """Log PNG bytes as the artifact `artifact_file` (e.g. figures/x.png)."""
    log_bytes(handle, png, artifact_file)


def log_bytes(handle: RunHandle, data: bytes, artifact_file: str) -> None:
    """Log `data` as the run artifact `artifact_file` (folders allowed)."""
    upload_bytes(client_for(handle.tracking_uri), handle.run_id, data, artifact_file)


def upload_bytes(client, run_id: str, data: bytes, artifact_file: str) -> None:
    """`data` as the artifact `artifact_file` of run `run_id`, through `client`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        path.write_bytes(data)
        parent = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), None if parent == "." else parent)
