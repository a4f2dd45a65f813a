"""The Ray Train adapter: the only module that talks to Ray Train.

Driver side: connect to (or start) Ray, build a `TorchTrainer` of
`replicas × towers` workers with a data config that splits the input by
replica and hands each split to the replica's tower 0, and run it.
Worker side: `train_worker` turns the plain-data payload into a tower, its
optimizer and schedule, and runs `service.train.loop.run_training` with hooks
that print progress, report checkpoints to Ray Train and log to MLflow.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from service.cli import spec_from_config
from service.config import Config, from_dict
from service.parallel.batches import replica_batches
from service.parallel.layout import ParallelLayout
from service.train import checkpoint as ckpt
from service.train.loop import LoopOptions, Progress, TowerTraining, run_training
from service.train.schedule import LRSchedule
from service.train.setup import build_optimizer, build_tower, rank_groups
from service.train.step import Normalizer, StepOptions, TowerStep

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- driver


def cpus_needed(cfg: Config) -> float:
    """CPUs the job reserves: the tower workers plus the decode tasks/actors."""
    world = cfg.parallel.replicas * cfg.parallel.towers
    return world * cfg.cluster.cpus_per_worker + max(1, cfg.data.decode_concurrency)


def connect(address: str, min_cpus: float = 0) -> None:
    """Join the configured cluster, the one a submitted job runs in, or start
    a local one with at least `min_cpus` logical CPUs. Token authentication
    stays on (Ray 2.60's default)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # An existing cluster (or the one a submitted job runs in): inherit its
        # runtime env; adding ours would conflict with the job's.
        ray.init(address=address, log_to_driver=True)
    else:
        # A new local cluster. Logical CPUs are oversubscribed on purpose: the
        # tower workers, the decode actors and Ray Data's read tasks each
        # reserve CPUs, and on a 2-core laptop they would otherwise wait for
        # each other forever; the OS shares the real cores among them.
        # Without enough, the decode tasks never get a CPU and training waits forever.
        num_cpus = int(max(4, os.cpu_count() or 1, math.ceil(min_cpus) + 1))
        runtime_env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}}
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)


def warn_if_short(cfg: Config) -> None:
    """Say so when the cluster cannot hold the job right now (it would wait;
    an autoscaling cluster may still grow, so this is not an error)."""
    resources = ray.cluster_resources()
    need_cpus = cpus_needed(cfg)
    world = cfg.parallel.replicas * cfg.parallel.towers
    problems = []
    if resources.get("CPU", 0) < need_cpus:
        problems.append(
            f"{need_cpus:g} CPUs ({world} workers x cluster.cpus_per_worker={cfg.cluster.cpus_per_worker:g} "
            f"+ data.decode_concurrency={max(1, cfg.data.decode_concurrency)}) but the cluster has {resources.get('CPU', 0):g}"
        )
    if cfg.cluster.use_gpu and resources.get("GPU", 0) < world:
        problems.append(f"{world} GPUs (one per tower worker) but the cluster has {resources.get('GPU', 0):g}")
    if problems:
        print(
            "[train] WARNING: the job needs " + "; and ".join(problems)
            + ". It will wait for resources (lower cluster.cpus_per_worker, or add nodes).",
            flush=True,
        )


class ReplicaDataConfig(DataConfig):
    """Split datasets by replica, not by world rank.

    Tower 0 of each replica gets that replica's split and broadcasts every
    batch to its sibling towers (`service.parallel.batches`); the other towers
    get None (every rank still asks for its shard: Ray Train makes that a
    barrier across all workers). Training splits are equal-sized (replicas must run the
    same number of steps); validation splits are not, so every image counts.
    """

    def __init__(self, towers: int, equal_splits: tuple[str, ...] = ("train",)):
        super().__init__()
        self.towers = towers
        self.equal_splits = equal_splits

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        replicas = world_size // self.towers
        output = [{name: None for name in datasets} for _ in range(world_size)]
        leaders = [replica * self.towers for replica in range(replicas)]
        hints = [worker_node_ids[rank] for rank in leaders] if worker_node_ids else None
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            splits = dataset.streaming_split(replicas, equal=name in self.equal_splits, locality_hints=hints)
            for rank, split in zip(leaders, splits):
                output[rank][name] = split
        return output


