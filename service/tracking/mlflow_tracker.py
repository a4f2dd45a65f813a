"""The MLflow adapter: the only module that talks to MLflow.

Driver side: open (or resume) the run, log the redacted config, log the
consolidated model and register it. Worker side (rank 0 only): metrics,
buffered until the next checkpoint is safely written, so a run that resumes
from that checkpoint never logs the same step twice; figures; system metrics.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from service.config import TrackingConfig
from service.tracking.redact import flatten, redact, strip_userinfo

log = logging.getLogger(__name__)

RUN_NAME_TAG = "alexnet.run_name"
SWEEP_TAG = "alexnet.sweep"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


def _mlflow():
    # Imported lazily: keeps `import service...` fast and MLflow-free where unused.
    import mlflow

    return mlflow


def resolve_tracking_uri(uri: str) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else ./mlruns.db (absolute,
    so Ray workers with another cwd write to the same store)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path('mlruns.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


@dataclass(frozen=True)
class RunHandle:
    """Plain data that identifies the MLflow run (sent to workers)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool = False

    def ui_hint(self) -> str:
        """The command that opens the MLflow UI on this run."""
        url = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.tracking_uri.startswith("sqlite:"):
            return (
                f"mlflow ui --backend-store-uri '{self.tracking_uri}' --host 127.0.0.1 --port 5000\n"
                f"  then open http://127.0.0.1:5000/{url}"
            )
        return f"open {strip_userinfo(self.tracking_uri).rstrip('/')}/{url}"


def _client(tracking_uri: str):
    return _mlflow().MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):
        # Beside the database, not relative to whichever cwd a worker has.
        db_path = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (db_path.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def _find_run(client, experiment_id: str, tag: str, value: str):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def open_parent_run(tracking: TrackingConfig, sweep_key: str) -> RunHandle:
    """The parent run of a Hydra multirun sweep (found by its sweep folder)."""
    uri = resolve_tracking_uri(tracking.uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, tracking.experiment, uri)
    existing = _find_run(client, experiment_id, SWEEP_TAG, sweep_key)
    if existing is not None:
        return RunHandle(uri, experiment_id, existing.info.run_id, resumed=True)
    run = client.create_run(experiment_id, run_name=f"sweep {Path(sweep_key).name}", tags={SWEEP_TAG: sweep_key})
    return RunHandle(uri, experiment_id, run.info.run_id)


def open_run(
    tracking: TrackingConfig, run_name: str, config: dict, parent: Optional[RunHandle] = None
) -> RunHandle:
    """Create the run for `run_name`, or reopen it when a run of that name
    exists (resume). Logs the redacted config as params and as an artifact."""
    uri = resolve_tracking_uri(tracking.uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, tracking.experiment, uri)
    existing = _find_run(client, experiment_id, RUN_NAME_TAG, run_name)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        return RunHandle(uri, experiment_id, existing.info.run_id, resumed=True)
    tags = {RUN_NAME_TAG: run_name}
    if parent is not None:
        tags[PARENT_TAG] = parent.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    safe = redact(config)
    params = [
        _mlflow().entities.Param(key, value[:MAX_PARAM_LENGTH])
        for key, value in sorted(flatten(safe).items())
    ]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(safe, sort_keys=False))
        client.log_artifact(run.info.run_id, str(path))
    return RunHandle(uri, experiment_id, run.info.run_id)


def finish_run(handle: RunHandle, failed: bool = False) -> None:
    _client(handle.tracking_uri).set_terminated(handle.run_id, status="FAILED" if failed else "FINISHED")


def logged_steps(handle: RunHandle, key: str = "loss") -> list[int]:
    """Steps already logged for `key` (tests and resume checks)."""
    return [m.step for m in _client(handle.tracking_uri).get_metric_history(handle.run_id, key)]


class WorkerTracker:
    """Rank 0's MLflow logger inside the training worker.

    Metrics are held until `flush()`, which the worker calls right after a
    checkpoint is persisted: if the run dies, what was not flushed belongs to
    steps that the resumed run will redo, so no step is logged twice.
    """

    def __init__(self, handle: RunHandle, system_metrics: bool):
        mlflow = _mlflow()
        # The system-metrics monitor logs through the fluent API: point it here.
        mlflow.set_tracking_uri(handle.tracking_uri)
        self.handle = handle
        self.client = _client(handle.tracking_uri)
        self.pending: list = []
        self._system = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._system = SystemMetricsMonitor(handle.run_id, sampling_interval=10)
                self._system.start()
            except Exception as error:  # psutil/GPU probes vary by machine
                log.warning("system metrics disabled: %s", error)
        self._metric = mlflow.entities.Metric

    def add(self, metrics: dict, step: int) -> None:
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self.pending.append(self._metric(key, float(value), timestamp, step))

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):
            self.client.log_batch(self.handle.run_id, metrics=self.pending[start : start + 1000])
        self.pending = []

    def log_png(self, png: bytes, artifact_file: str) -> None:
        log_png(self.handle, png, artifact_file)

    def close(self) -> None:
        self.flush()
        if self._system is not None:
            self._system.finish()


def metric_history(handle: RunHandle, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    client = _client(handle.tracking_uri)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(handle.run_id, key)) for key in keys
    }


def log_png(handle: RunHandle, png: bytes, artifact_file: str) -> None:
    """Log PNG bytes as the artifact `artifact_file` (e.g. figures/x.png)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        path.write_bytes(png)
        parent = str(Path(artifact_file).parent)
        _client(handle.tracking_uri).log_artifact(handle.run_id, str(path), None if parent == "." else parent)


def log_model(handle: RunHandle, model, input_example, tracking: TrackingConfig, metrics: dict) -> Optional[str]:
    """Log the consolidated reference model; register it and move the alias to
    the best version (lowest val_top1_error). Returns the registered version."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(handle.tracking_uri)
    with mlflow.start_run(run_id=handle.run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=input_example,
            registered_model_name=tracking.registered_model or None,
        )
    if not tracking.registered_model:
        return None
    version = str(info.registered_model_version)
    client = _client(handle.tracking_uri)
    error = metrics.get("val_top1_error")
    if error is not None:
        client.set_model_version_tag(tracking.registered_model, version, "val_top1_error", f"{error:.6f}")
    if _is_best(client, tracking, error):
        client.set_registered_model_alias(tracking.registered_model, tracking.best_alias, version)
    return version


def _is_best(client, tracking: TrackingConfig, error: Optional[float]) -> bool:
    try:
        current = client.get_model_version_by_alias(tracking.registered_model, tracking.best_alias)
    except Exception:
        return True  # no version holds the alias yet
    if error is None:
        return False
    best = current.tags.get("val_top1_error")
    return best is None or error <= float(best)
