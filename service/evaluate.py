"""`python -m service.evaluate`: a trained model's top-1/top-5 error on the validation shards.

config (Hydra, conf/evaluate.yaml) -> MLflow reachable? -> the weights
(checkpoint folder, runs:/, models:/, or torchvision's .pth) -> the Ray
cluster -> the validation Dataset, cropped as in training's validation ->
batch inference on a pool of model actors -> errors, per-class accuracy,
most confused pairs, images/s -> an MLflow evaluation run linked to the model.

    python -m service.evaluate model_uri=models:/alexnet@best data.root=data/synthetic
    python -m service.evaluate model=alexnet_owt weights=alexnet-owt-7be5be79.pth data.root=/data/imagenet eval.crops=10
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from service.config import ConfigError
from service.evaluation.config import EvaluateConfig, validate_evaluate_config
from service.evaluation.inference import plan_resources, run_inference, validation_dataset
from service.evaluation.model_source import check_fits_dataset, load_model_to_evaluate
from service.evaluation.report import format_report, per_class_csv, summarize
from service.progress import ProgressPrinter

CONFIG_NAME = "evaluate"


def say(message: str) -> None:
    """One progress line."""
    print(f"[eval] {message}", flush=True)


def _resolved_data(cfg: EvaluateConfig):
    root = cfg.data.root
    if "://" not in root:
        root = str(Path(root).resolve())  # Ray tasks run with another cwd
    return replace(cfg.data, root=root, eval_crops=cfg.eval.crops)


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run one evaluation; returns the figures (and the MLflow run id when tracking is on)."""
    import ray

    from service import ray_cluster
    from service.data import storage
    from service.data.meta import load_meta
    from service.tracking import figures
    from service.tracking.evaluation_log import log_evaluation, metric_prefix
    from service.tracking.mlflow_tracker import check_tracking_reachable, resolve_tracking_uri
    from service.tracking.run_record import read_dataset_record

    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    if cfg.tracking.enabled or cfg.model_uri.startswith(("runs:/", "models:/")):
        check_tracking_reachable(tracking_uri)
    data_cfg = _resolved_data(cfg)
    s3 = storage.S3Settings.from_fields(data_cfg)
    meta = load_meta(data_cfg.root, s3)  # a missing dataset fails before Ray starts
    with tempfile.TemporaryDirectory(prefix="alexnet-eval-") as workdir:
        model = load_model_to_evaluate(cfg, tracking_uri, Path(workdir))
    check_fits_dataset(model, meta)
    resize_size = cfg.eval.resize_size or model.resize_size or meta.resize_size
    data_cfg = replace(data_cfg, resize_size=resize_size)
    mean, std = model.mean or meta.mean, model.std or meta.std
    say(f"model: {model.description}")
    ray_cluster.connect(cfg.cluster.address)
    actors, data_cfg = plan_resources(cfg.eval, data_cfg, ray.cluster_resources().get("CPU", 1))
    meta, val = validation_dataset(data_cfg, model.spec.image_size)
    crops = "the centre crop" if cfg.eval.crops == 1 else "10 crops (softmax averaged)"
    say(f"data: {data_cfg.root}: {meta.num_val} validation images, {meta.num_classes} classes; shorter side "
        f"{resize_size}, {crops} of {model.spec.image_size}; {actors} model actor(s), "
        f"{data_cfg.decode_concurrency} decode task(s)")
    progress = ProgressPrinter(meta.num_val, say, unit="images")
    tally, seconds = run_inference(model.spec, model.state, mean, std, val, meta.num_classes, cfg.eval, actors,
                                   progress)
    progress(tally.count, seconds, final=True)
    if tally.count != meta.num_val:
        raise RuntimeError(f"evaluated {tally.count} images but meta.json lists {meta.num_val} validation images")
    result = summarize(tally, seconds, cfg.eval.confused_pairs)
    print(format_report(result, meta.wnids, meta.names), flush=True)
    summary = {"images": result.images, "top1_error": result.top1_error, "top5_error": result.top5_error,
               "loss": result.loss, "images_per_s": result.images_per_s,
               "per_class_accuracy": result.per_class_accuracy.tolist(), "confused_pairs": result.confused_pairs,
               "model_id": model.model_id}
    if cfg.tracking.enabled:
        prefix = metric_prefix(cfg.eval.crops)
        metrics = {f"{prefix}top1_error": result.top1_error, f"{prefix}top5_error": result.top5_error,
                   f"{prefix}loss": result.loss, f"{prefix}images": result.images,
                   f"{prefix}images_per_s": result.images_per_s}
        title = f"{cfg.model_uri or cfg.weights}: top-1 error {100 * result.top1_error:.2f}%"
        artifacts = {
            "evaluation/per_class_and_confusions.png": figures.evaluation_png(
                result.per_class_accuracy, meta.names, result.confused_pairs, title),
            "evaluation/per_class_accuracy.csv": per_class_csv(result, meta.wnids, meta.names),
            "evaluation/report.txt": format_report(result, meta.wnids, meta.names, max_class_rows=10**6).encode(),
        }
        config = dataclasses.asdict(cfg)
        config["data"] = dataclasses.asdict(data_cfg)
        handle = log_evaluation(
            cfg.tracking, f"eval {Path(cfg.model_uri or cfg.weights).name or cfg.model_uri} {cfg.eval.crops}-crop",
            config, read_dataset_record(data_cfg.root, s3), metrics, artifacts, cfg.model_uri or cfg.weights,
            model.model_id, model.source_run_id,
        )
        linked = f", attached to model {model.model_id}" if model.model_id else ""
        say(f"MLflow evaluation run {handle.run_id}{linked}\n  {handle.ui_hint()}")
        summary["mlflow_run_id"] = handle.run_id
    return summary


def main_with_config(cfg: EvaluateConfig) -> Optional[int]:
    """Hydra's entry point: errors a user can fix are one line, exit status 1."""
    from service.tracking.mlflow_tracker import TrackingUnreachable

    started = time.monotonic()
    try:
        evaluate(cfg)
    except (ConfigError, ValueError, FileNotFoundError, TrackingUnreachable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    say(f"done in {time.monotonic() - started:.0f} s")
    return None


def main() -> None:
    """`python -m service.evaluate key=value ...`"""
    from service.hydra_app import run

    run(CONFIG_NAME, EvaluateConfig, validate_evaluate_config, main_with_config)


if __name__ == "__main__":
    main()
