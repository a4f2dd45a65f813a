"""The GPU speed paths of the step, checked on CPU: no host reads outside
logging steps, torch.compile equal to eager, bf16 and channels_last through
the exchanges, bf16 gradient compression, exact mid-epoch resume."""

from __future__ import annotations

import pytest
import torch

from service.config import RecipeConfig
from service.model import ReferenceAlexNet, alexnet_spec
from service.parallel.exchange import TowerExchange
from service.parallel.layout import ParallelLayout
from service.parallel.local import run_on_processes
from service.train.build import TrainingOptions, build_training, rank_groups
from service.train.loop import LoopOptions, run_training
from tests.loop_support import RecordingHooks, synthetic_batches

MEAN, STD = (120.0, 115.0, 100.0), (60.0, 60.0, 60.0)


def options(towers=1, replicas=1, dropout=0.5, compile=False, steps_per_epoch=20, epochs=2, **recipe):
    spec = alexnet_spec(num_classes=8, image_size=64, towers=towers, width_mult=0.25, dropout=dropout, init="kaiming")
    return TrainingOptions(
        spec=spec, layout=ParallelLayout(replicas, towers), recipe=RecipeConfig(lr=0.01, schedule="constant", **recipe),
        base_lr=0.01, steps_per_epoch=steps_per_epoch, epochs=epochs, seed=3, mean=MEAN, std=STD, compile=compile,
    )


