"""The registered model serves JPEGs over real HTTP (`mlflow models serve`), and
its preprocessing is exactly the validation pipeline's.

A tiny AlexNet learns three colour classes from JPEGs the test writes, is
logged and registered by `log_trained_model` into a real `mlflow server`,
and served by `mlflow models serve -m models:/<name>@best --env-manager local`
on 127.0.0.1 (stopped by its process group)."""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import TrackingConfig
from service.serving.preprocess import MAX_IMAGE_BYTES, BadImage, preprocess
from tests.model_support import (
    IMAGE_SIZE, NAMES, RESIZE_SIZE, WNIDS, class_jpegs, class_photo, jpeg, tiny_meta, train_checkpoint,
)

MODEL_NAME = "serving-alexnet"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


# ----------------------------------------------------------------------------- preprocessing, no server


def test_preprocessing_equals_the_validation_pipeline():
    from service.data.decode import eval_image
    from service.data.epochs import DataSource

    jpegs, _ = class_jpegs(2)
    for crops in (1, 10):
        source = DataSource(root="", s3=None, meta=tiny_meta(), image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE,
                            augmentation="paper", hflip=True, pca_lighting_std=0.0, eval_crops=crops, seed=0,
                            skip_bad_shards=False)
        expected = np.stack([eval_image(source, data) for data in jpegs])
        served = preprocess(jpegs, RESIZE_SIZE, IMAGE_SIZE, crops)
        assert np.array_equal(served.reshape(expected.shape), expected)


def test_uint8_arrays_and_other_formats_are_accepted():
    photo = class_photo(1, seed=3)
    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    from_array, from_png = preprocess([photo, png.getvalue()], RESIZE_SIZE, IMAGE_SIZE, 1)
    assert from_array.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(from_array, from_png)  # lossless PNG of the same pixels


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "is empty"),
        (b"plain text, not an image", "not an image"),
        (b"\0" * (MAX_IMAGE_BYTES + 1), "more than the"),
        (_png_claiming(10_000, 10_000), "10000x10000 pixels"),
        (_png_claiming(100_000, 100_000), "more than 40000000 pixels"),
        (jpeg(class_photo(0, 0))[:-1500], "cannot be decoded"),  # truncated
        (np.zeros((4, 4), np.float32), "float32 array"),
        (np.zeros((4, 4, 4), np.uint8), "shape"),
    ],
)
def test_bad_images_are_named(payload, message):
    good = jpeg(class_photo(0, 1))
    with pytest.raises(BadImage, match=message) as raised:
        preprocess([good, payload], RESIZE_SIZE, IMAGE_SIZE, 1)
    assert str(raised.value).startswith("image 1 ")


# ----------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def model_server(mlflow_server, tmp_path_factory):
    from service.tracking.mlflow_tracker import finish_run, open_run
    from service.tracking.registry import log_trained_model
    from service.tracking.worker_tracker import WorkerTracker
    from tests.servers import start_model_server

    folder = tmp_path_factory.mktemp("serving")
    metrics = train_checkpoint(folder / "checkpoint")
    tracking = TrackingConfig(uri=mlflow_server.url, experiment="serving", registered_model=MODEL_NAME)
    handle = open_run(tracking, "serving-run", {"model": {"name": "alexnet_small"}})
    tracker = WorkerTracker(handle, system_metrics=False)
    tracker.add(metrics, step=40, epoch=1)
    tracker.flush()
    assert tracker.close().unsent_points == 0
    version = log_trained_model(handle, str(folder / "checkpoint"), tiny_meta(), tracking, resize_size=RESIZE_SIZE)
    finish_run(handle)
    server = start_model_server(f"models:/{MODEL_NAME}@best", mlflow_server.url, folder)
    try:
        yield server, version, handle
    finally:
        server.stop()


def _post(url: str, body: bytes) -> tuple[int, dict, str]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            return response.status, json.loads(text), text
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            return error.code, json.loads(text), text
        except json.JSONDecodeError:
            return error.code, {}, text


def _records(images: list[bytes], **extra) -> bytes:
    records = [{"image": base64.b64encode(image).decode()} for image in images]
    return json.dumps({"dataframe_records": records, **extra}).encode()


@pytest.mark.integration
def test_served_model_ranks_the_learned_class_first_on_its_training_jpegs(model_server):
    server, version, _ = model_server
    assert version == "1"
    images, labels = class_jpegs(4)  # among the images it was trained on
    status, body, text = _post(server.url, _records(images))
    assert status == 200, text
    predictions = body["predictions"]
    assert len(predictions) == len(images)
    for prediction, label in zip(predictions, labels):
        assert sorted(prediction) == ["names", "probabilities", "wnids"]
        assert len(prediction["wnids"]) == len(prediction["names"]) == len(prediction["probabilities"]) == 3
        assert sorted(prediction["wnids"]) == WNIDS  # 3 classes: the top 5 is all of them
        assert prediction["names"] == [NAMES[WNIDS.index(w)] for w in prediction["wnids"]]
        probabilities = prediction["probabilities"]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert prediction["wnids"][0] == WNIDS[label]
    status, body, text = _post(server.url, _records(images[:1], params={"top_k": 1}))
    assert status == 200 and len(body["predictions"][0]["wnids"]) == 1, text


@pytest.mark.integration
@pytest.mark.parametrize(
    "body, message",
    [
        (_records([b"plain text, not an image"]), "not an image"),
        (_records([b""]), "is empty"),
        (_records([_png_claiming(10_000, 10_000)]), "10000x10000 pixels"),
        (json.dumps({"dataframe_records": []}).encode(), "missing inputs ['image']"),
        (json.dumps({"dataframe_records": [{"picture": "AAAA"}]}).encode(), "image"),
        (b"{not json", "JSON"),
        (_records([jpeg(class_photo(0, 0))], params={"top_k": 0}), "top_k"),
    ],
)
def test_bad_payloads_get_a_4xx_with_a_clear_message(model_server, body, message):
    server, _, _ = model_server
    status, answer, text = _post(server.url, body)
    assert 400 <= status < 500, text
    assert message in answer.get("message", ""), text
    assert "Traceback" not in text and "stack_trace" not in answer


@pytest.mark.integration
def test_registered_version_carries_weights_for_fine_tuning(model_server, tmp_path):
    import mlflow
    import torch

    from service.model import ReferenceAlexNet
    from service.serving.classifier import CARD_FILE, WEIGHTS_FILE, ModelCard

    server, version, handle = model_server
    mlflow.set_tracking_uri(handle.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@best", dst_path=str(tmp_path))
    files = Path(folder) / "artifacts" / "model_files"
    card = ModelCard.from_dict(json.loads((files / CARD_FILE).read_text()))
    network = ReferenceAlexNet(card.spec)
    network.load_state_dict(torch.load(files / WEIGHTS_FILE, weights_only=True))  # plain PyTorch, strict
    assert card.wnids == WNIDS and card.resize_size == RESIZE_SIZE and card.provenance["run_id"] == handle.run_id
    client = mlflow.MlflowClient(handle.tracking_uri)
    model_id = client.get_model_version(MODEL_NAME, version).source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert {m.key for m in logged.metrics} >= {"val_top1_error", "val_top5_error"}
    history = client.get_metric_history(handle.run_id, "val_top1_error")
    assert [m.step for m in history] == [40]  # linking the metrics to the model added no second point
