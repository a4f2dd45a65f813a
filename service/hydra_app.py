"""The Hydra adapter: registers the structured config and turns a composed
`DictConfig` into the typed `Config`. Nothing past the entry points sees Hydra.

The YAML lives in the top-level `conf/` folder. It is found, in order, at
$ALEXNET_CONF_DIR, next to the `service` package (a source checkout or a
`ray job submit --working-dir`), or in the current directory (a container
whose WORKDIR holds the repository).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from service.config import Config, ConfigError, validate_config

CONFIG_NAME = "config"
SCHEMA_NAME = "base_config"


def register_schema() -> None:
    """Make `base_config` (the dataclass tree) available to the defaults list."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def conf_dir() -> str:
    candidates = [
        os.environ.get("ALEXNET_CONF_DIR", ""),
        str(Path(__file__).resolve().parent.parent / "conf"),
        str(Path.cwd() / "conf"),
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "cannot find the conf/ folder (looked in: "
        + ", ".join(c for c in candidates if c)
        + "); set ALEXNET_CONF_DIR to the folder holding config.yaml"
    )


def to_config(cfg: DictConfig) -> Config:
    """Typed, validated config from Hydra's composition."""
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, Config):
        raise ConfigError(f"the composed config is a {type(typed).__name__}, not the Config schema")
    validate_config(typed)
    return typed


def compose(overrides: Optional[list[str]] = None) -> Config:
    """Compose `conf/` with overrides outside `@hydra.main` (CLIs, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return to_config(hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides or [])))
