"""The Ray Train adapter: the trainer on the driver, the glue in each worker.

Driver: `build_trainer` makes a `TorchTrainer` of replicas x towers workers
that run `train_worker` with a typed `WorkerPayload`.
Worker: learn its place (groups, device, node), check the towers of its
replica share a node, assemble its training with the torch-only
`service.train.build.build_training`, resume, and run the torch-only loop
with hooks that print progress, checkpoint through Ray Train and log to
MLflow. Every tower builds its own lane's Ray Dataset for every epoch
(`service.data.pipeline.lane_dataset`: 1/T of each of its replica's
batches), prepares its shares on its device and all-gathers the replica's
batch with its sibling towers (`service.parallel.batches`); Ray Train's own
dataset splitting is not used, because an epoch's order must be a function
of (seed, epoch) for exact resume.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.collective
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from service.data.device_decode import ShareLoader
from service.parallel.batches import tower_batches
from service.parallel.groups import set_worker_device
from service.parallel.placement import check_tower_placement
from service.ray_cluster import quiet_ray_logging, ray_verbose
from service.resume import checkpoint_dir_name, find_resume_point
from service.train import checkpoint as ckpt
from service.train.build import TowerTraining, TrainingOptions, build_training, rank_groups
from service.train.loop import LoopOptions, Progress, run_training

# Checkpoints are ranked (and kept) by this reported metric, lower is better:
# the validation top-1 error where the checkpoint was evaluated, else
# UNEVALUATED, worse than any error (errors lie in [0, 1]). A number, not NaN
# or inf: Ray Train's run snapshot stores metrics as JSON, which has neither.
SCORE = "checkpoint_score"
UNEVALUATED = 2.0
# progress.json key: the metric points MLflow had not confirmed when the checkpoint was written.
UNCONFIRMED_METRICS = "unconfirmed_metrics"


@dataclass(frozen=True)
class WorkerPayload:
    """Everything a worker receives; plain data."""

    run_name: str
    training: TrainingOptions
    loop: LoopOptions
    # -- service.data.pipeline.DataSource: shards, statistics, augmentation.
    data: Any
    per_replica_batch: int
    # -- Concurrent Ray Data read tasks of each tower's lane dataset.
    read_tasks_per_lane: int
    # -- CPU threads a tower may decode with (decode="device" on a CPU device).
    decode_threads: int
    # -- The run's redacted config (recorded in every checkpoint for resume checks).
    config: dict
    # -- Facts the resume check compares: classes, steps per epoch.
    facts: dict
    allow_cross_node_towers: bool
    use_gpu: bool
    # -- service.tracking RunHandle of the MLflow run, rank 0 logs to it.
    mlflow: Any = None
    system_metrics: bool = True
    # -- Seconds rank 0 waits for MLflow at the end (tracking.close_timeout_s).
    tracking_close_timeout_s: float = 60.0
    # -- Metrics at steps <= this were already sent to MLflow; never resend.
    last_logged_step: int = -1
    # -- Where this run's checkpoints go (metrics MLflow never took are spilled there).
    run_folder: str = ""
    # -- The checkpoint the driver said it resumes from ("" for a fresh run).
    resume_path: str = ""
    storage_filesystem: Any = None
    # -- Test-only fault injection (ALEXNET_TEST_CRASH_IN_CHECKPOINT=<step>): the
    #    last tower of replica 0 dies halfway through uploading its shard, once
    #    (workers that Ray Train restarts write that checkpoint whole: `_first_try`).
    crash_in_checkpoint_at_step: int = -1


def build_trainer(payload: WorkerPayload, storage_path: str, filesystem, keep_checkpoints: int,
                  max_failures: int, cpus_per_worker: float) -> TorchTrainer:
    layout = payload.training.layout
    return TorchTrainer(
        train_worker,
        train_loop_config={"payload": payload},
        torch_config=TorchConfig(backend="nccl" if payload.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=layout.world_size, use_gpu=payload.use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=payload.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's own INFO lines ("Reporting training result ...") and
            # its controller's transient warnings stay off the console unless
            # ALEXNET_RAY_VERBOSE=1; the service prints its own progress.
            logging_config=LoggingConfig(log_level="INFO" if ray_verbose() else "ERROR"),
        ),
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


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class RayHooks:
    """Loop hooks inside a Ray Train worker."""

    def __init__(self, payload: WorkerPayload, training: TowerTraining, tracker, total_steps: int):
        self.payload = payload
        self.groups = training.groups
        self.tracker = tracker  # rank 0 only
        self.total_steps = total_steps
        self.started = time.monotonic()
        self.first_step: Optional[int] = None

    @property
    def is_chief(self) -> bool:
        return self.groups.rank == 0

    def _track(self, metrics: dict, step: int) -> None:
        if self.tracker and step > self.payload.last_logged_step:
            self.tracker.add(metrics, step)

    def on_step(self, progress: Progress, metrics: dict) -> None:
        if not self.is_chief:
            return
        if self.first_step is None:
            self.first_step, self.started = progress.step, time.monotonic()
        rate = (progress.step - self.first_step) / max(1e-9, time.monotonic() - self.started)
        eta = (self.total_steps - progress.step) / rate if rate > 0 else float("nan")
        say(
            f"[train] epoch {metrics['epoch']}/{self.payload.loop.epochs} "
            f"step {progress.step}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.5f} "
            f"{metrics['images_per_s']:.0f} img/s data-wait {metrics['data_wait_s'] * 1000:.0f} ms "
            f"ETA {_duration(eta)}"
        )
        self._track(metrics, progress.step)

    def on_epoch_end(self, progress: Progress, metrics: dict, conv1_weight: torch.Tensor) -> None:
        if not self.is_chief:
            return
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        say(f"[epoch {progress.epoch}] {shown}")
        if self.tracker and progress.step > self.payload.last_logged_step:
            from service.tracking.figures import conv1_kernels_png

            self.tracker.add(metrics, progress.step, epoch=progress.epoch)
            png = conv1_kernels_png(conv1_weight, self.groups.layout.towers, f"conv1 after epoch {progress.epoch}")
            self.tracker.log_png(png, f"figures/conv1_epoch{progress.epoch:03d}.png")

    def save_checkpoint(self, progress: Progress, tower_state: dict, metrics: dict) -> None:
        """Replica 0's towers write their shards, rank 0 writes progress.json;
        every worker reports (Ray Train syncs the folder name), then all wait
        until every upload is done before rank 0 releases the metrics."""
        groups = self.groups
        with tempfile.TemporaryDirectory() as folder:
            shard = ckpt.write_tower_shard(folder, groups.tower, tower_state) if groups.replica == 0 else None
            shards = [None] * groups.layout.world_size
            if dist.is_initialized():
                dist.all_gather_object(shards, shard)
            else:
                shards = [shard]
            if groups.rank == 0:
                record = self._progress_record(progress, metrics, [s for s in shards if s])
                # The points MLflow has not confirmed travel with the checkpoint: the
                # flush below only queues them, and a crash before they are sent must
                # not lose steps a resume from this checkpoint will not redo.
                record[UNCONFIRMED_METRICS] = self.tracker.unconfirmed_points() if self.tracker else []
                ckpt.write_progress(folder, record)
            crash = progress.step == self.payload.crash_in_checkpoint_at_step and groups.replica == 0 \
                and groups.tower == groups.layout.towers - 1 and _first_try(progress)
            report = {"epoch": progress.epoch, "step": progress.step}
            report.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            report[SCORE] = report.get("val_top1_error", UNEVALUATED)
            ray.train.report(
                report,
                checkpoint=Checkpoint.from_directory(folder) if groups.replica == 0 else None,
                checkpoint_dir_name=checkpoint_dir_name(progress.epoch, progress.step),
                checkpoint_upload_fn=_upload_half_then_die if crash else None,
            )
        # ray.train.report returns once *this* worker's upload is done: wait for
        # everyone's, so the metrics below are never ahead of a complete checkpoint.
        ray.train.collective.barrier()
        if self.tracker:
            self.tracker.flush()

    def _progress_record(self, progress: Progress, metrics: dict, shards: list[dict]) -> dict:
        training = self.payload.training
        return {
            "epoch": progress.epoch,
            "step": progress.step,
            "epoch_totals": progress.epoch_totals,
            "replicas": training.layout.replicas,
            "towers": training.layout.towers,
            "spec": ckpt.spec_to_dict(training.spec),
            "resize_size": self.payload.data.resize_size,  # evaluation geometry for service.evaluate
            "config": self.payload.config,
            **self.payload.facts,
            "mlflow_run_id": self.payload.mlflow.run_id if self.payload.mlflow else None,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "shards": shards,
        }


def _checkpoint_destination(dir_name: str) -> tuple[pafs.FileSystem, str]:
    """Where Ray Train uploads the checkpoint folder `dir_name` (test faults only:
    the storage context is a DeveloperAPI)."""
    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.build_checkpoint_path_from_name(dir_name)


def _first_try(progress: Progress) -> bool:
    """Test-only fault: crash once. When Ray Train restarts the workers
    (cluster.max_failures > 0) they pass the same step again and find the
    half-written folder; this time the checkpoint is written whole."""
    filesystem, destination = _checkpoint_destination(checkpoint_dir_name(progress.epoch, progress.step))
    return filesystem.get_file_info(destination).type == pafs.FileType.NotFound


def _upload_half_then_die(checkpoint: Checkpoint, checkpoint_dir_name: str) -> Checkpoint:
    """Test-only fault (ALEXNET_TEST_CRASH_IN_CHECKPOINT): upload the first
    half of each of this worker's checkpoint files, then SIGKILL this process:
    a worker killed in the middle of writing a checkpoint."""
    filesystem, destination = _checkpoint_destination(checkpoint_dir_name)
    filesystem.create_dir(destination)
    for name in sorted(os.listdir(checkpoint.path)):
        data = Path(checkpoint.path, name).read_bytes()
        with filesystem.open_output_stream(f"{destination}/{name}") as stream:
            stream.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _read(checkpoint: Checkpoint, name: str) -> bytes:
    """One file of a checkpoint, straight from its storage (no full download)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as stream:
        return stream.read()


