"""Assembling one worker's training: the production wiring, in one place.

`build_training(options, groups, device)` turns plain data (`TrainingOptions`)
into everything a tower trains with: its tower of the seeded reference model
on the device, the optimizer, the lr schedule, the normaliser and the step
(with DDP across replicas, torch.compile and the GPU numerics switches). The
Ray Train worker, the tests and every benchmark call this same function, so
what is measured is what runs. torch only: no Ray, MLflow or Hydra.

Every rank builds the same reference model from the same seed and keeps its
shard of it, so all layouts (and the reference itself) start from identical
weights. Dropout draws from a per-rank stream that is reseeded from (seed,
rank, step) whenever training (re)starts or a checkpoint is written, so a run
resumed from a checkpoint draws exactly the masks the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.distributed as dist

from service.config import Config, ModelConfig, RecipeConfig
from service.model import AlexNetSpec, AlexNetTower, ReferenceAlexNet, build_spec
from service.parallel.exchange import TowerExchange, excluded_from_compile
from service.parallel.groups import RankGroups, create_groups, single_process_groups
from service.parallel.layout import ParallelLayout
from service.parallel.sharding import reference_to_tower
from service.train.schedule import LRSchedule
from service.train.step import Normalizer, StepOptions, TowerStep


@dataclass(frozen=True)
class TrainingOptions:
    """What a worker needs to build its training; plain, picklable data."""

    spec: AlexNetSpec
    layout: ParallelLayout
    recipe: RecipeConfig
    # -- The recipe's lr after linear batch scaling (see `base_lr`).
    base_lr: float
    steps_per_epoch: int
    epochs: int
    seed: int
    # -- Per-channel RGB statistics of the training set, 0-255 units.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    compile: bool = False
    grad_compression: str = "none"


def base_lr(cfg: Config) -> float:
    """The recipe's lr, linearly scaled with the global batch when asked."""
    if cfg.recipe.scale_lr:
        return cfg.recipe.lr * cfg.train.batch_size / cfg.recipe.reference_batch_size
    return cfg.recipe.lr


def resolve_compile(cfg: Config) -> bool:
    """train.compile, where null means: on for GPU runs with bf16 (recipe=fast)."""
    if cfg.train.compile is not None:
        return cfg.train.compile
    return cfg.cluster.use_gpu and cfg.recipe.bf16


def training_options(cfg: Config, spec: AlexNetSpec, mean, std, steps_per_epoch: int) -> TrainingOptions:
    """The options for `cfg` once the dataset (statistics, size) is known."""
    return TrainingOptions(
        spec=spec,
        layout=ParallelLayout(cfg.parallel.replicas, cfg.parallel.towers),
        recipe=cfg.recipe,
        base_lr=base_lr(cfg),
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.train.epochs,
        seed=cfg.train.seed,
        mean=tuple(mean),
        std=tuple(std),
        compile=resolve_compile(cfg),
        grad_compression=cfg.parallel.grad_compression,
    )


@dataclass
class TowerTraining:
    """What one tower trains with; `state_dict` is its checkpoint shard."""

    step: TowerStep
    schedule: LRSchedule
    normalizer: Normalizer
    groups: RankGroups
    seed: int = 0

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

    def reseed(self, step: int) -> None:
        """Reseed this rank's dropout stream for optimizer step `step`."""
        torch.manual_seed((self.seed * 1_000_003 + 1 + self.groups.rank) * 1_000_033 + step)


def rank_groups(layout: ParallelLayout) -> RankGroups:
    """Groups for this process: real ones under a process group, trivial ones
    for a 1 x 1 layout run without any."""
    if dist.is_available() and dist.is_initialized():
        return create_groups(layout)
    return single_process_groups(layout)


def build_tower(spec: AlexNetSpec, groups: RankGroups, seed: int, device: torch.device,
                compile: bool = False) -> AlexNetTower:
    """This rank's tower, initialised as its shard of the seeded reference model
    (`compile`: its exchanges kept out of torch.compile graphs)."""
    groups.layout.validate_model(spec)
    torch.manual_seed(seed)
    reference_state = ReferenceAlexNet(spec).state_dict()
    exchange = TowerExchange(groups.tower_group)
    tower = AlexNetTower(spec, groups.tower, excluded_from_compile(exchange) if compile else exchange)
    tower.load_state_dict(reference_to_tower(reference_state, spec, groups.tower))
    # Independent dropout masks per rank; reproducible for a seed.
    torch.manual_seed(seed * 1_000_003 + 1 + groups.rank)
    return tower.to(device)


def build_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The paper's SGD: momentum 0.9, weight decay 5e-4 (on all parameters).

    PyTorch's SGD folds lr into the update (v = m*v + g + wd*w; w -= lr*v);
    the paper's form (v = m*v - wd*lr*w - lr*g) is the same while lr is
    constant and differs only transiently after an lr drop.
    """
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_schedule(options: TrainingOptions) -> LRSchedule:
    """The recipe's lr schedule over the run's steps."""
    recipe = options.recipe
    return LRSchedule(
        base_lr=options.base_lr,
        kind=recipe.schedule,
        steps_per_epoch=options.steps_per_epoch,
        total_epochs=options.epochs,
        warmup_epochs=recipe.warmup_epochs,
        step_epochs=tuple(recipe.step_epochs),
        plateau_patience=recipe.plateau_patience,
        plateau_max_drops=recipe.plateau_max_drops,
    )


def configure_device(device: torch.device, recipe: RecipeConfig) -> None:
    """The recipe's GPU numerics: TF32 matmul/conv and cuDNN autotuning (no-op on CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = recipe.tf32
    torch.backends.cudnn.allow_tf32 = recipe.tf32
    # The batch shape is fixed, so the autotuner's first-step cost buys every later step.
    torch.backends.cudnn.benchmark = recipe.cudnn_benchmark


def build_training(options: TrainingOptions, groups: RankGroups, device: torch.device) -> TowerTraining:
    """Everything this rank's tower trains with, on `device`."""
    recipe = options.recipe
    configure_device(device, recipe)
    model = build_tower(options.spec, groups, options.seed, device, options.compile)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, options.base_lr, recipe.momentum, recipe.weight_decay)
    step_options = StepOptions(
        bf16=recipe.bf16,
        channels_last=recipe.channels_last,
        label_smoothing=recipe.label_smoothing,
        compile=options.compile,
        grad_compression=options.grad_compression,
    )
    return TowerTraining(
        step=TowerStep(model, optimizer, options.spec, groups, step_options),
        schedule=build_schedule(options),
        normalizer=Normalizer(options.mean, options.std, device, recipe.channels_last),
        groups=groups,
        seed=options.seed,
    )


def spec_for(model: ModelConfig, towers: int, num_classes: int) -> AlexNetSpec:
    """The network for a model config; `num_classes` comes from the dataset
    unless `model.num_classes` pins it."""
    return build_spec(
        model.name,
        num_classes=model.num_classes or num_classes,
        image_size=model.image_size,
        towers=towers,
        width_mult=model.width_mult,
        dropout=model.dropout,
        init=model.init,
    )
