"""MLflow faults: unreachable at start, gone mid-run and back, gone for good.

A real `mlflow server` (sqlite backend) is stopped by PID in the middle of a
real training loop and restarted on the same port and store; the run's
history must hold every step exactly once. When it never comes back, the
unsent points go to a spill file that `resend_spilled` logs later.
"""

from __future__ import annotations

import json

import mlflow
import pytest

from service.config import TrackingConfig
from service.parallel.local import free_port
from service.tracking.mlflow_tracker import TrackingUnreachable, check_tracking_reachable, open_run
from service.tracking.resend import main as resend_main
from service.tracking.worker_tracker import (
    WORKER_HTTP_SETTINGS, WorkerTracker, file_spill, resend_spilled,
)
from tests.servers import start_mlflow_server, wait_until
from tests.tracked_training import STEP_KEYS, train_with_tracker

pytestmark = pytest.mark.integration
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 3, 10, 5
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


@pytest.fixture
def worker_http(monkeypatch):
    """The worker's short MLflow HTTP retries, undone after the test."""
    for key, value in WORKER_HTTP_SETTINGS.items():
        monkeypatch.setenv(key, value)


def _assert_complete_history(client, run_id: str) -> None:
    for key in STEP_KEYS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, TOTAL_STEPS + 1)), f"{key}: {sorted(steps)}"
    val_steps = sorted(m.step for m in client.get_metric_history(run_id, "val_top1_error"))
    assert val_steps == [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]
    best = client.get_run(run_id).data.metrics
    errors = [m.value for m in client.get_metric_history(run_id, "val_top1_error")]
    assert best["best_val_top1_error"] == min(errors)
    assert 1 <= best["best_epoch"] <= EPOCHS


def test_unreachable_tracking_server_is_one_line_naming_the_uri(tmp_path):
    port = free_port()  # nothing listens here
    with pytest.raises(TrackingUnreachable) as raised:
        check_tracking_reachable(f"http://alice:hunter2@127.0.0.1:{port}", timeout_s=5)
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "unreachable" in message
    assert "hunter2" not in message and "\n" not in message
    with pytest.raises(TrackingUnreachable, match="does not exist"):
        check_tracking_reachable(f"sqlite:///{tmp_path}/missing/folder/mlruns.db")
    check_tracking_reachable(f"sqlite:///{tmp_path}/mlruns.db")  # a folder that exists is enough


def test_outage_mid_run_training_goes_on_and_every_point_arrives_once(tmp_path, worker_http):
    server = start_mlflow_server(tmp_path)
    servers = [server]
    handle = open_run(TrackingConfig(uri=server.url, experiment="faults"), "outage", {"x": 1})
    tracker = WorkerTracker(handle, system_metrics=False, retry_interval_s=0.5)
    held_while_down = []

    def fault(checkpoint: int) -> None:
        if checkpoint == 1:  # step 5
            wait_until(lambda: tracker.unsent_points == 0, 60, "the first points to be sent")
            servers[-1].stop()
        elif checkpoint == 4:  # step 15, three checkpoints' worth of points held meanwhile
            held_while_down.append(tracker.unsent_points)
            tracker.log_png(b"\x89PNG not really", "figures/during_outage.png")
            servers.append(start_mlflow_server(tmp_path, port=server.port))

    try:
        progress = train_with_tracker(tracker, EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY, after_checkpoint=fault)
        assert progress.step == TOTAL_STEPS  # training never waited for MLflow
        assert held_while_down and held_while_down[0] > 0
        report = tracker.close(timeout_s=120)
        assert report.unsent_points == 0 and report.unsent_artifacts == 0 and report.discarded_points == 0
        client = mlflow.MlflowClient(server.url)
        _assert_complete_history(client, handle.run_id)
        names = [a.path for a in client.list_artifacts(handle.run_id, "figures")]
        assert names == ["figures/during_outage.png"]
    finally:
        servers[-1].stop()


def test_unsent_points_travel_in_the_checkpoint_and_the_spill_file(tmp_path, worker_http):
    """MLflow gone from step 10 on. (a) A worker killed after the step-20
    checkpoint: that checkpoint carries the points its sender had not
    delivered (`unconfirmed_points` goes into progress.json) and the resumed
    run sends them (`resend`). (b) Server gone for good: the job ends, the
    unsent points go to a spill file that `resend_spilled` logs later. Points
    sent twice (carried and spilled, or the command run again) never double."""
    server = start_mlflow_server(tmp_path)
    config = TrackingConfig(uri=server.url, experiment="faults")
    handle = open_run(config, "gone", {"x": 1})
    tracker = WorkerTracker(handle, system_metrics=False, retry_interval_s=0.5)
    carried: list[dict] = []

    def fault(checkpoint: int) -> None:
        if checkpoint == 2:  # step 10
            wait_until(lambda: tracker.unsent_points == 0, 60, "the first points to be sent")
            server.stop()
        elif checkpoint == 4:  # step 20: what its checkpoint would carry
            carried.extend(tracker.unconfirmed_points())

    train_with_tracker(tracker, EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY, after_checkpoint=fault)
    assert sorted({p["step"] for p in carried}) == list(range(11, 21))
    spill_folder = tmp_path / "checkpoints" / "gone"
    report = tracker.close(spill=file_spill(str(spill_folder), handle.run_id), timeout_s=3)
    assert report.spilled and report.unsent_points > 0
    (spill_file,) = spill_folder.glob("unsent_metrics-*.jsonl")
    lines = [json.loads(line) for line in spill_file.read_text().splitlines()]
    assert len(lines) == report.unsent_points
    # Exactly what the server did not get: every step after the outage began.
    assert sorted(line["step"] for line in lines if line.get("key") == "loss") == list(range(11, TOTAL_STEPS + 1))

    server = start_mlflow_server(tmp_path, port=server.port)
    try:
        client = mlflow.MlflowClient(server.url)
        resumed = open_run(config, "gone", {"x": 1})
        assert resumed.run_id == handle.run_id and resumed.resumed
        # (a) as a run resumed from the step-20 checkpoint would, twice over
        for _ in range(2):
            tracker = WorkerTracker(resumed, system_metrics=False, retry_interval_s=0.5)
            assert tracker.resend(carried) == len(carried)
            assert tracker.close(timeout_s=60).unsent_points == 0
        for key in STEP_KEYS:
            assert sorted(m.step for m in client.get_metric_history(handle.run_id, key)) == list(range(1, 21)), key
        # (b) the spill file, then again through the command: adds only what was missing
        assert resend_spilled(server.url, spill_file.read_bytes()) == report.unsent_points
        resend_main([server.url, str(spill_file)])
        _assert_complete_history(client, handle.run_id)
    finally:
        server.stop()
