"""The service's collectives on a world of one rank: what one GPU can check of NCCL.

NCCL refuses two ranks on one GPU, so a single-GPU machine can run the
collective code paths only in a world of one: `init_process_group("nccl",
world_size=1, rank=0, store=HashStore())`. Each check runs one path of the
service on that world and compares it with the same computation in plain
torch on the same device:

- "exchange": a small AlexNet tower forward and backward in bf16 autocast and
  channels_last, its four exchanges going through `TowerExchange` (the
  all-gather, and the reduce-scatter branch of NCCL / the all-to-all one of
  gloo) against the same tower with the identity exchange;
- "ddp bf16 hook": `wrap_data_parallel(..., compression="bf16")` (DDP with
  the bf16 compression hook) against plain backward whose gradients are
  rounded to bf16: a world of one averages over itself, so only the rounding
  is left;
- "batch split/gather": `tower_batches` + `ShareLoader` (headers over a gloo
  group, each share copied and flipped on a side stream and all-gathered over
  the tower group, the step waiting on its batch's event) against the host
  shares, flipped on the host.

Add a check by appending `(name, fn)` to `CHECKS`: `fn(device)` returns
(passed, detail). The runner times each and records an exception as a
failure, so one broken path does not hide the others. The CPU dry run uses
gloo, which exercises every line except NCCL's own branches.
"""

from __future__ import annotations

import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from service.model import AlexNetTower, ReferenceAlexNet, alexnet_spec
from service.data.device_decode import ShareLoader
from service.parallel.batches import tower_batches
from service.parallel.exchange import TowerExchange
from service.parallel.gradients import wrap_data_parallel
from service.parallel.groups import RankGroups
from service.parallel.layout import ParallelLayout
from service.parallel.sharding import reference_to_tower

Check = tuple[str, Callable[[torch.device], tuple[bool, str]]]
# bf16 keeps 8 significant bits: a rounding differs from the true value by at most 2^-8 relative.
BF16_RELATIVE = 2.0**-8


def _tower(exchange, device: torch.device) -> AlexNetTower:
    """A small T=1 tower (64 px, width 1/4), seeded, channels_last, on `device`."""
    spec = alexnet_spec(num_classes=16, image_size=64, towers=1, width_mult=0.25, dropout=0.0, init="kaiming")
    torch.manual_seed(0)
    tower = AlexNetTower(spec, 0, exchange)
    tower.load_state_dict(reference_to_tower(ReferenceAlexNet(spec).state_dict(), spec, 0))
    return tower.to(device).to(memory_format=torch.channels_last)


def _batch(device: torch.device, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, 64, 64, generator=generator).to(device)
    return images.contiguous(memory_format=torch.channels_last), torch.randint(0, 16, (count,), generator=generator).to(device)


