"""`python -m service.train`: the training job, start to finish (the driver).

parse config (Hydra) -> cheap checks (layout, model split, tracking server,
data root) -> resume point and its guards -> Ray -> data -> MLflow run (new,
or resumed by run.name) -> Ray Train fit -> the best checkpoint logged and
registered -> summary on the console. Every check that can fail runs before
any worker starts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from service import hydra_app
from service.config import Config, ConfigError, decode_mode, to_dict, validate_config
from service.parallel.layout import ParallelLayout
from service.tracking.redact import redact

log = logging.getLogger("service.train")
CRASH_ENV = "ALEXNET_TEST_CRASH_IN_CHECKPOINT"


def run_name(cfg: Config) -> str:
    if cfg.run.name:
        return cfg.run.name
    return f"{cfg.model.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def check_layout(cfg: Config, num_classes: int):
    """Every layout/model error surfaces here, before any worker starts."""
    from service.train.build import spec_for  # torch: only once the configuration has passed

    layout = ParallelLayout(cfg.parallel.replicas, cfg.parallel.towers)
    spec = spec_for(cfg.model, cfg.parallel.towers, num_classes)
    layout.validate_model(spec)
    layout.validate_batch(cfg.train.batch_size)
    return layout, spec


def loop_options(cfg: Config, steps_per_epoch: int):
    """The epoch loop's options for `cfg` once the epoch's length is known."""
    from service.train.loop import LoopOptions  # torch: only once the configuration has passed

    return LoopOptions(
        epochs=cfg.train.epochs,
        steps_per_epoch=steps_per_epoch,
        log_every_steps=cfg.train.log_every_steps,
        checkpoint_every_steps=cfg.train.checkpoint_every_steps,
        max_steps=cfg.train.max_steps,
        eval_every_epochs=cfg.train.eval_every_epochs,
    )


def storage_location(cfg: Config):
    """(storage_path, filesystem) of the checkpoints, as Ray Train takes them."""
    from service.data import storage

    return storage.checkpoint_filesystem(cfg.storage.path, storage.S3Settings.from_fields(cfg.data))


def resolved_data(cfg: Config):
    """`cfg.data` with an absolute root (Ray Data tasks and workers run with
    another cwd), generating the demo dataset first when no root is given."""
    data_cfg = cfg.data
    if not data_cfg.root:
        from service.data.demo import generate_demo_dataset

        root = generate_demo_dataset(
            out_dir=str(Path(data_cfg.generated_dir).resolve()),
            classes=data_cfg.generated_classes,
            images_per_class=data_cfg.generated_images_per_class,
            val_per_class=data_cfg.generated_val_per_class,
            seed=cfg.train.seed,
            image_side=data_cfg.resize_size,
        )
        print(f"[data] generated dataset ready at {root}", flush=True)
        return replace(data_cfg, root=str(root))
    if "://" not in data_cfg.root:
        return replace(data_cfg, root=str(Path(data_cfg.root).resolve()))
    return data_cfg


def _classes_digest(wnids: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(wnids).encode()).hexdigest()[:16]


def train(cfg: Config, parent=None) -> dict:
    """Run one training job; returns a summary dict."""
    from service import ray_cluster

    from service.data import storage
    from service.data.checks import check_data_root
    from service.data.epochs import open_source
    from service.data.epochs import steps_per_epoch as plan_steps

    started = time.monotonic()
    name = run_name(cfg)
    source = None
    if cfg.data.root:  # an ingested dataset: everything about it is known before Ray starts
        check_data_root(cfg.data.root, storage.S3Settings.from_fields(cfg.data))
        data_cfg = resolved_data(cfg)
        source = open_source(data_cfg, cfg.model.image_size, cfg.parallel.replicas, decode_mode(cfg))
    layout, spec = check_layout(cfg, source.meta.num_classes if source else cfg.data.generated_classes)
    if cfg.tracking.enabled:
        from service.tracking import mlflow_tracker

        mlflow_tracker.check_tracking_reachable(cfg.tracking.uri)
    # torch (checkpoint format): after the checks
    from service.resume import check_resume, find_resume_point, remove_untracked_checkpoints

    storage_path, filesystem = storage_location(cfg)
    point = find_resume_point(filesystem or pafs.LocalFileSystem(), f"{storage_path}/{name}")
    ray_cluster.connect(cfg.cluster.address, ray_cluster.training_job_cpus(cfg))
    if source is None:  # the demo's dataset is generated (a Ray Data job) now
        data_cfg = resolved_data(cfg)
        source = open_source(data_cfg, cfg.model.image_size, cfg.parallel.replicas, decode_mode(cfg))
    meta = source.meta
    per_replica = cfg.train.batch_size // layout.replicas
    steps_per_epoch = plan_steps(source, layout.replicas, layout.towers, per_replica)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set split per replica "
            f"({meta.num_train // layout.replicas} images); use a smaller batch"
        )
    config_dict = to_dict(cfg)
    config_dict["data"] = asdict(data_cfg)  # with the resolved data.root
    config_dict = redact(config_dict)
    facts = {"num_classes": meta.num_classes, "classes_digest": _classes_digest(meta.wnids),
             "steps_per_epoch": steps_per_epoch}
    check_resume(point, cfg.run.resume, name, config_dict, facts)
    decode = ray_cluster.plan_decode(cfg, ray_cluster.cluster_cpus())
    ray_cluster.warn_if_short(cfg, decode)
    handle, last_logged = None, -1
    if cfg.tracking.enabled:
        from service.tracking.run_record import read_dataset_record

        dataset = read_dataset_record(data_cfg.root, storage.S3Settings.from_fields(data_cfg))
        handle = mlflow_tracker.open_run(cfg.tracking, name, config_dict, parent=parent, dataset=dataset)
        if handle.resumed:
            logged = mlflow_tracker.metric_history(handle, ["loss", "val_top1_error"])
            last_logged = max((step for points in logged.values() for step, _ in points), default=-1)
        print(f"[mlflow] {'resumed' if handle.resumed else 'started'} run {handle.run_id} ({name})", flush=True)
    from service import ray_train  # torch and Ray Train: imported once the checks above have passed
    from service.train.build import training_options

    payload = ray_train.WorkerPayload(
        run_name=name,
        training=training_options(cfg, spec, meta.mean, meta.std, steps_per_epoch),
        loop=loop_options(cfg, steps_per_epoch),
        data=source,
        per_replica_batch=per_replica,
        read_tasks_per_lane=decode.per_lane,
        decode_threads=max(1, int(cfg.cluster.cpus_per_worker)),
        config=config_dict,
        facts=facts,
        allow_cross_node_towers=cfg.parallel.allow_cross_node_towers,
        use_gpu=cfg.cluster.use_gpu,
        run_folder=f"{storage_path}/{name}",
        resume_path=point.path if point else "",
        storage_filesystem=filesystem,
        mlflow=handle,
        system_metrics=cfg.tracking.system_metrics,
        tracking_close_timeout_s=cfg.tracking.close_timeout_s,
        last_logged_step=last_logged,
        crash_in_checkpoint_at_step=int(os.environ.get(CRASH_ENV, "-1")),
    )
    resume_note = f", resuming from step {point.step}" if point else ""
    print(
        f"[train] {name}: {spec.name} {layout.describe()}, {meta.num_train} train / {meta.num_val} val images, "
        f"{meta.num_classes} classes, {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, "
        f"decode={source.decode}, {decode.total} read tasks ({decode.reason}){resume_note}",
        flush=True,
    )
    trainer = ray_train.build_trainer(payload, storage_path, filesystem, cfg.train.keep_checkpoints,
                                      cfg.cluster.max_failures, cfg.cluster.cpus_per_worker)
    failed = True
    try:
        result = trainer.fit()
        failed = False
    finally:
        if handle and failed:
            mlflow_tracker.finish_run(handle, failed=True)
    tracked = [checkpoint.path for checkpoint, _ in result.best_checkpoints or []]
    if result.checkpoint is not None:
        tracked.append(result.checkpoint.path)
    removed = remove_untracked_checkpoints(filesystem or pafs.LocalFileSystem(), f"{storage_path}/{name}", tracked)
    if removed:
        names = ", ".join(path.rsplit("/", 1)[-1] for path in removed)
        print(f"[train] removed {len(removed)} checkpoint(s) left by earlier attempts of this run, beyond "
              f"train.keep_checkpoints={cfg.train.keep_checkpoints}: {names}", flush=True)
    summary = {"run_name": name, "wall_s": time.monotonic() - started, "layout": layout.describe()}
    best = best_checkpoint(result)
    if result.checkpoint is not None:
        summary["checkpoint"] = result.checkpoint.path
        summary.update(checkpoint_metrics(ray_train.read_progress(result.checkpoint)))
    if best is not None:
        summary["best_checkpoint"] = best.path
    if handle:
        summary.update(_finish_tracking(cfg, handle, best, source.meta, data_cfg))
    return summary


def best_checkpoint(result):
    """The kept checkpoint with the lowest validation error (the last one if none was evaluated)."""
    from service.ray_train import SCORE, UNEVALUATED

    scored = [(metrics[SCORE], checkpoint) for checkpoint, metrics in (result.best_checkpoints or [])
              if metrics.get(SCORE, UNEVALUATED) < UNEVALUATED]
    if scored:
        return min(scored, key=lambda pair: pair[0])[1]
    return result.checkpoint


def checkpoint_metrics(progress: dict) -> dict:
    """Epoch, step and the metrics recorded in a checkpoint's progress.json."""
    return {**progress.get("metrics", {}), "epoch": progress["epoch"], "step": progress["step"]}


