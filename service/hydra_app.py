"""The Hydra adapter: the one place that knows Hydra.

Every command-line entry point (`service.train`, `service.ingest`,
`service.synth`, `service.evaluate`, `service.model`) is a primary config in
the top-level `conf/` folder composed onto a typed dataclass schema. Past the
entry point only the dataclasses travel, never a `DictConfig`.

`conf/` is found, in order, at $ALEXNET_CONF_DIR, next to the `service`
package (a source checkout or a `ray job submit --working-dir`), or in the
current directory (a container whose WORKDIR holds the repository).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from service.config import Config, ConfigError, validate_config

CONFIG_NAME = "config"


def schema_name(config_name: str) -> str:
    """The ConfigStore name a primary config's defaults list starts with."""
    return "base_config" if config_name == CONFIG_NAME else f"{config_name}_schema"


def register_schema(config_name: str = CONFIG_NAME, schema: type = Config) -> None:
    """Make the dataclass tree available to `conf/<config_name>.yaml`'s defaults list."""
    ConfigStore.instance().store(name=schema_name(config_name), node=schema)


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


def to_typed(cfg: DictConfig, schema: type = Config, validate: Callable[[Any], None] = validate_config) -> Any:
    """Typed, validated config from Hydra's composition."""
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, schema):
        raise ConfigError(f"the composed config is a {type(typed).__name__}, not the {schema.__name__} schema")
    validate(typed)
    return typed


def to_config(cfg: DictConfig) -> Config:
    """The training job's typed, validated config."""
    return to_typed(cfg, Config, validate_config)


def compose(
    overrides: Optional[list[str]] = None,
    config_name: str = CONFIG_NAME,
    schema: type = Config,
    validate: Callable[[Any], None] = validate_config,
) -> Any:
    """Compose `conf/<config_name>.yaml` with overrides outside `@hydra.main` (CLIs, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema(config_name, schema)
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return to_typed(hydra_compose(config_name=config_name, overrides=list(overrides or [])), schema, validate)


def run(
    config_name: str,
    schema: type,
    validate: Callable[[Any], None],
    main: Callable[[Any], Optional[int]],
) -> None:
    """Run `main(typed_config)` as a Hydra application (`--help`, `-m` sweeps,
    `key=value` overrides). A `ConfigError` exits with status 2 and one line
    naming the key and what is accepted; no traceback."""
    import hydra

    register_schema(config_name, schema)

    def entry(raw: DictConfig) -> None:
        try:
            typed = to_typed(raw, schema, validate)
        except ConfigError as error:
            print(f"configuration error: {error}", file=sys.stderr)
            sys.exit(2)
        status = main(typed)
        if status:
            sys.exit(status)

    hydra.main(config_path=conf_dir(), config_name=config_name, version_base="1.3")(entry)()
