"""The arithmetic behind bench/project.py: time per step and images/s of a
replicas x towers layout, from per-tower compute, bytes, link speeds and the
input pipeline's per-image costs.

Pure functions over plain data (no files, no clocks), so tests check them by hand.

The model of one replica's step (every replica runs the same step):

    step = compute(T) + exchanges(T) + max(0, gradient_sync - backward_window)

- compute(T): one tower's forward + backward + update at the replica batch
  (measured on a GPU, or scaled from the T=1 rate by the tower's FLOPs);
- exchanges: every all-gather (forward) and reduce-scatter (backward) of the
  tower's activations, one after another and not overlapped with compute
  (each exchange sits between two layers that need it); ring collectives:
  each tower sends and receives (T-1)/T of the gathered tensor, plus a fixed
  latency per collective;
- gradient sync: DDP's ring all-reduce of one tower's gradients over the
  replicas, 2(R-1)/R of its bytes. It overlaps backward (the fc layers hold
  ~96% of the bytes and finish first), so only the part longer than the
  backward pass (`backward_fraction` of compute) adds to the step.

The model of a node's input (`InputCosts`, one per decode mode): every GPU's
tower reads its own lane, so a node of G GPUs runs G consumers. A node's
input images/s is the smallest of these ceilings:

- read CPUs: the vCPUs left after the training workers and the system,
  each giving `smt_efficiency` / (read-task + Ray CPU-seconds per image);
- consumers: G / (one consumer process's CPU-seconds per image): each
  tower's process takes 1/G of the node's images on one core;
- host->device: G x the PCIe bandwidth / bytes per image;
- device decode (decode=device): G x the decode rate per GPU; the JPEG
  engines do not use the SMs, so decode overlaps the step.

A node's images/s is the smaller of its GPUs' step rate and that input rate;
the binding input (or the largest part of the step) is named.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.model import AlexNetTower
from service.model.spec import AlexNetSpec, feature_map_sizes

EPOCH_IMAGES = 1_281_167  # ImageNet-1k train
EPOCHS = 90


@dataclass(frozen=True)
class Exchange:
    """One activation exchange of a tower's forward pass."""

    name: str
    # The gathered tensor (all towers' slices) per image, in elements.
    elements_per_image: int
    # A reduce-scatter in backward too (none where everything after it is
    # replicated on every tower: see service/parallel/exchange.py).
    backward: bool


def exchanges(spec: AlexNetSpec) -> list[Exchange]:
    """The exchanges `AlexNetTower.forward` makes, derived from the spec (none for one tower)."""
    if spec.towers == 1:
        return []
    sizes = feature_map_sizes(spec)
    found = []
    for index, conv in enumerate(spec.convs[1:], start=1):
        if conv.reads == "all":  # exchange 1: conv3 reads every tower's conv2 maps
            previous = spec.convs[index - 1]
            found.append(Exchange(f"conv{index + 1} input", previous.out_channels * sizes[index - 1] ** 2, True))
    found.append(Exchange("fc6 input (pool5)", spec.fc_in_features, True))
    for index, width in enumerate(spec.fc_widths):
        last = index == len(spec.fc_widths) - 1
        found.append(Exchange(f"fc{index + 7} input", width, not (last and not spec.fc8_sliced)))
    if spec.fc8_sliced:  # the logits slices are gathered; everything after is replicated
        found.append(Exchange("logits", spec.num_classes, False))
    return found