def _finish_tracking(cfg: Config, handle, best, meta, data_cfg) -> dict:
    """Learning curves, the best checkpoint as the registered, servable model, final status."""
    from service.tracking import figures, mlflow_tracker
    from service.tracking.registry import log_trained_model

    out = {"mlflow_run_id": handle.run_id, "ui": handle.ui_hint()}
    # Quick requests for up to tracking.close_timeout_s (as long as the workers wait for
    # MLflow at their end): MLflow's own retries would hold a finished job for minutes, then fail it.
    deadline = time.monotonic() + cfg.tracking.close_timeout_s
    while True:
        try:
            mlflow_tracker.check_tracking_reachable(handle.tracking_uri)
            break
        except mlflow_tracker.TrackingUnreachable as error:
            if time.monotonic() > deadline:
                print(f"[mlflow] {str(error).split(';')[0]} at the end of the job: the learning curves, the model "
                      "registration and the run's end were not recorded (the checkpoints are complete)", flush=True)
                return out
            time.sleep(2)  # polling interval while MLflow is away
    history = mlflow_tracker.metric_history(
        handle, ["loss", "train_loss", "val_loss", "train_top1_error", "val_top1_error", "val_top5_error"]
    )
    if any(history.values()):
        mlflow_tracker.log_png(handle, figures.learning_curves_png(history), "figures/learning_curves.png")
    if best is not None and cfg.tracking.log_model:
        from service.ray_train import read_progress

        best_metrics = checkpoint_metrics(read_progress(best))
        with best.as_directory() as folder:
            version = log_trained_model(handle, folder, meta, cfg.tracking, best_metrics,
                                        resize_size=data_cfg.resize_size, crops=data_cfg.eval_crops)
        out["best_epoch"] = best_metrics["epoch"]
        out["best_val_top1_error"] = best_metrics.get("val_top1_error")
        if version:
            out["registered"] = f"{cfg.tracking.registered_model} v{version}"
    mlflow_tracker.finish_run(handle)
    return out


