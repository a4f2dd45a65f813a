"""Load: four training runs logging at once to one `mlflow server` backed by a
real PostgreSQL (Debian's package, started here on 127.0.0.1) lose no point.

Each run is its own process running the project's training loop on a tiny
AlexNet through the real `WorkerTracker` (`python -m tests.tracked_training`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.servers import postgres_bin, quiet_env, start_mlflow_server, start_postgres
from tests.tracked_training import STEP_KEYS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
RUNS, EPOCHS, STEPS_PER_EPOCH = 4, 2, 25


@pytest.fixture(scope="module")
def postgres_mlflow(tmp_path_factory):
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries are absent: apt-get install -y postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver is absent: pip install psycopg2-binary")
    postgres = start_postgres()
    try:
        server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-pg"), backend_store_uri=postgres.uri, workers=4)
        try:
            yield server
        finally:
            server.stop()
    finally:
        postgres.stop()


def test_four_concurrent_training_runs_lose_no_metric_point(postgres_mlflow):
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.tracked_training", "--tracking-uri", postgres_mlflow.url,
             "--experiment", "load", "--run-name", f"load-{index}", "--epochs", str(EPOCHS),
             "--steps-per-epoch", str(STEPS_PER_EPOCH), "--seed", str(index)],
            cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
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
        assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH and summary["unsent"] == 0
        run = client.get_run(summary["run_id"])
        stored = 0
        for key in run.data.metrics:
            history = client.get_metric_history(summary["run_id"], key)
            steps = [m.step for m in history]
            assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
            stored += len(history)
        for key in STEP_KEYS:
            steps = sorted(m.step for m in client.get_metric_history(summary["run_id"], key))
            assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1)), key
        assert stored == summary["sent"]  # every point the tracker sent is stored, none twice
