"""The typed configuration tree.

Hydra composes YAML from `conf/` onto these dataclasses (see
`service/hydra_app.py`); past the entry point only these dataclasses travel,
never a `DictConfig`. Each component receives the narrow piece it needs.

`validate_config` checks every value before anything is started (no Ray, no
process group) and raises `ConfigError` naming the key, the bad value and what
would be accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from service.data.options import AUGMENTATIONS, DECODE_MODES, EVAL_CROPS, S3Keys
from service.model.spec import ALLOWED_TOWERS

MODEL_NAMES = ("alexnet", "alexnet_owt", "alexnet_small")
SCHEDULES = ("plateau", "step", "cosine", "constant")
WEIGHT_INITS = ("paper", "kaiming")
RESUME_MODES = ("auto", "never", "require")
GRAD_COMPRESSIONS = ("none", "bf16")


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid."""


@dataclass
class ModelConfig:
    """Which network to build."""

    # -- "alexnet" (paper, two towers), "alexnet_owt" (torchvision-style single
    #    tower) or "alexnet_small" (the paper network, narrower, for CPUs).
    name: str = "alexnet"
    # -- Input crop side in pixels (paper: 224).
    image_size: int = 224
    # -- Multiplies every channel/neuron count (1.0 = paper widths).
    width_mult: float = 1.0
    # -- Dropout on fc6/fc7 outputs (paper: 0.5).
    dropout: float = 0.5
    # -- "paper" (N(0, 0.01), biases 1 in conv2/4/5, fc6/7) or "kaiming".
    init: str = "paper"
    # -- Number of classes; None = taken from the dataset's meta.json.
    num_classes: Optional[int] = None


@dataclass
class ParallelConfig:
    """The replicas × towers layout: world size = replicas * towers."""

    # -- AlexNet towers per model replica, one worker (GPU) each: 1, 2, 4 or 8.
    towers: int = 2
    # -- Data-parallel model replicas.
    replicas: int = 1
    # -- Towers of one replica exchange activations every step and belong on
    #    one node (NVLink). A replica spread over nodes fails at start-up
    #    naming the nodes, unless this is true (then it only warns).
    allow_cross_node_towers: bool = False
    # -- Replica gradient all-reduce payload: "none" (fp32) or "bf16"
    #    (half the bytes; for multi-node data parallelism over slow links).
    grad_compression: str = "none"


@dataclass
class DataConfig(S3Keys):
    """Where the ingested shards live and how batches are made; the S3 keys
    (s3_endpoint, s3_region, s3_access_key, s3_secret_key, s3_max_attempts)
    come from `S3Keys`, shared with the ingest CLI."""

    # -- Local path, file:// or s3:// URI holding `meta.json` and `shards/`.
    #    Empty: `make demo`-style generated data under `generated_dir`.
    root: str = ""
    # -- Where generated data goes when `root` is empty.
    generated_dir: str = "data/synthetic"
    # -- Generated data size (only when `root` is empty).
    generated_classes: int = 10
    generated_images_per_class: int = 260
    generated_val_per_class: int = 40
    # -- Training augmentation: "paper" (random 224 crop of 256 + flip + PCA
    #    lighting) or "rrc" (RandomResizedCrop + flip).
    augmentation: str = "paper"
    # -- Random horizontal flips in training and mirrored crops in 10-crop
    #    evaluation. Turn off for data that is not mirror-symmetric (text,
    #    digits, some medical images).
    hflip: bool = True
    # -- Standard deviation of the PCA lighting noise (paper: 0.1).
    pca_lighting_std: float = 0.1
    # -- Evaluation crops: 1 (centre) or 10 (paper: 4 corners + centre, mirrored).
    eval_crops: int = 1
    # -- Side the shards are stored at; crops are taken from it.
    resize_size: int = 256
    # -- Where training images are decoded: "cpu" (Ray Data tasks decode and
    #    crop; the towers get pixels), "device" (tasks only read: JPEG bytes
    #    and augmentation parameters; each tower decodes its share on its own
    #    device, the GPU's JPEG engine where there is one, its CPU otherwise),
    #    or "auto": device when cluster.use_gpu, else cpu.
    decode: str = "auto"
    # -- Concurrent Ray Data read (+ decode in cpu mode) tasks, one CPU each,
    #    for the whole job, split over the towers' lanes. 0 = auto: the
    #    cluster's CPUs not reserved by training workers. An explicit number wins.
    decode_concurrency: int = 0
    # -- A shard that cannot be read mid-run stops training with an error
    #    naming it; true skips it instead and reports how many were skipped.
    skip_bad_shards: bool = False
    # -- Seed of the per-epoch shuffle.
    shuffle_seed: int = 0


