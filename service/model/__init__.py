"""AlexNet in plain `torch.nn`: the reference model and one tower of it.

Nothing here imports Ray, MLflow, Hydra or `torch.distributed`.
"""

from service.model.reference import ReferenceAlexNet
from service.model.spec import (
    ALLOWED_TOWERS,
    AlexNetSpec,
    alexnet_owt_spec,
    alexnet_spec,
    build_spec,
    feature_map_sizes,
    tower_divisibility_problems,
)
from service.model.tower import AlexNetTower, identity_exchange

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
