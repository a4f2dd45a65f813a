"""The projection's arithmetic (bench/projection.py): bytes from the spec, step model, input ceilings, bottleneck."""

from __future__ import annotations

import pytest
import torch

from bench.projection import (
    EPOCH_IMAGES,
    EPOCHS,
    InputCosts,
    Layout,
    Link,
    Node,
    StepInputs,
    exchange_bytes_per_image,
    exchanges,
    input_ceilings,
    project,
    step_seconds,
    tower_parameters,
)
from service.model import AlexNetTower, alexnet_spec

FAST = Link("fast", 1e6, 1.0, 0.0)  # ~free communication
PLENTY = Node(vcpus=10_000, cpus_per_worker=2, system_cpus=4)
# Input costs that never bind: 1 us of CPU per image, 1 byte to the device.
FREE_INPUT = InputCosts("cpu", read_cpu_s=1e-6, system_cpu_s=0.0, consumer_cpu_s=1e-6, host_to_device_bytes=1.0)


def test_two_tower_exchange_bytes_match_a_hand_count():
    spec = alexnet_spec(towers=2)
    # conv2 maps after pool2, pool5, fc6 out, fc7 out, the logits.
    hand = [256 * 13 * 13, 256 * 6 * 6, 4096, 4096, 1000]
    assert [e.elements_per_image for e in exchanges(spec)] == hand
    # The logits gather has no backward collective (everything after it is replicated).
    assert [e.backward for e in exchanges(spec)] == [True, True, True, True, False]
    forward, backward = exchange_bytes_per_image(spec, dtype_bytes=2)
    # Ring collectives over 2 towers: each sends (and receives) half of the gathered bf16 tensor.
    assert forward == sum(hand) / 2 * 2 == 61_672
    assert backward == sum(hand[:4]) / 2 * 2 == 60_672


@pytest.mark.parametrize("towers,num_classes", [(2, 1000), (4, 1000), (8, 1000), (4, 10)])
def test_exchanges_are_the_ones_the_tower_makes(towers, num_classes):
    """Count what AlexNetTower.forward actually exchanges, through a recording stand-in."""
    spec = alexnet_spec(towers=towers, num_classes=num_classes, image_size=224)
    calls = []

    def recording_exchange(x, replicated_after=False):
        calls.append((x[0].numel() * towers, not replicated_after))
        return torch.cat([x] * towers, dim=1)

    with torch.device("meta"):
        AlexNetTower(spec, 0, recording_exchange)(torch.empty(2, 3, 224, 224))
    assert [(e.elements_per_image, e.backward) for e in exchanges(spec)] == calls
    if num_classes % towers:  # fc8 replicated: no logits gather, no backward after fc7's exchange
        assert calls[-1] == (spec.fc_widths[-1], False)


def test_tower_parameters_add_up_to_the_paper_count():
    assert 2 * tower_parameters(alexnet_spec(towers=2)) == 60_965_224


def test_one_tower_hours_follow_from_the_step_time():
    spec = alexnet_spec(towers=1)
    row = project(spec, Layout(1, 1), StepInputs(batch=256, compute_s=0.0128), PLENTY, FREE_INPUT, FAST, FAST)
    assert row["images_per_s"] == pytest.approx(256 / 0.0128)
    assert row["hours_90_epochs"] == pytest.approx(EPOCH_IMAGES * EPOCHS / (256 / 0.0128) / 3600)
    assert row["bottleneck"] == "step"


def test_gradient_sync_counts_only_what_backward_does_not_hide():
    spec = alexnet_spec(towers=2)
    one_gb = Link("1 GB/s", 1.0, 1.0, 0.0)
    params = tower_parameters(spec)
    # 2 replicas: a ring all-reduce moves 2 * (2-1)/2 = 1x the fp32 gradient bytes.
    sync = params * 4 / 1e9
    hidden = StepInputs(batch=8, compute_s=3 * sync)  # backward window 2/3 * compute = 2 * sync
    parts = step_seconds(spec, Layout(2, 2), hidden, FAST, one_gb)
    assert parts["gradient_sync_s"] == pytest.approx(sync)
    assert parts["gradient_sync_exposed_s"] == 0.0
    exposed = StepInputs(batch=8, compute_s=0.75 * sync)  # window 0.5 * sync
    parts = step_seconds(spec, Layout(2, 2), exposed, FAST, one_gb)
    assert parts["gradient_sync_exposed_s"] == pytest.approx(0.5 * sync)
    assert parts["step_s"] == pytest.approx(0.75 * sync + parts["exchange_s"] + 0.5 * sync)


