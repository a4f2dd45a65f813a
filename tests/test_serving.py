"""The registered model serves JPEGs over real HTTP (`mlflow models serve`), and
its preprocessing is exactly the validation pipeline's.

Served: `models:/alexnet@best` of the session's real trained run (6 classes,
so the top-5 cut leaves one out), by `mlflow models serve --env-manager local`
on 127.0.0.1 as `make serve` does (stopped by its process group), and the same
run's checkpoint registered as a 10-crop model. On the validation JPEGs both
err exactly as training's validation of the same weights did."""

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

from service.serving.preprocess import MAX_IMAGE_BYTES, BadImage, preprocess
from tests.model_support import IMAGE_SIZE, RESIZE_SIZE, class_jpegs, class_photo, jpeg, tiny_meta


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


def _val_jpegs(data_root: str) -> tuple[list[bytes], list[int]]:
    """The validation set's JPEGs as stored in its shards (the bytes training validated on), and labels."""
    import pyarrow.parquet as pq

    from service.data.meta import load_meta

    jpegs, labels = [], []
    for shard in load_meta(data_root).shards["val"]:
        table = pq.read_table(Path(data_root) / shard, columns=["jpeg", "label"])
        jpegs += table.column("jpeg").to_pylist()
        labels += table.column("label").to_pylist()
    return jpegs, labels


def _provenance(trained_run, model_uri: str) -> dict:
    import tempfile

    from service.tracking.registry import fetch_model_files

    with tempfile.TemporaryDirectory() as folder:
        card, _state, _model_id = fetch_model_files(model_uri, trained_run.tracking_uri, folder)
    return card.provenance


@pytest.fixture(scope="module")
def model_servers(trained_run, ten_crop_model, tmp_path_factory):
    """The module's two served models, `mlflow models serve` each (what `make serve` runs),
    started side by side: "best", the session's trained run as `models:/alexnet@best`, and
    "ten-crop" (see `ten_crop_model`)."""
    from tests.servers import launch_model_server

    servers = {
        "best": launch_model_server(f"models:/{trained_run.model_name}@best", trained_run.tracking_uri,
                                    tmp_path_factory.mktemp("serving")),
        "ten-crop": launch_model_server(ten_crop_model[0], trained_run.tracking_uri,
                                        tmp_path_factory.mktemp("serving-ten-crop")),
    }
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def model_server(model_servers):
    """`mlflow models serve -m models:/alexnet@best` of the session's trained run."""
    return model_servers["best"]


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


def _served_errors(url: str, jpegs: list[bytes], labels: list[int], wnids: list[str]) -> tuple[float, float, list]:
    """(top-1 error, top-5 error, predictions) of the served model on these JPEGs."""
    status, body, text = _post(url, _records(jpegs))
    assert status == 200, text
    predictions = body["predictions"]
    assert len(predictions) == len(jpegs)
    top1 = sum(p["wnids"][0] != wnids[label] for p, label in zip(predictions, labels)) / len(labels)
    top5 = sum(wnids[label] not in p["wnids"] for p, label in zip(predictions, labels)) / len(labels)
    return top1, top5, predictions


@pytest.mark.integration
def test_served_best_model_cuts_at_top_5_and_errs_exactly_as_its_run_logged(model_server, trained_run):
    """The 36 validation JPEGs of the tiny dataset (6 classes) sent over HTTP: each
    answer is the top 5 of 6, best first; the served top-1/top-5 errors are
    the validation errors training logged at the registered checkpoint's step."""
    import mlflow

    from service.data.meta import load_meta

    meta = load_meta(trained_run.data_root)
    jpegs, labels = _val_jpegs(trained_run.data_root)
    top1, top5, predictions = _served_errors(model_server.url, jpegs, labels, meta.wnids)
    for prediction in predictions:
        assert sorted(prediction) == ["names", "probabilities", "wnids"]
        assert len(set(prediction["wnids"])) == len(prediction["names"]) == len(prediction["probabilities"]) == 5
        assert set(prediction["wnids"]) < set(meta.wnids)  # 6 classes: one left out
        assert prediction["names"] == [meta.names[meta.wnids.index(w)] for w in prediction["wnids"]]
        probabilities = prediction["probabilities"]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) < 1  # the sixth class holds the rest
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    step = _provenance(trained_run, f"models:/{trained_run.model_name}@best")["step"]
    logged = {key: {m.step: m.value for m in client.get_metric_history(trained_run.run_id, key)}
              for key in ("val_top1_error", "val_top5_error")}
    assert (top1, top5) == pytest.approx((logged["val_top1_error"][step], logged["val_top5_error"][step]),
                                         abs=1e-9)
    status, body, text = _post(model_server.url, _records(jpegs[:1], params={"top_k": 1}))
    assert status == 200 and len(body["predictions"][0]["wnids"]) == 1, text


