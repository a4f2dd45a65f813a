"""Checking that the towers of each replica share a node.

Towers exchange activations four times per step in both directions; across
nodes that traffic leaves NVLink for the network and the step slows by an
order of magnitude. Rank -> (replica, tower) is arithmetic (see `layout`)
that keeps a replica on one node only while the launcher happens to order
workers by node, which Ray Train does not promise. So every rank reports its
node at start-up and the layout is checked against what actually happened.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from service.parallel.layout import ParallelLayout

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """A replica's towers landed on more than one node."""


def split_replicas(layout: ParallelLayout, nodes_by_rank: list[str]) -> dict[int, list[str]]:
    """Replica -> the node of each of its towers, for replicas spread over several nodes."""
    split = {}
    for replica in range(layout.replicas):
        nodes = [nodes_by_rank[rank] for rank in layout.tower_group_ranks(replica)]
        if len(set(nodes)) > 1:
            split[replica] = nodes
    return split


def describe_split(layout: ParallelLayout, split: dict[int, list[str]], nodes_by_rank: list[str]) -> str:
    """A message naming each split replica's nodes and what would fit."""
    per_node: dict[str, int] = {}
    for node in nodes_by_rank:
        per_node[node] = per_node.get(node, 0) + 1
    lines = [
        f"replica {replica}: towers " + ", ".join(f"{tower} on {node}" for tower, node in enumerate(nodes))
        for replica, nodes in sorted(split.items())
    ]
    counts = ", ".join(f"{node}: {count}" for node, count in per_node.items())
    return (
        f"the towers of {len(split)} replica(s) span nodes ({'; '.join(lines)}). Workers per node: {counts}; "
        f"each node must hold a multiple of towers={layout.towers} workers (e.g. one worker pod per node with "
        f"GPUs per node divisible by {layout.towers}), or set parallel.allow_cross_node_towers=true to run anyway"
    )


def check_tower_placement(layout: ParallelLayout, node: str, allow_cross_node: bool) -> list[str]:
    """All-gather every rank's `node` name and fail (or warn) if a replica spans nodes.

    Collective over the default process group: call on every rank. Returns
    the node of each rank.
    """
    nodes_by_rank: list = [None] * layout.world_size
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes_by_rank, node)
    else:
        nodes_by_rank = [node]
    split = split_replicas(layout, nodes_by_rank)
    if split:
        message = describe_split(layout, split, nodes_by_rank)
        if not allow_cross_node:
            raise PlacementError(message)
        log.warning("parallel.allow_cross_node_towers=true: %s", message)
    return nodes_by_rank