def test_input_ceilings_follow_from_the_per_image_costs():
    node = Node(vcpus=100, cpus_per_worker=2, system_cpus=4, smt_efficiency=0.5, host_to_device_gb_per_s=50.0)
    costs = InputCosts("device", read_cpu_s=0.2e-3, system_cpu_s=0.05e-3, consumer_cpu_s=0.1e-3,
                       host_to_device_bytes=25_000, device_decode_per_s=10_000)
    ceilings = input_ceilings(node, costs, gpus=8)
    # (100 - 8 x 2 - 4) vCPUs x 0.5 / 0.25 ms = 160k img/s; 8 consumers of 10k/s each;
    # 8 x 50 GB/s / 25 kB; 8 GPUs decoding 10k/s each.
    assert ceilings == pytest.approx({"read CPUs": 80 * 0.5 / 0.25e-3, "consumer": 80_000,
                                      "host->device": 8 * 2e6, "device decode": 80_000})
    assert "device decode" not in input_ceilings(node, InputCosts("cpu", 1e-3, 0.0, 1e-4, 150_000), gpus=8), \
        "cpu mode: the GPUs do not decode"


def test_bottleneck_is_whatever_is_slowest():
    spec = alexnet_spec(towers=2)
    step = StepInputs(batch=256, compute_s=0.005)
    assert project(spec, Layout(4, 2), step, PLENTY, FREE_INPUT, FAST, FAST)["bottleneck"] == "step"
    starved = Node(vcpus=20, cpus_per_worker=2, system_cpus=0)
    row = project(spec, Layout(4, 2), step, starved, InputCosts("cpu", 1e-3, 0.0, 1e-6, 1.0), FAST, FAST)
    assert row["bottleneck"] == "read CPUs"
    assert row["images_per_s"] == pytest.approx((20 - 8 * 2) * 1000.0)
    one_core = InputCosts("cpu", 1e-6, 0.0, 1e-4, 1.0)  # each tower's process takes 10k img/s at most
    row = project(spec, Layout(4, 2), step, PLENTY, one_core, FAST, FAST)
    assert row["bottleneck"] == "consumer" and row["images_per_s"] == pytest.approx(8 * 10_000)
    slow_decode = InputCosts("device", 1e-6, 0.0, 1e-6, 1.0, device_decode_per_s=1_000)
    row = project(spec, Layout(4, 2), step, PLENTY, slow_decode, FAST, FAST)
    assert row["bottleneck"] == "device decode" and row["images_per_s"] == pytest.approx(8 * 1_000)
    slow = Link("slow", 1.0, 1.0, 0.0)  # 1 GB/s: ~31 MB of activations per step take ~31 ms
    assert project(spec, Layout(4, 2), step, PLENTY, FREE_INPUT, slow, FAST)["bottleneck"] == "exchange"
    assert project(spec, Layout(4, 2), step, PLENTY, FREE_INPUT, FAST, slow)["bottleneck"] == "gradient sync"


def test_layouts_that_cannot_exist_are_refused():
    with pytest.raises(ValueError, match="16 GPUs per node"):
        Layout(2, 8)
    with pytest.raises(ValueError, match="3 replicas do not split evenly over 2 nodes"):
        Layout(3, 2, nodes=2)
    with pytest.raises(ValueError, match="no CPUs left to read"):
        Node(16, 2, 0).read_cpus(8)


def test_project_writes_the_rows_the_readme_table_needs(tmp_path):
    """bench/project.py end to end, on given rates (no result files, no measuring)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out, none = tmp_path / "projection.json", str(tmp_path / "none.json")
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "project.py"), "--t1-images-per-s", "15000",
         "--device-decode-per-gpu", "14000", "--gpu-bench", none, "--device-decode", none, "--input-pipeline", none,
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["rows"]
    main = [(row["decode"], row["layout"], row["nodes"], row["gpus_per_node"]) for row in rows if row["main_table"]]
    layouts = [("1x2", 1, 2), ("4x2", 1, 8), ("1x8", 1, 8), ("16x8", 16, 8)]
    assert main == [("cpu", *layout) for layout in layouts] + [("device", *layout) for layout in layouts]
    for row in rows:
        assert {"images_per_s", "hours_90_epochs", "bottleneck", "measured", "node_input_ceilings"} <= set(row)
        assert row["hours_90_epochs"] == pytest.approx(EPOCH_IMAGES * EPOCHS / row["images_per_s"] / 3600)
        assert row["measured"]["input"].startswith("assumed")
        assert row["measured"]["tower_step"].startswith(("given", "scaled"))
        assert row["bottleneck"] in {"read CPUs", "consumer", "host->device", "device decode", "step", "exchange",
                                     "gradient sync"}
    device = [row for row in rows if row["decode"] == "device"]
    assert all("device decode given on the command line" in row["measured"]["input"] for row in device)
    assert [(t["layout"], t["nodes"], t["bound_minutes"]) for t in record["targets"]] == [
        ("4x2", 1, 20.0), ("1x8", 1, 20.0), ("16x8", 16, 2.0)]
