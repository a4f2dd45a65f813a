"""`python -m service.train`: the training job, start to finish.

parse config (Hydra) → validate → data (ingested shards, or generated ones
for the demo) → MLflow run (new, or resumed by run.name) → Ray Train fit →
consolidated model logged and registered → summary on the console.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Optional

import hydra
from omegaconf import DictConfig

from service.cli import spec_from_config
from service.config import Config, ConfigError, to_dict
from service.hydra_app import CONFIG_NAME, conf_dir, register_schema, to_config
from service.parallel.layout import ParallelLayout
from service.tracking.redact import redact

log = logging.getLogger("service.train")


def base_lr(cfg: Config) -> float:
    """The recipe's lr, linearly scaled with the global batch when asked."""
    if cfg.recipe.scale_lr:
        return cfg.recipe.lr * cfg.train.batch_size / cfg.recipe.reference_batch_size
    return cfg.recipe.lr


def run_name(cfg: Config) -> str:
    if cfg.run.name:
        return cfg.run.name
    return f"{cfg.model.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def check_before_start(cfg: Config, num_classes: int):
    """Every layout/model error surfaces here, before any worker starts."""
    layout = ParallelLayout(cfg.parallel.replicas, cfg.parallel.towers)
    spec = spec_from_config(cfg.model, cfg.parallel.towers, num_classes)
    layout.validate_model(spec)
    layout.validate_batch(cfg.train.batch_size)
    return layout, spec


def prepare_data(cfg: Config):
    """The Ray Data pipeline over `data.root`, generating a demo dataset when
    no root is given."""
    from dataclasses import replace
    from pathlib import Path

    from service.data.demo import generate_demo_dataset
    from service.data.pipeline import build_pipeline

    data_cfg = cfg.data
    if not data_cfg.root:
        # Absolute: Ray Data tasks and train workers run with another cwd.
        root = generate_demo_dataset(
            out_dir=str(Path(data_cfg.generated_dir).resolve()),
            classes=data_cfg.generated_classes,
            images_per_class=data_cfg.generated_images_per_class,
            val_per_class=data_cfg.generated_val_per_class,
            seed=cfg.train.seed,
            image_side=data_cfg.resize_size,
        )
        print(f"[data] generated dataset ready at {root}", flush=True)
        data_cfg = replace(data_cfg, root=str(root))
    elif "://" not in data_cfg.root:
        data_cfg = replace(data_cfg, root=str(Path(data_cfg.root).resolve()))
    return data_cfg, build_pipeline(data_cfg, cfg.model.image_size, cfg.parallel.replicas)


def train(cfg: Config, parent=None) -> dict:
    """Run one training job; returns a summary dict."""
    from service import ray_train
    from service.train import checkpoint as ckpt

    started = time.monotonic()
    name = run_name(cfg)
    # Cheap checks first (model table arithmetic needs only the class count).
    check_before_start(cfg, cfg.model.num_classes or 1000)
    ray_train.connect(cfg.cluster.address, min_cpus=ray_train.cpus_needed(cfg))
    ray_train.warn_if_short(cfg)
    data_cfg, data = prepare_data(cfg)
    meta = data.meta
    layout, spec = check_before_start(cfg, meta.num_classes)
    per_replica = cfg.train.batch_size // layout.replicas
    steps_per_epoch = (meta.num_train // layout.replicas) // per_replica
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set split per replica "
            f"({meta.num_train // layout.replicas} images); use a smaller batch"
        )
    config_dict = to_dict(cfg)
    config_dict["data"] = asdict(data_cfg)  # with the resolved data.root
    handle = None
    if cfg.tracking.enabled:
        from service.tracking import mlflow_tracker

        handle = mlflow_tracker.open_run(cfg.tracking, name, config_dict, parent=parent)
        print(f"[mlflow] {'resumed' if handle.resumed else 'started'} run {handle.run_id} ({name})", flush=True)
    payload = {
        "config": config_dict,
        "run_name": name,
        "spec": ckpt.spec_to_dict(spec),
        "config_hash": ckpt.config_hash(redact(config_dict)),
        "meta": {"mean": list(meta.mean), "std": list(meta.std), "num_classes": meta.num_classes},
        "steps_per_epoch": steps_per_epoch,
        "base_lr": base_lr(cfg),
        "mlflow": vars(handle) if handle else None,
    }
    print(
        f"[train] {name}: {spec.name} {layout.describe()}, {meta.num_train} train / {meta.num_val} val images, "
        f"{meta.num_classes} classes, {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs",
        flush=True,
    )
    trainer = ray_train.build_trainer(cfg, payload, {"train": data.train, "val": data.val})
    failed = True
    try:
        result = trainer.fit()
        failed = False
    finally:
        if handle and failed:
            mlflow_tracker.finish_run(handle, failed=True)
    summary = {"run_name": name, "wall_s": time.monotonic() - started, "layout": layout.describe()}
    folder = ray_train.latest_checkpoint_dir(result)
    if folder:
        summary.update(ray_train.checkpoint_metrics(folder))
        summary["checkpoint"] = result.checkpoint.path
    if handle:
        summary.update(_finish_tracking(cfg, handle, folder, spec, summary))
    return summary


def _finish_tracking(cfg: Config, handle, folder: Optional[str], spec, summary: dict) -> dict:
    """Consolidated model, learning curves, final status."""
    import torch

    from service.model import ReferenceAlexNet
    from service.tracking import figures, mlflow_tracker
    from service.train import checkpoint as ckpt

    out = {"mlflow_run_id": handle.run_id, "ui": handle.ui_hint()}
    history = mlflow_tracker.metric_history(
        handle, ["loss", "train_loss", "val_loss", "train_top1_error", "val_top1_error", "val_top5_error"]
    )
    if any(history.values()):
        mlflow_tracker.log_png(handle, figures.learning_curves_png(history), "figures/learning_curves.png")
    if folder:
        _, state = ckpt.load_reference_state(folder)
        model = ReferenceAlexNet(spec)
        model.load_state_dict(state)
        model.eval()
        example = torch.zeros(1, 3, spec.image_size, spec.image_size).numpy()
        version = mlflow_tracker.log_model(handle, model, example, cfg.tracking, summary)
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


def _hydra_main(raw: DictConfig) -> None:
    try:
        cfg = to_config(raw)
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    try:
        summary = train(cfg, parent=_sweep_parent(cfg))
    except (ConfigError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print_summary(summary)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    register_schema()
    hydra.main(config_path=conf_dir(), config_name=CONFIG_NAME, version_base="1.3")(_hydra_main)()
