"""An evaluation as an MLflow run, linked to the model it measured.

The run sits in the training experiment, carries the (redacted) evaluation
config, the validation dataset as an "evaluation" input, source/command tags
and the figure/CSV artifacts. Its metrics carry the LoggedModel id and the
dataset (MLflow 3's model metrics), so the model's page in the UI lists
every evaluation of it next to its training metrics.
"""

from __future__ import annotations

import time
from typing import Optional

from service.config import TrackingConfig
from service.tracking.mlflow_tracker import RunHandle, client_for, experiment_id_for, log_config, upload_bytes
from service.tracking.run_record import DatasetRecord, dataset_input, source_tags

KIND_TAG = "alexnet.kind"
EVALUATED_MODEL_TAG = "alexnet.evaluated_model_id"
EVALUATED_RUN_TAG = "alexnet.evaluated_run_id"
MODEL_URI_TAG = "alexnet.model_uri"


def metric_prefix(crops: int) -> str:
    """`eval_` for centre-crop figures, `eval_10crop_` for the paper's 10 crops."""
    return "eval_" if crops == 1 else f"eval_{crops}crop_"


def log_evaluation(
    tracking: TrackingConfig,
    run_name: str,
    config: dict,
    dataset: DatasetRecord,
    metrics: dict[str, float],
    artifacts: dict[str, bytes],
    model_uri: str,
    model_id: Optional[str] = None,
    source_run_id: Optional[str] = None,
) -> RunHandle:
    """Create the finished evaluation run; returns its handle."""
    from mlflow.entities import Metric

    uri, experiment_id = experiment_id_for(tracking)
    client = client_for(uri)
    tags = {KIND_TAG: "evaluation", MODEL_URI_TAG: model_uri, **source_tags()}
    if model_id:
        tags[EVALUATED_MODEL_TAG] = model_id
    if source_run_id:
        tags[EVALUATED_RUN_TAG] = source_run_id
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    failed = True
    try:
        log_config(client, run_id, config)
        client.log_inputs(run_id, datasets=[dataset_input(dataset, "evaluation")])
        timestamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[
            Metric(key, float(value), timestamp, 0, model_id=model_id,
                   dataset_name=dataset.name, dataset_digest=dataset.digest)
            for key, value in metrics.items()
        ])
        for artifact_file, data in artifacts.items():
            upload_bytes(client, run_id, data, artifact_file)
        failed = False
    finally:
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    return RunHandle(uri, experiment_id, run_id)
