"""`python -m service.evaluate` on a real Ray cluster, with a real MLflow server.

A two-tower AlexNet trained for a few steps on generated, ingested shards is
evaluated from its checkpoint folder and from `models:/...@best`: the numbers
must be identical, equal to what training's own validation computes for the
same weights, and 10-crop evaluation must count every image exactly once.
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

from service.config import TrackingConfig
from service.evaluate import evaluate
from service.evaluation.config import EvaluateConfig, validate_evaluate_config
from service.hydra_app import compose

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
REGISTERED = "eval-alexnet"
SECRET = "TOPSECRET-eval-9d1c"
CLASSES, VAL_PER_CLASS, RESIZE_SIZE, IMAGE_SIZE = 4, 6, 72, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_session):
    from service.data.demo import generate_demo_dataset

    return generate_demo_dataset(str(tmp_path_factory.mktemp("eval-data")), classes=CLASSES, images_per_class=12,
                                 val_per_class=VAL_PER_CLASS, seed=3, image_side=RESIZE_SIZE)


def _validation_batches(root: str, crops: int, resize_size: int = RESIZE_SIZE, image_size: int = IMAGE_SIZE,
                        batch_size: int = 7):
    """The validation set as training's loop sees it: uint8 batches from the pipeline."""
    from dataclasses import replace

    from service.config import DataConfig
    from service.evaluation.inference import validation_dataset

    data_cfg = replace(DataConfig(), root=root, resize_size=resize_size, eval_crops=crops, decode_concurrency=2)
    meta, val = validation_dataset(data_cfg, image_size)
    images = val.select_columns(["image", "label"])
    return meta, list(images.iter_torch_batches(batch_size=batch_size, drop_last=False))


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    """A two-tower checkpoint folder (tower shards + progress.json) after a few SGD steps."""
    from service.model import ReferenceAlexNet, alexnet_spec
    from service.parallel.sharding import reference_to_tower
    from service.train import checkpoint as ckpt
    from service.train.step import Normalizer

    meta, batches = _validation_batches(dataset, crops=1)  # a few labelled batches to take steps on
    spec = alexnet_spec(num_classes=CLASSES, image_size=IMAGE_SIZE, towers=2, width_mult=0.25, init="kaiming")
    torch.manual_seed(0)
    network = ReferenceAlexNet(spec)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    normalizer = Normalizer(meta.mean, meta.std, torch.device("cpu"), channels_last=False)
    for batch in batches[:2] * 3:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(normalizer(batch["image"])), batch["label"]).backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("eval-ckpt") / "checkpoint_000001"
    folder.mkdir()
    state = network.state_dict()
    shards = [ckpt.write_tower_shard(folder, tower, {"model": reference_to_tower(state, spec, tower)})
              for tower in range(2)]
    ckpt.write_progress(folder, {"epoch": 1, "step": 6, "replicas": 1, "towers": 2, "spec": ckpt.spec_to_dict(spec),
                                 "metrics": {}, "mlflow_run_id": None, "shards": shards})
    return folder, network.eval(), meta


def _config(overrides: list[str]) -> EvaluateConfig:
    return compose(overrides, "evaluate", EvaluateConfig, validate_evaluate_config)


def _training_validation(network, meta, root: str, crops: int) -> dict:
    """What `run_training` logs as val_* for these weights."""
    from service.parallel.groups import single_process_groups
    from service.parallel.layout import ParallelLayout
    from service.train.step import Normalizer
    from service.train.step import evaluate as training_evaluate

    _, batches = _validation_batches(root, crops)
    normalizer = Normalizer(meta.mean, meta.std, torch.device("cpu"), channels_last=False)
    return training_evaluate(network, batches, normalizer, single_process_groups(ParallelLayout(1, 1)))


def test_checkpoint_and_registered_model_give_the_same_numbers_as_training_validation(
    dataset, checkpoint, mlflow_server, ray_session
):
    from service.tracking.mlflow_tracker import finish_run, open_run
    from service.tracking.registry import log_trained_model

    folder, network, meta = checkpoint
    tracking = TrackingConfig(uri=mlflow_server.url, experiment="evaluate", registered_model=REGISTERED)
    handle = open_run(tracking, "eval-source", {"model": {"name": "alexnet_small"}})
    log_trained_model(handle, str(folder), meta, tracking, {"val_top1_error": 0.5}, resize_size=RESIZE_SIZE)
    finish_run(handle)
    common = [f"data.root={dataset}", f"tracking.uri={mlflow_server.url}", "tracking.experiment=evaluate",
              "eval.actors=2", "eval.batch_size=5"]
    from_checkpoint = evaluate(_config([f"model_uri={folder}", *common]))
    from_registry = evaluate(_config([f"model_uri=models:/{REGISTERED}@best", *common]))

    for key in ("images", "top1_error", "top5_error", "loss", "confused_pairs"):
        assert from_checkpoint[key] == from_registry[key], key
    assert np.array_equal(from_checkpoint["per_class_accuracy"], from_registry["per_class_accuracy"], equal_nan=True)
    expected = _training_validation(network, meta, dataset, crops=1)
    assert from_checkpoint["images"] == expected["val_images"] == CLASSES * VAL_PER_CLASS
    assert from_checkpoint["top1_error"] == pytest.approx(expected["val_top1_error"], abs=1e-12)
    assert from_checkpoint["top5_error"] == pytest.approx(expected["val_top5_error"], abs=1e-12)
    assert from_checkpoint["loss"] == pytest.approx(expected["val_loss"], rel=1e-5)

    # The models:/ evaluation is attached to the LoggedModel, with its dataset.
    client = mlflow.MlflowClient(mlflow_server.url)
    model_id = from_registry["model_id"]
    assert model_id and model_id.startswith("m-")
    logged = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert logged["eval_top1_error"].value == pytest.approx(from_registry["top1_error"])
    assert logged["eval_top1_error"].dataset_digest
    run = client.get_run(from_registry["mlflow_run_id"])
    assert run.data.tags["alexnet.evaluated_model_id"] == model_id
    assert run.data.tags["alexnet.evaluated_run_id"] == handle.run_id
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == logged["eval_top1_error"].dataset_digest
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/per_class_and_confusions.png", "evaluation/per_class_accuracy.csv",
                         "evaluation/report.txt"}


