"""Logging from inside the training workers, surviving an MLflow outage.

`WorkerTracker` (rank 0) holds metrics until `flush()`, which the worker
calls once a checkpoint is durable: a run that resumes from that checkpoint
redoes exactly the steps that were never flushed, so no step is logged twice.
Flushed points go to a background sender thread, so training never waits on
MLflow: while the server is unreachable the sender keeps them, in order, and
retries; when it answers again they are sent. A resend of a batch whose reply
was lost cannot duplicate points: the SQL stores skip a point identical in
(key, value, timestamp, step) to one they hold. If the server never comes
back, `close()` returns the unsent points' count and hands them, as JSON
lines, to a `spill` callable (`file_spill` writes them next to the
checkpoints); `resend_spilled` logs such a file later.

`start_node_system_metrics` samples CPU/GPU/memory/network on one node and
logs them under `system/<node id>/...` (MLflow's SystemMetricsMonitor).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from service.tracking.mlflow_tracker import RunHandle, client_for, upload_bytes
from service.tracking.redact import strip_userinfo

log = logging.getLogger(__name__)

BATCH_LIMIT = 1000  # MLflow's log_batch accepts at most 1000 metrics per call
# MLflow's client retries a failed request 7 times with exponential backoff
# (minutes) and waits 120 s per request by default. The sender retries on its
# own, so each attempt should fail fast.
WORKER_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def limit_http_retries() -> None:
    """Short MLflow HTTP retries for this process, unless the user set their own."""
    for key, value in WORKER_HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class CloseReport:
    """What `WorkerTracker.close` could and could not send."""

    sent_points: int
    unsent_points: int
    unsent_artifacts: int
    # -- Points added after the last flush: they belong to steps after the
    #    last checkpoint, which a resumed run redoes (and logs) again.
    discarded_points: int
    spilled: bool


class _Sender(threading.Thread):
    """Sends queued metric batches and figures in order; retries while MLflow is away."""

    def __init__(self, handle: RunHandle, retry_interval_s: float):
        super().__init__(name="mlflow-sender", daemon=True)
        self.handle = handle
        self.client = client_for(handle.tracking_uri)
        self.retry_interval_s = retry_interval_s
        self.queue: deque = deque()  # ("metrics", [Metric]) | ("artifact", bytes, path)
        self.condition = threading.Condition()
        self.closing = False
        self.deadline = math.inf
        self.sent_points = 0
        self.rejected: list = []  # items MLflow refused (4xx): spilled, never retried
        self.outage_since: Optional[float] = None

    def put(self, item: tuple) -> None:
        with self.condition:
            self.queue.append(item)
            self.condition.notify()

    def run(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.closing:
                    self.condition.wait()
                if not self.queue or time.monotonic() >= self.deadline:
                    return
                item = self.queue[0]
            try:
                self._send(item)
            except Exception as error:  # noqa: BLE001 - any failure: keep the item, retry
                if not _is_transient(error):
                    log.error("MLflow rejected %s; it will be spilled, not retried: %s", _describe(item), error)
                    with self.condition:
                        self.rejected.append(self.queue.popleft())
                    continue
                self._note_outage(error)
                with self.condition:
                    self.condition.wait(min(self.retry_interval_s, max(0.0, self.deadline - time.monotonic())))
                continue
            with self.condition:
                self.queue.popleft()
            if item[0] == "metrics":
                self.sent_points += len(item[1])
            if self.outage_since is not None:
                log.warning(
                    "MLflow at %s answers again after %.0f s; sending the held points",
                    strip_userinfo(self.handle.tracking_uri), time.monotonic() - self.outage_since,
                )
                self.outage_since = None

    def _send(self, item: tuple) -> None:
        if item[0] == "metrics":
            self.client.log_batch(self.handle.run_id, metrics=item[1])
            return
        _, data, artifact_file = item
        upload_bytes(self.client, self.handle.run_id, data, artifact_file)

    def _note_outage(self, error: Exception) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning(
                "MLflow at %s is unreachable (%s); training goes on, metrics are held and retried every %.0f s",
                strip_userinfo(self.handle.tracking_uri), type(error).__name__, self.retry_interval_s,
            )

    def close(self, timeout_s: float) -> list:
        """Stop after sending what it can within `timeout_s`; return the items left."""
        with self.condition:
            self.closing = True
            self.deadline = time.monotonic() + timeout_s
            self.condition.notify()
        self.join(timeout_s + 5)
        with self.condition:
            left = list(self.rejected) + list(self.queue)
            self.queue.clear()
        return left


def _is_transient(error: Exception) -> bool:
    """Connection failures, timeouts, 5xx, 408 and 429 are worth retrying; other 4xx are not."""
    status = getattr(error, "get_http_status_code", None)
    if status is None:
        return True
    code = status()
    return not (400 <= code < 500) or code in (408, 429)


def _describe(item: tuple) -> str:
    return f"{len(item[1])} metric points" if item[0] == "metrics" else f"artifact {item[2]}"


class WorkerTracker:
    """Rank 0's MLflow logger inside the training worker (see the module docstring)."""

    def __init__(
        self,
        handle: RunHandle,
        system_metrics: bool,
        node_id: Optional[str] = None,
        retry_interval_s: float = 5.0,
    ):
        limit_http_retries()
        from mlflow.entities import Metric

        self._metric = Metric
        self.handle = handle
        self.pending: list = []
        self._sender = _Sender(handle, retry_interval_s)
        self._sender.start()
        self._best_error = self._previous_best()
        self._stop_system = start_node_system_metrics(handle, node_id) if system_metrics else None

    def _previous_best(self) -> float:
        """The best validation error a resumed run already logged (inf for a new run)."""
        if not self.handle.resumed:
            return math.inf
        try:
            logged = client_for(self.handle.tracking_uri).get_run(self.handle.run_id).data.metrics
        except Exception as error:  # noqa: BLE001 - unreachable now: best restarts from this run's epochs
            log.warning("cannot read the run's best_val_top1_error (%s); tracking the best afresh", error)
            return math.inf
        return float(logged.get("best_val_top1_error", math.inf))

    def add(self, metrics: dict, step: int, epoch: Optional[int] = None) -> None:
        """Hold `metrics` at `step` until the next `flush()`.

        An epoch's `val_top1_error` below every earlier one also adds
        `best_val_top1_error`, `best_val_top5_error` and (given `epoch`) `best_epoch`.
        """
        timestamp = int(time.time() * 1000)
        values = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
        error = values.get("val_top1_error")
        if error is not None and error < self._best_error:
            self._best_error = error
            values["best_val_top1_error"] = error
            if "val_top5_error" in values:
                values["best_val_top5_error"] = values["val_top5_error"]
            if epoch is not None:
                values["best_epoch"] = float(epoch)
        self.pending.extend(self._metric(key, value, timestamp, step) for key, value in values.items())

    def unconfirmed_points(self) -> list[dict]:
        """Every point MLflow has not accepted yet (flushed but queued, and held
        since the last flush), as JSON-able dicts: the checkpoint being written
        carries them, so a crash before the sender delivers them loses none
        (`resend` sends them again after a resume)."""
        with self._sender.condition:
            queued = [m for item in self._sender.queue if item[0] == "metrics" for m in item[1]]
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                for m in queued + self.pending]

    def resend(self, points: list[dict]) -> int:
        """Queue points carried by the checkpoint a run resumed from (they are
        covered by it, so they are sent without waiting for a flush). Sending
        a point the store already holds is harmless: MLflow's SQL stores skip
        a point identical in key, value, timestamp and step."""
        metrics = [self._metric(p["key"], p["value"], p["timestamp"], p["step"]) for p in points]
        for start in range(0, len(metrics), BATCH_LIMIT):
            self._sender.put(("metrics", metrics[start : start + BATCH_LIMIT]))
        return len(metrics)

    def flush(self) -> None:
        """Release the held metrics for sending (call once a checkpoint is durable)."""
        for start in range(0, len(self.pending), BATCH_LIMIT):
            self._sender.put(("metrics", self.pending[start : start + BATCH_LIMIT]))
        self.pending = []

    def log_png(self, png: bytes, artifact_file: str) -> None:
        """Queue a figure (e.g. figures/conv1_epoch003.png) for upload."""
        self._sender.put(("artifact", png, artifact_file))

    @property
    def unsent_points(self) -> int:
        """Flushed points not yet accepted by MLflow."""
        with self._sender.condition:
            return sum(len(item[1]) for item in self._sender.queue if item[0] == "metrics")

    def close(self, spill: Optional[Callable[[bytes], None]] = None, timeout_s: float = 60.0) -> CloseReport:
        """Send what is flushed (waiting at most `timeout_s` for MLflow), then stop.

        Points still unsent are passed to `spill` as JSON lines (one point or
        figure per line, see `resend_spilled`); the report counts them.
        """
        discarded = len(self.pending)
        self.pending = []
        if self._stop_system is not None:
            self._stop_system()
        left = self._sender.close(timeout_s)
        unsent_points = sum(len(item[1]) for item in left if item[0] == "metrics")
        unsent_artifacts = sum(1 for item in left if item[0] == "artifact")
        spilled = False
        if left and spill is not None:
            spill(spill_lines(self.handle, left))
            spilled = True
        if left:
            log.warning(
                "%d metric points and %d figures were not sent to MLflow at %s%s",
                unsent_points, unsent_artifacts, strip_userinfo(self.handle.tracking_uri),
                "; written to the spill file (send later with resend_spilled)" if spilled else "",
            )
        return CloseReport(self._sender.sent_points, unsent_points, unsent_artifacts, discarded, spilled)


