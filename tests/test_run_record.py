"""What a training run records in MLflow for comparing runs: the dataset input,
the source version and command, the experiment's kind, the best-epoch
metrics, and never a secret (of the session's real `trained_run`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow

from service.tracking.run_record import (
    COMMAND_TAG, EXPERIMENT_KIND_TAG, GIT_COMMIT_TAG, MODEL_TRAINING_KIND, REPO_ROOT, command_line, describe_dataset,
    read_dataset_record, redact_argv,
)
from tests.conftest import TINY_VAL_IMAGES
from tests.helpers import assert_no_secret

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


def test_the_trained_run_records_its_dataset_source_best_metrics_and_no_secret(trained_run, s3_server, tmp_path):
    """The session's `trained_run` (`python -m service.train`, resumed once, S3 keys
    on its command line): what MLflow holds for comparing it with other runs."""
    client = mlflow.MlflowClient(trained_run.tracking_uri)
    run = client.get_run(trained_run.run_id)
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    tags, params = run.data.tags, run.data.params
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert commit.returncode == 0, f"the tests run in a git checkout: {commit.stderr}"
    assert tags[GIT_COMMIT_TAG] == commit.stdout.strip()
    assert tags["mlflow.source.name"] == "python -m service.train"
    assert tags[COMMAND_TAG].startswith(f"python -m service.train experiment=smoke data.root={trained_run.data_root} ")
    assert "data.s3_secret_key=***" in tags[COMMAND_TAG] and "data.s3_access_key=***" in tags[COMMAND_TAG]

    (dataset_input,) = run.inputs.dataset_inputs  # one, though the run was started twice
    record = read_dataset_record(trained_run.data_root)
    assert dataset_input.dataset.name == Path(trained_run.data_root).name
    assert dataset_input.dataset.digest == record.digest
    assert json.loads(dataset_input.dataset.source)["uri"] == trained_run.data_root
    assert json.loads(dataset_input.dataset.profile)["num_val"] == TINY_VAL_IMAGES
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    # best_* are logged at each new lowest validation error, across the resume.
    errors = sorted((m.step, m.value) for m in client.get_metric_history(trained_run.run_id, "val_top1_error"))
    best = sorted((m.step, m.value) for m in client.get_metric_history(trained_run.run_id, "best_val_top1_error"))
    assert len(errors) == 2
    assert best == [errors[0]] + ([errors[1]] if errors[1][1] < errors[0][1] else [])
    assert errors[int(run.data.metrics["best_epoch"]) - 1][1] == min(value for _, value in errors)

    assert params["data.s3_secret_key"] == "***" and params["data.s3_access_key"] == "***"
    artifacts = client.download_artifacts(trained_run.run_id, "", str(tmp_path / "artifacts"))
    assert_no_secret(s3_server.secret_key, [*params.values(), *tags.values(), dataset_input.dataset.source,
                                            *trained_run.outputs], [Path(artifacts)])