@dataclass
class RecipeConfig:
    """Optimiser and schedule."""

    # -- "paper" or "fast"; informational, the fields below hold the values.
    name: str = "paper"
    # -- Learning rate at `reference_batch_size`; scaled linearly with the
    #    global batch when `scale_lr` is set.
    lr: float = 0.01
    reference_batch_size: int = 128
    scale_lr: bool = False
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # -- "plateau" (divide by 10 when val error stops improving), "step",
    #    "cosine" or "constant".
    schedule: str = "plateau"
    # -- plateau: epochs without improvement before dividing; max divisions.
    plateau_patience: int = 5
    plateau_max_drops: int = 3
    # -- step: epochs at which lr is divided by 10.
    step_epochs: list[int] = field(default_factory=lambda: [30, 60, 80])
    # -- Linear warm-up length in epochs (0 = none).
    warmup_epochs: float = 0.0
    # -- GPU speed switches (ignored on CPU): bf16 autocast (activations and
    #    exchanges in bf16, weights and the update in fp32), NHWC activations,
    #    TF32 matmul/conv, cuDNN autotuning.
    bf16: bool = False
    channels_last: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False
    # -- Label smoothing (0 = the paper's plain cross-entropy).
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 90
    # -- Global batch (all replicas together); each replica gets batch/replicas.
    batch_size: int = 128
    seed: int = 0
    # -- Print/log every N optimizer steps.
    log_every_steps: int = 10
    # -- Checkpoint every N steps (0 = only at the end of each epoch).
    checkpoint_every_steps: int = 0
    # -- Keep this many checkpoints.
    keep_checkpoints: int = 2
    # -- Stop after this many steps in total (0 = no limit); for smoke tests.
    max_steps: int = 0
    # -- Evaluate every N epochs.
    eval_every_epochs: int = 1
    # -- torch.compile each tower: true, false, or null = on for GPU runs
    #    with recipe.bf16 (recipe=fast), off otherwise.
    compile: Optional[bool] = None


@dataclass
class ClusterConfig:
    """Where the workers run."""

    name: str = "local"
    use_gpu: bool = False
    # -- CPUs reserved per training worker (it needs ~1-2 on a GPU: the
    #    step runs on the device; decoding has CPUs of its own).
    cpus_per_worker: float = 1.0
    # -- Ray address; empty = RAY_ADDRESS, the submitting job's cluster, or a
    #    new local cluster.
    address: str = ""
    # -- How many times Ray Train restarts the workers from the last checkpoint.
    max_failures: int = 0


@dataclass
class TrackingConfig:
    """MLflow."""

    # -- Tracking URI; empty = MLFLOW_TRACKING_URI or sqlite:///mlruns.db.
    uri: str = ""
    experiment: str = "alexnet"
    # -- Log the best checkpoint as the run's servable MLflow model.
    log_model: bool = True
    # -- Registered model name; empty = do not register.
    registered_model: str = "alexnet"
    # -- Alias set on the best registered version.
    best_alias: str = "best"
    # -- Log CPU/GPU/memory system metrics.
    system_metrics: bool = True
    enabled: bool = True
    # -- Seconds the job waits at its end for an unreachable MLflow (workers
    #    sending their last metrics, the driver logging curves and the model)
    #    before it writes what is unsent next to the checkpoints and finishes.
    close_timeout_s: float = 60.0


@dataclass
class RunConfig:
    """Identity of a run."""

    # -- The resume key: re-running with the same name continues the run.
    #    Empty: a fresh timestamped name.
    name: str = ""
    # -- "auto": resume when a checkpoint of this name exists, else start;
    #    "never": fail if one exists; "require": fail if none exists.
    resume: str = "auto"


@dataclass
class StorageConfig:
    """Checkpoint storage."""

    # -- Local folder or s3:// URI for Ray Train checkpoints.
    path: str = "checkpoints"


