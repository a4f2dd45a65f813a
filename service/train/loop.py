"""The epoch loop of one tower worker.

It knows nothing of Ray or MLflow: batches come from callables, and
everything the outside world needs (progress lines, metrics, checkpoints)
goes through `LoopHooks`. The Ray Train adapter implements the hooks; tests
and benchmarks use plain in-memory ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as dist

from service.parallel.groups import RankGroups
from service.train.schedule import LRSchedule, apply_lr
from service.train.step import Normalizer, TowerStep, evaluate, topk_correct

Batches = Callable[[int], Iterable[dict]]  # epoch -> device batches


@dataclass
class Progress:
    """Where training stands: completed epochs and optimizer steps."""

    epoch: int = 0
    step: int = 0


@dataclass(frozen=True)
class LoopOptions:
    epochs: int
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0
    max_steps: int = 0
    eval_every_epochs: int = 1


class LoopHooks(Protocol):
    def on_step(self, progress: Progress, metrics: dict) -> None: ...

    def on_epoch_end(self, progress: Progress, metrics: dict, conv1_weight: torch.Tensor) -> None: ...

    def save_checkpoint(self, progress: Progress, tower_state: dict, metrics: dict) -> None: ...


@dataclass
class TowerTraining:
    """What one tower trains with; `state_dict` is its checkpoint shard."""

    step: TowerStep
    schedule: LRSchedule
    normalizer: Normalizer
    groups: RankGroups

    def state_dict(self) -> dict:
        return {
            "model": self.step.model.state_dict(),
            "optimizer": self.step.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step.model.load_state_dict(state["model"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


def gather_conv1(training: TowerTraining) -> torch.Tensor:
    """All towers' conv1 kernels of this replica, in tower order (for figures)."""
    weight = training.step.model.conv1.weight.detach()
    group = training.groups.tower_group
    if group is None:
        return weight.cpu()
    parts = [torch.empty_like(weight) for _ in range(training.groups.layout.towers)]
    dist.all_gather(parts, weight.contiguous(), group=group)
    return torch.cat(parts).cpu()


def run_training(
    training: TowerTraining,
    train_batches: Batches,
    val_batches: Batches,
    hooks: LoopHooks,
    options: LoopOptions,
    start: Optional[Progress] = None,
) -> Progress:
    """Train from `start` until `options.epochs` epochs (or `max_steps`) are done."""
    progress = Progress(**vars(start)) if start else Progress()
    replicas = training.groups.layout.replicas
    while progress.epoch < options.epochs:
        epoch_totals = torch.zeros(3, dtype=torch.float64)  # images, top1 hits, loss sum
        data_wait = 0.0
        tick = time.perf_counter()
        stopped_early = False
        for batch in train_batches(progress.epoch):
            fetched = time.perf_counter()
            data_wait += fetched - tick
            lr = training.schedule.lr_at(progress.step)
            apply_lr(training.step.optimizer, lr)
            images = training.normalizer(batch["image"], batch.get("lighting"))
            loss, logits = training.step(images, batch["label"])
            progress.step += 1
            top1 = topk_correct(logits, batch["label"], ks=(1,))[0]
            count = len(batch["label"])
            epoch_totals += torch.tensor([count, top1, float(loss) * count], dtype=torch.float64)
            done = time.perf_counter()
            if progress.step % options.log_every_steps == 0:
                hooks.on_step(
                    progress,
                    {
                        "loss": float(loss),
                        "lr": lr,
                        # Global throughput: every replica processes `count` images.
                        "images_per_s": count * replicas / max(1e-9, done - tick),
                        "data_wait_s": fetched - tick,
                        "epoch": progress.epoch + 1,
                    },
                )
            if options.checkpoint_every_steps and progress.step % options.checkpoint_every_steps == 0:
                hooks.save_checkpoint(progress, training.state_dict(), {"loss": float(loss)})
            tick = time.perf_counter()
            if options.max_steps and progress.step >= options.max_steps:
                stopped_early = True
                break
        if stopped_early:
            hooks.save_checkpoint(progress, training.state_dict(), {"loss": float(loss)})
            return progress
        progress.epoch += 1
        metrics = _epoch_metrics(epoch_totals, data_wait)
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
    return progress


def _epoch_metrics(totals: torch.Tensor, data_wait: float) -> dict:
    count, top1, loss_sum = totals.tolist()
    if count == 0:
        raise RuntimeError("the training epoch produced no batches: is the dataset smaller than one batch?")
    # Train error is measured on this replica's batches, with dropout on.
    return {"train_top1_error": 1.0 - top1 / count, "train_loss": loss_sum / count, "data_wait_epoch_s": data_wait}
