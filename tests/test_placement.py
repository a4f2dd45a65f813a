"""Placement you can trust: on a real two-node Ray cluster (a head and a
second `ray start --address` node on this machine, 3 CPUs each, workers of 2
CPUs: one tower worker fits per node), a replica's two towers land on
different nodes. The job must stop naming both nodes, or, with
parallel.allow_cross_node_towers=true, warn and train."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service.parallel.layout import ParallelLayout
from service.parallel.placement import describe_split, split_replicas
from tests.servers import VENV_BIN, start_ray_head, wait_until

REPO = Path(__file__).resolve().parent.parent


def test_split_replicas_names_the_nodes_of_each_split_replica():
    layout = ParallelLayout(replicas=3, towers=2)
    nodes = ["a", "a", "a", "b", "b", "b"]  # replica 1 straddles a and b
    split = split_replicas(layout, nodes)
    assert split == {1: ["a", "b"]}
    message = describe_split(layout, split, nodes)
    assert "replica 1: towers 0 on a, 1 on b" in message and "a: 3, b: 3" in message
    assert "parallel.allow_cross_node_towers=true" in message
    assert split_replicas(ParallelLayout(2, 2), ["a", "a", "b", "b"]) == {}


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node of 3 logical CPUs each, on 127.0.0.1."""
    folder = tempfile.mkdtemp(prefix="rp", dir="/tmp")
    head = start_ray_head(folder, num_cpus=3)
    env = dict(head.env)
    try:
        result = subprocess.run(
            [str(VENV_BIN / "ray"), "start", "--address", head.address, "--node-ip-address", "127.0.0.1",
             "--num-cpus", "3", "--temp-dir", folder, "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: _alive_nodes(head) == 2, 120, "the second Ray node")
        yield head
    finally:
        head.stop()


def _alive_nodes(head) -> int:
    command = [sys.executable, "-c", "import ray; ray.init(address='%s'); print(sum(n['Alive'] for n in ray.nodes()))"
               % head.address]
    out = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=60).stdout.strip()
    return int(out.splitlines()[-1]) if out else 0


def _train(head, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **head.env, "RAY_ADDRESS": head.address}
    command = [
        sys.executable, "-m", "service.train", "experiment=smoke", "tracking.enabled=false",
        "cluster.cpus_per_worker=2", "data.decode_concurrency=1", "train.max_steps=2",
        f"data.generated_dir={tmp_path / 'data'}", f"storage.path={tmp_path / 'ckpt'}",
        f"hydra.run.dir={tmp_path / 'hydra'}", *extra,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_towers_split_over_two_nodes_stop_the_job_naming_the_nodes(two_nodes, tmp_path):
    result = _train(two_nodes, tmp_path, "run.name=split")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "the towers of 1 replica(s) span nodes" in output, output[-3000:]
    assert "replica 0: towers 0 on" in output and "1 on" in output


@pytest.mark.integration
def test_cross_node_towers_allowed_explicitly_train_with_a_warning(two_nodes, tmp_path):
    result = _train(two_nodes, tmp_path, "run.name=allowed", "parallel.allow_cross_node_towers=true")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "parallel.allow_cross_node_towers=true: the towers of 1 replica(s) span nodes" in output
    assert "=== run finished ===" in result.stdout