def storage_settings(path: str, s3_endpoint: str, s3_region: str):
    """(storage_path, storage_filesystem) for Ray Train: local folders are made
    absolute; s3:// with a custom endpoint gets an explicit pyarrow filesystem."""
    if path.startswith("s3://") and s3_endpoint:
        import pyarrow.fs as pafs

        filesystem = pafs.S3FileSystem(
            endpoint_override=s3_endpoint,
            region=s3_region,
            scheme="https" if s3_endpoint.startswith("https") else "http",
        )
        return path[len("s3://"):], filesystem
    if "://" in path:
        return path, None
    return str(Path(path).resolve()), None


def build_trainer(cfg: Config, payload: dict, datasets: dict) -> TorchTrainer:
    layout = ParallelLayout(cfg.parallel.replicas, cfg.parallel.towers)
    storage_path, filesystem = storage_settings(cfg.storage.path, cfg.data.s3_endpoint, cfg.data.s3_region)
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    return TorchTrainer(
        train_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=layout.world_size, use_gpu=cfg.cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=payload["run_name"],
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        ),
        datasets=datasets,
        dataset_config=ReplicaDataConfig(cfg.parallel.towers),
    )


# --------------------------------------------------------------------------- worker


def say(message: str) -> None:
    """One progress line on the worker's stdout (streamed to the driver).

    Ray Train patches `print` to also log through its logger, which shows
    every line twice once another library wraps stdout; writing to the real
    stdout avoids that.
    """
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


class RayHooks:
    """Loop hooks inside a Ray Train worker."""

    def __init__(self, payload: dict, training: TowerTraining, total_steps: int, tracker):
        self.payload = payload
        self.training = training
        self.groups = training.groups
        self.total_steps = total_steps
        self.tracker = tracker  # rank 0 only
        self.started = time.monotonic()
        self.first_step: Optional[int] = None

    @property
    def is_chief(self) -> bool:
        return self.groups.rank == 0

    def on_step(self, progress: Progress, metrics: dict) -> None:
        if not self.is_chief:
            return
        if self.first_step is None:
            self.first_step, self.started = progress.step, time.monotonic()
        done = progress.step - self.first_step
        rate = done / max(1e-9, time.monotonic() - self.started)
        eta = (self.total_steps - progress.step) / rate if rate > 0 else float("nan")
        say(
            f"[train] epoch {metrics['epoch']}/{self.payload['config']['train']['epochs']} "
            f"step {progress.step}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.5f} "
            f"{metrics['images_per_s']:.0f} img/s data-wait {metrics['data_wait_s'] * 1000:.0f} ms "
            f"ETA {_duration(eta)}"
        )
        if self.tracker:
            self.tracker.add(metrics, progress.step)

    def on_epoch_end(self, progress: Progress, metrics: dict, conv1_weight: torch.Tensor) -> None:
        if not self.is_chief:
            return
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        say(f"[epoch {progress.epoch}] {shown}")
        if self.tracker:
            from service.tracking.figures import conv1_kernels_png

            self.tracker.add(metrics, progress.step)
            png = conv1_kernels_png(conv1_weight, self.groups.layout.towers, f"conv1 after epoch {progress.epoch}")
            self.tracker.log_png(png, f"figures/conv1_epoch{progress.epoch:03d}.png")

    def save_checkpoint(self, progress: Progress, tower_state: dict, metrics: dict) -> None:
        # Every worker must call report (it is a barrier); replica 0's towers
        # contribute their shards to the same checkpoint folder.
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.groups.replica == 0:
                ckpt.write_tower_shard(folder, self.groups.tower, tower_state)
                if self.groups.tower == 0:
                    ckpt.write_progress(
                        folder,
                        {
                            "epoch": progress.epoch,
                            "step": progress.step,
                            "replicas": self.groups.layout.replicas,
                            "towers": self.groups.layout.towers,
                            "spec": self.payload["spec"],
                            "config_hash": self.payload["config_hash"],
                            "mlflow_run_id": self.payload["mlflow"]["run_id"] if self.payload["mlflow"] else None,
                            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                        },
                    )
                checkpoint = Checkpoint.from_directory(folder)
            report = {"epoch": progress.epoch, "step": progress.step}
            report.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            ray.train.report(report, checkpoint=checkpoint)
        # The checkpoint is persisted: metrics up to here can never be redone.
        if self.tracker:
            self.tracker.flush()


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _restore(training: TowerTraining, groups, payload: dict) -> Progress:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as folder:
        progress = ckpt.read_progress(folder)
        if progress["towers"] != groups.layout.towers:
            raise ValueError(
                f"checkpoint has towers={progress['towers']} but this run has towers={groups.layout.towers}; "
                "resume with the same parallel.towers or choose a new run.name"
            )
        training.load_state_dict(ckpt.read_tower_shard(folder, groups.tower))
    if groups.rank == 0:
        say(f"[train] resumed from epoch {progress['epoch']} step {progress['step']}")
    return Progress(epoch=progress["epoch"], step=progress["step"])


