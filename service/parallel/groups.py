"""Process groups for a `ParallelLayout`.

`dist.new_group` is collective over the *whole* world: every rank must create
every subgroup, in the same order, even groups it is not a member of (NCCL
hangs otherwise). `create_groups` does exactly that, right after
`init_process_group`, and keeps only the groups this rank belongs to.

Besides the tower group (activations, on the device's backend) each replica
gets a CPU (gloo) twin for batch headers: a sibling tower learns a batch's
shape from a CPU tensor, which never waits for the GPU, whereas reading a
header that arrived over NCCL would stall the host on every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from service.parallel.layout import ParallelLayout


@dataclass
class RankGroups:
    """This rank's place in the layout and the groups it talks over."""

    layout: ParallelLayout
    rank: int
    # None when the group would have a single member (no communication needed).
    tower_group: Optional[dist.ProcessGroup]
    data_parallel_group: Optional[dist.ProcessGroup]
    # The tower group's CPU twin for small host-side messages (batch headers).
    # The tower group itself when that already runs on gloo.
    header_group: Optional[dist.ProcessGroup] = None

    @property
    def replica(self) -> int:
        return self.layout.replica_of(self.rank)

    @property
    def tower(self) -> int:
        return self.layout.tower_of(self.rank)

    @property
    def tower_leader_rank(self) -> int:
        """Global rank of tower 0 of this replica: it reads the data."""
        return self.layout.rank_of(self.replica, 0)


def default_group_timeout() -> Optional[timedelta]:
    """The timeout the default process group runs with (None if torch does not say).

    torch keeps it only on the group's backends (no public getter), so it is
    read from there; every backend of a group shares the timeout it was made with.
    """
    group = dist.distributed_c10d._get_default_group()
    for device in group._device_types:
        try:
            return group._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):  # a backend without options, or none for this device
            continue
    return None


def set_worker_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (no-op elsewhere).

    Ray Train sets it before the worker function runs, but NCCL communicators,
    `torch.cuda.Stream()` and bare `"cuda"` tensors all follow the current
    device: saying it here keeps them right under any launcher.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)


def create_groups(layout: ParallelLayout, timeout: Optional[timedelta] = None) -> RankGroups:
    """Create all tower and data-parallel groups (collective; call on every rank).

    `timeout`: for every group; default: the default group's."""
    if not dist.is_initialized():
        raise RuntimeError("create_groups needs an initialised default process group")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"process group has {world} ranks but the layout needs {layout.describe()}"
        )
    rank = dist.get_rank()
    timeout = timeout or default_group_timeout()
    tower_group = None
    header_group = None
    data_parallel_group = None
    if layout.towers > 1:
        for replica in range(layout.replicas):
            group = dist.new_group(layout.tower_group_ranks(replica), timeout=timeout)
            if layout.replica_of(rank) == replica:
                tower_group = header_group = group
        if dist.get_backend() != "gloo":
            for replica in range(layout.replicas):
                group = dist.new_group(layout.tower_group_ranks(replica), timeout=timeout, backend="gloo")
                if layout.replica_of(rank) == replica:
                    header_group = group
    if layout.replicas > 1:
        for tower in range(layout.towers):
            group = dist.new_group(layout.data_parallel_ranks(tower), timeout=timeout)
            if layout.tower_of(rank) == tower:
                data_parallel_group = group
    return RankGroups(layout, rank, tower_group, data_parallel_group, header_group)


def single_process_groups(layout: ParallelLayout) -> RankGroups:
    """Groups for a 1 replica × 1 tower run that needs no process group."""
    if layout.world_size != 1:
        raise ValueError(f"single_process_groups needs a world of 1, not {layout.describe()}")
    return RankGroups(layout, 0, None, None)
