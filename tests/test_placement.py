"""Placement you can trust: on a real two-node Ray cluster (the session's
head, 6 CPUs, and a second `ray start --address` node of 4 on this machine;
workers of 4 CPUs: one tower worker fits per node), a replica's two towers
land on different nodes. The job must stop naming both nodes, or, with
parallel.allow_cross_node_towers=true, warn and train."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from service.parallel.layout import ParallelLayout
from service.parallel.placement import describe_split, split_replicas
from tests.helpers import REPO, VENV_BIN, free_port, ray_env, train_command, wait_until
from tests.servers import terminate


def test_split_replicas_names_the_nodes_of_each_split_replica():
    layout = ParallelLayout(replicas=3, towers=2)
    nodes = ["a", "a", "a", "b", "b", "b"]  # replica 1 straddles a and b
    split = split_replicas(layout, nodes)
    assert split == {1: ["a", "b"]}
    message = describe_split(layout, split, nodes)
    assert "replica 1: towers 0 on a, 1 on b" in message and "a: 3, b: 3" in message
    assert "parallel.allow_cross_node_towers=true" in message
    assert split_replicas(ParallelLayout(2, 2), ["a", "a", "b", "b"]) == {}


def test_a_cluster_too_small_for_the_job_is_named_with_what_it_needs(ray_session, capsys):
    """The session cluster has 6 CPUs and no GPU: 2 tower workers of 4 CPUs, or
    on GPUs, do not fit; the job says what it needs (and would then wait)."""
    from service.hydra_app import compose
    from service.ray_cluster import cluster_cpus, plan_decode, warn_if_short

    def warning(*overrides: str) -> str:
        cfg = compose(["experiment=smoke", *overrides])
        warn_if_short(cfg, plan_decode(cfg, cluster_cpus()))
        return capsys.readouterr().out

    assert cluster_cpus() == 6
    assert warning() == ""  # 2 workers x 1 CPU + 4 decode tasks: the cluster's 6
    said = warning("cluster.cpus_per_worker=4", "data.decode_concurrency=2")
    assert said.startswith("[train] WARNING: the job needs 10 CPUs (2 workers x cluster.cpus_per_worker=4 "
                           "+ 2 decode tasks) but the cluster has 6. It will wait"), said
    said = warning("cluster.use_gpu=true")
    assert "2 GPUs (one per tower worker) but the cluster has 0" in said and "CPUs" not in said, said


SECOND_NODE_CPUS = CPUS_PER_WORKER = 4  # the session head has 6: one tower worker fits per node


@pytest.fixture(scope="module")
def two_nodes(ray_session):
    """The session cluster with a second node (`ray start --address`, 4 logical CPUs, on
    127.0.0.1) for this module's tests. The node leaves when the module ends (its raylet
    and what it started, stopped by PID), so the rest of the run has the session cluster
    as it was; one cluster start fewer than a two-node cluster of its own."""
    head = ray_session
    before = _node_ids()
    manager_port = free_port()
    result = subprocess.run(
        [str(VENV_BIN / "ray"), "start", "--address", head.address, "--node-ip-address", "127.0.0.1",
         "--num-cpus", str(SECOND_NODE_CPUS), "--temp-dir", head.temp_dir, "--disable-usage-stats",
         "--node-manager-port", str(manager_port), "--dashboard-agent-listen-port", str(free_port())],
        env=head.env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: len(_node_ids()) == len(before) + 1, 120, "the second Ray node")
        yield head
    finally:
        _stop_node(manager_port)
        wait_until(lambda: _node_ids() == before, 120, "the second node to leave the cluster")


def _node_ids() -> list[str]:
    """The ids of the session cluster's live nodes (this process is one of its drivers)."""
    import ray

    return sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])


def _stop_node(manager_port: int) -> None:
    """SIGTERM the raylet listening on `manager_port` and every process it started (the
    node's agents and workers): it tells the cluster it is leaving, as `ray stop` would
    there, without touching the head's processes."""
    import psutil

    flag = f"--node_manager_port={manager_port}"
    raylets = [p for p in psutil.process_iter(["cmdline"]) if flag in (p.info["cmdline"] or [])]
    terminate([*raylets, *(child for raylet in raylets for child in raylet.children(recursive=True))], timeout_s=10)


def _train(head, tiny_dataset, tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    command = train_command(tiny_dataset, tmp_path / "ckpt", tmp_path / "hydra",
                            f"cluster.cpus_per_worker={CPUS_PER_WORKER}", "data.decode_concurrency=1",
                            "train.max_steps=2", *extra, name=name)
    return subprocess.run(command, cwd=REPO, env=ray_env(head), capture_output=True, text=True, timeout=600)


def test_towers_split_over_two_nodes_stop_the_job_naming_the_nodes(two_nodes, tiny_dataset, tmp_path):
    result = _train(two_nodes, tiny_dataset, tmp_path, "split")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "the towers of 1 replica(s) span nodes" in output, output[-3000:]
    # Each node named by the start of its id (and its address): the two nodes of the cluster.
    nodes = re.search(r"replica 0: towers 0 on (\w+) \([^)]*\), 1 on (\w+) \(", output)
    assert nodes, output[-3000:]
    assert sorted(nodes.groups()) == sorted(node[:12] for node in _node_ids()), output[-3000:]


def test_cross_node_towers_allowed_explicitly_train_with_a_warning(two_nodes, tiny_dataset, tmp_path):
    result = _train(two_nodes, tiny_dataset, tmp_path, "allowed", "parallel.allow_cross_node_towers=true")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "parallel.allow_cross_node_towers=true: the towers of 1 replica(s) span nodes" in output
    assert "=== run finished ===" in result.stdout
