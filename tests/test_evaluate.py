"""`python -m service.evaluate` on what a real training run produced: the
session's `trained_run` (tests/conftest.py: `python -m service.train`,
checkpoints on S3, the best registered as `alexnet@best`), on the session's
Ray cluster and MLflow server.

Centre crop, every val image once: the best checkpoint, evaluated from its S3
folder and as `models:/alexnet@best`, gives exactly the validation figures
its training run logged at that checkpoint's step, and `runs:/<id>/model`
those logged at its own step; 10 crops equal training's own 10-crop
validation of the same weights and count every image once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from service.evaluate import evaluate
from service.evaluation.config import EvaluateConfig, validate_evaluate_config
from service.hydra_app import compose
from service.tracking.mlflow_tracker import UI_MODEL_TRAINING
from service.tracking.registry import fetch_model_files
from tests.conftest import TINY_VAL_IMAGES, checkpoint_progress, download_checkpoint
from tests.helpers import REPO, assert_no_secret
from tests.model_support import training_validation

SECRET = "TOPSECRET-eval-9d1c"
CLASSES = 4  # of the torchvision-weights dataset
# What the evaluation command must not print (Ray 2.60 and MLflow 3.17 do, left alone): MLflow's
# type-hint UserWarning on the pyfunc, Ray's token-authentication WARNING when it starts a
# cluster, Ray Data's dataset logger and streaming executor INFO lines.
CONSOLE_NOISE = ("UserWarning", "Type hint used in the model's predict function",
                 "Add type hints to the `predict` method", "Token authentication is", "Registered dataset logger",
                 "Starting execution of Dataset", "Execution plan of Dataset")


def _config(overrides: list[str]) -> EvaluateConfig:
    return compose(overrides, "evaluate", EvaluateConfig, validate_evaluate_config)


def _logged(trained_run, key: str) -> dict[int, float]:
    """{step: value} of a metric the trained run logged."""
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(trained_run.run_id, key)}


def _card(trained_run, model_uri: str, folder: Path):
    """The model card (spec, geometry, provenance: run, epoch, step) of a logged model."""
    card, _state, _model_id = fetch_model_files(model_uri, trained_run.tracking_uri, str(folder))
    return card


def test_best_checkpoint_from_s3_and_as_registered_model_give_what_its_run_logged(trained_run, s3_server,
                                                                                 tmp_path):
    step = _card(trained_run, "models:/alexnet@best", tmp_path).provenance["step"]
    (folder,) = [uri for uri in trained_run.checkpoints if checkpoint_progress(uri, s3_server)["step"] == step]
    common = [f"data.root={trained_run.data_root}", f"tracking.uri={trained_run.tracking_uri}",
              "tracking.experiment=evaluate", "eval.actors=2", "eval.batch_size=5"]
    from_checkpoint = evaluate(_config([f"model_uri={folder}", *trained_run.s3_overrides, *common]))
    from_registry = evaluate(_config(["model_uri=models:/alexnet@best", *common]))

    for key in ("images", "top1_error", "top5_error", "loss", "confused_pairs"):
        assert from_checkpoint[key] == from_registry[key], key
    assert np.array_equal(from_checkpoint["per_class_accuracy"], from_registry["per_class_accuracy"], equal_nan=True)
    assert from_registry["images"] == TINY_VAL_IMAGES
    assert from_registry["top1_error"] == _logged(trained_run, "val_top1_error")[step]
    assert from_registry["top5_error"] == _logged(trained_run, "val_top5_error")[step]
    assert from_registry["loss"] == pytest.approx(_logged(trained_run, "val_loss")[step], rel=1e-5)

    # The models:/ evaluation is attached to the LoggedModel, with its dataset.
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    model_id = from_registry["model_id"]
    assert model_id and model_id.startswith("m-")
    logged = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert logged["eval_top1_error"].value == from_registry["top1_error"]
    assert logged["eval_top1_error"].dataset_digest
    run = client.get_run(from_registry["mlflow_run_id"])
    assert run.data.tags["alexnet.evaluated_model_id"] == model_id
    assert run.data.tags["alexnet.evaluated_run_id"] == trained_run.run_id
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == logged["eval_top1_error"].dataset_digest
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/per_class_and_confusions.png", "evaluation/per_class_accuracy.csv",
                         "evaluation/report.txt"}


def test_ten_crops_equal_trainings_ten_crop_validation_and_count_every_image_once(trained_run, tmp_path):
    from service.data.meta import load_meta
    from service.evaluation.model_source import load_model_to_evaluate
    from service.model import ReferenceAlexNet

    model_uri = "models:/alexnet@best"
    model = load_model_to_evaluate(_config([f"model_uri={model_uri}", f"data.root={trained_run.data_root}"]),
                                   trained_run.tracking_uri, tmp_path)
    network = ReferenceAlexNet(model.spec)
    network.load_state_dict(model.state)
    meta = load_meta(trained_run.data_root)
    result = evaluate(_config([f"model_uri={model_uri}", f"data.root={trained_run.data_root}", "eval.crops=10",
                               "eval.actors=1", "eval.batch_size=4", f"tracking.uri={trained_run.tracking_uri}",
                               "tracking.enabled=false"]))
    expected = training_validation(network, model.mean or meta.mean, model.std or meta.std, trained_run.data_root,
                                    crops=10, resize_size=model.resize_size)
    assert result["images"] == expected["val_images"] == TINY_VAL_IMAGES
    assert result["top1_error"] == pytest.approx(expected["val_top1_error"], abs=1e-12)
    assert result["top5_error"] == pytest.approx(expected["val_top5_error"], abs=1e-12)
    assert result["loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


def test_command_line_on_the_runs_model_prints_the_summary_logs_what_training_logged_and_no_secret(
    trained_run, tmp_path
):
    """`runs:/<id>/model`: the run's last logged model (part two's best), evaluated by
    the command a user types; its MLflow evaluation holds the figures training
    logged at that model's step."""
    model_uri = f"runs:/{trained_run.run_id}/model"
    step = _card(trained_run, model_uri, tmp_path).provenance["step"]
    command = [sys.executable, "-m", "service.evaluate", f"model_uri={model_uri}",
               f"data.root={trained_run.data_root}", f"tracking.uri={trained_run.tracking_uri}",
               "tracking.experiment=evaluate-cli", "eval.actors=1", f"data.s3_secret_key={SECRET}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    error = _logged(trained_run, "val_top1_error")[step]
    printed = {line.split(" error ")[0]: float(line.split(" error ")[1].rstrip("%")) for line in lines
               if re.fullmatch(r"top-[15] error [0-9.]+%", line)}
    assert printed["top-1"] == pytest.approx(100 * error, abs=5e-3), result.stdout
    assert printed["top-5"] == pytest.approx(100 * _logged(trained_run, "val_top5_error")[step], abs=5e-3)
    assert "most confused pairs" in result.stdout and "images/s" in result.stdout
    assert f"[eval] {TINY_VAL_IMAGES}/{TINY_VAL_IMAGES} images (100%)" in result.stdout  # progress
    console = result.stdout + result.stderr
    for noise in CONSOLE_NOISE:
        assert noise not in console, f"{noise!r} printed:\n{console[-5000:]}"
    assert_no_secret(SECRET, texts=[result.stdout, result.stderr])
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluate-cli").experiment_id])
    assert run.data.metrics["eval_top1_error"] == error
    assert run.data.metrics["eval_top5_error"] == _logged(trained_run, "val_top5_error")[step]
    assert run.data.tags["alexnet.evaluated_run_id"] == trained_run.run_id
    assert run.data.params["data.s3_secret_key"] == "***"
    assert "data.s3_secret_key=***" in run.data.tags["alexnet.command"]
    link = f"{trained_run.tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert f"  open {link}{UI_MODEL_TRAINING}" in lines, result.stdout  # the run link, in the UI's model-training mode
    assert_no_secret(SECRET, texts=list(run.data.params.values()) + list(run.data.tags.values()))


def test_torchvision_weights_evaluate_as_documented(tmp_path, ray_session):
    """`model=alexnet_owt weights=<torchvision .pth>`: 224 crops, torchvision's ImageNet normalisation."""
    from service.data.demo import generate_demo_dataset
    from service.model import ReferenceAlexNet
    from service.model.torchvision_weights import IMAGENET_MEAN_255, IMAGENET_STD_255, to_torchvision, torchvision_spec

    root = generate_demo_dataset(str(tmp_path / "data"), classes=CLASSES, images_per_class=2, val_per_class=3,
                                 seed=5, image_side=256)
    torch.manual_seed(1)
    network = ReferenceAlexNet(torchvision_spec(num_classes=CLASSES)).eval()
    weights = tmp_path / "alexnet-torchvision-layout.pth"
    torch.save(to_torchvision(network.state_dict()), weights)  # the layout of torchvision's published file
    result = evaluate(_config(["model=alexnet_owt", f"weights={weights}", f"data.root={root}", "eval.actors=1",
                               "tracking.enabled=false"]))
    expected = training_validation(network, IMAGENET_MEAN_255, IMAGENET_STD_255, str(root), crops=1, resize_size=256)
    assert result["images"] == expected["val_images"] == CLASSES * 3
    assert result["top1_error"] == pytest.approx(expected["val_top1_error"], abs=1e-12)
    assert result["loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.root=/x"], "give exactly one of model_uri"),
        (["weights=/x.pth", "data.root=/x"], "add model=alexnet_owt"),
        (["model_uri=/x", "data.root=/x", "eval.crops=5"], "eval.crops=5 is not allowed; choose one of [1, 10]"),
        (["model_uri=/x", "data.root=/x", "eval.actors=-1"], "eval.actors=-1 must be >= 0"),
        (["model_uri=/x"], "data.root is empty"),
    ],
)
def test_bad_arguments_name_the_key(overrides, message):
    from service.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(overrides)


