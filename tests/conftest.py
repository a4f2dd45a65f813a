"""Shared fixtures: one real Ray cluster and one real MLflow server per test
session, both on 127.0.0.1, telemetry off, Ray token auth on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.servers import quiet_env, start_mlflow_server, start_ray_head

pytest_plugins = [p for p in ("tests.fixtures.s3",) if (Path(__file__).parent / "fixtures" / "s3.py").exists()]

# Telemetry off and token auth on for everything this test process starts.
os.environ.update({k: v for k, v in quiet_env().items() if k.startswith(("RAY_", "MLFLOW_", "DO_NOT"))})


@pytest.fixture(scope="session")
def ray_head():
    """A `ray start --head` cluster; the test process joins it as a driver."""
    import ray

    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    head = start_ray_head(folder)
    os.environ["RAY_ADDRESS"] = head.address
    try:
        yield head
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        head.stop()


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This process connected to the shared cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.address, log_to_driver=True)
    return ray_head


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, ray_session):
    """4 generated classes x 40 train / 8 val images at shorter side 72, ingested to shards."""
    from service.data.demo import generate_demo_dataset

    out = tmp_path_factory.mktemp("tiny-data")
    return generate_demo_dataset(str(out), classes=4, images_per_class=40, val_per_class=8, seed=0, image_side=72)
