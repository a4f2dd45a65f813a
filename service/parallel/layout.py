"""The replicas × towers layout.

World rank `replica * towers + tower` hosts tower `tower` of model replica
`replica`. Ranks of one replica form its *tower group* (they exchange
activations); ranks holding the same tower index form that tower's
*data-parallel group* (they average gradients).

Everything here is arithmetic: it is validated before any process group or
cluster resource exists, so a bad layout fails fast with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.model.spec import ALLOWED_TOWERS, AlexNetSpec, tower_divisibility_problems


@dataclass(frozen=True)
class ParallelLayout:
    """`replicas` data-parallel copies of a model split into `towers` towers."""

    replicas: int
    towers: int

    def __post_init__(self):
        if self.towers not in ALLOWED_TOWERS:
            raise ValueError(f"towers={self.towers} is not allowed; choose one of {list(ALLOWED_TOWERS)}")
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas} must be >= 1")

    @classmethod
    def from_world_size(cls, world_size: int, towers: int) -> "ParallelLayout":
        """The layout for `world_size` workers; raises if towers does not divide it."""
        if towers not in ALLOWED_TOWERS:
            raise ValueError(f"towers={towers} is not allowed; choose one of {list(ALLOWED_TOWERS)}")
        if world_size < towers or world_size % towers:
            fitting = [t for t in ALLOWED_TOWERS if t <= world_size and world_size % t == 0]
            nearest = max(towers, (world_size // towers) * towers)
            raise ValueError(
                f"world size {world_size} is not a multiple of towers={towers}: "
                f"use a world size of {nearest} (or a multiple of {towers}), "
                f"or towers in {fitting} for {world_size} workers"
            )
        return cls(replicas=world_size // towers, towers=towers)

    @property
    def world_size(self) -> int:
        return self.replicas * self.towers

    def replica_of(self, rank: int) -> int:
        return rank // self.towers

    def tower_of(self, rank: int) -> int:
        return rank % self.towers

    def rank_of(self, replica: int, tower: int) -> int:
        return replica * self.towers + tower

    def tower_group_ranks(self, replica: int) -> list[int]:
        """Ranks holding the towers of one replica (activation exchange)."""
        return [self.rank_of(replica, tower) for tower in range(self.towers)]

    def data_parallel_ranks(self, tower: int) -> list[int]:
        """Ranks holding the same tower in every replica (gradient averaging)."""
        return [self.rank_of(replica, tower) for replica in range(self.replicas)]

    def validate_model(self, spec: AlexNetSpec) -> None:
        """Raise ValueError if `spec` cannot be split into this many towers."""
        if spec.towers != self.towers:
            raise ValueError(f"model spec has towers={spec.towers} but the layout has towers={self.towers}")
        problems = tower_divisibility_problems(spec)
        if problems:
            raise ValueError(
                f"the model cannot be split into {self.towers} towers: " + "; ".join(problems)
            )

    def validate_batch(self, global_batch: int) -> int:
        """The per-replica batch; raises if the global batch does not divide."""
        if global_batch % self.replicas:
            fits = max(self.replicas, global_batch - global_batch % self.replicas)
            raise ValueError(
                f"global batch {global_batch} does not divide over {self.replicas} replicas; "
                f"use a multiple of {self.replicas}, e.g. {fits}"
            )
        return global_batch // self.replicas

    def describe(self) -> str:
        return f"{self.replicas} replica(s) x {self.towers} tower(s) = {self.world_size} workers"
