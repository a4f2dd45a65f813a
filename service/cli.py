"""Small command-line entry points that compose the Hydra config."""

from __future__ import annotations

import sys

from service.config import Config, ConfigError, ModelConfig
from service.model import AlexNetSpec, build_spec


def spec_from_config(model: ModelConfig, towers: int, num_classes: int) -> AlexNetSpec:
    """The model spec for a config; `num_classes` comes from the dataset
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


def model_table_main(argv: list[str] | None = None) -> None:
    """Print the layer table for `model=... parallel.towers=...` overrides
    (1000 classes unless model.num_classes is given)."""
    from service.hydra_app import compose
    from service.model.summary import format_table

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg: Config = compose(args)
        spec = spec_from_config(cfg.model, cfg.parallel.towers, num_classes=1000)
        print(format_table(spec))
    except (ConfigError, ValueError) as error:
        sys.exit(f"error: {error}")