def exchange_bytes_per_image(spec: AlexNetSpec, dtype_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes each tower sends (and receives) per image in ring collectives."""
    share = (spec.towers - 1) / spec.towers
    forward = sum(e.elements_per_image for e in exchanges(spec)) * share * dtype_bytes
    backward = sum(e.elements_per_image for e in exchanges(spec) if e.backward) * share * dtype_bytes
    return forward, backward


def tower_parameters(spec: AlexNetSpec) -> int:
    """Parameters one tower holds (tower 0; all towers hold the same count)."""
    with torch.device("meta"):
        return sum(p.numel() for p in AlexNetTower(spec, 0).parameters())


@dataclass(frozen=True)
class Link:
    """A GPU's link for one kind of collective."""

    name: str
    # Per GPU, per direction, as the datasheet gives it.
    gb_per_s: float
    # Fraction of it large NCCL collectives reach.
    efficiency: float
    # Fixed cost per collective (launch, synchronisation, small-message latency).
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        """Time for one collective that moves `nbytes` through each GPU's link."""
        return self.latency_s + nbytes / (self.gb_per_s * 1e9 * self.efficiency)


# Stated assumptions; bench/project.py prints them.
NVLINK4 = Link("NVLink 4 via NVSwitch (H100/H200 SXM)", 450.0, 0.8, 20e-6)
PCIE5 = Link("PCIe 5 x16 (no NVLink)", 55.0, 1.0, 25e-6)  # 55 GB/s is already an effective figure
IB400 = Link("400 Gb/s NIC per GPU (IB/EFA)", 50.0, 0.8, 30e-6)
IB100 = Link("100 Gb/s NIC per GPU", 12.5, 0.8, 30e-6)


@dataclass(frozen=True)
class Layout:
    """`replicas` x `towers` on `nodes` nodes; a replica's towers share a node."""

    replicas: int
    towers: int
    nodes: int = 1
    node_gpus: int = 8

    def __post_init__(self):
        if self.replicas % self.nodes:
            raise ValueError(f"{self.name}: {self.replicas} replicas do not split evenly over {self.nodes} nodes")
        if self.gpus_per_node > self.node_gpus:
            raise ValueError(f"{self.name} needs {self.gpus_per_node} GPUs per node; nodes have {self.node_gpus}")

    @property
    def name(self) -> str:
        return f"{self.replicas}x{self.towers}"

    @property
    def replicas_per_node(self) -> int:
        return self.replicas // self.nodes

    @property
    def gpus_per_node(self) -> int:
        return self.replicas_per_node * self.towers


@dataclass(frozen=True)
class Node:
    """The CPU side of one node."""

    vcpus: int
    cpus_per_worker: float
    # Raylet, object store, driver, OS.
    system_cpus: float
    # What one vCPU delivers when every vCPU is busy, relative to one process alone on the
    # machine the per-image costs were measured on (hyperthreads: ~0.65).
    smt_efficiency: float = 1.0
    # Host->device bandwidth per GPU (PCIe 5 x16, effective).
    host_to_device_gb_per_s: float = 55.0

    def read_cpus(self, workers: int) -> float:
        """vCPUs left for the read tasks."""
        cpus = self.vcpus - workers * self.cpus_per_worker - self.system_cpus
        if cpus <= 0:
            raise ValueError(f"no CPUs left to read: {self.vcpus} vCPUs, {workers} workers x {self.cpus_per_worker}"
                             f" + {self.system_cpus} system")
        return cpus


@dataclass(frozen=True)
class InputCosts:
    """Per-image costs of one decode mode's input pipeline (bench/input_pipeline.py measures them)."""

    mode: str
    # Read tasks' CPU-seconds per image (cpu mode: the decode and crop included).
    read_cpu_s: float
    # Ray's own processes' CPU-seconds per image (raylet, GCS, ...), on the same vCPUs.
    system_cpu_s: float
    # One tower process's CPU-seconds per image it consumes (its ceiling: 1 / this).
    consumer_cpu_s: float
    # Bytes per image copied to the GPU (cpu mode: the crop's pixels; device mode: the JPEG).
    host_to_device_bytes: float
    # Decoded images/s per GPU in decode=device (0: the GPU does not decode).
    device_decode_per_s: float = 0.0


def input_ceilings(node: Node, costs: InputCosts, gpus: int) -> dict[str, float]:
    """Images/s each input resource of a node with `gpus` training GPUs (one consumer each) can carry."""
    ceilings = {
        "read CPUs": node.read_cpus(gpus) * node.smt_efficiency / (costs.read_cpu_s + costs.system_cpu_s),
        "consumer": gpus / costs.consumer_cpu_s,
        "host->device": gpus * node.host_to_device_gb_per_s * 1e9 / costs.host_to_device_bytes,
    }
    if costs.device_decode_per_s:
        ceilings["device decode"] = gpus * costs.device_decode_per_s
    return ceilings


@dataclass(frozen=True)
class StepInputs:
    """What one replica step costs, apart from links."""

    batch: int  # images per replica step
    compute_s: float  # one tower's compute per step at `batch`
    activation_bytes: int = 2  # bf16 exchanges
    gradient_bytes: int = 4  # fp32 all-reduce (2 with parallel.grad_compression=bf16)
    backward_fraction: float = 2 / 3  # of compute: the window gradient sync can hide in


def step_seconds(spec: AlexNetSpec, layout: Layout, step: StepInputs, tower_link: Link, replica_link: Link) -> dict:
    """The parts of one replica step, in seconds."""
    exchange = 0.0
    for item in exchanges(spec):
        nbytes = item.elements_per_image * step.batch * (spec.towers - 1) / spec.towers * step.activation_bytes
        exchange += tower_link.seconds(nbytes) * (2 if item.backward else 1)
    if not spec.fc8_sliced and spec.towers > 1:  # replicated fc8: its gradients are summed over towers
        fc8 = spec.fc_widths[-1] * spec.num_classes + spec.num_classes
        exchange += tower_link.seconds(2 * (spec.towers - 1) / spec.towers * fc8 * step.gradient_bytes)
    gradient = 0.0
    if layout.replicas > 1:
        nbytes = 2 * (layout.replicas - 1) / layout.replicas * tower_parameters(spec) * step.gradient_bytes
        gradient = replica_link.seconds(nbytes)
    hidden = step.backward_fraction * step.compute_s
    excess = max(0.0, gradient - hidden)
    return {
        "compute_s": step.compute_s,
        "exchange_s": exchange,
        "gradient_sync_s": gradient,
        "gradient_sync_exposed_s": excess,
        "step_s": step.compute_s + exchange + excess,
    }


def bottleneck(inputs: dict[str, float], gpu_rate: float, parts: dict) -> str:
    """What limits the node: the smallest input ceiling when it is below the GPUs' rate,
    else the largest part of the step."""
    binding = min(inputs, key=inputs.get)
    if inputs[binding] < gpu_rate:
        return binding
    named = {"step": parts["compute_s"], "exchange": parts["exchange_s"], "gradient sync": parts["gradient_sync_exposed_s"]}
    return max(named, key=named.get)


def project(spec: AlexNetSpec, layout: Layout, step: StepInputs, node: Node, costs: InputCosts, tower_link: Link,
            replica_link: Link) -> dict:
    """Images/s, 90-epoch hours and the binding input or step part of `layout` in `costs.mode`."""
    if spec.towers != layout.towers:
        raise ValueError(f"spec has {spec.towers} towers, layout {layout.name} has {layout.towers}")
    parts = step_seconds(spec, layout, step, tower_link, replica_link)
    gpu_rate = layout.replicas_per_node * step.batch / parts["step_s"]
    inputs = input_ceilings(node, costs, layout.gpus_per_node)
    input_rate = min(inputs.values())
    images_per_s = layout.nodes * min(gpu_rate, input_rate)
    hours = EPOCH_IMAGES * EPOCHS / images_per_s / 3600
    return {
        "layout": layout.name,
        "decode": costs.mode,
        "nodes": layout.nodes,
        "gpus_per_node": layout.gpus_per_node,
        "images_per_s": images_per_s,
        "hours_90_epochs": hours,
        "minutes_90_epochs": hours * 60,
        "gpu_hours": hours * layout.nodes * layout.gpus_per_node,
        "bottleneck": bottleneck(inputs, gpu_rate, parts),
        "node_gpu_images_per_s": gpu_rate,
        "node_input_images_per_s": input_rate,
        "node_input_ceilings": inputs,
        "tower_link": tower_link.name,
        "replica_link": replica_link.name if layout.replicas > 1 else None,
        **{key[: -len("_s")] + "_ms": value * 1000 for key, value in parts.items()},
    }
