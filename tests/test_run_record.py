"""What a training run records in MLflow for comparing runs: the dataset input,
the source version and command, the experiment's kind, the best-epoch
metrics, per-node system metrics, and never a secret."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest

from service.config import TrackingConfig
from service.tracking.run_record import (
    COMMAND_TAG, EXPERIMENT_KIND_TAG, GIT_COMMIT_TAG, MODEL_TRAINING_KIND, REPO_ROOT, command_line, describe_dataset,
    read_dataset_record, redact_argv,
)
from tests.servers import wait_until

SECRET = "TOPSECRET-record-77aa"


def test_command_words_with_secrets_are_masked():
    argv = ["python", "-m", "service.train", "model=alexnet", f"data.s3_secret_key={SECRET}",
            f"+data.s3_access_key={SECRET}", f"tracking.uri=http://bob:{SECRET}@mlflow:5000", "data.s3_secret_key="]
    assert redact_argv(argv) == ["python", "-m", "service.train", "model=alexnet", "data.s3_secret_key=***",
                                 "+data.s3_access_key=***", "tracking.uri=http://***@mlflow:5000",
                                 "data.s3_secret_key="]
    main = str(REPO_ROOT / "service" / "train" / "__main__.py")
    assert command_line([main, "experiment=demo", f"data.s3_secret_key={SECRET}"]) == (
        "python -m service.train experiment=demo 'data.s3_secret_key=***'"
    )


def test_dataset_digest_follows_meta_and_ingest_report():
    meta = json.dumps({"num_train": 10, "num_val": 4, "num_classes": 2, "resize_size": 72}).encode()
    report = json.dumps({"fingerprint": "abc", "counts": {"quarantined": 1, "converted": 2}}).encode()
    record = describe_dataset(f"s3://key:{SECRET}@bucket/imagenet", meta, report)
    assert record.name == "imagenet" and SECRET not in record.source_uri
    assert record.profile == {"num_train": 10, "num_val": 4, "num_classes": 2, "resize_size": 72,
                              "quarantined": 1, "converted": 2, "ingest_fingerprint": "abc"}
    assert describe_dataset("/data/imagenet", meta, report).digest == record.digest
    assert describe_dataset("/data/imagenet", meta, report.replace(b"abc", b"abd")).digest != record.digest
    assert describe_dataset("/data/imagenet", meta.replace(b"10", b"11"), report).digest != record.digest


@pytest.fixture
def dataset_root(tmp_path):
    """An ingested dataset's description files (meta.json, ingest_report.json)."""
    from service.data.meta import META_FILE, REPORT_FILE

    root = tmp_path / "imagenet-mini"
    root.mkdir()
    meta = {"num_classes": 3, "wnids": ["a", "b", "c"], "names": ["a", "b", "c"], "num_train": 30, "num_val": 9,
            "resize_size": 72, "layout": "imagefolder"}
    (root / META_FILE).write_text(json.dumps(meta))
    (root / REPORT_FILE).write_text(json.dumps({"fingerprint": "f00d", "counts": {"quarantined": 0, "converted": 1}}))
    return root


@pytest.mark.integration
def test_training_run_records_dataset_source_best_metrics_and_no_secrets(mlflow_server, dataset_root, monkeypatch):
    from service.tracking.mlflow_tracker import open_run
    from service.tracking.worker_tracker import WorkerTracker, start_node_system_metrics

    main = str(REPO_ROOT / "service" / "train" / "__main__.py")
    monkeypatch.setattr(sys, "argv", [main, "experiment=demo", f"data.s3_secret_key={SECRET}"])
    tracking = TrackingConfig(uri=mlflow_server.url, experiment="record")
    config = {"data": {"root": str(dataset_root), "s3_secret_key": SECRET}, "model": {"name": "alexnet"}}
    record = read_dataset_record(str(dataset_root))
    handle = open_run(tracking, "record-1", config, dataset=record)
    client = mlflow.MlflowClient(mlflow_server.url)

    assert client.get_experiment(handle.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    run = client.get_run(handle.run_id)
    tags = run.data.tags
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert commit.returncode == 0, f"the tests run in a git checkout: {commit.stderr}"
    assert tags[GIT_COMMIT_TAG] == commit.stdout.strip()
    assert tags[COMMAND_TAG] == "python -m service.train experiment=demo 'data.s3_secret_key=***'"
    assert tags["mlflow.source.name"] == "python -m service.train"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "imagenet-mini"
    assert dataset_input.dataset.digest == record.digest
    assert json.loads(dataset_input.dataset.source)["uri"] == str(dataset_root)
    assert json.loads(dataset_input.dataset.profile)["num_val"] == 9
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    tracker = WorkerTracker(handle, system_metrics=False)
    for epoch, error in enumerate([0.8, 0.6, 0.7], start=1):
        tracker.add({"val_top1_error": error, "val_top5_error": error / 2}, step=10 * epoch, epoch=epoch)
        tracker.flush()
    assert tracker.close().unsent_points == 0
    metrics = client.get_run(handle.run_id).data.metrics
    assert metrics["best_val_top1_error"] == 0.6 and metrics["best_val_top5_error"] == 0.3
    assert metrics["best_epoch"] == 2
    assert [m.step for m in client.get_metric_history(handle.run_id, "best_val_top1_error")] == [10, 20]

    resumed = open_run(tracking, "record-1", config, dataset=record)
    assert resumed.resumed and resumed.run_id == handle.run_id
    tracker = WorkerTracker(resumed, system_metrics=False)
    tracker.add({"val_top1_error": 0.65}, step=40, epoch=4)  # worse than the best before the resume
    tracker.add({"val_top1_error": 0.5}, step=50, epoch=5)
    tracker.flush()
    tracker.close()
    assert [m.value for m in client.get_metric_history(handle.run_id, "best_val_top1_error")] == [0.8, 0.6, 0.5]

    stop = start_node_system_metrics(resumed, node_id="node-a", sampling_interval_s=0.5)
    try:
        wait_until(lambda: any(k.startswith("system/node-a/") for k in client.get_run(handle.run_id).data.metrics),
                   60, "system metrics of node-a")
    finally:
        stop()

    texts = list(run.data.params.values()) + list(tags.values()) + [dataset_input.dataset.source]
    assert run.data.params["data.s3_secret_key"] == "***"
    assert not any(SECRET in text for text in texts)