def print_summary(summary: dict) -> None:
    print("\n=== run finished ===")
    rows = [
        ("run", summary.get("run_name")),
        ("layout", summary.get("layout")),
        ("epochs", summary.get("epoch")),
        ("steps", summary.get("step")),
        ("val top-1 error", _pct(summary.get("val_top1_error"))),
        ("val top-5 error", _pct(summary.get("val_top5_error"))),
        ("train top-1 error", _pct(summary.get("train_top1_error"))),
        ("best epoch", summary.get("best_epoch")),
        ("best val top-1", _pct(summary.get("best_val_top1_error"))),
        ("wall time", f"{summary.get('wall_s', 0):.0f} s"),
        ("checkpoint", summary.get("checkpoint")),
        ("mlflow run", summary.get("mlflow_run_id")),
        ("registered", summary.get("registered")),
    ]
    for key, value in rows:
        if value is not None:
            print(f"  {key:<18} {value}")
    if summary.get("ui"):
        print(f"\nOpen the MLflow UI on this run:\n  {summary['ui']}")


def _pct(value) -> Optional[str]:
    return None if value is None else f"{100 * value:.1f}%"


def _sweep_parent(cfg: Config):
    """In a Hydra multirun, the MLflow parent run shared by the sweep's points."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN or not cfg.tracking.enabled:
        return None
    from service.tracking import mlflow_tracker

    return mlflow_tracker.open_parent_run(cfg.tracking, str(hydra_cfg.sweep.dir))


def describe_failure(error: Exception) -> str:
    """One line per distinct worker error of a failed Ray Train run (the
    root cause, not Ray's wrapping traceback)."""
    failures = getattr(error, "worker_failures", None) or {}
    by_message: dict[str, list[int]] = {}
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure
        text = str(cause).strip().splitlines()
        by_message.setdefault(f"{type(cause).__name__}: {text[-1] if text else ''}", []).append(rank)
    if not by_message:
        return str(error).strip().splitlines()[-1]
    return "; ".join(f"rank(s) {', '.join(map(str, ranks))}: {message}" for message, ranks in by_message.items())


def run_job(cfg: Config) -> int:
    """The Hydra job: train, print the summary; user errors are one line
    (exit 2), a failed training says which workers failed and why (exit 1)."""
    from ray.train import TrainingFailedError

    try:
        summary = train(cfg, parent=_sweep_parent(cfg))
    except (ConfigError, ValueError, FileNotFoundError, PermissionError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingFailedError as error:
        print(f"error: training failed: {describe_failure(error)}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def main() -> None:
    from service.ray_cluster import quiet_ray_logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_ray_logging()
    hydra_app.run(hydra_app.CONFIG_NAME, Config, validate_config, run_job)
