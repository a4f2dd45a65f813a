"""Training-step rate of one tower on one device, through the production wiring.

Two networks, both the paper configuration (224 px, 1000 classes):

- "alexnet T=1": `alexnet_spec(towers=1)` built by `build_training` on a
  1 x 1 layout: exactly what a 1-tower worker of the service trains;
- "tower of T=k": tower 0 of the k-tower network (`AlexNetTower`) alone on
  the device, stepped through `TowerStep`, its exchanges replaced by a local
  stand-in that returns k copies of its own slice (the shapes and the copy
  the real all-gather hands back, without the communication, which
  bench/project.py models from bytes and link speeds);
- "reference T=2": the paper's two-tower network in one process
  (`ReferenceAlexNet`, conv2/4/5 with groups=2) stepped through the service's
  own `TowerStep` (1 x 1 groups; the loss is not divided by towers because it
  holds both towers), with the optimizer, normaliser and device switches
  from `service.train.build`. `build_training` builds towers, not the
  reference, so this one wrapper is assembled here from the same parts.

Numerics, as the recipes set them (conf/recipe/*.yaml; YAML is not
available on the GPU machines, so the switches are spelled here):
"fp32" = recipe=paper (no bf16, NCHW, no TF32, no cuDNN autotuning);
"bf16+cl" = recipe=fast (bf16 autocast, channels_last, TF32, cudnn.benchmark);
"bf16+cl+compile" = the same with `train.compile=true`.

Each step is the service's: uint8 NHWC batch on the device -> normaliser ->
forward, loss, backward, SGD update; no host read inside. Steps are queued
back to back with CUDA events around each, and read once at the end.
"""

from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import dataclass, replace

import torch

from service.config import RecipeConfig
from service.model import AlexNetTower, ReferenceAlexNet, alexnet_spec
from service.model.spec import AlexNetSpec
from service.model.summary import forward_macs, layer_table
from service.parallel.groups import single_process_groups
from service.parallel.layout import ParallelLayout
from service.train.build import (
    TrainingOptions,
    TowerTraining,
    build_optimizer,
    build_schedule,
    build_training,
    configure_device,
    rank_groups,
)
from service.train.step import Normalizer, StepOptions, TowerStep

# ImageNet's per-channel mean/std in 0-255 units; values do not change the speed.
MEAN, STD = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
PAPER_NUMERICS = dict(bf16=False, channels_last=False, tf32=False, cudnn_benchmark=False)
FAST_NUMERICS = dict(bf16=True, channels_last=True, tf32=True, cudnn_benchmark=True)
MODES = {  # name: (recipe numerics, torch.compile)
    "fp32": (PAPER_NUMERICS, False),
    "bf16+cl": (FAST_NUMERICS, False),
    "bf16+cl+compile": (FAST_NUMERICS, True),
}
MODELS = ("alexnet T=1", "reference T=2")
# One tower of a T-tower replica, alone on the device: its compute per step,
# which bench/project.py combines with modelled exchange times.
TOWER_MODELS = ("tower of T=2", "tower of T=4", "tower of T=8")


@dataclass(frozen=True)
class RowPlan:
    """One measurement: a network, a batch size and a numerics mode."""

    model: str
    batch: int
    mode: str


@dataclass(frozen=True)
class Shape:
    """The network's size: the paper's by default; the CPU dry run shrinks it."""

    image_size: int = 224
    num_classes: int = 1000
    width_mult: float = 1.0


PAPER = Shape()


def model_spec(model: str, shape: Shape = PAPER) -> AlexNetSpec:
    """The spec each benchmarked network is built from."""
    towers = 1 if model == "alexnet T=1" else 2 if model == "reference T=2" else int(model.rsplit("=", 1)[1])
    return alexnet_spec(num_classes=shape.num_classes, image_size=shape.image_size, towers=towers, width_mult=shape.width_mult)


def train_flops_per_image(spec: AlexNetSpec) -> float:
    """Forward MACs x 2 FLOPs x 3 (forward + the two backward GEMMs): the usual convention.

    Slightly above the work done: conv1 needs no input gradient.
    """
    _, totals = layer_table(spec)
    return totals.macs * 2.0 * 3.0


def tower_train_flops_per_image(spec: AlexNetSpec, tower: int = 0) -> float:
    """The same convention for tower `tower` of `spec.towers` alone: the layers
    it holds (1/towers of every layer, all of a replicated fc8), counted from
    the module it runs, not the whole replica's network."""
    with torch.device("meta"):
        model = AlexNetTower(spec, tower, _standin_exchange(spec.towers))
    return forward_macs(model, spec.image_size) * 2.0 * 3.0


def row_flops_per_image(model: str, shape: Shape = PAPER) -> float:
    """Train FLOPs per image of a benchmarked network, as the row's device runs it."""
    spec = model_spec(model, shape)
    return tower_train_flops_per_image(spec) if model in TOWER_MODELS else train_flops_per_image(spec)


