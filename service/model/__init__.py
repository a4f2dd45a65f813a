"""AlexNet in plain `torch.nn`: the reference model and one tower of it.

Nothing here imports Ray, MLflow, Hydra or `torch.distributed`.
"""

from service.model.spec import (
    ALLOWED_TOWERS,
    AlexNetSpec,
    alexnet_owt_spec,
    alexnet_spec,
    build_spec,
    feature_map_sizes,
    tower_divisibility_problems,
)

# The modules (torch) load on first use, so that code reading only the spec (the configuration
# check every command runs first) starts without importing torch.
_LAZY = {"ReferenceAlexNet": "service.model.reference", "AlexNetTower": "service.model.tower",
         "identity_exchange": "service.model.tower"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALLOWED_TOWERS",
    "AlexNetSpec",
    "AlexNetTower",
    "ReferenceAlexNet",
    "alexnet_owt_spec",
    "alexnet_spec",
    "build_spec",
    "feature_map_sizes",
    "identity_exchange",
    "tower_divisibility_problems",
]
