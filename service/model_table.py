"""`python -m service.model [overrides]`: the per-layer table of a configured
network (the training config's keys, e.g. `model=alexnet_small
parallel.towers=4`; 1000 classes unless model.num_classes is given)."""

from __future__ import annotations

from service import hydra_app
from service.config import Config, validate_config
from service.model.summary import format_table
from service.train.build import spec_for


def print_table(cfg: Config) -> int:
    """Print the table; a model that cannot be split exits 2 with the reason."""
    try:
        spec = spec_for(cfg.model, cfg.parallel.towers, num_classes=1000)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    print(format_table(spec))
    return 0


def main() -> None:
    hydra_app.run(hydra_app.CONFIG_NAME, Config, validate_config, print_table)
