"""Building one worker's tower, optimizer and process groups.

Every rank builds the same reference model from the same seed and keeps its
shard of it, so all layouts (and the reference itself) start from identical
weights. Dropout then draws from a per-rank RNG stream so masks differ per
tower and per replica.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from service.model import AlexNetSpec, AlexNetTower, ReferenceAlexNet
from service.parallel.exchange import TowerExchange
from service.parallel.groups import RankGroups, create_groups, single_process_groups
from service.parallel.layout import ParallelLayout
from service.parallel.sharding import reference_to_tower


def rank_groups(layout: ParallelLayout) -> RankGroups:
    """Groups for this process: real ones under a process group, trivial ones
    for a 1 × 1 layout run without any."""
    if dist.is_available() and dist.is_initialized():
        return create_groups(layout)
    return single_process_groups(layout)


def build_tower(spec: AlexNetSpec, groups: RankGroups, seed: int, device: torch.device) -> AlexNetTower:
    """This rank's tower, initialised as its shard of the seeded reference model."""
    groups.layout.validate_model(spec)
    torch.manual_seed(seed)
    reference_state = ReferenceAlexNet(spec).state_dict()
    tower = AlexNetTower(spec, groups.tower, TowerExchange(groups.tower_group))
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
