"""Faults injected into real runs, then proof that nothing was lost or counted
twice: `python -m service.train` in a subprocess against the session's real
Ray cluster and `mlflow server`, on 4 generated classes (10 steps an epoch,
3 epochs, a checkpoint every 4 steps, loss logged every 2).

- a training worker SIGKILLed mid-epoch: Ray Train restarts the group from
  the last checkpoint; one MLflow run, every logged step exactly once;
- a worker killed halfway through uploading a checkpoint: the next run skips
  that incomplete checkpoint and resumes from the previous complete one;
- the driver SIGKILLed mid-epoch, then the same command again: it resumes
  into the same MLflow run and ends with the same steps and the same weights
  as an uninterrupted run.
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
EPOCHS, STEPS_PER_EPOCH, LOG_EVERY, CHECKPOINT_EVERY = 3, 10, 2, 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def _command(tiny_dataset, mlflow_server, storage: Path, experiment: str, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "service.train", "experiment=smoke",
        f"data.root={tiny_dataset}", f"tracking.uri={mlflow_server.url}", f"tracking.experiment={experiment}",
        "tracking.log_model=false", "tracking.system_metrics=false", f"storage.path={storage}",
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


def _finish(process: subprocess.Popen, lines: list[str], timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    return "".join(lines) + (out or "")


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


def test_killed_worker_is_restarted_from_the_last_checkpoint(tiny_dataset, mlflow_server, ray_session, tmp_path):
    storage = tmp_path / "ckpt"
    command = _command(tiny_dataset, mlflow_server, storage, "fault-worker", "w", "cluster.max_failures=3")
    process, lines = _run_until(command, _env(ray_session), r"epoch 2/3 step 1[46]/")
    victims = _train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    output = _finish(process, lines)
    assert process.returncode == 0, output[-4000:]
    # Killed after step 14 or 16 was printed: the last complete checkpoint is 12 or 16.
    assert re.search(r"resumed from epoch 1 step (12|16) ", output), output[-4000:]
    client = mlflow.MlflowClient(mlflow_server.url)
    run = _the_run(client, "fault-worker", "w")
    assert run.info.status == "FINISHED"
    _assert_complete_history(client, run)


def test_interrupted_run_resumes_exactly_after_a_cut_checkpoint_and_a_killed_driver(
    tiny_dataset, mlflow_server, ray_session, tmp_path
):
    """One run interrupted twice, then compared with an uninterrupted one:
    1. a worker dies halfway through uploading the step-8 checkpoint (the job fails);
    2. the same command resumes from step 4, the last complete checkpoint, and
       its driver is SIGKILLed in epoch 2 after the step-16 checkpoint;
    3. the same command resumes from there into the same MLflow run and ends
       with every step logged once and the uninterrupted run's weights."""
    storage = tmp_path / "ckpt"
    env = _env(ray_session)
    uninterrupted = _run(_command(tiny_dataset, mlflow_server, storage, "fault-resume", "whole"), env)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    command = _command(tiny_dataset, mlflow_server, storage, "fault-resume", "interrupted")
    crashed = _run(command, _env(ray_session, ALEXNET_TEST_CRASH_IN_CHECKPOINT="8"))
    assert crashed.returncode == 1, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    assert "error: training failed" in crashed.stderr
    cut = storage / "interrupted" / "checkpoint_e0000_s000000008"
    assert (cut / "tower_1.pt").is_file()  # half of it reached storage

    process, lines = _run_until(command, env, r"epoch 2/3 step 18/")  # after the step-16 checkpoint
    output = "".join(lines)
    assert f"skipping incomplete checkpoint {cut}" in output and "resuming from step 4" in output, output[-3000:]
    process.kill()  # SIGKILL the driver: no clean-up of any kind
    process.wait()

    resumed = _run(command, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The workers outlive their driver for a moment and may finish the step-20 checkpoint.
    assert re.search(r"resuming from step (16|20)\b", resumed.stdout), resumed.stdout[-3000:]
    client = mlflow.MlflowClient(mlflow_server.url)
    run = _the_run(client, "fault-resume", "interrupted")
    assert run.info.status == "FINISHED"
    _assert_complete_history(client, run)
    whole, interrupted = _final_state(storage, "whole"), _final_state(storage, "interrupted")
    for name, value in whole.items():
        torch.testing.assert_close(interrupted[name], value, rtol=1e-5, atol=1e-6, msg=name)
