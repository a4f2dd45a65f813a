"""The loop, schedule, batch replication and checkpoint format, without Ray."""

import math

import pytest
import torch

from service.model import ReferenceAlexNet, alexnet_spec
from service.parallel.layout import ParallelLayout
from service.train import checkpoint as ckpt
from service.train.build import TowerTraining, build_optimizer, build_tower, rank_groups
from service.train.loop import LoopOptions, Progress, run_training
from service.train.schedule import LRSchedule
from service.train.step import Normalizer, TowerStep
from tests.loop_support import RecordingHooks, synthetic_batches


def test_warmup_then_step_schedule():
    schedule = LRSchedule(0.1, "step", steps_per_epoch=10, total_epochs=90, warmup_epochs=1, step_epochs=(30, 60))
    assert schedule.lr_at(0) == pytest.approx(0.01)
    assert schedule.lr_at(9) == pytest.approx(0.1)
    assert schedule.lr_at(299) == pytest.approx(0.1)
    assert schedule.lr_at(300) == pytest.approx(0.01)
    assert schedule.lr_at(600) == pytest.approx(0.001)


def test_cosine_reaches_zero():
    schedule = LRSchedule(0.2, "cosine", steps_per_epoch=5, total_epochs=4)
    assert schedule.lr_at(0) == pytest.approx(0.2)
    assert schedule.lr_at(10) == pytest.approx(0.1)
    assert schedule.lr_at(20) == pytest.approx(0.0, abs=1e-12)


def test_plateau_divides_by_ten_at_most_max_drops_times_and_survives_restore():
    schedule = LRSchedule(0.01, "plateau", steps_per_epoch=1, total_epochs=90, plateau_patience=2, plateau_max_drops=3)
    errors = [0.9, 0.8, 0.8, 0.8] + [0.8] * 10
    drops = [schedule.end_epoch(e) for e in errors]
    assert drops[:4] == [False, False, False, True]  # two epochs without improvement
    assert sum(drops) == 3  # capped, as in the paper
    assert schedule.lr_at(100) == pytest.approx(1e-5)
    restored = LRSchedule(0.01, "plateau", steps_per_epoch=1, total_epochs=90)
    restored.load_state_dict(schedule.state_dict())
    assert restored.lr_at(0) == pytest.approx(1e-5)
    assert not math.isinf(restored.state.best_error)


def test_loop_trains_without_ray_and_checkpoints_round_trip(tmp_path):
    spec = alexnet_spec(num_classes=4, image_size=64, towers=1, width_mult=0.25, init="kaiming", dropout=0.0)
    layout = ParallelLayout(1, 1)
    groups = rank_groups(layout)
    model = build_tower(spec, groups, seed=0, device=torch.device("cpu"))
    optimizer = build_optimizer(model, 0.005, 0.9, 5e-4)
    training = TowerTraining(
        TowerStep(model, optimizer, spec, groups),
        LRSchedule(0.005, "constant", steps_per_epoch=8, total_epochs=6),
        Normalizer([100, 100, 100], [60, 60, 60], torch.device("cpu"), channels_last=False),
        groups,
    )
    data = synthetic_batches(8, batch=16, num_classes=4, learnable=True)
    hooks = RecordingHooks()
    final = run_training(training, lambda epoch, done: data[done:], lambda epoch: data[:2], hooks,
                         LoopOptions(epochs=6, steps_per_epoch=8, log_every_steps=4))
    assert (final.epoch, final.step) == (6, 48)
    assert [e for e, _, _ in hooks.epochs] == [1, 2, 3, 4, 5, 6]
    assert hooks.epochs[-1][1]["val_top1_error"] < 0.5  # learned something (chance: 0.75)
    assert hooks.steps[-1][1] < hooks.steps[0][1]
    # The last checkpoint, written in the service's format, loads into the reference model.
    progress, state = hooks.checkpoints[-1]
    shard = ckpt.write_tower_shard(tmp_path, 0, state)
    ckpt.write_progress(tmp_path, {"epoch": progress.epoch, "step": progress.step, "towers": 1,
                                   "spec": ckpt.spec_to_dict(spec), "shards": [shard]})
    loaded_spec, reference_state = ckpt.load_reference_state(tmp_path)
    assert loaded_spec == spec
    reference = ReferenceAlexNet(spec)
    reference.load_state_dict(reference_state)
    for name, value in model.state_dict().items():
        assert torch.equal(reference.state_dict()[name], value)


def test_max_steps_stops_and_checkpoints_mid_epoch():
    spec = alexnet_spec(num_classes=4, image_size=64, towers=1, width_mult=0.25, init="kaiming")
    groups = rank_groups(ParallelLayout(1, 1))
    model = build_tower(spec, groups, seed=0, device=torch.device("cpu"))
    training = TowerTraining(
        TowerStep(model, build_optimizer(model, 0.01, 0.9, 0), spec, groups),
        LRSchedule(0.01, "constant", steps_per_epoch=8, total_epochs=3),
        Normalizer([100] * 3, [60] * 3, torch.device("cpu"), channels_last=False),
        groups,
    )
    hooks = RecordingHooks()
    data = synthetic_batches(8, batch=16, num_classes=4, learnable=True)
    final = run_training(training, lambda e, done: data[done:], lambda e: data, hooks,
                         LoopOptions(epochs=3, steps_per_epoch=8, max_steps=5), start=Progress(0, 0))
    assert (final.epoch, final.step) == (0, 5)
    assert [p.step for p, _ in hooks.checkpoints] == [5]