@pytest.mark.integration
@pytest.mark.parametrize(
    "body, message",
    [  # the bad payloads the README lists, then malformed requests
        (_records([b"plain text, not an image"]), "not an image"),
        (_records([b""]), "is empty"),
        (_records([b"\0" * (MAX_IMAGE_BYTES + 1)]), f"more than the {MAX_IMAGE_BYTES} accepted"),
        (_records([_png_claiming(10_000, 10_000)]), "10000x10000 pixels, more than the 40000000 accepted"),
        (_records([jpeg(class_photo(0, 0))[:-1500]]), "cannot be decoded"),
        # MLflow's schema check, before the model's code runs: the column it lacks, the
        # schema it accepts and the column it was sent.
        (json.dumps({"dataframe_records": [{"picture": "AAAA"}]}).encode(),
         "with schema '['image': binary (required)]'. Error: Model is missing inputs ['image']. "
         "Note that there were extra inputs: ['picture']."),
        (json.dumps({"dataframe_records": []}).encode(), "missing inputs ['image']"),
        (b"{not json", "JSON"),
        (_records([jpeg(class_photo(0, 0))], params={"top_k": 0}), "top_k"),
    ],
    ids=["not-an-image", "empty", "over-20MiB", "over-40MP", "truncated", "no-image-column", "no-records",
         "not-json", "top_k-0"],
)
def test_bad_payloads_get_http_400_naming_the_fault(model_server, body, message):
    status, answer, text = _post(model_server.url, body)
    assert status == 400, text[:2000]
    assert message in answer.get("message", ""), text[:2000]
    assert "Traceback" not in text and "stack_trace" not in answer


@pytest.mark.integration
def test_registered_version_carries_weights_for_fine_tuning(trained_run, tmp_path):
    import mlflow
    import torch

    from service.data.meta import load_meta
    from service.model import ReferenceAlexNet
    from service.serving.classifier import CARD_FILE, WEIGHTS_FILE, ModelCard

    mlflow.set_tracking_uri(trained_run.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(f"models:/{trained_run.model_name}@best", dst_path=str(tmp_path))
    files = Path(folder) / "artifacts" / "model_files"
    card = ModelCard.from_dict(json.loads((files / CARD_FILE).read_text()))
    network = ReferenceAlexNet(card.spec)
    network.load_state_dict(torch.load(files / WEIGHTS_FILE, weights_only=True))  # plain PyTorch, strict
    meta = load_meta(trained_run.data_root)
    assert card.wnids == meta.wnids and card.resize_size == meta.resize_size and card.crops == 1
    assert card.provenance["run_id"] == trained_run.run_id
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    version = client.get_model_version_by_alias(trained_run.model_name, "best")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    metrics = {m.key: m.value for m in logged.metrics}
    history = {m.step: m.value for m in client.get_metric_history(trained_run.run_id, "val_top1_error")}
    assert metrics["val_top1_error"] == history[card.provenance["step"]]


@pytest.fixture(scope="module")
def ten_crop_model(trained_run, s3_server, tmp_path_factory):
    """The trained run's last checkpoint, registered by `log_trained_model` as a
    10-crop model (what data.eval_crops=10 registers) in a run of its own:
    (its models:/ URI, the checkpoint folder)."""
    from service.config import TrackingConfig
    from service.data.meta import load_meta
    from service.tracking.mlflow_tracker import finish_run, open_run
    from service.tracking.registry import log_trained_model

    from tests.conftest import download_checkpoint

    checkpoint = tmp_path_factory.mktemp("ten-crop") / "checkpoint"
    download_checkpoint(trained_run.checkpoints[-1], s3_server, checkpoint)
    meta = load_meta(trained_run.data_root)
    tracking = TrackingConfig(uri=trained_run.tracking_uri, experiment="serving", registered_model="ten-crop")
    handle = open_run(tracking, "ten-crop", {"model": {"name": "alexnet_small"}})
    version = log_trained_model(handle, str(checkpoint), meta, tracking, resize_size=meta.resize_size, crops=10)
    finish_run(handle)
    return f"models:/ten-crop/{version}", checkpoint


@pytest.fixture(scope="module")
def ten_crop_server(model_servers, ten_crop_model):
    """The 10-crop model served, and its checkpoint folder."""
    return model_servers["ten-crop"], ten_crop_model[1]


@pytest.mark.integration
def test_a_ten_crop_model_serves_training_s_ten_crop_validation(ten_crop_server, trained_run):
    """Served over HTTP, the 10-crop model errs on the validation JPEGs exactly as
    training's own 10-crop validation of the same weights does."""
    from service.data.meta import load_meta
    from service.model import ReferenceAlexNet
    from service.train.checkpoint import load_reference_state
    from tests.model_support import training_validation

    server, checkpoint = ten_crop_server
    meta = load_meta(trained_run.data_root)
    jpegs, labels = _val_jpegs(trained_run.data_root)
    top1, top5, _ = _served_errors(server.url, jpegs, labels, meta.wnids)
    spec, state = load_reference_state(checkpoint)
    network = ReferenceAlexNet(spec)
    network.load_state_dict(state)
    expected = training_validation(network, meta.mean, meta.std, trained_run.data_root, crops=10,
                                   resize_size=meta.resize_size)
    assert expected["val_images"] == len(jpegs)
    assert (top1, top5) == pytest.approx((expected["val_top1_error"], expected["val_top5_error"]), abs=1e-9)
