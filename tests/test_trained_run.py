"""What one real training run leaves behind (the session's `trained_run`:
`python -m service.train experiment=smoke` for 1 epoch, then the same
command with train.epochs=2, checkpoints on S3): the resume from S3
checkpoints, the kept checkpoints, the run's record in MLflow (every logged
step once, conv1 and learning-curve figures, per-node system metrics), the
registered versions and their `best` alias. (Evaluating and serving its
models: tests/test_evaluate.py, tests/test_serving.py.)
"""

from __future__ import annotations

import re

import mlflow
import pytest
import torch

from service.config import TrainConfig
from service.tracking.registry import fetch_model_files
from tests.conftest import checkpoint_progress
from tests.helpers import assert_complete_history

pytestmark = pytest.mark.integration
STEPS_PER_EPOCH, LOG_EVERY = 5, 2  # 162 images at batch 32; smoke's logging
KEEP_CHECKPOINTS = TrainConfig.keep_checkpoints  # the default: the trained run does not set it


def test_checkpoints_on_s3_and_the_resume_from_them(trained_run, s3_server):
    first, second = trained_run.outputs
    assert "resuming from step" not in first
    assert re.search(rf"resuming from step {STEPS_PER_EPOCH}\b", second), second[-3000:]
    assert f"resumed from epoch 1 step {STEPS_PER_EPOCH} ({trained_run.run_folder.removeprefix('s3://')}" in second
    # Checkpoints at steps 2, 4, 5, 6, 8 and 10 (every 2 steps and each epoch's end); the
    # train.keep_checkpoints best by validation error stay in the bucket: the two evaluated ones,
    # the last among them. Those in between were written, then pruned.
    assert len(trained_run.checkpoints) == KEEP_CHECKPOINTS, trained_run.checkpoints
    steps = sorted(checkpoint_progress(uri, s3_server)["step"] for uri in trained_run.checkpoints)
    assert steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_the_run_records_every_step_once_figures_and_node_system_metrics(trained_run):
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    run = client.get_run(trained_run.run_id)
    assert run.info.status == "FINISHED"
    assert_complete_history(client, trained_run.run_id, ["loss", "lr"], 2 * STEPS_PER_EPOCH, every=LOG_EVERY,
                            val_steps=[STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH])
    figures = {a.path for a in client.list_artifacts(trained_run.run_id, "figures")}
    assert figures == {"figures/conv1_epoch001.png", "figures/conv1_epoch002.png", "figures/learning_curves.png"}
    system = [key for key in run.data.metrics if key.startswith("system/")]
    assert system and all(re.match(r"system/node\d+/", key) for key in system), system
    assert any(key.startswith("system/node0/cpu_utilization") for key in system), system


def test_registered_versions_and_the_best_alias(trained_run, tmp_path):
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    versions = client.search_model_versions(f"name='{trained_run.model_name}'")
    assert sorted(v.version for v in versions) == ["1", "2"]  # the best of each part of the run
    assert {v.run_id for v in versions} == {trained_run.run_id}
    errors = {int(v.version): float(v.tags["val_top1_error"]) for v in versions}  # the tag: 6 decimals
    logged = {m.step: m.value for m in client.get_metric_history(trained_run.run_id, "val_top1_error")}
    # What each version holds: the checkpoint it was made from (its card's provenance) and its weights.
    held = {v: fetch_model_files(f"models:/{trained_run.model_name}/{v}", trained_run.tracking_uri,
                                 str(tmp_path / f"v{v}"))[:2] for v in errors}
    steps = {v: card.provenance["step"] for v, (card, _state) in held.items()}
    # Part one registers its only evaluated checkpoint (epoch 1); part two the best of those kept
    # (epochs 1 and 2). Each version's tag is the error logged at the step its weights come from.
    assert steps[1] == STEPS_PER_EPOCH and steps[2] in logged, steps
    assert logged[steps[2]] == min(logged.values()), (steps, logged)
    for version, step in steps.items():
        assert errors[version] == pytest.approx(logged[step], abs=1e-6), (version, step, errors, logged)
    # Versions from different checkpoints are different models (not the same weights twice).
    (_, first), (_, second) = held[1], held[2]
    same = all(torch.equal(first[name], second[name]) for name in first)
    assert same == (steps[1] == steps[2]), steps
    best = client.get_model_version_by_alias(trained_run.model_name, "best")
    lowest = min(errors.values())  # a tie goes to the newer version
    assert int(best.version) == max(v for v, error in errors.items() if error == lowest), errors


def test_the_console_links_the_run_page_and_nothing_else(trained_run):
    """Against a tracking server MLflow would print its own run and experiment
    links at each run end; the experiment's opens the GenAI overview. Each
    part prints the one line of the summary that opens the run page, and says
    which model version it registered without MLflow's own lines."""
    server = trained_run.tracking_uri.rstrip("/")
    for output in trained_run.outputs:
        assert "View experiment at" not in output and "View run" not in output, output[-3000:]
        # MLflow's own registration lines: the summary's "registered <name> v<k>" says it once.
        assert "Successfully registered model" not in output and "Created version" not in output, output[-3000:]
        assert re.search(rf"registered\s+{trained_run.model_name} v\d+", output), output[-3000:]
        links = re.findall(rf"{re.escape(server)}/#/\S*", output)
        assert len(links) == 1, links
        assert re.fullmatch(rf".*/#/experiments/\d+/runs/{trained_run.run_id}\?workflowType=machine_learning",
                            links[0]), links