def spill_lines(handle: RunHandle, items: list) -> bytes:
    """JSON lines for unsent items: {"run_id", "key", "value", "timestamp", "step"} or a figure."""
    import base64

    lines = []
    for item in items:
        if item[0] == "metrics":
            lines.extend(
                json.dumps({"run_id": handle.run_id, "key": m.key, "value": m.value,
                            "timestamp": m.timestamp, "step": m.step})
                for m in item[1]
            )
        else:
            lines.append(json.dumps({"run_id": handle.run_id, "artifact_file": item[2],
                                     "png_base64": base64.b64encode(item[1]).decode()}))
    return ("\n".join(lines) + "\n").encode()


def file_spill(folder_uri: str, run_id: str, filesystem=None) -> Callable[[bytes], None]:
    """A `spill` target writing `<folder_uri>/unsent_metrics-<run_id>-<time>.jsonl`.

    `folder_uri`: a local folder or any URI pyarrow opens (s3://...); pass the
    pyarrow `filesystem` (and a path without scheme) for custom endpoints.
    """
    import pyarrow.fs as pafs

    def _filesystem(uri: str):
        if "://" not in uri:
            return pafs.LocalFileSystem(), str(Path(uri).resolve())
        return pafs.FileSystem.from_uri(uri)

    def write(data: bytes) -> None:
        fs, base = (filesystem, folder_uri) if filesystem is not None else _filesystem(folder_uri)
        fs.create_dir(base, recursive=True)
        path = f"{base.rstrip('/')}/unsent_metrics-{run_id}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        log.warning("unsent MLflow points written to %s", path)

    return write


