"""Session fixtures, shared by every test file a pytest process runs: one real
Ray cluster, one real MLflow server (restartable: the outage tests stop and
start it), one S3 server, one tiny ingested dataset and one real trained smoke
run, all on 127.0.0.1 with telemetry off and Ray token auth on. `make test`
runs two pytest-xdist workers, each with its own set for its group of server
tests (`SERVER_GROUPS` below); `make test TEST_WORKERS=0` runs one process."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass

import pytest

from tests.helpers import REPO, ray_env, train_command
from tests.servers import quiet_env, start_mlflow_server, start_ray_head

pytest_plugins = ["tests.fixtures.s3"]

# Telemetry off and token auth on for everything this test process starts.
os.environ.update({k: v for k, v in quiet_env().items() if k.startswith(("RAY_", "MLFLOW_", "DO_NOT"))})

# The tiny dataset: more than 5 classes, so a served top-5 leaves classes out;
# 162 train images in 5 shards (a bad one can be skipped), 36 val images.
TINY_CLASSES, TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS, TINY_SHARD_SIZE = 6, 27, 6, 40
TINY_VAL_IMAGES = TINY_CLASSES * TINY_VAL_PER_CLASS


# A test that uses any of these (directly or through another fixture) needs real servers.
SERVER_FIXTURES = {"ray_head", "ray_session", "ray_local", "mlflow_server", "mlflow_outage", "s3_server",
                   "s3_fault_proxy", "tiny_dataset", "trained_run", "two_nodes", "postgres_mlflow", "model_server"}


# `make test` runs two pytest-xdist workers (-n 2). Each module with server tests belongs to
# one of two groups, and a group runs whole in one worker, which starts the session fixtures
# above for itself: two Ray clusters, two MLflow and S3 servers, side by side. A serial run
# kept the two cores 75% busy (waits on servers and restarts, one-threaded start-ups); the
# other group's jobs fill those gaps (92% busy). The groups are balanced by
# their serial times on the 2-core CI machine (~300 s each): the session's trained run, every
# module that uses it and the `ray job submit` and sweep tests in "trained"; the fault,
# placement, data and tracking tests in "jobs". Every other module is a unit of its own (its
# module fixtures built once), dealt to whichever worker is free.
SERVER_GROUPS = {
    "trained": {"test_evaluate.py", "test_serving.py", "test_trained_run.py", "test_model_from_code.py",
                "test_run_record.py", "test_service_integration.py"},
    "jobs": {"test_faults.py", "test_placement.py", "test_tracking_faults.py", "test_tracking_load.py",
             "data/test_ingest.py", "data/test_pipeline.py", "data/test_s3_faults.py", "data/test_storage.py",
             "data/test_edges.py"},
}
GROUP_OF_MODULE = {f"tests/{module}": group for group, modules in SERVER_GROUPS.items() for module in modules}


def pytest_collection_modifyitems(items):
    """Mark every test that reaches a server fixture `integration`, so `make test-fast`
    (-m "not integration and not slow") selects exactly the tests without Ray or servers.
    A server test outside `SERVER_GROUPS` is refused: under xdist it would start a
    third set of servers in whichever worker it landed on."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
            module = item.nodeid.split("::", 1)[0]
            if module not in GROUP_OF_MODULE:
                raise pytest.UsageError(f"{module} has server tests ({item.name}) but is in no group of "
                                        "SERVER_GROUPS in tests/conftest.py: add it to one")


