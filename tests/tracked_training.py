"""A short real training run logged through the real `WorkerTracker`.

The project's own loop (`run_training`), tower, optimizer and schedule train a
tiny AlexNet on learnable synthetic batches; the hooks do what the Ray Train
adapter does with MLflow: metrics added every step and at each epoch end,
flushed right after each checkpoint. Used in-process by the tracking-fault
tests and as a subprocess (`python -m tests.tracked_training`) by the load test.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Optional

import torch

from service.model import alexnet_spec
from service.parallel.groups import single_process_groups
from service.parallel.layout import ParallelLayout
from service.train.build import TowerTraining, build_optimizer, build_tower
from service.train.loop import LoopOptions, Progress, run_training
from service.train.schedule import LRSchedule
from service.train.step import Normalizer, TowerStep
# Batches whose label shows in the colour channels: a net learns them in a few steps.
from tests.test_train_loop import _learnable_batches as learnable_batches

STEP_KEYS = ("loss", "lr", "images_per_s", "data_wait_s", "epoch")  # what the loop reports per logged step
NUM_CLASSES, IMAGE_SIZE, BATCH = 4, 64, 8


class TrackerHooks:
    """The Ray adapter's MLflow behaviour, without Ray: add per step and epoch, flush after checkpoints."""

    def __init__(self, tracker, after_checkpoint: Optional[Callable[[int], None]] = None):
        self.tracker = tracker
        self.after_checkpoint = after_checkpoint
        self.checkpoints = 0

    def on_step(self, progress: Progress, metrics: dict) -> None:
        self.tracker.add(metrics, progress.step)

    def on_epoch_end(self, progress: Progress, metrics: dict, conv1_weight: torch.Tensor) -> None:
        self.tracker.add(metrics, progress.step, epoch=progress.epoch)

    def save_checkpoint(self, progress: Progress, tower_state: dict, metrics: dict) -> None:
        # (The checkpoint itself would be written here; it is durable before the flush.)
        self.tracker.flush()
        self.checkpoints += 1
        if self.after_checkpoint is not None:
            self.after_checkpoint(self.checkpoints)


def train_with_tracker(tracker, epochs: int, steps_per_epoch: int, checkpoint_every_steps: int = 0,
                       seed: int = 0, after_checkpoint: Optional[Callable[[int], None]] = None) -> Progress:
    """Train the tiny model for `epochs` x `steps_per_epoch` steps, logging every step."""
    # One thread: several of these run at once on a 2-core machine, and
    # OpenMP threads spinning against each other make a step 20x slower.
    torch.set_num_threads(1)
    spec = alexnet_spec(num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, towers=1, width_mult=0.25,
                        dropout=0.0, init="kaiming")
    groups = single_process_groups(ParallelLayout(1, 1))
    device = torch.device("cpu")
    model = build_tower(spec, groups, seed, device)
    training = TowerTraining(
        step=TowerStep(model, build_optimizer(model, 0.005, 0.9, 5e-4), spec, groups),
        schedule=LRSchedule(0.005, "constant", steps_per_epoch=steps_per_epoch, total_epochs=epochs),
        normalizer=Normalizer([60.0] * 3, [80.0] * 3, device, channels_last=False),
        groups=groups,
    )
    shape = {"num_classes": NUM_CLASSES, "batch": BATCH, "size": IMAGE_SIZE}
    train = learnable_batches(count=steps_per_epoch, seed=seed, **shape)
    val = learnable_batches(count=2, seed=seed + 1, **shape)
    options = LoopOptions(epochs=epochs, steps_per_epoch=steps_per_epoch, log_every_steps=1,
                          checkpoint_every_steps=checkpoint_every_steps)
    return run_training(training, lambda epoch, done: train[done:], lambda epoch: val,
                        TrackerHooks(tracker, after_checkpoint), options)


def main() -> None:
    """One training process of the load test: open a run, train, close; print a JSON summary."""
    from service.config import TrackingConfig
    from service.tracking.mlflow_tracker import finish_run, open_run
    from service.tracking.worker_tracker import WorkerTracker

    parser = argparse.ArgumentParser()
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    handle = open_run(TrackingConfig(uri=args.tracking_uri, experiment=args.experiment), args.run_name,
                      {"seed": args.seed})
    tracker = WorkerTracker(handle, system_metrics=False, retry_interval_s=1.0)
    progress = train_with_tracker(tracker, args.epochs, args.steps_per_epoch, checkpoint_every_steps=10,
                                  seed=args.seed)
    report = tracker.close(timeout_s=120)
    finish_run(handle)
    print(json.dumps({"run_id": handle.run_id, "steps": progress.step, "sent": report.sent_points,
                      "unsent": report.unsent_points}))


if __name__ == "__main__":
    main()
