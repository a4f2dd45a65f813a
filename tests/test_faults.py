"""Faults injected into a real run, then proof that nothing was lost or
counted twice: `python -m service.train` in a subprocess against the
session's real Ray cluster and `mlflow server`, on 4 generated classes (10
steps an epoch, 3 epochs, a checkpoint every 4 steps, loss logged every 2).

One run is interrupted three ways (a worker killed halfway through uploading
a checkpoint, a training worker SIGKILLed mid-epoch, the driver SIGKILLed
mid-epoch) and must end exactly like an uninterrupted run of the same
command: the same steps and weights, one MLflow run with every logged step
once, its model registered, no secret anywhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from service.train.checkpoint import load_reference_state
from service.tracking.mlflow_tracker import RUN_NAME_TAG

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
SECRET = "TOPSECRET-do-not-log-4f9a"
EPOCHS, STEPS_PER_EPOCH, LOG_EVERY, CHECKPOINT_EVERY = 3, 10, 2, 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def _command(tiny_dataset, mlflow_server, storage: Path, experiment: str, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "service.train", "experiment=smoke",
        f"data.root={tiny_dataset}", f"tracking.uri={mlflow_server.url}", f"tracking.experiment={experiment}",
        f"tracking.registered_model={experiment}-model", "tracking.system_metrics=false", f"storage.path={storage}",
        f"data.s3_secret_key={SECRET}", "data.s3_access_key=AKIAEXAMPLE-KEY",
        f"run.name={name}", f"train.epochs={EPOCHS}", "train.batch_size=16", f"train.log_every_steps={LOG_EVERY}",
        f"train.checkpoint_every_steps={CHECKPOINT_EVERY}", "train.keep_checkpoints=3",
        f"hydra.run.dir={storage.parent / 'hydra'}", *extra,
    ]


def _env(ray_head, **extra) -> dict:
    return {**os.environ, **ray_head.env, "RAY_ADDRESS": ray_head.address, **extra}


def _run_until(command, env, line_pattern: str) -> tuple[subprocess.Popen, list[str]]:
    """Start the job; return once a line matching `line_pattern` was printed."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(line_pattern, line):
            return process, lines
    process.wait()
    raise AssertionError(f"the job ended (rc {process.returncode}) before printing {line_pattern!r}:\n"
                         + "".join(lines[-40:]))


def _lines_until(process: subprocess.Popen, line_pattern: str) -> list[str]:
    """Read the running job's output until a line matches `line_pattern`."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(line_pattern, line):
            return lines
    raise AssertionError(f"the job ended before printing {line_pattern!r}:\n" + "".join(lines[-40:]))


def _run(command, env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _the_run(client, experiment: str, name: str):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return runs[0]


def _assert_complete_history(client, run) -> None:
    """Every logging step exactly once, in order; every epoch's validation once."""
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY)), steps
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1_error")]
    assert val_steps == [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)], val_steps


def _final_state(storage: Path, name: str) -> dict:
    folder = storage / name / f"checkpoint_e{EPOCHS:04d}_s{TOTAL_STEPS:09d}"
    return load_reference_state(folder)[1]


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [actor.pid for actor in actors if "RayTrainWorker" in actor.class_name]


def _assert_no_secret(client, run, storage: Path, tmp_path: Path) -> None:
    """The S3 keys given on the command line reach no param, tag, artifact or checkpoint."""
    params = run.data.params
    assert params["data.s3_secret_key"] == "***" and params["data.s3_access_key"] == "***"
    assert not any(SECRET in value for value in params.values())
    assert not any(SECRET in value for value in run.data.tags.values())  # the recorded command among them
    artifact_dir = client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
    for folder in (Path(artifact_dir), storage):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_a_run_interrupted_three_ways_ends_like_an_uninterrupted_one(tiny_dataset, mlflow_server, ray_session,
                                                                      tmp_path):
    """1. a worker dies halfway through uploading the step-8 checkpoint: the job fails;
    2. the same command skips that incomplete checkpoint and resumes from step 4;
       a training worker is SIGKILLed in epoch 2 and Ray Train restarts the
       workers (cluster.max_failures) from the newest complete checkpoint;
       then the driver is SIGKILLed in epoch 3;
    3. the same command resumes from the newest complete checkpoint into the
       same MLflow run, and ends with the uninterrupted run's steps and weights.
    A change of layout under the same run.name stops before any worker starts."""
    storage, env = tmp_path / "ckpt", _env(ray_session)
    client = mlflow.MlflowClient(mlflow_server.url)
    whole = _run(_command(tiny_dataset, mlflow_server, storage, "faults", "whole"), env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    command = _command(tiny_dataset, mlflow_server, storage, "faults", "interrupted")
    crashed = _run(command, _env(ray_session, ALEXNET_TEST_CRASH_IN_CHECKPOINT="8"))
    assert crashed.returncode == 1 and "error: training failed" in crashed.stderr, crashed.stderr[-3000:]
    cut = storage / "interrupted" / "checkpoint_e0000_s000000008"
    assert (cut / "tower_1.pt").is_file()  # half of it reached storage

    changed = _run(command + ["parallel.towers=1"], env)
    assert changed.returncode == 2 and "parallel.towers: 2 -> 1" in changed.stderr, changed.stderr[-2000:]
    assert "Traceback" not in changed.stderr

    process, lines = _run_until(command + ["cluster.max_failures=3"], env, r"epoch 2/3 step 14/")
    assert f"skipping incomplete checkpoint {cut}" in "".join(lines) and "resuming from step 4" in "".join(lines)
    victims = _train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    lines += _lines_until(process, r"epoch 3/3 step 26/")  # after the restart, past the step-24 checkpoint
    assert re.search(r"resumed from epoch 1 step (12|16) ", "".join(lines)), "".join(lines)[-3000:]
    process.kill()  # SIGKILL the driver: no clean-up of any kind
    process.wait()

    resumed = _run(command, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The workers outlive their driver for a moment and may finish the step-28 checkpoint.
    assert re.search(r"resuming from step (24|28)\b", resumed.stdout), resumed.stdout[-3000:]
    run = _the_run(client, "faults", "interrupted")
    assert run.info.status == "FINISHED"
    _assert_complete_history(client, run)
    reference, interrupted = _final_state(storage, "whole"), _final_state(storage, "interrupted")
    for name, value in reference.items():
        torch.testing.assert_close(interrupted[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Both runs registered their best checkpoint; the alias is on the lowest error.
    versions = client.search_model_versions("name='faults-model'")
    assert sorted(v.run_id for v in versions) == sorted([run.info.run_id, _the_run(client, "faults", "whole").info.run_id])
    errors = {v.version: float(v.tags["val_top1_error"]) for v in versions}
    assert errors[client.get_model_version_by_alias("faults-model", "best").version] == min(errors.values())
    _assert_no_secret(client, run, storage, tmp_path)