def resend_spilled(tracking_uri: str, data: bytes) -> int:
    """Log a spill file's points (and figures) to their runs; returns the points sent.

    Safe to repeat: points identical to ones the store holds are skipped by it.
    """
    import base64
    from collections import defaultdict

    from mlflow.entities import Metric

    client = client_for(tracking_uri)
    points: dict[str, list] = defaultdict(list)
    for line in data.decode().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "artifact_file" in record:
            upload_bytes(client, record["run_id"], base64.b64decode(record["png_base64"]), record["artifact_file"])
            continue
        points[record["run_id"]].append(Metric(record["key"], record["value"], record["timestamp"], record["step"]))
    for run_id, metrics in points.items():
        for start in range(0, len(metrics), BATCH_LIMIT):
            client.log_batch(run_id, metrics=metrics[start : start + BATCH_LIMIT])
    return sum(len(m) for m in points.values())


def start_node_system_metrics(handle: RunHandle, node_id: Optional[str] = None,
                              sampling_interval_s: float = 10.0) -> Callable[[], None]:
    """Sample this node's CPU, memory, disk, network (and GPUs, with pynvml) into
    the run as `system/<node_id>/...`; returns the function that stops it.

    Call once per node (one process per node). A machine where the probes
    fail logs a warning and gets a no-op stopper.
    """
    limit_http_retries()
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            handle.run_id,
            sampling_interval=sampling_interval_s,
            resume_logging=handle.resumed,
            node_id=node_id,
            tracking_uri=handle.tracking_uri,
        )
        monitor.start()
    except Exception as error:  # noqa: BLE001 - psutil/GPU probes vary by machine
        log.warning("system metrics disabled on node %s: %s", node_id, error)
        return lambda: None
    return monitor.finish
