"""A `python -m service.train` job's training, run without Ray: the reference a
real job's weights are compared against (tests/test_faults.py).

The driver's own functions turn the overrides into the job's data source,
layout, training and loop options (`service.launch`); each tower then does
what `service.ray_train.train_worker` does on a fresh run, on a
`run_on_processes` rank over gloo: the same build, loop and all-gather of
shares, except that it reads its lane in-process (`iter_lane_local`: the lane
dataset's shares, same order and content, tested in tests/data/test_pipeline.py)
and writes no checkpoint and no metric. So the reference shares no Ray code
with the job it checks, and costs no Ray Train start.
"""

from __future__ import annotations

from pathlib import Path

import torch

from service.config import decode_mode
from service.data.device_decode import ShareLoader
from service.data.epochs import Lane, open_source, steps_per_epoch
from service.data.pipeline import iter_lane_local
from service.hydra_app import compose
from service.launch import check_layout, loop_options, resolved_data
from service.parallel.batches import tower_batches
from service.parallel.local import run_on_processes
from service.parallel.sharding import towers_to_reference
from service.train.build import build_training, rank_groups, training_options
from service.train.loop import run_training
from tests.loop_support import RecordingHooks


def _tower(rank, world_size, options, loop, source, share_rows, out_dir):
    layout = options.layout
    groups = rank_groups(layout)
    device = torch.device("cpu")
    training = build_training(options, groups, device)
    loader = ShareLoader(source, device)
    lane = Lane(groups.replica, layout.replicas, groups.tower, layout.towers)

    def epochs_of(split: str):
        # As service.ray_train._epoch_batches: validation reads epoch 0's plan every time.
        def for_epoch(epoch: int, done_batches: int = 0):
            shares = iter_lane_local(source, split, epoch if split == "train" else 0, lane, share_rows,
                                     skip_shares=done_batches)
            return tower_batches(shares, lambda share: loader(share, split), groups, device)

        return for_epoch

    run_training(training, epochs_of("train"), epochs_of("val"), RecordingHooks(), loop)
    if groups.replica == 0:
        torch.save(training.state_dict()["model"], f"{out_dir}/tower_{groups.tower}.pt")


def train_without_ray(overrides: list[str], out_dir: Path) -> dict[str, torch.Tensor]:
    """The consolidated final weights (single-process reference layout) of
    `python -m service.train <overrides>` trained from scratch."""
    cfg = compose(overrides)
    source = open_source(resolved_data(cfg), cfg.model.image_size, cfg.parallel.replicas, decode_mode(cfg))
    layout, spec = check_layout(cfg, source.meta.num_classes)
    per_replica = cfg.train.batch_size // layout.replicas
    steps = steps_per_epoch(source, layout.replicas, layout.towers, per_replica)
    options = training_options(cfg, spec, source.meta.mean, source.meta.std, steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_on_processes(_tower, layout.world_size, options, loop_options(cfg, steps), source,
                     per_replica // layout.towers, str(out_dir))
    return towers_to_reference([torch.load(out_dir / f"tower_{t}.pt") for t in range(layout.towers)], spec)
