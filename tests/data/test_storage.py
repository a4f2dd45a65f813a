"""The storage layer (pyarrow.fs) on a local folder and on a real S3 server."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from service.data import storage


# The s3 case reaches `s3_server` through getfixturevalue, which tests/conftest.py's
# automatic marking (it reads fixturenames) cannot see: it is marked here.
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path), storage.S3Settings()
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.create_bucket()}/some/prefix", server.settings()


def test_storage_helpers_on_both_backends(location, tmp_path_factory):
    root, s3 = location
    storage.write_json(storage.join(root, "a/meta.json"), {"x": 1}, s3)
    storage.write_bytes(storage.join(root, "a/b/c.bin"), b"abc", s3)
    assert storage.read_json(storage.join(root, "a/meta.json"), s3) == {"x": 1}
    assert storage.exists(storage.join(root, "a/b/c.bin"), s3)
    assert not storage.exists(storage.join(root, "a/b/missing"), s3) and not storage.exists(storage.join(root, "a"), s3)
    assert [e.rel for e in storage.list_files(storage.join(root, "a"), s3)] == ["b/c.bin", "meta.json"]
    storage.move_prefix(storage.join(root, "a"), storage.join(root, "z"), s3)
    assert [e.rel for e in storage.list_files(root, s3)] == ["z/b/c.bin", "z/meta.json"]
    fs, path = storage.arrow_filesystem(storage.join(root, "z/b/c.bin"), s3)
    with fs.open_input_file(path) as f:
        assert f.read_at(2, 1) == b"bc"
    local = tmp_path_factory.mktemp("tree")
    (local / "d").mkdir()
    (local / "d" / "e.txt").write_text("e")
    (local / "f.txt").write_text("f")
    assert storage.copy_tree(str(local), storage.join(root, "copy"), s3) == 2
    assert storage.read_bytes(storage.join(root, "copy/d/e.txt"), s3) == b"e"
    storage.delete_file(storage.join(root, "z/meta.json"), s3)
    storage.delete_file(storage.join(root, "z/meta.json"), s3)  # absent: no error
    storage.delete_prefix(storage.join(root, "z"), s3)
    storage.delete_prefix(storage.join(root, "copy"), s3)
    storage.delete_prefix(storage.join(root, "never-written"), s3)
    assert storage.list_files(root, s3) == []


def test_s3_credentials_and_endpoint_come_from_the_environment(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    s3 = storage.S3Settings()
    resolved = s3.resolved()
    assert resolved.endpoint == s3_server.endpoint_url and resolved.secret_key == s3_server.secret_key
    assert s3_server.secret_key not in repr(resolved) and s3_server.access_key not in str(resolved)
    uri = f"s3://{s3_server.create_bucket()}/x.json"
    storage.write_json(uri, [1, 2], s3)
    assert storage.read_json(uri, s3) == [1, 2]


def test_settings_round_trip_through_config_fields(s3_server):
    from service.config import DataConfig

    s3 = s3_server.settings()
    cfg = DataConfig(root="s3://b/x", **s3.as_fields())
    assert storage.S3Settings.from_fields(cfg) == s3


def test_checkpoint_filesystem_for_ray_train(s3_server, tmp_path):
    """What Ray Train does with (storage_path, storage_filesystem): copy a checkpoint folder in, list it."""
    path, fs = storage.checkpoint_filesystem("relative/ckpt", storage.S3Settings())
    assert fs is None and path == os.path.abspath("relative/ckpt")
    assert storage.checkpoint_filesystem("file:///tmp/ckpt", storage.S3Settings()) == ("/tmp/ckpt", None)
    bucket = s3_server.create_bucket()
    path, fs = storage.checkpoint_filesystem(f"s3://{bucket}/runs", s3_server.settings())
    assert path == f"{bucket}/runs" and isinstance(fs, pafs.S3FileSystem)
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    (folder / "tower_0.pt").write_bytes(b"\0" * 1000)
    (folder / "progress.json").write_text("{}")
    pafs.copy_files(str(folder), f"{path}/demo/checkpoint_000001", destination_filesystem=fs)
    assert sorted(e.rel for e in storage.list_files(f"s3://{bucket}/runs/demo", s3_server.settings())) == [
        "checkpoint_000001/progress.json", "checkpoint_000001/tower_0.pt"]
