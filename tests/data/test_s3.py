"""Object storage: helpers on both back-ends, ingest from and pipeline over a real S3 server."""

from __future__ import annotations

import pytest

from service.config import DataConfig
from service.data import storage
from service.data.pipeline import build_pipeline
from service.data.ingest import IngestConfig, run_ingest
from service.data.meta import load_meta


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path), storage.S3Settings()
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.create_bucket()}/some/prefix", server.settings()


def test_storage_helpers_on_both_backends(location):
    root, s3 = location
    storage.write_json(storage.join(root, "a/meta.json"), {"x": 1}, s3)
    storage.write_bytes(storage.join(root, "a/b/c.bin"), b"abc", s3)
    assert storage.read_json(storage.join(root, "a/meta.json"), s3) == {"x": 1}
    assert storage.exists(storage.join(root, "a/b/c.bin"), s3)
    assert not storage.exists(storage.join(root, "a/b/missing"), s3)
    assert [e.rel for e in storage.list_files(storage.join(root, "a"), s3)] == ["b/c.bin", "meta.json"]
    storage.move_prefix(storage.join(root, "a"), storage.join(root, "z"), s3)
    assert [e.rel for e in storage.list_files(root, s3)] == ["z/b/c.bin", "z/meta.json"]
    fs, path = storage.arrow_filesystem(storage.join(root, "z/b/c.bin"), s3)
    with fs.open_input_file(path) as f:
        assert f.read_at(2, 1) == b"bc"
    storage.delete_file(storage.join(root, "z/meta.json"), s3)
    storage.delete_prefix(storage.join(root, "z"), s3)
    assert storage.list_files(root, s3) == []


def test_s3_credentials_come_from_the_environment(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    s3 = storage.S3Settings(endpoint=s3_server.endpoint_url)
    assert "testing" not in repr(s3.resolved()), "secrets never appear in repr"
    uri = f"s3://{s3_server.create_bucket()}/x.json"
    storage.write_json(uri, [1, 2], s3)
    assert storage.read_json(uri, s3) == [1, 2]


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["kaggle", "ilsvrc-tars"])
def test_ingest_from_s3_and_train_from_s3(ray_local, s3_server, synth_dataset, layout):
    raw, manifest = synth_dataset(layout, bad_inputs=True)
    s3 = s3_server.settings()
    bucket = s3_server.create_bucket()
    uploaded = storage.upload_dir(raw, f"s3://{bucket}/raw", s3)  # through boto3
    assert uploaded >= 3
    dest = f"s3://{bucket}/imagenet"
    report = run_ingest(IngestConfig(source=f"s3://{bucket}/raw", dest=dest, resize_size=40, shard_size=6, s3=s3))
    assert report["counts"]["input"] == manifest["num_inputs"]
    assert report["counts"]["quarantined_by_reason"] == manifest["expected"]["quarantined_by_reason"]
    assert storage.read_json(f"{dest}/ingest_report.json", s3)["status"] == "complete"
    keys = [e.rel for e in storage.list_files(dest, s3)]
    assert not any(k.startswith("_staging") for k in keys) and "meta.json" in keys

    meta = load_meta(dest, s3)
    cfg = DataConfig(root=dest, resize_size=40, s3_endpoint=s3.endpoint, s3_region=s3.region,
                     s3_access_key=s3.access_key, s3_secret_key=s3.secret_key, eval_crops=10)
    data = build_pipeline(cfg, 32, 1)
    assert data.train.count() == meta.num_train
    batch = data.val.take_batch(meta.num_val, batch_format="numpy")
    assert batch["image"].shape == (meta.num_val, 10, 32, 32, 3)
    # Re-running over the same S3 destination is a no-op.
    assert run_ingest(IngestConfig(source=f"s3://{bucket}/raw", dest=dest, resize_size=40, shard_size=6,
                                   s3=s3))["run_id"] == report["run_id"]
