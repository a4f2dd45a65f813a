"""The chart on real GPU nodes: every Ray pod holds what it promises (CPU for the training workers
and the decode tasks, memory for /dev/shm, the object store and the processes), the head never
runs reads or decode, multi-node extras (RDMA/EFA resources, IPC_LOCK, NCCL) land on the GPU
workers only, and a pod that cannot hold its layout fails at render time naming the values and
what would fit. The expected numbers are recomputed here from the values, independently of the
chart's own arithmetic in templates/_sizing.tpl."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from deploy_support import (
    CHART,
    chart_values,
    containers,
    deep_merge,
    entrypoint_overrides,
    load_values,
    quantity,
    ray_cluster_spec,
)

GIB = 2**30
# The per-process memory the chart reserves (documented in values.yaml and _sizing.tpl).
TRAINING_WORKER_BYTES = 4 * GIB
DECODE_TASK_BYTES = 1 * GIB
HEAD_PROCESS_BYTES = 4 * GIB


def _groups(case) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = ray_cluster_spec(case)
    workers = spec["workerGroupSpecs"]
    assert len(workers) == 1, "one GPU worker group"
    return spec["headGroupSpec"], workers[0]


def _shm_bytes(group: dict[str, Any]) -> float:
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    return quantity(volumes["dshm"]["emptyDir"]["sizeLimit"])


def _expected_worker(values: dict[str, Any]) -> dict[str, float]:
    training, worker = values["training"], values["ray"]["worker"]
    gpus = worker["gpusPerPod"]
    pods = training["replicas"] * training["towers"] // gpus
    ray_cpus = math.floor(quantity(worker["cpu"]))
    training_cpus = gpus * training["cpusPerWorker"]
    if training["decodeConcurrency"]:
        decode_cpus = math.ceil(training["decodeConcurrency"] / pods)
        min_decode = decode_cpus
    else:
        decode_cpus = math.floor(ray_cpus - training_cpus)
        min_decode = gpus * worker["minDecodeCpusPerGpu"]
    store, extra_shm = quantity(worker["objectStoreMemory"]), quantity(worker["sharedMemory"])
    processes = gpus * TRAINING_WORKER_BYTES + decode_cpus * DECODE_TASK_BYTES
    return {"pods": pods, "ray_cpus": ray_cpus, "training_cpus": training_cpus, "decode_cpus": decode_cpus,
            "min_decode": min_decode, "store": store, "shm": store + extra_shm,
            "memory_needed": store + extra_shm + processes}


# ---------- every render case: what each pod holds ----------

def test_head_never_runs_reads_decode_or_training(case):
    head, _ = _groups(case)
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0" and params["num-gpus"] == "0"
    gpu_name = chart_values(case)["ray"]["worker"]["gpuResourceName"]
    for container in containers(head["template"]):
        assert gpu_name not in container["resources"]["limits"]


def test_worker_pods_hold_training_and_decode_cpus(case):
    values = chart_values(case)
    expected = _expected_worker(values)
    _, worker = _groups(case)
    params = worker["rayStartParams"]
    assert params["num-cpus"] == str(expected["ray_cpus"])
    assert params["num-gpus"] == str(values["ray"]["worker"]["gpusPerPod"])
    assert worker["replicas"] == expected["pods"]
    assert expected["ray_cpus"] >= expected["training_cpus"] + expected["min_decode"]
    overrides = entrypoint_overrides(case)
    # The service reserves exactly what the chart sized for.
    assert float(overrides["cluster.cpus_per_worker"]) == values["training"]["cpusPerWorker"]
    assert int(overrides["data.decode_concurrency"]) == values["training"]["decodeConcurrency"]


def test_memory_covers_shm_object_store_and_processes(case):
    values = chart_values(case)
    head, worker = _groups(case)
    expected = _expected_worker(values)
    assert worker["rayStartParams"]["object-store-memory"] == str(int(expected["store"]))
    assert _shm_bytes(worker) == expected["shm"]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert quantity(limits["memory"]) >= expected["memory_needed"]
    head_values = values["ray"]["head"]
    head_store = quantity(head_values["objectStoreMemory"])
    assert head["rayStartParams"]["object-store-memory"] == str(int(head_store))
    assert _shm_bytes(head) == head_store + quantity(head_values["sharedMemory"])
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert quantity(head_limits["memory"]) >= _shm_bytes(head) + HEAD_PROCESS_BYTES


def test_multi_node_extras_only_on_gpu_workers(case):
    values = chart_values(case)
    worker_values = values["ray"]["worker"]
    head, worker = _groups(case)
    container = worker["template"]["spec"]["containers"][0]
    for name, count in worker_values["extraResources"].items():
        assert container["resources"]["requests"][name] == container["resources"]["limits"][name] == str(count)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k: env.get(k) for k in worker_values["ncclEnv"]} == {
        k: str(v) for k, v in worker_values["ncclEnv"].items()}
    head_env = {e["name"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert not any(re.match(r"(NCCL|FI|UCX)_", name) for name in head_env), "NCCL settings on the head"


def test_documented_default_is_one_worker_pod_per_8_gpu_node():
    """The defaults: all 8 GPUs of a node in one worker pod, filled by 4 replicas × 2 towers."""
    defaults = load_values(CHART / "values.yaml")
    assert defaults["ray"]["worker"]["gpusPerPod"] == 8
    assert defaults["training"]["cpusPerWorker"] == 2
    assert defaults["training"]["replicas"] * defaults["training"]["towers"] == 8


# ---------- multi-node and shared-volume options ----------

def test_rdma_example_spreads_replicas_not_towers_over_nodes(render):
    case = render(load_values(CHART / "ci" / "2x8-two-nodes-rdma-values.yaml"))
    _, worker = _groups(case)
    container = worker["template"]["spec"]["containers"][0]
    assert worker["replicas"] == 2 and container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["limits"]["rdma/ib"] == "1"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert entrypoint_overrides(case)["parallel.grad_compression"] == "bf16"


def test_shared_data_volume_is_mounted_read_only_for_training(render, minimal_values):
    values = deep_merge(minimal_values, {
        "dataVolume": {"claimName": "imagenet-shards", "mountPath": "/data"},
        "training": {"dataRoot": "/data/imagenet"},
        "ingest": {"enabled": True, "source": "s3://imagenet/raw"}})
    case = render(values)
    head, worker = _groups(case)
    ingest = next(j for j in case.of_kind("Job") if j["metadata"]["name"].endswith("-ingest"))
    for template, read_only in ((head["template"], True), (worker["template"], True),
                                (ingest["spec"]["template"], False)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "imagenet-shards", "readOnly": read_only}
        mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": read_only}
    assert entrypoint_overrides(case)["data.root"] == "/data/imagenet"
    command = ingest["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "dest=/data/imagenet" in command


# ---------- pods that cannot hold their layout fail at render time ----------

SIZING_FAILURES = [
    pytest.param(
        {"ray": {"worker": {"cpu": "40"}}},
        ["ray.worker.cpu=40 is too small", "8 GPUs × training.cpusPerWorker=2 = 16 CPUs",
         "32 decode CPUs (ray.worker.minDecodeCpusPerGpu=4 × 8 GPUs", "at least 48"],
        id="cpu-too-small-auto-decode"),
    pytest.param(
        {"training": {"decodeConcurrency": 150}, "ray": {"worker": {"cpu": "120"}}},
        ["ray.worker.cpu=120 is too small", "150 decode CPUs (training.decodeConcurrency=150 over 1 worker pods)",
         "at least 166"],
        id="cpu-too-small-explicit-decode"),
    pytest.param(
        {"training": {"cpusPerWorker": 4}, "ray": {"worker": {"cpu": "60"}}},
        ["8 GPUs × training.cpusPerWorker=4 = 32 CPUs", "at least 64"],
        id="four-cpus-per-gpu-worker"),
    pytest.param(
        {"ray": {"worker": {"memory": "256Gi"}}},
        ["ray.worker.memory=256Gi is too small", "ray.worker.objectStoreMemory=160Gi",
         "ray.worker.sharedMemory=16Gi", "8 training workers × 4Gi + 72 decode CPUs × 1Gi",
         "at least 280.0Gi"],
        id="memory-too-small-for-shm-and-object-store"),
    pytest.param(
        {"ray": {"head": {"memory": "4Gi"}}},
        ["ray.head.memory=4Gi is too small", "4Gi for the driver, GCS and dashboard", "at least 7.0Gi"],
        id="head-memory-too-small"),
    pytest.param(
        {"training": {"towers": 8, "replicas": 1}, "ray": {"worker": {"gpusPerPod": 4}}},
        ["ray.worker.gpusPerPod=4 is not a multiple of training.towers=8", "use gpusPerPod=8"],
        id="replica-towers-not-dividing-gpus-per-pod"),
    pytest.param(
        {"training": {"towers": 2, "replicas": 1}},
        ["replicas×towers = 1×2 = 2 GPUs does not fill worker pods of ray.worker.gpusPerPod=8",
         "make replicas a multiple of 4", "or use gpusPerPod=2"],
        id="layout-smaller-than-a-node"),
    pytest.param(
        {"ray": {"head": {"rayStartParams": {"num-cpus": "8"}}}},
        ["ray.head.rayStartParams.num-cpus is set by the chart", "must never run reads or decode"],
        id="head-cpus-for-tasks"),
    pytest.param(
        {"ray": {"worker": {"rayStartParams": {"object-store-memory": "1000"}}}},
        ["ray.worker.rayStartParams.object-store-memory is set by the chart", "objectStoreMemory"],
        id="object-store-outside-values"),
    pytest.param(
        {"ray": {"worker": {"extraResources": {"nvidia.com/gpu": 2}}}},
        ["ray.worker.extraResources.nvidia.com/gpu", "gpusPerPod"], id="gpus-as-extra-resource"),
    pytest.param(
        {"ray": {"worker": {"memory": "640Gb"}}}, ["/ray/worker/memory"], id="memory-not-a-quantity"),
    pytest.param(
        {"ray": {"worker": {"ncclEnv": {"LD_PRELOAD": "/x.so"}}}}, ["/ray/worker/ncclEnv", "LD_PRELOAD"],
        id="non-nccl-env"),
    pytest.param(
        {"training": {"dataRoot": "/mnt/imagenet"}},
        ["training.dataRoot=\"/mnt/imagenet\" is not an s3:// URI, and no shared volume is mounted",
         "set dataVolume.claimName"], id="local-data-root-without-volume"),
    pytest.param(
        {"training": {"dataRoot": "/mnt/imagenet"}, "dataVolume": {"claimName": "shards"}},
        ["training.dataRoot=\"/mnt/imagenet\" is not under dataVolume.mountPath=/data"],
        id="data-root-outside-the-volume"),
]


@pytest.mark.parametrize(("override", "fragments"), SIZING_FAILURES)
def test_pods_that_cannot_hold_the_layout_fail_at_render(render_failure, override, fragments):
    message = render_failure(override)
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"{missing} not in: {message}"


def test_the_size_a_failure_names_renders(render, render_failure, minimal_values):
    """'At least N' is a real bound: N renders, one CPU or one GiB less does not."""
    assert "at least 48 " in render_failure({"ray": {"worker": {"cpu": "47"}}})
    assert render(deep_merge(minimal_values, {"ray": {"worker": {"cpu": "48"}}})).one("RayJob")
    assert "at least 280.0Gi" in render_failure({"ray": {"worker": {"memory": "279Gi"}}})
    assert render(deep_merge(minimal_values, {"ray": {"worker": {"memory": "280Gi"}}})).one("RayJob")
