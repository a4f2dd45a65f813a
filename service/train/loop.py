"""The epoch loop of one tower worker.

It knows nothing of Ray or MLflow: batches come from a callable, and
everything the outside world needs (progress lines, metrics, checkpoints)
goes through `LoopHooks`. The Ray Train adapter implements the hooks; tests
and benchmarks use plain in-memory ones.

Host reads: the loss and the epoch's running totals stay on the device. The
loop reads them only on logging steps, at checkpoints and at the end of an
epoch, so on a GPU the host queues steps ahead of the device instead of
waiting for every step to finish.

Resume: a `Progress` from a checkpoint taken in the middle of epoch e at
global step s continues epoch e at its batch s - e * steps_per_epoch (the
batches callable skips what was already trained on), with the epoch's train
totals so far and the dropout stream the uninterrupted run had at step s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as dist

from service.train.build import TowerTraining
from service.train.schedule import apply_lr
from service.train.step import evaluate, topk_hits

# (epoch, batches of that epoch already trained on) -> device batches from there on.
Batches = Callable[[int, int], Iterable[dict]]


@dataclass
class Progress:
    """Where training stands."""

    # -- Completed epochs.
    epoch: int = 0
    # -- Optimizer steps taken since the start of the run.
    step: int = 0
    # -- The epoch in progress so far: images, top-1 hits, loss sum (a
    #    mid-epoch checkpoint keeps them so the epoch's train error is whole).
    epoch_totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


@dataclass(frozen=True)
class LoopOptions:
    epochs: int
    steps_per_epoch: int
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0
    max_steps: int = 0
    eval_every_epochs: int = 1


class LoopHooks(Protocol):
    def on_step(self, progress: Progress, metrics: dict) -> None: ...

    def on_epoch_end(self, progress: Progress, metrics: dict, conv1_weight: torch.Tensor) -> None: ...

    def save_checkpoint(self, progress: Progress, tower_state: dict, metrics: dict) -> None: ...


def gather_conv1(training: TowerTraining) -> torch.Tensor:
    """All towers' conv1 kernels of this replica, in tower order (for figures)."""
    weight = training.step.model.conv1.weight.detach()
    group = training.groups.tower_group
    if group is None:
        return weight.cpu()
    parts = [torch.empty_like(weight) for _ in range(training.groups.layout.towers)]
    dist.all_gather(parts, weight.contiguous(), group=group)
    return torch.cat(parts).cpu()


class _Window:
    """Throughput between two logging steps (measured after the log step's host read)."""

    def __init__(self):
        self.started, self.images = time.perf_counter(), 0

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(1e-9, now - self.started)
        self.started, self.images = now, 0
        return rate


def run_training(
    training: TowerTraining,
    train_batches: Batches,
    val_batches: Callable[[int], Iterable[dict]],
    hooks: LoopHooks,
    options: LoopOptions,
    start: Optional[Progress] = None,
) -> Progress:
    """Train from `start` until `options.epochs` epochs (or `max_steps`) are done."""
    progress = replace(start) if start else Progress()
    replicas = training.groups.layout.replicas
    device = training.normalizer.mean.device
    training.reseed(progress.step)
    window = _Window()
    while progress.epoch < options.epochs:
        done = progress.step - progress.epoch * options.steps_per_epoch
        totals = torch.tensor(progress.epoch_totals, dtype=torch.float64, device=device)
        data_wait, tick = 0.0, time.perf_counter()
        loss = None
        for batch in train_batches(progress.epoch, done):
            fetched = time.perf_counter()
            data_wait += fetched - tick
            lr = training.schedule.lr_at(progress.step)
            apply_lr(training.step.optimizer, lr)
            images = training.normalizer(batch["image"], batch.get("lighting"))
            labels = batch["label"]
            loss, logits = training.step(images, labels)
            progress.step += 1
            count = labels.shape[0]  # a shape, not a device read
            window.images += count * replicas  # every replica trains on `count` images
            totals[0] += count  # a Python scalar into a kernel: no host<->device copy
            totals[1] += topk_hits(logits, labels, (1,))[0]
            totals[2] += loss * count
            if progress.step % options.log_every_steps == 0:
                hooks.on_step(progress, {
                    "loss": float(loss),  # the host read of this logging step
                    "lr": lr,
                    "images_per_s": window.rate(),
                    "data_wait_s": fetched - tick,
                    "epoch": progress.epoch + 1,
                })
            stop = bool(options.max_steps) and progress.step >= options.max_steps
            epoch_ends = progress.step == (progress.epoch + 1) * options.steps_per_epoch  # its own checkpoint follows
            periodic = options.checkpoint_every_steps and progress.step % options.checkpoint_every_steps == 0
            if stop or (periodic and not epoch_ends):
                progress.epoch_totals = totals.tolist()
                hooks.save_checkpoint(progress, training.state_dict(), {"loss": float(loss)})
                training.reseed(progress.step)
            if stop:
                return progress
            tick = time.perf_counter()
        progress.epoch += 1
        progress.epoch_totals = [0.0, 0.0, 0.0]
        metrics = _epoch_metrics(totals, data_wait)
        if progress.epoch % options.eval_every_epochs == 0 or progress.epoch == options.epochs:
            metrics.update(
                evaluate(
                    training.step.model,
                    val_batches(progress.epoch),
                    training.normalizer,
                    training.groups,
                    bf16=training.step.options.bf16,
                )
            )
            if training.schedule.end_epoch(metrics["val_top1_error"]):
                metrics["lr_dropped"] = 1.0
        hooks.on_epoch_end(progress, metrics, gather_conv1(training))
        hooks.save_checkpoint(progress, training.state_dict(), metrics)
        training.reseed(progress.step)
    return progress


def _epoch_metrics(totals: torch.Tensor, data_wait: float) -> dict:
    count, top1, loss_sum = totals.tolist()
    if count == 0:
        raise RuntimeError("the training epoch produced no batches: is the dataset smaller than one batch?")
    # Train error is measured on this replica's batches, with dropout on.
    return {"train_top1_error": 1.0 - top1 / count, "train_loss": loss_sum / count, "data_wait_epoch_s": data_wait}
