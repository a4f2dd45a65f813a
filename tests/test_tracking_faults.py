"""MLflow faults met by the real job: unreachable at start, gone for good.

`python -m service.train` runs on the session's Ray cluster, logging through
the real Ray Train worker (`RayHooks` + `WorkerTracker`) to the session's
real `mlflow server`, which the test stops by PID while the job prints its
step lines. When the server never comes back, the job still ends, says how
many points it could not send, and writes them to a spill file that
`python -m service.tracking.resend` delivers later. (Stopped mid-run and
started again, every step arriving once: the resumed run of
tests/test_faults.py meets that outage.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from service.config import TrackingConfig
from service.tracking.mlflow_tracker import TrackingUnreachable, check_tracking_reachable, open_run
from service.tracking.worker_tracker import WORKER_HTTP_SETTINGS, WorkerTracker, file_spill, resend_spilled
from tests.helpers import (
    REPO, assert_complete_history, closed_port, ray_env, run_until, the_run, train_command, wait_until,
)

pytestmark = pytest.mark.integration
STEPS_PER_EPOCH = 10  # 162 tiny-dataset images at batch 16
STEP_KEYS = ("loss", "lr", "images_per_s", "data_wait_s", "epoch")  # what the loop reports per logged step


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


def _command(tiny_dataset, server, tmp_path: Path, name: str, *extra: str) -> list[str]:
    # One tower: what is tested is rank 0's tracking; a second tower would only add a worker process.
    return train_command(
        tiny_dataset, tmp_path / "ckpt", tmp_path / "hydra", "train.epochs=1", "train.batch_size=16",
        "train.log_every_steps=1", "train.checkpoint_every_steps=2", "tracking.system_metrics=false",
        "tracking.log_model=false", "parallel.towers=1", *extra, tracking_uri=server.url, experiment="outage",
        name=name,
    )


def test_server_gone_for_good_the_job_ends_spills_and_resend_delivers(tiny_dataset, mlflow_outage, ray_session,
                                                                     tmp_path):
    """Stopped at step 3, for good: the job still ends normally once its
    end-of-job wait (`tracking.close_timeout_s`, here 3 s) is over, says how
    many points it could not send and writes them to the spill file, which
    `python -m service.tracking.resend` delivers (twice: nothing doubles)."""
    server = mlflow_outage
    command = _command(tiny_dataset, server, tmp_path, "gone", "tracking.close_timeout_s=3")
    process, lines = run_until(command, ray_env(ray_session), r"epoch 1/1 step 3/")
    try:
        server.stop()
        lines.extend(process.stdout)
        returncode = process.wait(timeout=600)
    finally:
        process.kill()
    output = "".join(lines)
    assert returncode == 0, output[-4000:]
    (said,) = [line for line in lines if "metric points and" in line and "were not sent; written under" in line]
    unsent = int(said.split("[mlflow] ")[1].split()[0])
    (spill_file,) = (tmp_path / "ckpt" / "gone").glob("unsent_metrics-*.jsonl")
    assert str(spill_file.parent) in said and "python -m service.tracking.resend" in said
    records = [json.loads(line) for line in spill_file.read_text().splitlines() if '"key"' in line]
    assert len(records) == unsent and max(r["step"] for r in records) == STEPS_PER_EPOCH

    server.start()
    command = [sys.executable, "-m", "service.tracking.resend", server.url, str(spill_file)]
    for _ in range(2):  # safe to repeat: the second time adds nothing
        sent = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0 and f"{unsent} points sent" in sent.stdout, sent.stderr[-2000:]
    client = mlflow.MlflowClient(server.url)
    assert_complete_history(client, the_run(client, "outage", "gone").info.run_id, STEP_KEYS, STEPS_PER_EPOCH,
                            every=1, val_steps=[STEPS_PER_EPOCH])


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
    report = tracker.close(spill=file_spill(str(spill_folder), handle.run_id), timeout_s=3)
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