@dataclass
class Config:
    """The whole job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # -- Name of the experiment preset that was applied (demo, smoke, ...).
    experiment: str = ""


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


def validate_config(cfg: Config) -> None:
    """Raise `ConfigError` for the first invalid value; nothing is started."""
    _choice("model.name", cfg.model.name, MODEL_NAMES)
    _choice("model.init", cfg.model.init, WEIGHT_INITS)
    _positive("model.image_size", cfg.model.image_size)
    _positive("model.width_mult", cfg.model.width_mult)
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout!r} must be in [0, 1)")
    if cfg.model.num_classes is not None and cfg.model.num_classes < 2:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes!r} must be >= 2 (or null)")
    _choice("parallel.towers", cfg.parallel.towers, ALLOWED_TOWERS)
    _positive("parallel.replicas", cfg.parallel.replicas)
    _choice("parallel.grad_compression", cfg.parallel.grad_compression, GRAD_COMPRESSIONS)
    _choice("data.augmentation", cfg.data.augmentation, AUGMENTATIONS)
    _choice("data.eval_crops", cfg.data.eval_crops, EVAL_CROPS)
    _choice("data.decode", cfg.data.decode, DECODE_MODES)
    _positive("data.decode_concurrency", cfg.data.decode_concurrency, allow_zero=True)
    _positive("data.s3_max_attempts", cfg.data.s3_max_attempts)
    if cfg.data.resize_size < cfg.model.image_size:
        raise ConfigError(
            f"data.resize_size={cfg.data.resize_size} is smaller than model.image_size="
            f"{cfg.model.image_size}; crops are taken from the resized image"
        )
    _choice("recipe.schedule", cfg.recipe.schedule, SCHEDULES)
    _positive("recipe.lr", cfg.recipe.lr)
    if not 0.0 <= cfg.recipe.momentum < 1.0:
        raise ConfigError(f"recipe.momentum={cfg.recipe.momentum!r} must be in [0, 1)")
    _positive("recipe.weight_decay", cfg.recipe.weight_decay, allow_zero=True)
    _positive("recipe.warmup_epochs", cfg.recipe.warmup_epochs, allow_zero=True)
    _positive("train.epochs", cfg.train.epochs)
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.log_every_steps", cfg.train.log_every_steps)
    _positive("train.max_steps", cfg.train.max_steps, allow_zero=True)
    _positive("train.keep_checkpoints", cfg.train.keep_checkpoints)
    if cfg.train.batch_size % cfg.parallel.replicas:
        fits = cfg.train.batch_size - cfg.train.batch_size % cfg.parallel.replicas
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} does not divide over parallel.replicas="
            f"{cfg.parallel.replicas}; use a multiple of {cfg.parallel.replicas}, e.g. {fits or cfg.parallel.replicas}"
        )
    lanes = cfg.parallel.replicas * cfg.parallel.towers
    if cfg.train.batch_size % lanes:
        fits = cfg.train.batch_size - cfg.train.batch_size % lanes
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} does not divide over parallel.replicas x parallel.towers="
            f"{lanes} (every tower reads an equal share of its replica's batch); use a multiple of {lanes}, "
            f"e.g. {fits or lanes}"
        )
    _positive("cluster.cpus_per_worker", cfg.cluster.cpus_per_worker)
    _positive("tracking.close_timeout_s", cfg.tracking.close_timeout_s, allow_zero=True)
    _choice("run.resume", cfg.run.resume, RESUME_MODES)
    if not cfg.storage.path:
        raise ConfigError("storage.path is empty; give a local folder or an s3:// URI")


def decode_mode(cfg: Config) -> str:
    """data.decode resolved: "auto" is "device" when training on GPUs, else "cpu"."""
    if cfg.data.decode == "auto":
        return "device" if cfg.cluster.use_gpu else "cpu"
    return cfg.data.decode


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (what workers and checkpoints receive)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""

    def build(cls, values: dict):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(names)
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(names)}")
        kwargs = {}
        for name, value in values.items():
            sub = _DATACLASS_FIELDS.get((cls.__name__, name))
            kwargs[name] = build(sub, value) if sub is not None else value
        return cls(**kwargs)

    return build(Config, data)


_DATACLASS_FIELDS = {
    ("Config", f.name): f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
}