class Counting:
    """Batches of an epoch, counting how many the loop has taken."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __call__(self, epoch, done):
        for batch in self.batches[done:]:
            self.taken += 1
            yield batch


@pytest.mark.parametrize("log_every, checkpoint_every, first_read_after", [(7, 0, 7), (100, 0, 20), (100, 5, 5)])
def test_loop_reads_the_device_only_on_logging_steps_checkpoints_and_epoch_ends(
    log_every, checkpoint_every, first_read_after
):
    """On the meta device every host read (float(), .item(), .tolist(), .cpu())
    raises: the first one must come exactly at the first logging step,
    checkpoint or epoch end, never on the steps before it."""
    meta = torch.device("meta")
    training = build_training(options(), rank_groups(ParallelLayout(1, 1)), meta)
    batches = Counting(synthetic_batches(20, device=meta))
    loop = LoopOptions(epochs=1, steps_per_epoch=20, log_every_steps=log_every, checkpoint_every_steps=checkpoint_every)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        run_training(training, batches, lambda epoch: [], RecordingHooks(), loop)
    assert batches.taken == first_read_after


def _train(training, batches, steps):
    for batch in batches[:steps]:
        loss, _ = training.step(training.normalizer(batch["image"]), batch["label"])
    return float(loss)


# Inductor generates and compiles C++ for the whole step: 20-40 s cold on 2 cores, so in
# `make test-slow` (CI runs it); the compile path's graph count and forward are in
# test_gpu_path_review.py's test_one_tower_compiles_in_four_graphs_with_the_eager_loss.
@pytest.mark.slow
def test_compiled_tower_trains_like_the_eager_one():
    batches = synthetic_batches(3)
    eager = build_training(options(dropout=0.0), rank_groups(ParallelLayout(1, 1)), torch.device("cpu"))
    compiled = build_training(options(dropout=0.0, compile=True), rank_groups(ParallelLayout(1, 1)), torch.device("cpu"))
    assert compiled.step.trained is not compiled.step.model  # really compiled
    assert _train(compiled, batches, 3) == pytest.approx(_train(eager, batches, 3), rel=1e-4)
    for (name, a), b in zip(eager.step.model.state_dict().items(), compiled.step.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_activations_stay_bf16_through_lrn_and_every_exchange():
    """Under bf16 autocast every exchanged tensor is bf16 (LRN would return
    fp32), and channels_last maps stay channels_last."""
    spec = alexnet_spec(num_classes=8, image_size=64, towers=1, width_mult=0.25, init="kaiming")
    seen = []

    def recording_exchange(x, replicated_after=False):
        seen.append((x.dtype, x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)))
        return x

    from service.model import AlexNetTower

    tower = AlexNetTower(spec, 0, recording_exchange).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tower(images)
    # exchange 1 (conv2 maps), pool5, fc6, fc7 and the sliced logits
    assert len(seen) == 5 and all(dtype == torch.bfloat16 for dtype, _ in seen), seen
    assert seen[0][1] and seen[1][1], "conv2 and pool5 maps must reach the exchange channels_last"


def _exchange_worker(rank, world_size, out_dir):
    groups = rank_groups(ParallelLayout(1, world_size))
    exchange = TowerExchange(groups.tower_group)
    torch.manual_seed(rank)
    base = torch.randn(2, 4, 3, 3)
    results = {}
    for name, x in (("nchw", base.clone()), ("nhwc", base.contiguous(memory_format=torch.channels_last)),
                    ("bf16", base.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))):
        x.requires_grad_(True)
        y = exchange(x)
        weight = torch.arange(y.numel(), dtype=torch.float32).view(y.shape).to(y.dtype)
        (y * weight).sum().backward()
        results[name] = (y.detach().float(), x.grad.float(), y.dtype, y.is_contiguous(memory_format=torch.channels_last))
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_exchange_is_layout_and_dtype_preserving(tmp_path):
    run_on_processes(_exchange_worker, 2, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        out, grad, dtype, _ = results["nchw"]
        assert out.shape == (2, 8, 3, 3) and dtype == torch.float32
        # The gathered maps are tower 0's then tower 1's, whatever the memory layout.
        for name in ("nhwc", "bf16"):
            other_out, other_grad, other_dtype, channels_last = results[name]
            assert channels_last
            tolerance = 1e-2 if name == "bf16" else 0.0
            torch.testing.assert_close(other_out, out, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(other_grad, grad, rtol=tolerance, atol=tolerance * 100)
        assert results["bf16"][2] == torch.bfloat16
        # backward = sum over towers of the gradient of this tower's slice: both
        # towers weighted their outputs the same way, so each gets 2x its slice's weight.
        slice_weight = torch.arange(2 * 8 * 9, dtype=torch.float32).view(2, 8, 3, 3)[:, rank * 4:(rank + 1) * 4]
        torch.testing.assert_close(grad, 2 * slice_weight)


def _compressed_worker(rank, world_size, out_dir):
    groups = rank_groups(ParallelLayout(world_size, 1))
    opts = options(dropout=0.0)
    training = build_training(
        TrainingOptions(**{**opts.__dict__, "layout": ParallelLayout(world_size, 1), "grad_compression": "bf16"}),
        groups, torch.device("cpu"))
    batch = synthetic_batches(1, batch=8, seed=rank)[0]
    training.step.optimizer.zero_grad()
    training.step.forward_backward(training.normalizer(batch["image"]), batch["label"])
    torch.save({n: p.grad.clone() for n, p in training.step.model.named_parameters()}, f"{out_dir}/rank{rank}.pt")


def test_bf16_gradient_compression_averages_replicas_within_bf16_precision(tmp_path):
    run_on_processes(_compressed_worker, 2, str(tmp_path))
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(3)
    reference = ReferenceAlexNet(options(dropout=0.0).spec)
    from torch.nn import functional as F

    from service.train.step import Normalizer

    normalizer = Normalizer(MEAN, STD, torch.device("cpu"), channels_last=False)
    batches = [synthetic_batches(1, batch=8, seed=r)[0] for r in range(2)]
    loss = sum(F.cross_entropy(reference(normalizer(b["image"])), b["label"]) for b in batches) / 2
    loss.backward()
    for name, param in reference.named_parameters():
        assert torch.equal(grads[0][name], grads[1][name]), f"{name}: replicas disagree"
        scale = param.grad.abs().max().item()
        assert (grads[0][name] - param.grad).abs().max().item() <= 1e-2 * scale + 1e-6, name


def test_resume_mid_epoch_replays_the_same_batches_and_ends_with_the_same_weights():
    """Stop at a mid-epoch checkpoint, rebuild everything, resume: the batches
    taken after the checkpoint and the final weights equal the uninterrupted
    run's (dropout on: its stream is restored too)."""
    data = {epoch: synthetic_batches(6, seed=100 + epoch) for epoch in range(2)}
    loop = LoopOptions(epochs=2, steps_per_epoch=6, log_every_steps=100, checkpoint_every_steps=4)
    seen_full: list = []

    def batches(record):
        def for_epoch(epoch, done):
            for index in range(done, 6):
                record.append((epoch, index))
                yield data[epoch][index]
        return for_epoch

    def fresh():
        return build_training(options(steps_per_epoch=6), rank_groups(ParallelLayout(1, 1)), torch.device("cpu"))

    full = fresh()
    final = run_training(full, batches(seen_full), lambda e: data[0][:1], RecordingHooks(), loop)
    assert final.step == 12

    first, seen_first = fresh(), []
    hooks = RecordingHooks()
    run_training(first, batches(seen_first), lambda e: data[0][:1], hooks, LoopOptions(**{**loop.__dict__, "max_steps": 8}))
    progress, state = next((p, s) for p, s in hooks.checkpoints if p.step == 8)  # epoch 1, batch 2
    assert (progress.epoch, progress.step) == (1, 8)
    resumed, seen_resumed = fresh(), []
    resumed.load_state_dict(state)
    final = run_training(resumed, batches(seen_resumed), lambda e: data[0][:1], RecordingHooks(), loop, start=progress)
    assert final.step == 12
    assert seen_first[:8] + seen_resumed == seen_full
    for (name, a), b in zip(full.step.model.state_dict().items(), resumed.step.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