def _options(spec: AlexNetSpec, mode: str, steps: int) -> TrainingOptions:
    numerics, compiled = MODES[mode]
    return TrainingOptions(
        spec=spec,
        layout=ParallelLayout(1, 1),
        recipe=RecipeConfig(name="bench", **numerics),
        base_lr=0.01,
        steps_per_epoch=steps,
        epochs=1,
        seed=0,
        mean=MEAN,
        std=STD,
        compile=compiled,
    )


def _one_process_training(model: torch.nn.Module, step_spec: AlexNetSpec, options: TrainingOptions,
                          device: torch.device) -> TowerTraining:
    """`model` in the service's step, optimizer, schedule and normaliser, wired as
    `build_training` wires a tower (which only builds towers of a process group)."""
    recipe = options.recipe
    configure_device(device, recipe)
    model = model.to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = single_process_groups(options.layout)
    # The same StepOptions build_training derives from the recipe.
    step_options = StepOptions(bf16=recipe.bf16, channels_last=recipe.channels_last,
                               label_smoothing=recipe.label_smoothing, compile=options.compile)
    step = TowerStep(model, build_optimizer(model, options.base_lr, recipe.momentum, recipe.weight_decay),
                     step_spec, groups, step_options)
    return TowerTraining(step, build_schedule(options), Normalizer(options.mean, options.std, device, recipe.channels_last), groups)


def reference_training(options: TrainingOptions, device: torch.device) -> TowerTraining:
    """The one-process two-tower reference in the service's step."""
    torch.manual_seed(options.seed)
    # towers=1 view for the step: the reference holds every tower, so its loss needs no 1/towers.
    return _one_process_training(ReferenceAlexNet(options.spec), replace(options.spec, towers=1), options, device)


def _standin_exchange(towers: int):
    """What an all-gather over `towers` towers returns, from this tower alone."""
    def exchange(x: torch.Tensor, replicated_after: bool = False) -> torch.Tensor:
        return torch.cat([x] * towers, dim=1)
    return exchange


def lone_tower_training(options: TrainingOptions, device: torch.device) -> TowerTraining:
    """Tower 0 of `options.spec.towers`, alone, with the stand-in exchange (timing only)."""
    torch.manual_seed(options.seed)
    # PyTorch's default init: the values do not change the speed.
    tower = AlexNetTower(options.spec, 0, _standin_exchange(options.spec.towers))
    return _one_process_training(tower, options.spec, options, device)


def build(plan: RowPlan, device: torch.device, steps: int, shape: Shape) -> TowerTraining:
    """The training object for a row, through the production wiring."""
    spec = model_spec(plan.model, shape)
    options = _options(spec, plan.mode, steps)
    if plan.model == "alexnet T=1":
        return build_training(options, rank_groups(options.layout), device)
    if plan.model == "reference T=2":
        return reference_training(options, device)
    return lone_tower_training(options, device)


def _time_steps(training: TowerTraining, device: torch.device, images, labels, warmup: int, steps: int):
    """Per-step seconds (events around each step, read once at the end) and the span per step."""
    for _ in range(warmup):
        loss, _ = training.step(training.normalizer(images), labels)
    if device.type != "cuda":  # the CPU dry run: host clock
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            loss, _ = training.step(training.normalizer(images), labels)
            times.append(time.perf_counter() - begin)
        return times, statistics.fmean(times), float(loss)
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for start, end in zip(starts, ends):
        start.record()
        loss, _ = training.step(training.normalizer(images), labels)
        end.record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) / 1000 for s, e in zip(starts, ends)]
    return times, starts[0].elapsed_time(ends[-1]) / 1000 / steps, float(loss)


def measure_row(plan: RowPlan, device: torch.device, steps: int, warmup: int, shape: Shape = PAPER) -> dict:
    """One row: median step time, images/s, achieved TFLOP/s; an `error` entry instead if it failed."""
    row = {"model": plan.model, "batch": plan.batch, "mode": plan.mode}
    began = time.perf_counter()
    try:
        if MODES[plan.mode][1]:
            torch._dynamo.reset()  # a fresh compile per row: no recompiles, no dynamic-shape fallback
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        training = build(plan, device, steps, shape)
        spec = model_spec(plan.model, shape)
        image_size = shape.image_size
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (plan.batch, image_size, image_size, 3), dtype=torch.uint8, generator=generator).to(device)
        labels = torch.randint(0, spec.num_classes, (plan.batch,), generator=generator).to(device)
        times, span, loss = _time_steps(training, device, images, labels, warmup, steps)
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"loss became {loss} (numerics broken in this mode)")
        median = statistics.median(times)
        flops = row_flops_per_image(plan.model, shape)
        row.update(
            step_ms=median * 1000,
            step_ms_min=min(times) * 1000,
            images_per_s=plan.batch / median,
            # Back-to-back rate, gaps between steps included (host-bound steps show here).
            images_per_s_span=plan.batch / span,
            train_gflop_per_image=flops / 1e9,
            achieved_tflops=flops * plan.batch / median / 1e12,
            final_loss=loss,
            max_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        )
    except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        row["wall_s"] = time.perf_counter() - began
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row
