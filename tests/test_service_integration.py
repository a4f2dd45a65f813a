"""The training service against real parts: a `ray start --head` cluster, a
real `mlflow server` over HTTP, generated ImageNet-format data ingested into
shards. Resume, secrets, multirun sweeps and `ray job submit` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from service.config import ConfigError
from service.hydra_app import compose
from service.launch import train
from service.tracking.mlflow_tracker import PARENT_TAG, RUN_NAME_TAG, SWEEP_TAG
from tests.servers import wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
SECRET = "TOPSECRET-do-not-log-4f9a"


def _overrides(tiny_dataset, mlflow_server, ray_head, storage: Path, experiment: str, name: str) -> list[str]:
    return [
        "experiment=smoke",
        f"data.root={tiny_dataset}",
        f"tracking.uri={mlflow_server.url}",
        f"tracking.experiment={experiment}",
        f"tracking.registered_model={experiment}-model",
        f"storage.path={storage}",
        f"cluster.address={ray_head.address}",
        f"run.name={name}",
    ]


def _runs(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_resume_continues_the_same_run_without_duplicate_steps(tiny_dataset, mlflow_server, ray_session, tmp_path):
    base = _overrides(tiny_dataset, mlflow_server, ray_session, tmp_path / "ckpt", "resume", "resume-1")
    secret_overrides = [f"data.s3_secret_key={SECRET}", "data.s3_access_key=AKIAEXAMPLE-KEY"]
    first = train(compose(base + secret_overrides + ["train.epochs=1"]))
    client = mlflow.MlflowClient(mlflow_server.url)
    (run,) = _runs(client, "resume")
    first_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert first["epoch"] == 1 and first_steps and max(first_steps) <= first["step"]

    # Changing the layout under the same run.name stops before any worker starts.
    with pytest.raises(ConfigError, match=r"would resume from step \d+ .*parallel.towers: 2 -> 1"):
        train(compose(base + secret_overrides + ["train.epochs=2", "parallel.towers=1"]))
    second = train(compose(base + secret_overrides + ["train.epochs=2"]))
    runs = _runs(client, "resume")
    assert len(runs) == 1 and runs[0].info.run_id == run.info.run_id  # one MLflow run, continued
    assert runs[0].data.tags[RUN_NAME_TAG] == "resume-1"
    assert second["epoch"] == 2 and second["step"] == 2 * first["step"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == sorted(set(steps)), "metric steps must be strictly increasing, none duplicated"
    assert max(steps) > max(first_steps)
    val = client.get_metric_history(run.info.run_id, "val_top1_error")
    assert sorted(m.step for m in val) == [first["step"], second["step"]]
    # Both finished runs registered a model; the alias points at the best one.
    versions = client.search_model_versions("name='resume-model'")
    assert len(versions) == 2
    best = client.get_model_version_by_alias("resume-model", "best")
    errors = {v.version: float(v.tags["val_top1_error"]) for v in versions}
    assert errors[best.version] == min(errors.values())
    _assert_no_secret(client, runs[0], tmp_path)


def _assert_no_secret(client, run, tmp_path: Path) -> None:
    """The S3 keys given on the command line reach no param, artifact or checkpoint."""
    params = run.data.params
    assert params["data.s3_secret_key"] == "***" and params["data.s3_access_key"] == "***"
    assert not any(SECRET in value for value in params.values())
    assert not any(SECRET in value for value in run.data.tags.values())  # e.g. the recorded command
    artifact_dir = client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
    for folder in (Path(artifact_dir), tmp_path / "ckpt"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_multirun_sweep_logs_children_under_one_parent(tiny_dataset, mlflow_server, ray_session, tmp_path):
    base = _overrides(tiny_dataset, mlflow_server, ray_session, tmp_path / "ckpt", "sweep", "ignored")
    overrides = [o for o in base if not o.startswith("run.name")] + [
        "train.max_steps=2",
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


def test_ray_job_submit_end_to_end(tiny_dataset, mlflow_server, ray_session, tmp_path):
    """`ray job submit --working-dir .` with token auth, as the README shows."""
    ray_head = ray_session
    wait_until(_job_agent_registered, 120, "the head's job agent")
    env = {**os.environ, **ray_head.env}
    overrides = _overrides(tiny_dataset, mlflow_server, ray_head, tmp_path / "ckpt", "jobs", "job-smoke")
    overrides = [o for o in overrides if not o.startswith("cluster.address")]
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
    client = mlflow.MlflowClient(mlflow_server.url)
    (run,) = _runs(client, "jobs")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "alexnet_small"
    assert run.data.params["parallel.towers"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps and steps == sorted(set(steps))
    assert "val_top1_error" in run.data.metrics
    (version,) = client.search_model_versions("name='jobs-model'")
    assert version.run_id == run.info.run_id
    progress = next((tmp_path / "ckpt").rglob("progress.json"))
    assert json.loads(progress.read_text())["mlflow_run_id"] == run.info.run_id


def test_two_replicas_two_towers_with_ten_crop_eval(tiny_dataset, mlflow_server, ray_session, tmp_path):
    """4 workers: data split by replica, every val image counted exactly once."""
    base = _overrides(tiny_dataset, mlflow_server, ray_session, tmp_path / "ckpt", "replicas", "r2x2")
    summary = train(
        compose(base + ["parallel.replicas=2", "train.batch_size=32", "data.eval_crops=10", "tracking.log_model=false"])
    )
    assert summary["val_images"] == 4 * 8  # classes x val_per_class of the tiny dataset
    # Exact counting over both replicas: the error is a whole number of the 32 images.
    wrong = summary["val_top1_error"] * 32
    assert abs(wrong - round(wrong)) < 1e-9, summary["val_top1_error"]
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.parent == tmp_path / "ckpt" / "r2x2"
    # Replica 0's towers write the shards; replica 1 holds identical weights.
    assert sorted(p.name for p in checkpoint.iterdir()) == ["progress.json", "tower_0.pt", "tower_1.pt"]
    client = mlflow.MlflowClient(mlflow_server.url)
    (run,) = _runs(client, "replicas")
    assert run.data.params["parallel.replicas"] == "2"