def train_worker(payload: dict) -> None:
    """Ray Train's per-worker function; everything it receives is plain data."""
    cfg = from_dict(payload["config"])
    layout = ParallelLayout(cfg.parallel.replicas, cfg.parallel.towers)
    groups = rank_groups(layout)
    device = ray.train.torch.get_device()
    spec = ckpt.spec_from_dict(payload["spec"])
    model = build_tower(spec, groups, cfg.train.seed, device)
    options = StepOptions(cfg.recipe.bf16, cfg.recipe.channels_last, cfg.recipe.label_smoothing)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, payload["base_lr"], cfg.recipe.momentum, cfg.recipe.weight_decay)
    steps_per_epoch = payload["steps_per_epoch"]
    schedule = LRSchedule(
        base_lr=payload["base_lr"],
        kind=cfg.recipe.schedule,
        steps_per_epoch=steps_per_epoch,
        total_epochs=cfg.train.epochs,
        warmup_epochs=cfg.recipe.warmup_epochs,
        step_epochs=tuple(cfg.recipe.step_epochs),
        plateau_patience=cfg.recipe.plateau_patience,
        plateau_max_drops=cfg.recipe.plateau_max_drops,
    )
    meta = payload["meta"]
    training = TowerTraining(
        step=TowerStep(model, optimizer, spec, groups, options),
        schedule=schedule,
        normalizer=Normalizer(meta["mean"], meta["std"], device, options.channels_last),
        groups=groups,
    )
    start = _restore(training, groups, payload)
    tracker = None
    if groups.rank == 0 and payload["mlflow"]:
        from service.tracking.mlflow_tracker import RunHandle, WorkerTracker

        tracker = WorkerTracker(RunHandle(**payload["mlflow"]), cfg.tracking.system_metrics)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    hooks = RayHooks(payload, training, total_steps, tracker)
    per_replica = cfg.train.batch_size // layout.replicas
    is_leader = groups.tower == 0
    # Every rank must ask (a barrier); only tower 0 of a replica gets an iterator.
    train_split = ray.train.get_dataset_shard("train")
    val_split = ray.train.get_dataset_shard("val")
    if not is_leader and (train_split is not None or val_split is not None):
        raise RuntimeError(f"rank {groups.rank} (tower {groups.tower}) was given data; only tower 0 reads")

    def batches(split, drop_last: bool):
        def for_epoch(epoch: int):
            source = split.iter_torch_batches(batch_size=per_replica, drop_last=drop_last) if split else None
            return replica_batches(source, groups, device)

        return for_epoch

    try:
        run_training(
            training,
            batches(train_split, drop_last=True),
            batches(val_split, drop_last=False),
            hooks,
            LoopOptions(
                epochs=cfg.train.epochs,
                log_every_steps=cfg.train.log_every_steps,
                checkpoint_every_steps=cfg.train.checkpoint_every_steps,
                max_steps=cfg.train.max_steps,
                eval_every_epochs=cfg.train.eval_every_epochs,
            ),
            start,
        )
    finally:
        if tracker:
            tracker.close()


def latest_checkpoint_dir(result) -> Optional[str]:
    """A local folder holding the run's final checkpoint (downloaded if remote)."""
    if result.checkpoint is None:
        return None
    return result.checkpoint.to_directory()


def checkpoint_metrics(folder: str) -> dict:
    """Epoch, step and the last metrics recorded in a checkpoint."""
    progress = ckpt.read_progress(folder)
    return {**progress.get("metrics", {}), "epoch": progress["epoch"], "step": progress["step"]}
