"""The central correctness test: tower-parallel training equals the
single-process reference (logits, loss, every gradient, weights after 3 SGD
steps), for towers 1/2/4 and replicas 1/2, on gloo with real processes."""

import pytest
import torch
from torch.nn import functional as F

from service.model import ReferenceAlexNet, alexnet_spec
from service.parallel.layout import ParallelLayout
from service.parallel.sharding import reference_to_tower, towers_to_reference
from service.train.build import build_optimizer, build_tower, rank_groups
from service.train.step import TowerStep
from service.parallel.local import run_on_processes

SEED = 7
GLOBAL_BATCH = 8
STEPS = 3
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


def small_spec(towers: int, num_classes: int = 10, dropout: float = 0.0):
    # 10 classes: fc8 is sliced for 1 and 2 towers and replicated for 4.
    return alexnet_spec(
        num_classes=num_classes, image_size=64, towers=towers, width_mult=0.25, dropout=dropout, init="kaiming"
    )


def batches(num_classes: int):
    generator = torch.Generator().manual_seed(123)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator),
         torch.randint(0, num_classes, (GLOBAL_BATCH,), generator=generator))
        for _ in range(STEPS)
    ]


def _worker(rank, world_size, towers, out_dir):
    layout = ParallelLayout.from_world_size(world_size, towers)
    groups = rank_groups(layout)
    spec = small_spec(towers)
    model = build_tower(spec, groups, SEED, torch.device("cpu"))
    optimizer = build_optimizer(model, LR, MOMENTUM, WD)
    step = TowerStep(model, optimizer, spec, groups)
    per_replica = GLOBAL_BATCH // layout.replicas
    record = {}
    for index, (images, labels) in enumerate(batches(spec.num_classes)):
        rows = slice(groups.replica * per_replica, (groups.replica + 1) * per_replica)
        optimizer.zero_grad()
        loss, logits = step.forward_backward(images[rows], labels[rows])
        if index == 0:
            record["logits"] = logits
            record["loss"] = loss
            record["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    record["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(record, f"{out_dir}/rank{rank}.pt")


def _reference(towers):
    spec = small_spec(towers)
    torch.manual_seed(SEED)
    model = ReferenceAlexNet(spec)
    optimizer = build_optimizer(model, LR, MOMENTUM, WD)
    record = {}
    for index, (images, labels) in enumerate(batches(spec.num_classes)):
        optimizer.zero_grad()
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if index == 0:
            record["logits"], record["loss"] = logits.detach(), loss.detach()
            record["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    record["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return spec, record


def _close(actual, expected, what):
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5 * scale + 1e-7, f"{what}: max error {err:.3g} (scale {scale:.3g})"


# Every layout up to 2 replicas x 2 towers, and 4 towers, in `make test`; 4 towers x 2 replicas
# (8 processes: what 2x2 and 4x1 together already prove) in `make test-slow`, which CI runs.
@pytest.mark.parametrize("towers, replicas", [
    (1, 1), (2, 1), (4, 1), (1, 2), (2, 2), pytest.param(4, 2, marks=pytest.mark.slow),
], ids=lambda value: str(value))
def test_tower_parallel_equals_reference(tmp_path, towers, replicas):
    run_on_processes(_worker, towers * replicas, towers, str(tmp_path))
    spec, ref = _reference(towers)
    layout = ParallelLayout(replicas, towers)
    per_replica = GLOBAL_BATCH // replicas
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(layout.world_size)]
    for replica in range(replicas):
        ranks = layout.tower_group_ranks(replica)
        rows = slice(replica * per_replica, (replica + 1) * per_replica)
        for rank in ranks:
            _close(records[rank]["logits"], ref["logits"][rows], f"logits rank {rank}")
        # Each replica's loss is over its own rows; their mean is the global loss.
        for key in ("grads", "weights"):
            merged = towers_to_reference([records[r][key] for r in ranks], spec)
            assert set(merged) == set(ref[key])
            for name, value in merged.items():
                _close(value, ref[key][name], f"{key} {name} replica {replica}")
    losses = torch.stack([records[layout.rank_of(r, 0)]["loss"] for r in range(replicas)])
    _close(losses.mean(), ref["loss"], "loss")


def test_shard_round_trip_is_exact():
    for towers, classes in ((1, 10), (2, 10), (4, 10), (4, 12), (8, 16)):
        spec = small_spec(towers, num_classes=classes)
        state = ReferenceAlexNet(spec).state_dict()
        shards = [reference_to_tower(state, spec, t) for t in range(towers)]
        back = towers_to_reference(shards, spec)
        assert set(back) == set(state)
        for name in state:
            assert torch.equal(back[name], state[name]), name


def _dropout_worker(rank, world_size, out_dir):
    layout = ParallelLayout.from_world_size(world_size, 2)
    groups = rank_groups(layout)
    spec = small_spec(2, dropout=0.5)
    model = build_tower(spec, groups, SEED, torch.device("cpu")).train()
    captured = {}
    model.fc6.register_forward_hook(lambda m, i, o: captured.setdefault("fc6", o.detach().clone()))
    # The input of fc7 is the gathered, dropped fc6 output.
    model.fc7.register_forward_pre_hook(lambda m, i: captured.setdefault("fc7_in", i[0].detach().clone()))
    torch.manual_seed(0)  # same images on both towers...
    images = torch.randn(16, 3, 64, 64)
    torch.manual_seed(SEED * 1_000_003 + 1 + rank)  # ...then the per-rank dropout stream
    model(images)
    torch.save(captured, f"{out_dir}/rank{rank}.pt")


def test_dropout_masks_differ_per_tower_and_scale(tmp_path):
    run_on_processes(_dropout_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    width = ranks[0]["fc6"].shape[1]
    # Both towers see the same gathered (dropped) fc6 activations.
    assert torch.equal(ranks[0]["fc7_in"], ranks[1]["fc7_in"])
    masks = []
    for tower, record in enumerate(ranks):
        relu = torch.relu(record["fc6"])
        dropped = record["fc7_in"][:, tower * width:(tower + 1) * width]
        active = relu > 0
        kept = dropped[active] != 0
        # Kept units are scaled by 1/(1-p) = 2, dropped ones are zero.
        torch.testing.assert_close(dropped[active][kept], 2 * relu[active][kept])
        assert 0.4 < kept.float().mean().item() < 0.6
        masks.append(dropped != 0)
    # Different towers draw independent masks (the pattern is not shared).
    assert not torch.equal(masks[0], masks[1])