def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by scope, where the scope of a test is its module's server group
    (`SERVER_GROUPS`), else its module. (xdist's own `--dist loadgroup` does not group
    under pytest 9: it renames `item._nodeid`, which pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ServerGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return GROUP_OF_MODULE.get(module, module)

    return ServerGroupScheduling(config, log)


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
    """The session's `mlflow server` (sqlite store); see `mlflow_outage` to stop it."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_outage(mlflow_server):
    """The session's MLflow server for a test that stops it (`.stop()`, `.start()`):
    running again, on the same address and store, when the test ends."""
    yield mlflow_server
    if not mlflow_server.running:
        mlflow_server.start()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, ray_session):
    """6 generated classes x 27 train / 6 val images at shorter side 72, ingested to shards of 40."""
    from service.data.demo import generate_demo_dataset

    out = tmp_path_factory.mktemp("tiny-data")
    return generate_demo_dataset(str(out), classes=TINY_CLASSES, images_per_class=TINY_TRAIN_PER_CLASS,
                                 val_per_class=TINY_VAL_PER_CLASS, seed=0, image_side=72,
                                 shard_size=TINY_SHARD_SIZE, log=lambda message: None)


@dataclass(frozen=True)
class TrainedRun:
    """The session's trained run: `python -m service.train experiment=smoke` on
    the tiny dataset for 1 epoch, then the same command with train.epochs=2,
    which resumes from the first part's checkpoint. Checkpoints on S3 (the
    session's moto server), tracked in the session's MLflow server, the best
    registered as `alexnet` with alias `best`."""

    run_id: str
    tracking_uri: str
    model_name: str
    data_root: str
    storage: str  # s3://<bucket>/runs; the run's checkpoints are under <storage>/smoke/
    s3_overrides: tuple  # data.s3_* keys reaching the S3 server
    outputs: tuple  # the console (stdout + stderr) of each part
    checkpoints: tuple  # s3:// URIs of the checkpoint folders left in storage, oldest first

    @property
    def run_folder(self) -> str:
        return f"{self.storage}/smoke"


@pytest.fixture(scope="session")
def trained_run(tiny_dataset, mlflow_server, ray_session, s3_server, tmp_path_factory) -> TrainedRun:
    import mlflow

    from service.data import storage as storage_module
    from service.tracking.mlflow_tracker import RUN_NAME_TAG

    bucket = s3_server.create_bucket()
    storage = f"s3://{bucket}/runs"
    s3 = (f"data.s3_endpoint={s3_server.endpoint_url}", f"data.s3_access_key={s3_server.access_key}",
          f"data.s3_secret_key={s3_server.secret_key}")
    hydra = tmp_path_factory.mktemp("trained-run")
    outputs = []
    for epochs in (1, 2):
        # A checkpoint every 2 steps besides each epoch end's: 6 in all, of which the
        # train.keep_checkpoints=2 best by validation error stay (tests/test_trained_run.py).
        command = train_command(tiny_dataset, storage, hydra, *s3, f"train.epochs={epochs}",
                                "train.checkpoint_every_steps=2",
                                "tracking.registered_model=alexnet", tracking_uri=mlflow_server.url,
                                experiment="trained", name="smoke")
        result = subprocess.run(command, cwd=REPO, env=ray_env(ray_session), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    client = mlflow.MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("trained")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'smoke'")
    files = storage_module.list_files(f"{storage}/smoke", s3_server.settings())
    checkpoints = sorted({f"{storage}/smoke/{entry.rel.split('/')[0]}" for entry in files
                          if entry.rel.endswith("/progress.json")})
    return TrainedRun(run.info.run_id, mlflow_server.url, "alexnet", tiny_dataset, storage, s3, tuple(outputs),
                      tuple(checkpoints))


def download_checkpoint(uri: str, s3_server, folder) -> None:
    """Copy the files of the s3:// checkpoint folder `uri` into the local `folder`."""
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    client = s3_server.client()
    folder.mkdir(parents=True, exist_ok=True)
    for entry in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]:
        name = entry["Key"].removeprefix(f"{prefix}/")
        if name and "/" not in name:  # not the folder's own marker object
            client.download_file(bucket, entry["Key"], str(folder / name))


def checkpoint_progress(uri: str, s3_server) -> dict:
    """A checkpoint folder's progress.json (local or s3://)."""
    from service.data import storage

    return json.loads(storage.read_bytes(f"{uri}/progress.json", s3_server.settings()))
