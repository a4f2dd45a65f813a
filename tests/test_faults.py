"""Faults injected into a real run, then proof that nothing was lost or
counted twice: `python -m service.train` in a subprocess against the
session's real Ray cluster and `mlflow server`, on the tiny dataset (10
steps an epoch, 3 epochs, a checkpoint every 4 steps, loss logged every 2).

One run is interrupted four ways (a worker killed halfway through uploading
a checkpoint and a training worker SIGKILLed mid-epoch, both met by Ray
Train's restarts within the job, the driver SIGKILLed mid-epoch, and the
MLflow server stopped and restarted while the resumed run trains) and must
end exactly like the same training run uninterrupted and without Ray
(tests/plain_training.py: the service's own build, loop and lane reads on
plain gloo processes): the same steps and weights, one MLflow run with every
logged step once, its model registered, no secret anywhere. Both use
data.decode=device (JPEG bytes and augmentation parameters to the towers,
decoded there by nvImageCodec, on its CPU backend here), so the equal final
weights prove that path's exact resume through the real service.

A damaged shard met by the real job: named, or skipped saying which; the job
that skips it also loses its MLflow server for good, and no point is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from service.train.checkpoint import load_reference_state
from tests.helpers import (
    REPO, STEP_KEYS, assert_complete_history, assert_no_secret, lines_until, ray_env, run_until, the_run,
    train_command, train_worker_pids,
)
from tests.plain_training import train_without_ray

pytestmark = pytest.mark.integration
SECRET = "TOPSECRET-do-not-log-4f9a"
EPOCHS, STEPS_PER_EPOCH, LOG_EVERY, CHECKPOINT_EVERY, KEEP_CHECKPOINTS = 3, 10, 2, 4, 3
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
TRAINING = (f"train.epochs={EPOCHS}", "train.batch_size=16", f"train.log_every_steps={LOG_EVERY}",
            f"train.checkpoint_every_steps={CHECKPOINT_EVERY}", f"train.keep_checkpoints={KEEP_CHECKPOINTS}",
            "data.decode=device")


def _command(tiny_dataset, mlflow_server, storage: Path, name: str, *extra: str) -> list[str]:
    return train_command(
        tiny_dataset, storage, storage.parent / "hydra", "tracking.system_metrics=false",
        f"data.s3_secret_key={SECRET}", "data.s3_access_key=AKIAEXAMPLE-KEY",
        *TRAINING, *extra,
        tracking_uri=mlflow_server.url, experiment="faults", name=name,
    )


def _run(command, env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _assert_no_secret(client, run, storage: Path, tmp_path: Path) -> None:
    """The S3 keys given on the command line reach no param, tag, artifact or checkpoint."""
    params = run.data.params
    assert params["data.s3_secret_key"] == "***" and params["data.s3_access_key"] == "***"
    artifact_dir = client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
    # The tags hold the recorded command among them.
    assert_no_secret(SECRET, [*params.values(), *run.data.tags.values()], [Path(artifact_dir), storage])


def test_a_run_interrupted_four_ways_ends_like_an_uninterrupted_one(tiny_dataset, mlflow_outage, ray_session,
                                                                     tmp_path):
    """One command with cluster.max_failures=3, interrupted four ways:
    1. a worker dies halfway through uploading the step-8 checkpoint: Ray Train
       restarts the workers, which skip that incomplete checkpoint and resume
       from step 4;
    2. a training worker is SIGKILLed in epoch 2: Ray Train restarts the
       workers from the newest complete checkpoint;
    3. the driver is SIGKILLed in epoch 3: the same command resumes from the
       newest complete checkpoint into the same MLflow run;
    4. the MLflow server is stopped as that resumed run starts training, and
       started again on the same port and store once the worker has said it is
       unreachable (its client's own retries would hide an outage shorter than
       ~3 s: waiting for the line makes the test independent of how fast the
       server restarts; the job waits for it at its end, up to
       tracking.close_timeout_s, 300 s here): the worker says MLflow is back and
       sends what it held;
    and ends with every step trained once, the weights of the same training
    uninterrupted and without Ray, and every logged step in MLflow exactly
    once. A change of layout under the same run.name stops before any worker
    starts."""
    mlflow_server = mlflow_outage
    storage, env = tmp_path / "ckpt", ray_env(ray_session)
    client = mlflow.MlflowClient(mlflow_server.url)
    command = _command(tiny_dataset, mlflow_server, storage, "interrupted")
    process, lines = run_until(command + ["cluster.max_failures=3"],
                               ray_env(ray_session, ALEXNET_TEST_CRASH_IN_CHECKPOINT="8"), r"epoch 2/3 step 14/")
    cut = storage / "interrupted" / "checkpoint_e0000_s000000008"
    said = "".join(lines)
    assert f"skipping incomplete checkpoint {cut}: " in said, said[-3000:]
    skipped_at = said.index(f"skipping incomplete checkpoint {cut}")
    assert skipped_at < said.index("resumed from epoch 0 step 4 "), said[-3000:]
    victims = train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    lines_until(process, r"epoch 3/3 step 26/", seen=lines)  # after the restart, past the step-24 checkpoint
    assert re.search(r"resumed from epoch 1 step (12|16) ", "".join(lines)), "".join(lines)[-3000:]
    process.kill()  # SIGKILL the driver: no clean-up of any kind
    process.wait()

    changed = _run(command + ["parallel.towers=1"], env)
    assert changed.returncode == 2 and "parallel.towers: 2 -> 1" in changed.stderr, changed.stderr[-2000:]
    assert "Traceback" not in changed.stderr

    # The job waits for MLflow at its end up to tracking.close_timeout_s: room for a server
    # that takes this machine up to a minute to start (tracking keys may change on resume).
    process, lines = run_until(command + ["tracking.close_timeout_s=300"], env, r"resumed from epoch 2 step")
    try:
        mlflow_server.stop()
        lines_until(process, r"is unreachable .*training goes on", seen=lines)
        mlflow_server.start()
        lines.extend(process.stdout)
        assert process.wait(timeout=600) == 0, "".join(lines)[-3000:]
    finally:
        process.kill()
    said = "".join(lines)
    # The workers outlive their driver for a moment and may finish the step-28 checkpoint.
    assert re.search(r"resuming from step (24|28)\b", said), said[-3000:]
    away = next(i for i, line in enumerate(lines) if "is unreachable" in line and "training goes on" in line)
    back = next(i for i, line in enumerate(lines) if "answers again" in line)
    assert away < back and "were not sent" not in said, said[-3000:]
    run = the_run(client, "faults", "interrupted")
    assert run.info.status == "FINISHED"
    assert_complete_history(client, run.info.run_id, ["loss"], TOTAL_STEPS, every=LOG_EVERY,
                            val_steps=[STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)])
    # train.keep_checkpoints holds across the attempts: what the killed driver and its
    # outliving workers left, Ray Train's manager of the finished attempt never knew;
    # the job removes it at its end, saying so (5 folders before this rule, in one run).
    kept = sorted(path.name for path in (storage / "interrupted").glob("checkpoint_e*"))
    assert len(kept) == KEEP_CHECKPOINTS and kept[-1] == f"checkpoint_e{EPOCHS:04d}_s{TOTAL_STEPS:09d}", kept
    removals = [line for line in lines if line.startswith("[train] removed ")]
    removal = re.compile(rf"\[train\] removed \d checkpoint\(s\) left by earlier attempts of this run, beyond "
                         rf"train.keep_checkpoints={KEEP_CHECKPOINTS}: checkpoint_e")
    assert all(removal.match(line) for line in removals), removals
    # The reference: the same training without Ray, uninterrupted (tests/plain_training.py).
    reference = train_without_ray(["experiment=smoke", f"data.root={tiny_dataset}", *TRAINING], tmp_path / "plain")
    interrupted = load_reference_state(storage / "interrupted" / f"checkpoint_e{EPOCHS:04d}_s{TOTAL_STEPS:09d}")[1]
    assert reference.keys() == interrupted.keys()
    for name, value in reference.items():
        torch.testing.assert_close(interrupted[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Registered once, by the invocation that finished (the alias between runs that
    # differ: tests/test_trained_run.py).
    versions = client.search_model_versions("name='faults-model'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    _assert_no_secret(client, run, storage, tmp_path)


def _damaged_copy(tiny_dataset, folder: Path) -> tuple[Path, Path]:
    """A copy of the tiny dataset with its train shard 2 cut in half (a partial upload)."""
    root = folder / "damaged"
    shutil.copytree(tiny_dataset, root, ignore=shutil.ignore_patterns("raw"))
    shard = root / json.loads((root / "meta.json").read_text())["shards"]["train"][2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return root, shard


def test_a_bad_shard_is_named_or_skipped_and_mlflow_gone_for_good_loses_no_point(tiny_dataset, mlflow_outage,
                                                                                 ray_session, tmp_path):
    """Two jobs side by side on the tiny dataset with a damaged train shard (one
    tower each: the shard is met by the reading, whatever the layout):
    - without data.skip_bad_shards, the job stops with an error naming the shard;
    - with data.skip_bad_shards=true, the job trains, saying which shard it skipped,
      and meets a second, independent fault: the MLflow server stopped at step 3, for
      good. The job still ends normally once its end-of-job wait
      (`tracking.close_timeout_s`, here 1 s) is over, says how many points it could not
      send and writes them to the spill file, which `python -m service.tracking.resend`
      delivers (twice: nothing doubles).
    (Two faults in one job: a job start is most of the cost of either proof.)"""
    server, env = mlflow_outage, ray_env(ray_session)
    root, shard = _damaged_copy(tiny_dataset, tmp_path)
    stopping = subprocess.Popen(train_command(str(root), tmp_path / "ckpt", tmp_path / "hydra-1",
                                              "parallel.towers=1", name="stops"),
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        skipping = train_command(
            str(root), tmp_path / "ckpt", tmp_path / "hydra-2", "parallel.towers=1", "data.skip_bad_shards=true",
            "train.epochs=1", "train.batch_size=16", "train.log_every_steps=1", "train.checkpoint_every_steps=2",
            "tracking.system_metrics=false", "tracking.log_model=false", "tracking.close_timeout_s=1",
            tracking_uri=server.url, experiment="outage", name="gone",
        )
        process, lines = run_until(skipping, env, r"epoch 1/1 step 3/")
        try:
            server.stop()
            lines.extend(process.stdout)
            returncode = process.wait(timeout=600)
        finally:
            process.kill()
        out, err = stopping.communicate(timeout=600)
    finally:
        stopping.kill()
    assert stopping.returncode == 1, out[-2000:] + err[-3000:]
    (said,) = [line for line in err.splitlines() if line.startswith("error: training failed:")]
    assert f"bad shard {shard}: " in said and "data.skip_bad_shards=true" in said, said

    output = "".join(lines)
    assert returncode == 0, output[-4000:]
    assert re.search(rf"\[data\] replica 0 tower \d: skipped unreadable train shard {re.escape(str(shard))} ",
                     output), output[-3000:]
    assert "=== run finished ===" in output
    _assert_spilled_and_resent(server, lines, tmp_path / "ckpt" / "gone")


def _assert_spilled_and_resent(server, lines: list[str], run_folder: Path) -> None:
    """MLflow gone for good: the unsent points named on the console, in the spill file, and
    delivered by `python -m service.tracking.resend` once the server is back (twice: nothing doubles)."""
    (said,) = [line for line in lines if "metric points and" in line and "were not sent; written under" in line]
    unsent = int(said.split("[mlflow] ")[1].split()[0])
    (spill_file,) = run_folder.glob("unsent_metrics-*.jsonl")
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