def read_progress(checkpoint: Checkpoint) -> dict:
    """A checkpoint's progress.json, read from its storage."""
    return ckpt.parse_progress(_read(checkpoint, ckpt.PROGRESS_FILE).decode("utf-8"), checkpoint.path)


def _newest_checkpoint(payload: WorkerPayload, rank: int) -> Optional[Checkpoint]:
    """Rank 0 picks, every rank loads the same: the newer of Ray Train's latest
    registered checkpoint and the newest complete one in storage. Ray Train
    registers a checkpoint only after every worker's upload, asynchronously;
    a worker restarted in between would otherwise go back one checkpoint and
    redo (and re-log) steps whose metrics were already sent."""
    choice: list = [None]
    if rank == 0:
        candidates = []
        registered = ray.train.get_checkpoint()
        if registered is not None:
            candidates.append((read_progress(registered)["step"], 1, registered))
        filesystem = payload.storage_filesystem or pafs.LocalFileSystem()
        skipped: list[str] = []
        point = find_resume_point(filesystem, payload.run_folder, log=skipped.append)
        # The driver has already said which incomplete checkpoints it skipped. A
        # different point means Ray Train restarted the workers mid-job: say why
        # they go back past the checkpoints written since.
        if (point.path if point else "") != payload.resume_path:
            for line in skipped:
                say(line)
        if point is not None:
            candidates.append((point.step, 0, Checkpoint(point.path, filesystem=filesystem)))
        choice = [max(candidates, key=lambda c: c[:2])[2] if candidates else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _restore(training: TowerTraining, payload: WorkerPayload) -> tuple[Progress, list[dict]]:
    """Load the newest complete checkpoint (see `_newest_checkpoint`); each
    worker reads progress.json and its own tower's shard only. Returns where
    to continue and the metric points the checkpoint carries that MLflow did
    not hold when the run started (rank 0 sends them)."""
    groups = training.groups
    checkpoint = _newest_checkpoint(payload, groups.rank)
    if checkpoint is None:
        return Progress(), []
    progress = read_progress(checkpoint)
    if progress["towers"] != groups.layout.towers:  # the driver checks this first; never load a wrong shard
        raise ValueError(f"checkpoint has towers={progress['towers']}, this run towers={groups.layout.towers}")
    data = _read(checkpoint, ckpt.shard_file(groups.tower))
    training.load_state_dict(ckpt.load_shard(data, groups.tower, progress, checkpoint.path))
    if groups.rank == 0:
        say(f"[train] resumed from epoch {progress['epoch']} step {progress['step']} ({checkpoint.path})")
    carried = [p for p in progress.get(UNCONFIRMED_METRICS, []) if p["step"] > payload.last_logged_step]
    return (Progress(epoch=progress["epoch"], step=progress["step"],
                     epoch_totals=list(progress.get("epoch_totals") or [0.0, 0.0, 0.0])), carried)


def _node_label() -> str:
    context = ray.get_runtime_context()
    return f"{context.get_node_id()[:12]} ({ray.util.get_node_ip_address()})"


def _reporting_skipped_shards(shares, source, split: str, groups):
    """Pass host shares through, saying which unreadable shards were skipped
    (data.skip_bad_shards=true: their rows are stood in for, so counts hold)."""
    from service.data.read import skipped_shards

    skipped: set = set()
    for share in shares:
        if source.skip_bad_shards:
            for uri in sorted(skipped_shards(share, source, split) - skipped):
                skipped.add(uri)
                say(f"[data] replica {groups.replica} tower {groups.tower}: skipped unreadable {split} shard {uri} "
                    f"({len(skipped)} this epoch; data.skip_bad_shards=true)")
        yield share


def _epoch_batches(payload: WorkerPayload, groups, device: torch.device, split: str, loader):
    """Callables giving this tower the replica's device batches of an epoch of
    `split`: it reads its own lane (1/T of every batch), `loader` prepares each
    share on this device, and the towers all-gather the full batch."""
    from service.data.epochs import Lane
    from service.data.pipeline import iter_shares, lane_dataset, object_store_budget

    layout = payload.training.layout
    share_rows = payload.per_replica_batch // layout.towers
    lane = Lane(groups.replica, layout.replicas, groups.tower, layout.towers)
    budget = object_store_budget(layout.world_size)

    def for_epoch(epoch: int, done_batches: int = 0):
        dataset = lane_dataset(payload.data, split, epoch if split == "train" else 0, lane, share_rows,
                               skip_shares=done_batches, concurrency=payload.read_tasks_per_lane,
                               object_store_bytes=budget)
        shares = _reporting_skipped_shards(iter_shares(dataset, share_rows, payload.data.decode), payload.data, split, groups)
        return tower_batches(shares, lambda share: loader(share, split), groups, device)

    return for_epoch


def _start_tracking(payload: WorkerPayload, rank: int):
    """(rank 0's metric tracker, this node's system-metrics stopper); either may be None."""
    if payload.mlflow is None:
        return None, None
    context = ray.train.get_context()
    samples_node = payload.system_metrics and context.get_local_rank() == 0  # one sampler per node
    if rank != 0 and not samples_node:
        return None, None  # sends nothing, so never imports MLflow (~2 CPU-s at every job start)
    from service.tracking.worker_tracker import WorkerTracker, start_node_system_metrics

    stop_system = None
    if samples_node:
        stop_system = start_node_system_metrics(payload.mlflow, node_id=f"node{context.get_node_rank()}")
    tracker = WorkerTracker(payload.mlflow, system_metrics=False) if rank == 0 else None
    return tracker, stop_system


def _stop_tracking(payload: WorkerPayload, tracker, stop_system) -> None:
    """Send what MLflow can still take; write what it cannot next to the checkpoints."""
    if tracker:
        from service.tracking.worker_tracker import file_spill

        report = tracker.close(spill=file_spill(payload.run_folder, payload.mlflow.run_id, payload.storage_filesystem),
                               timeout_s=payload.tracking_close_timeout_s)
        if report.unsent_points or report.unsent_artifacts:
            say(f"[mlflow] {report.unsent_points} metric points and {report.unsent_artifacts} figures were not sent; "
                f"written under {payload.run_folder} (python -m service.tracking.resend)")
    if stop_system:
        stop_system()


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function."""
    payload: WorkerPayload = config["payload"]
    set_worker_device(ray.train.torch.get_device())  # before any NCCL group or CUDA stream exists
    quiet_ray_logging()
    layout = payload.training.layout
    groups = rank_groups(layout)
    check_tower_placement(layout, _node_label(), payload.allow_cross_node_towers)
    device = ray.train.torch.get_device()
    training = build_training(payload.training, groups, device)
    loader = ShareLoader(payload.data, device, threads=payload.decode_threads)
    start, carried_points = _restore(training, payload)
    loop = payload.loop
    total_steps = loop.steps_per_epoch * loop.epochs
    if loop.max_steps:
        total_steps = min(total_steps, loop.max_steps)
    tracker, stop_system = _start_tracking(payload, groups.rank)
    if tracker and carried_points:
        say(f"[mlflow] sending {tracker.resend(carried_points)} metric points the checkpoint carried "
            f"(steps {min(p['step'] for p in carried_points)}-{max(p['step'] for p in carried_points)}, "
            "not in MLflow when this run started)")
    hooks = RayHooks(payload, training, tracker, total_steps)
    try:
        run_training(
            training,
            _epoch_batches(payload, groups, device, "train", loader),
            _epoch_batches(payload, groups, device, "val", loader),
            hooks,
            loop,
            start,
        )
    finally:
        _stop_tracking(payload, tracker, stop_system)
