"""The typed configuration of `python -m service.evaluate` (conf/evaluate.yaml).

It reuses the training tree's `model`, `data`, `tracking` and `cluster`
pieces (so `model=alexnet_owt` and every `data.*` key work as in training)
and adds what to evaluate and how.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.config import ClusterConfig, ConfigError, DataConfig, ModelConfig, TrackingConfig
from service.data.options import EVAL_CROPS

MODEL_URI_SCHEMES = ("runs:/", "models:/", "s3://", "file://", "a local checkpoint folder")


@dataclass
class EvalOptions:
    """How the evaluation runs."""

    # -- 1 (centre crop) or 10 (the paper's 4 corners + centre, mirrored; softmax averaged).
    crops: int = 1
    # -- Images per inference call of one model actor.
    batch_size: int = 64
    # -- Model replicas (Ray actors, one CPU each by default); 0 = auto: half the
    #    cluster's CPUs (at most 8), the rest decode JPEGs.
    actors: int = 0
    # -- CPUs (and torch threads) per model actor.
    cpus_per_actor: float = 1.0
    # -- Shorter side images are resized to before cropping; 0 = the model's
    #    own (a registered model records it), else the shards' stored side.
    resize_size: int = 0
    # -- How many of the most confused (true, predicted) class pairs to report.
    confused_pairs: int = 20


@dataclass
class EvaluateConfig:
    """`python -m service.evaluate`: give exactly one of model_uri and weights."""

    # -- A checkpoint folder (local or s3://), runs:/<run id>/model,
    #    models:/<name>@<alias> or models:/<name>/<version>.
    model_uri: str = ""
    # -- A torchvision AlexNet state dict (.pth), e.g. alexnet-owt-7be5be79.pth;
    #    needs model=alexnet_owt.
    weights: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def validate_evaluate_config(cfg: EvaluateConfig) -> None:
    """Raise `ConfigError` naming the key, the value and what is accepted."""
    if bool(cfg.model_uri) == bool(cfg.weights):
        raise ConfigError(
            "give exactly one of model_uri=<checkpoint folder | runs:/<run id>/model | models:/<name>@<alias> | "
            "models:/<name>/<version>> and weights=<torchvision AlexNet .pth>"
            + (f" (got model_uri={cfg.model_uri!r} and weights={cfg.weights!r})" if cfg.model_uri else "")
        )
    if cfg.weights and cfg.model.name != "alexnet_owt":
        raise ConfigError(
            "weights= holds torchvision's AlexNet, which is alexnet_owt; add model=alexnet_owt "
            f"(got model.name={cfg.model.name!r})"
        )
    if cfg.eval.crops not in EVAL_CROPS:
        raise ConfigError(f"eval.crops={cfg.eval.crops!r} is not allowed; choose one of {list(EVAL_CROPS)}")
    for key, value in (("eval.batch_size", cfg.eval.batch_size), ("eval.cpus_per_actor", cfg.eval.cpus_per_actor),
                       ("eval.confused_pairs", cfg.eval.confused_pairs)):
        if value <= 0:
            raise ConfigError(f"{key}={value!r} must be > 0")
    for key, value in (("eval.actors", cfg.eval.actors), ("eval.resize_size", cfg.eval.resize_size)):
        if value < 0:
            raise ConfigError(f"{key}={value!r} must be >= 0 (0 = auto)")
    if not cfg.data.root:
        raise ConfigError("data.root is empty; give the ingested dataset (the folder or s3:// URI holding meta.json), "
                          "e.g. data.root=data/synthetic after `make demo`")
