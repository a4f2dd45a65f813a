"""Load: four processes logging at once to one `mlflow server` backed by a
real PostgreSQL (Debian's package, started here on 127.0.0.1) lose no point.

Each process logs like a training job's rank 0 does (the real `WorkerTracker`,
a flush every 10 steps, as after each checkpoint), without training: the
load is on MLflow and PostgreSQL, not on the 2 CPU cores. `.ci/run` installs
PostgreSQL, so under CI=true a PostgreSQL that cannot start fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest

from tests.helpers import REPO, assert_complete_history, skip_or_fail_in_ci
from tests.servers import postgres_bin, quiet_env, start_mlflow_server, start_postgres

pytestmark = pytest.mark.integration
RUNS, STEPS, FLUSH_EVERY = 4, 50, 10
KEYS = ("loss", "lr", "images_per_s", "data_wait_s")


def log_like_a_training_job(tracking_uri: str, run_name: str, steps: int) -> dict:
    """Open a run, log every key at every step through `WorkerTracker`, flushing every
    FLUSH_EVERY steps; close it. Returns what the tracker says it sent."""
    from service.config import TrackingConfig
    from service.tracking.mlflow_tracker import finish_run, open_run
    from service.tracking.worker_tracker import WorkerTracker

    handle = open_run(TrackingConfig(uri=tracking_uri, experiment="load"), run_name, {"name": run_name})
    tracker = WorkerTracker(handle, system_metrics=False, retry_interval_s=1.0)
    for step in range(1, steps + 1):
        tracker.add({key: step / (index + 1) for index, key in enumerate(KEYS)}, step)
        if step % FLUSH_EVERY == 0:
            tracker.flush()
    report = tracker.close(timeout_s=120)
    finish_run(handle)
    return {"run_id": handle.run_id, "sent": report.sent_points, "unsent": report.unsent_points}


@pytest.fixture(scope="module")
def postgres_mlflow(tmp_path_factory):
    if postgres_bin() is None:
        skip_or_fail_in_ci("PostgreSQL server binaries are absent: apt-get install -y postgresql")
    postgres = start_postgres()
    try:
        server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-pg"), backend_store_uri=postgres.uri, workers=4)
        try:
            yield server
        finally:
            server.stop()
    finally:
        postgres.stop()


def test_four_concurrent_writers_lose_no_metric_point(postgres_mlflow):
    script = ("import json, sys; from tests.test_tracking_load import log_like_a_training_job as log; "
              "print(json.dumps(log(sys.argv[1], sys.argv[2], int(sys.argv[3]))))")
    processes = [
        subprocess.Popen([sys.executable, "-c", script, postgres_mlflow.url, f"load-{index}", str(STEPS)],
                         cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(RUNS)
    ]
    summaries = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    client = mlflow.MlflowClient(postgres_mlflow.url)
    assert len({s["run_id"] for s in summaries}) == RUNS
    for summary in summaries:
        assert summary["unsent"] == 0 and summary["sent"] == STEPS * len(KEYS)
        assert set(client.get_run(summary["run_id"]).data.metrics) == set(KEYS)
        # Every key at every step 1..STEPS, each exactly once: none lost, none logged twice.
        assert_complete_history(client, summary["run_id"], KEYS, STEPS, every=1)