@pytest.mark.parametrize(
    "overrides, status, message",
    [
        (["model_uri=/x", "data.root=/x", "eval.crops=5"], 2, "configuration error: eval.crops=5 is not allowed"),
        (["model_uri=/no/such/checkpoint", "data.root=/no/such/data", "tracking.enabled=false"], 1,
         "error: /no/such/data/meta.json not found"),
    ],
)
def test_command_line_errors_are_one_line(overrides, status, message):
    result = subprocess.run([sys.executable, "-m", "service.evaluate", *overrides], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == status
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(message), result.stderr


def test_checkpoint_folder_on_s3_loads_like_a_local_copy(trained_run, s3_server, tmp_path):
    from service.evaluation.model_source import load_model_to_evaluate

    uri = trained_run.checkpoints[-1]
    folder = tmp_path / "local-copy"
    download_checkpoint(uri, s3_server, folder)
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    s3_keys = [*trained_run.s3_overrides, "data.root=/unused"]
    remote = load_model_to_evaluate(_config([f"model_uri={uri}", *s3_keys]), "sqlite:///unused.db", tmp_path / "work")
    local = load_model_to_evaluate(_config([f"model_uri={folder}", "data.root=/unused"]), "sqlite:///unused.db",
                                   tmp_path / "work-local")
    assert remote.spec == local.spec and remote.state.keys() == local.state.keys()
    assert all(torch.equal(remote.state[k], local.state[k]) for k in local.state)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_model_to_evaluate(_config([f"model_uri=s3://{bucket}/runs/absent", *s3_keys]), "sqlite:///unused.db",
                               tmp_path / "work-absent")
