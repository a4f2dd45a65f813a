"""MLflow faults: unreachable at start, and what the worker's tracker holds
while the server is away (carried in the checkpoint, spilled at the end).

The real job meets the outages in tests/test_faults.py: `python -m
service.train` on the session's Ray cluster, logging through the real Ray
Train worker (`RayHooks` + `WorkerTracker`) to the session's real `mlflow
server`, stopped by PID while the job prints its step lines. Stopped mid-run
and started again, every step arrives once (the four-way run); gone for good,
the job still ends, says how many points it could not send, and writes them
to a spill file that `python -m service.tracking.resend` delivers later (the
bad-shard run that skips).
"""

from __future__ import annotations

import json

import mlflow
import pytest

from service.config import TrackingConfig
from service.tracking.mlflow_tracker import TrackingUnreachable, check_tracking_reachable, open_run
from service.tracking.worker_tracker import WORKER_HTTP_SETTINGS, WorkerTracker, file_spill, resend_spilled
from tests.helpers import STEP_KEYS, assert_complete_history, closed_port, wait_until

pytestmark = pytest.mark.integration


def test_unreachable_tracking_server_is_one_line_naming_the_uri(tmp_path):
    port = closed_port()
    with pytest.raises(TrackingUnreachable) as raised:
        check_tracking_reachable(f"http://alice:hunter2@127.0.0.1:{port}", timeout_s=5)
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "unreachable" in message
    assert "hunter2" not in message and "\n" not in message
    with pytest.raises(TrackingUnreachable, match="does not exist"):
        check_tracking_reachable(f"sqlite:///{tmp_path}/missing/folder/mlruns.db")
    check_tracking_reachable(f"sqlite:///{tmp_path}/mlruns.db")  # a folder that exists is enough


def test_unsent_points_travel_in_the_checkpoint_and_the_spill_file(mlflow_outage, tmp_path, monkeypatch):
    """The tracker alone, deterministic: MLflow gone from step 10 on. (a) What the
    step-20 checkpoint would carry (`unconfirmed_points`) is exactly steps
    11-20, and a resumed run's `resend` delivers it, twice without doubling;
    (b) closed with the server still away, the rest goes to the spill file,
    which overlaps (a) and adds only what was missing."""
    for key, value in WORKER_HTTP_SETTINGS.items():
        monkeypatch.setenv(key, value)
    server, total, every = mlflow_outage, 30, 5
    config = TrackingConfig(uri=server.url, experiment="carried")
    handle = open_run(config, "carried", {"x": 1})
    tracker = WorkerTracker(handle, system_metrics=False, retry_interval_s=0.5)
    carried: list[dict] = []
    for step in range(1, total + 1):  # a point per key and step, flushed at each "checkpoint"
        tracker.add({key: 1.0 / step for key in STEP_KEYS}, step)
        if step % every == 0:
            tracker.flush()
            if step == 10:
                wait_until(lambda: tracker.unsent_points == 0, 60, "the first points to be sent")
                server.stop()
            elif step == 20:
                carried.extend(tracker.unconfirmed_points())
    assert sorted({p["step"] for p in carried}) == list(range(11, 21))
    spill_folder = tmp_path / "checkpoints" / "carried"
    # The server is down: close waits all of timeout_s, then spills.
    report = tracker.close(spill=file_spill(str(spill_folder), handle.run_id), timeout_s=1)
    assert report.spilled and report.unsent_points == (total - 10) * len(STEP_KEYS)
    (spill_file,) = spill_folder.glob("unsent_metrics-*.jsonl")
    lines = [json.loads(line) for line in spill_file.read_text().splitlines()]
    assert sorted(line["step"] for line in lines if line["key"] == "loss") == list(range(11, total + 1))

    server.start()
    client = mlflow.MlflowClient(server.url)
    resumed = open_run(config, "carried", {"x": 1})
    assert resumed.run_id == handle.run_id and resumed.resumed
    for _ in range(2):  # (a) as a run resumed from the step-20 checkpoint would, twice over
        tracker = WorkerTracker(resumed, system_metrics=False, retry_interval_s=0.5)
        assert tracker.resend(carried) == len(carried)
        assert tracker.close(timeout_s=60).unsent_points == 0
    assert_complete_history(client, handle.run_id, STEP_KEYS, 20, every=1)
    # (b) the spill file: adds only steps 21-30
    assert resend_spilled(server.url, spill_file.read_bytes()) == report.unsent_points
    assert_complete_history(client, handle.run_id, STEP_KEYS, total, every=1)