def test_ten_crop_counts_every_image_once(dataset, checkpoint, ray_session):
    folder, network, meta = checkpoint
    result = evaluate(_config([f"model_uri={folder}", f"data.root={dataset}", "eval.crops=10", "eval.actors=1",
                               "eval.batch_size=4", "tracking.enabled=false"]))
    expected = _training_validation(network, meta, dataset, crops=10)
    assert result["images"] == expected["val_images"] == CLASSES * VAL_PER_CLASS
    assert result["top1_error"] == pytest.approx(expected["val_top1_error"], abs=1e-12)
    assert result["top5_error"] == pytest.approx(expected["val_top5_error"], abs=1e-12)


def test_command_line_prints_the_summary_and_keeps_secrets_out(dataset, checkpoint, mlflow_server, ray_session):
    folder, _, _ = checkpoint
    command = [sys.executable, "-m", "service.evaluate", f"model_uri={folder}", f"data.root={dataset}",
               f"tracking.uri={mlflow_server.url}", "tracking.experiment=evaluate-cli", "eval.actors=1",
               f"data.s3_secret_key={SECRET}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("top-1 error ") and line.endswith("%") for line in lines), result.stdout
    assert any(line.startswith("top-5 error ") and line.endswith("%") for line in lines)
    assert "most confused pairs" in result.stdout and "images/s" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    client = mlflow.MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluate-cli").experiment_id])
    assert run.data.params["data.s3_secret_key"] == "***"
    assert "data.s3_secret_key=***" in run.data.tags["alexnet.command"]
    texts = list(run.data.params.values()) + list(run.data.tags.values())
    assert not any(SECRET in text for text in texts)


def test_torchvision_weights_evaluate_as_documented(tmp_path, ray_session):
    """`model=alexnet_owt weights=<torchvision .pth>`: 224 crops, torchvision's ImageNet normalisation."""
    from service.data.demo import generate_demo_dataset
    from service.model import ReferenceAlexNet
    from service.model.torchvision_weights import IMAGENET_MEAN_255, IMAGENET_STD_255, to_torchvision, torchvision_spec
    from service.parallel.groups import single_process_groups
    from service.parallel.layout import ParallelLayout
    from service.train.step import Normalizer
    from service.train.step import evaluate as training_evaluate

    root = generate_demo_dataset(str(tmp_path / "data"), classes=CLASSES, images_per_class=2, val_per_class=3,
                                 seed=5, image_side=256)
    torch.manual_seed(1)
    network = ReferenceAlexNet(torchvision_spec(num_classes=CLASSES)).eval()
    weights = tmp_path / "alexnet-torchvision-layout.pth"
    torch.save(to_torchvision(network.state_dict()), weights)  # the layout of torchvision's published file
    result = evaluate(_config(["model=alexnet_owt", f"weights={weights}", f"data.root={root}", "eval.actors=1",
                               "tracking.enabled=false"]))
    _, batches = _validation_batches(root, crops=1, resize_size=256, image_size=224)
    normalizer = Normalizer(IMAGENET_MEAN_255, IMAGENET_STD_255, torch.device("cpu"), channels_last=False)
    expected = training_evaluate(network, batches, normalizer, single_process_groups(ParallelLayout(1, 1)))
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


def test_checkpoint_folder_on_s3_loads_like_the_local_one(s3_server, tmp_path):
    from service.evaluation.model_source import load_model_to_evaluate
    from tests.model_support import train_checkpoint

    folder = tmp_path / "checkpoint_000001"
    train_checkpoint(folder, steps=1)
    bucket = s3_server.create_bucket()
    for path in folder.iterdir():
        s3_server.client().upload_file(str(path), bucket, f"runs/r1/checkpoint_000001/{path.name}")
    s3_keys = [f"data.s3_endpoint={s3_server.endpoint_url}", f"data.s3_access_key={s3_server.access_key}",
               f"data.s3_secret_key={s3_server.secret_key}", "data.root=/unused"]
    remote = load_model_to_evaluate(_config([f"model_uri=s3://{bucket}/runs/r1/checkpoint_000001", *s3_keys]),
                                    "sqlite:///unused.db", tmp_path / "work")
    local = load_model_to_evaluate(_config([f"model_uri={folder}", "data.root=/unused"]), "sqlite:///unused.db",
                                   tmp_path / "work-local")
    assert remote.spec == local.spec and remote.state.keys() == local.state.keys()
    assert all(torch.equal(remote.state[k], local.state[k]) for k in local.state)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_model_to_evaluate(_config([f"model_uri=s3://{bucket}/runs/absent", *s3_keys]), "sqlite:///unused.db",
                               tmp_path / "work-absent")
