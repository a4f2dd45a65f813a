"""The training service against real parts: a `ray start --head` cluster, a
real `mlflow server` over HTTP, generated ImageNet-format data ingested into
shards. Multirun sweeps, and `ray job submit` of 2 replicas x 2 towers end
to end (resume, secrets and faults: tests/test_faults.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest

from service.evaluate import evaluate
from service.evaluation.config import EvaluateConfig, validate_evaluate_config
from service.hydra_app import compose
from service.resume import find_resume_point
from service.tracking.mlflow_tracker import PARENT_TAG, SWEEP_TAG
from tests.conftest import TINY_VAL_IMAGES
from tests.helpers import REPO, assert_complete_history, train_overrides, wait_until

pytestmark = pytest.mark.integration


def _runs(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_multirun_sweep_logs_children_under_one_parent(tiny_dataset, mlflow_server, ray_session, tmp_path):
    base = train_overrides(tiny_dataset, tmp_path / "ckpt", f"cluster.address={ray_session.address}",
                           tracking_uri=mlflow_server.url, experiment="sweep")
    overrides = [o for o in base if not o.startswith("run.name")] + [
        "train.max_steps=2",
        "parallel.towers=1",  # what is tested is the runs' nesting: one worker a child is enough
        "tracking.log_model=false",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "recipe.lr=0.01,0.02",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "service.train", "-m", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_server.url)
    runs = _runs(client, "sweep")
    parents = [r for r in runs if SWEEP_TAG in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags[PARENT_TAG] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["recipe.lr"] for c in children) == ["0.01", "0.02"]


def _job_agent_registered() -> bool:
    """True once the head's dashboard agent has published its address in the
    GCS (the job server needs it; before that it answers "No available agent
    to submit job")."""
    from ray.experimental.internal_kv import _internal_kv_list

    return bool(_internal_kv_list("DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX:", namespace="dashboard"))


def test_ray_job_submit_end_to_end_two_replicas_ten_crop(tiny_dataset, mlflow_server, ray_session, tmp_path):
    """`ray job submit --working-dir .` with token auth, as the README shows, of a
    2 replicas x 2 towers job (4 workers) with 10-crop validation: data split by
    replica, every val image counted exactly once, and the 4 workers' 10-crop
    validation equal to the single-process evaluator's on the same weights."""
    ray_head = ray_session
    wait_until(_job_agent_registered, 120, "the head's job agent")
    env = {**os.environ, **ray_head.env}
    overrides = train_overrides(tiny_dataset, tmp_path / "ckpt", tracking_uri=mlflow_server.url, experiment="jobs",
                                name="job-smoke")
    # Half a logical CPU a worker: the 4 workers and their 4 lanes' read tasks fit the
    # session cluster's 6, so nothing queues for a CPU (the job would say it waits).
    overrides += ["parallel.replicas=2", "data.eval_crops=10", "cluster.cpus_per_worker=0.5"]
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", ray_head.dashboard_url,
        "--working-dir", ".",
        "--runtime-env", "ray_runtime_env.yaml",
        "--", "python", "-m", "service.train", *overrides,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower()
    assert "will wait for resources" not in output, output[-4000:]
    client = mlflow.MlflowClient(mlflow_server.url)
    (run,) = _runs(client, "jobs")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "alexnet_small"
    assert (run.data.params["parallel.towers"], run.data.params["parallel.replicas"]) == ("2", "2")
    # smoke: 5 steps of 32 images (16 a replica), loss logged every 2nd step, validation at the epoch's end.
    assert_complete_history(client, run.info.run_id, ["loss"], 5, every=2, val_steps=[5])
    assert run.data.metrics["val_images"] == TINY_VAL_IMAGES  # every val image once over both replicas
    (version,) = client.search_model_versions("name='jobs-model'")
    assert version.run_id == run.info.run_id
    # The run's newest complete checkpoint, found as a resume would find it.
    newest = find_resume_point(pafs.LocalFileSystem(), str(tmp_path / "ckpt" / "job-smoke"))
    checkpoint = Path(newest.path)
    assert newest.progress["mlflow_run_id"] == run.info.run_id
    # Replica 0's towers write the shards; replica 1 holds identical weights.
    assert sorted(p.name for p in checkpoint.iterdir()) == ["progress.json", "tower_0.pt", "tower_1.pt"]
    # Exact counting: the 4 workers' 10-crop validation of the last checkpoint equals the evaluator's.
    evaluated = evaluate(compose([f"model_uri={checkpoint}", f"data.root={tiny_dataset}", "eval.crops=10",
                                  "eval.actors=1", "tracking.enabled=false"], "evaluate", EvaluateConfig,
                                 validate_evaluate_config))
    assert (evaluated["top1_error"], evaluated["top5_error"]) == pytest.approx(
        (run.data.metrics["val_top1_error"], run.data.metrics["val_top5_error"]), abs=1e-12)