def _forward_backward(tower: AlexNetTower, images, labels, bf16: bool) -> tuple[torch.Tensor, dict]:
    tower.zero_grad(set_to_none=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.autocast(device_type=images.device.type, dtype=dtype, enabled=bf16):
        logits = tower(images)
    torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    return logits.detach().float(), {name: p.grad.detach().clone() for name, p in tower.named_parameters()}


def _max_relative(actual: dict, expected: dict) -> float:
    return max(float((actual[k] - expected[k]).abs().max() / (expected[k].abs().max() + 1e-12)) for k in expected)


def _recording(exchange, seen: list):
    """`exchange`, noting the dtype and layout of every tensor it is handed."""
    def recorded(x, replicated_after=False):
        seen.append((x.dtype, x.dim() < 4 or x.is_contiguous(memory_format=torch.channels_last)))
        return exchange(x, replicated_after)
    return recorded


def check_exchange(device: torch.device) -> tuple[bool, str]:
    """Exchanges over the world group == identity exchanges, bf16 + channels_last."""
    images, labels = _batch(device)
    seen, plain_seen = [], []
    logits, grads = _forward_backward(_tower(_recording(TowerExchange(dist.group.WORLD), seen), device),
                                      images, labels, bf16=True)
    identity = lambda x, replicated_after=False: x  # noqa: E731
    plain_logits, plain_grads = _forward_backward(_tower(_recording(identity, plain_seen), device),
                                                  images, labels, bf16=True)
    # A one-tower exchange moves values, never changes them; what is left is
    # the run-to-run rounding of bf16 kernels (at most a step or two of bf16).
    error = _max_relative({"logits": logits, **grads}, {"logits": plain_logits, **plain_grads})
    kept = seen == plain_seen and all(dtype == torch.bfloat16 and layout for dtype, layout in seen)
    return error <= 2 * BF16_RELATIVE and kept, \
        f"{len(seen)} exchanges, bf16 and channels_last kept: {kept}, max relative difference {error:.2e}"


def check_ddp_bf16(device: torch.device) -> tuple[bool, str]:
    """DDP with the bf16 compression hook == plain gradients rounded to bf16."""
    images, labels = _batch(device)
    tower = _tower(lambda x, replicated_after=False: x, device)
    _, plain = _forward_backward(tower, images, labels, bf16=False)
    groups = RankGroups(ParallelLayout(1, 1), 0, tower_group=None, data_parallel_group=dist.group.WORLD)
    wrapped = wrap_data_parallel(tower, groups, compression="bf16")
    tower.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(wrapped(images).float(), labels).backward()
    rounded = {name: grad.to(torch.bfloat16).float() for name, grad in plain.items()}
    error = _max_relative({name: p.grad for name, p in tower.named_parameters()}, rounded)
    # Rounding of one kernel's sum against another's (cuDNN may pick a
    # different backward algorithm): at most one bf16 step apart.
    return error <= 2 * BF16_RELATIVE, f"max relative difference to bf16-rounded plain gradients {error:.2e}"


def check_batches(device: torch.device) -> tuple[bool, str]:
    """tower_batches + ShareLoader (decode="cpu" shares) == the host shares, flipped where
    their flip bit says, on the device: the side-stream copy and flip, the header swap on
    gloo and the all-gather over the tower group (one rank: the collective runs, trivially)."""
    generator = torch.Generator().manual_seed(2)
    shares = [{"image": torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=generator).numpy(),
               "label": torch.randint(0, 16, (6,), generator=generator).numpy(),
               "flip": (torch.rand(6, generator=generator) < 0.5).numpy(),
               "lighting": torch.randn(6, 3, generator=generator).numpy()} for _ in range(4)]
    # The tower group on the device's backend, the headers on gloo, as create_groups makes them.
    header = dist.new_group([0], backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    groups = RankGroups(ParallelLayout(1, 1), 0, tower_group=dist.group.WORLD, data_parallel_group=None,
                        header_group=header)
    loader = ShareLoader.for_decoded(device)
    delivered = list(tower_batches(iter(shares), lambda share: loader(share, "train"), groups, device))
    expected = [{"image": torch.where(torch.from_numpy(s["flip"]).view(-1, 1, 1, 1),
                                      torch.from_numpy(s["image"]).flip(2), torch.from_numpy(s["image"])),
                 "label": torch.from_numpy(s["label"]), "lighting": torch.from_numpy(s["lighting"])} for s in shares]
    same = len(delivered) == len(shares) and all(
        got[key].device.type == device.type and torch.equal(got[key].cpu(), want[key])
        for got, want in zip(delivered, expected) for key in want)
    return same, f"{len(delivered)} of {len(shares)} batches delivered, identical: {same}"


CHECKS: list[Check] = [
    ("exchange bf16+cl fwd/bwd", check_exchange),
    ("ddp bf16 hook", check_ddp_bf16),
    ("batch split/gather", check_batches),
]


def run_checks(checks: list[Check], device: torch.device) -> list[dict]:
    """Each check's name, pass/fail, seconds and detail (or the error that stopped it)."""
    rows = []
    for name, check in checks:
        began = time.perf_counter()
        try:
            passed, detail = check(device)
            row = {"name": name, "passed": bool(passed), "detail": detail}
        except Exception as error:  # noqa: BLE001 - one broken path must not hide the others
            row = {"name": name, "passed": False, "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(limit=6)}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["seconds"] = time.perf_counter() - began
        rows.append(row)
    return rows


def one_rank_check(device: torch.device, checks: list[Check] = CHECKS) -> dict:
    """A world of one on `device` (NCCL on CUDA, gloo on CPU), every check on it, then closed."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    began = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, world_size=1, rank=0, store=dist.HashStore(),
                            device_id=device if device.type == "cuda" else None)
    try:
        rows = run_checks(checks, device)
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "checks": rows, "passed": all(row["passed"] for row in rows),
            "wall_s": time.perf_counter() - began}
