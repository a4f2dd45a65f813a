"""How fast, and at what size, a 90-epoch ImageNet run would go: a projection, both decode modes.

    python bench/project.py [--node-vcpus 192] [--batch 256] [--t1-images-per-s N] [--device-decode-per-gpu N]

From measured inputs where they exist, stated assumptions where they do not:
- the input pipeline's per-image costs, per decode mode: read tasks' and
  Ray's CPU-seconds, the consumer (tower process) CPU-seconds, bytes per
  image: `bench/results/input_pipeline.json` (bench/input_pipeline.py), else
  the figures it printed on the 2-core dev VM (stated below); the tower-side
  crop/flip runs on the GPU, so the consumer is its "deliver" part plus, in
  cpu mode, pinning the pixels, in device mode the decode call's host work
  (assumed);
- the device decode rate per GPU: `bench/results/device_decode.json`
  (bench/device_decode_rate.py on a GPU) or gpu_bench.json's `device_decode`,
  else assumed from NVIDIA's figure (below);
- one tower's step time: gpu_bench.json's "alexnet T=1" and "tower of T=k"
  rows (bf16+cl, eager), else an assumed T=1 rate scaled by each tower's FLOPs
  above a fixed per-step launch floor;
- exchange and gradient bytes from the model spec, link speeds from datasheets
  (bench/projection.py).
Prints the table (each row names its binding input and which inputs were
measured) and the targets; writes bench/results/projection.json.
See bench/projection.py for the step and input model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.projection import (  # noqa: E402
    EPOCH_IMAGES,
    EPOCHS,
    IB100,
    IB400,
    NVLINK4,
    PCIE5,
    InputCosts,
    Layout,
    Node,
    StepInputs,
    exchange_bytes_per_image,
    project,
    tower_parameters,
)
from service.model import alexnet_spec  # noqa: E402
from service.model.summary import layer_table  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# Without a GPU measurement: H100 SXM, bf16 + channels_last, eager, batch 256.
# AlexNet is 6.8 GFLOP per image to train at T=1, but conv1 (3 input
# channels, stride 4), LRN and pooling are memory-bound and the fc layers are
# small GEMMs: ~10% of the 989 TFLOP/s bf16 peak, i.e. ~15k images/s. An
# assumption (easily 2x off either way) until bench/gpu.sh measures it.
ASSUMED_T1_IMAGES_PER_S = 15_000.0
# Fixed time per eager step (~200 kernel launches at ~5 us): the part that
# does not shrink when a tower gets 1/T of the work.
ASSUMED_LAUNCH_FLOOR_S = 1e-3
# What one vCPU of a hyperthreaded pair delivers when both work, relative to
# one process alone (two threads on one core ~1.3x one thread).
ASSUMED_SMT_EFFICIENCY = 0.65
# Device decode per GPU: NVIDIA reports ~7k full-size ImageNet images/s on one A100 with
# DALI and its hardware JPEG decoder; the shards hold about half the pixels of full-size
# ImageNet (shorter side 256), so ~14k/s. Not scaled up for H100/H200's 7 NVJPG engines
# (A100 has one): a floor until bench/gpu.sh (device_decode_rate.py) measures it.
ASSUMED_DEVICE_DECODE_PER_GPU = 2 * 7_000.0
# Host work per image on a GPU: the decode call (parse headers, submit to the engine) and
# ShareLoader's per-row work (wrap the decoded image, slice its crop; the crops are then
# stacked in one call): not measurable on the CPU device here.
ASSUMED_DEVICE_HOST_S = 20e-6
# Pinning the cpu mode's pixels before the copy (ShareLoader: pin_memory), memcpy GB/s.
ASSUMED_PIN_GB_PER_S = 8.0
# bench/input_pipeline.py on the 2-core dev VM (steady CPU ms per image, 2026-12-03, run A of the
# README's input-pipeline table, 4,000 images in shards of 1,000, 3 epochs per mode), used when
# bench/results/input_pipeline.json is absent: {mode: (read tasks, Ray system, consumer
# deliver, bytes per image to the device)}. So a fresh clone prints the README's projection.
DEV_VM_COSTS_MS = {"cpu": (0.4896, 0.0234, 0.0722, 150_577.0), "device": (0.0521, 0.0208, 0.0223, 19_956.0)}
TOWER_COUNTS = (1, 2, 4, 8)
# Issue #15's projection targets (device decode): minutes for 90 epochs.
TARGET_MINUTES = {("1x8", 1): 20.0, ("4x2", 1): 20.0, ("16x8", 16): 2.0}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def device_decode_input(args, gpu: dict | None, device_decode: dict | None) -> tuple[float, str]:
    """Decoded images/s per GPU for decode=device, and where it came from."""
    if args.device_decode_per_gpu:
        return args.device_decode_per_gpu, "given on the command line"
    for name, record in (("device_decode.json", device_decode), ("gpu_bench.json", (gpu or {}).get("device_decode"))):
        rows = [r for r in (record or {}).get("rows", []) if r.get("library") == "nvImageCodec"
                and "images_per_s" in r and str(record.get("device", "")).startswith("cuda")]
        if rows:
            best = max(rows, key=lambda r: r["images_per_s"])
            return best["images_per_s"], (f"measured: bench/results/{name}, nvImageCodec {best['backend']} batch "
                                          f"{best['batch']} on {record['device']}")
    return ASSUMED_DEVICE_DECODE_PER_GPU, ("assumed: NVIDIA's ~7k full-size ImageNet img/s on one A100 (DALI, "
                                           "hardware decoder) x2 for the shards' half pixels; H100's 7 NVJPG "
                                           "engines not counted")


def input_costs(pipeline: dict | None, decode_per_gpu: float, decode_source: str) -> tuple[dict[str, InputCosts],
                                                                                           dict[str, str]]:
    """Per-mode input costs for the projection and a line on where they came from."""
    out, sources = {}, {}
    for mode in ("cpu", "device"):
        summary = (pipeline or {}).get("summary", {}).get(mode)
        if summary:
            steady = summary["steady_cpu_ms_per_image"]
            read, system, deliver = steady["read tasks"], steady["ray system"], steady["consumer: deliver"]
            to_device = summary["consumed_bytes_per_image"]
            origin = (f"measured: bench/results/input_pipeline.json ({pipeline.get('time', 'undated')}, "
                      f"{pipeline['config']['cores']} cores, commit {pipeline['git']['commit'][:8]})")
        else:
            read, system, deliver, to_device = DEV_VM_COSTS_MS[mode]
            origin = "assumed: bench/input_pipeline.py's figures on the 2-core dev VM (2026-12-03, run A in the README)"
        host = (to_device / (ASSUMED_PIN_GB_PER_S * 1e9) if mode == "cpu" else ASSUMED_DEVICE_HOST_S)
        out[mode] = InputCosts(mode, read_cpu_s=read / 1e3, system_cpu_s=system / 1e3,
                               consumer_cpu_s=deliver / 1e3 + host, host_to_device_bytes=to_device,
                               device_decode_per_s=decode_per_gpu if mode == "device" else 0.0)
        extra = (f"pinning {to_device / 1e3:.0f} kB at {ASSUMED_PIN_GB_PER_S:g} GB/s (assumed)" if mode == "cpu"
                 else f"{ASSUMED_DEVICE_HOST_S * 1e6:.0f} us of decode-call host work (assumed)")
        sources[mode] = (f"{origin}; consumer = delivery + {extra}"
                         + (f"; device decode {decode_source}" if mode == "device" else ""))
    return out, sources


def _gpu_row(gpu: dict | None, model: str, batch: int) -> dict | None:
    for row in (gpu or {}).get("steps", []):
        if row["model"] == model and row["batch"] == batch and row["mode"] == "bf16+cl" and "step_ms" in row:
            return row
    return None


def tower_compute_inputs(args, gpu: dict | None) -> tuple[dict[int, float], dict[int, str]]:
    """Seconds of one tower's step at `args.batch` for each tower count, and the source of each."""
    macs = {towers: layer_table(alexnet_spec(towers=towers))[1].macs / towers for towers in TOWER_COUNTS}
    t1_row = _gpu_row(gpu, "alexnet T=1", args.batch)
    if args.t1_images_per_s:
        t1_s, t1_source = args.batch / args.t1_images_per_s, f"given: T=1 at {args.t1_images_per_s:.0f} img/s"
    elif t1_row:
        t1_s = t1_row["step_ms"] / 1000
        t1_source = f"measured: bench/results/gpu_bench.json, alexnet T=1 bf16+cl batch {args.batch} on {gpu['environment']['device']}"
    else:
        t1_s = args.batch / ASSUMED_T1_IMAGES_PER_S
        t1_source = f"assumed: H100 SXM T=1 bf16+cl at {ASSUMED_T1_IMAGES_PER_S:.0f} img/s (~10% MFU)"
    seconds, sources = {1: t1_s}, {1: t1_source}
    for towers in TOWER_COUNTS[1:]:
        row = _gpu_row(gpu, f"tower of T={towers}", args.batch)
        if row and not args.t1_images_per_s:
            seconds[towers] = row["step_ms"] / 1000
            sources[towers] = f"measured: bench/results/gpu_bench.json, tower of T={towers} alone, bf16+cl batch {args.batch}"
        else:
            floor = min(ASSUMED_LAUNCH_FLOOR_S, t1_s)
            seconds[towers] = floor + (t1_s - floor) * macs[towers] / macs[1]
            sources[towers] = (f"scaled from T=1 by tower FLOPs ({macs[towers] / macs[1]:.3f}x) above an assumed "
                               f"{ASSUMED_LAUNCH_FLOOR_S * 1000:.1f} ms launch floor")
    return seconds, sources


def print_table(rows: list[dict]) -> None:
    """The projection rows, both modes."""
    print(f"\nprojected 90-epoch ImageNet ({EPOCHS} x {EPOCH_IMAGES:,} images)")
    header = (f"{'decode':<7}{'layout':<6} {'nodes':>5} {'links (towers / replicas)':<30} {'img/s':>10} {'90 ep':>8} "
              f"{'binding':<14} {'step ms':>7} {'xchg ms':>7} {'grad ms':>7} {'GPU img/s':>10} {'input img/s':>11}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        links = " ".join(row["tower_link"].split(" ")[:2])
        if row["replica_link"]:
            links += " / " + " ".join(row["replica_link"].split(" ")[:2])
        minutes = row["minutes_90_epochs"]
        when = f"{minutes / 60:.2f} h" if minutes >= 60 else f"{minutes:.1f} min"
        mark = "" if row["main_table"] else "  (sensitivity)"
        print(f"{row['decode']:<7}{row['layout']:<6} {row['nodes']:>5} {links:<30} {row['images_per_s']:>10,.0f} "
              f"{when:>8} {row['bottleneck']:<14} {row['compute_ms']:>7.2f} {row['exchange_ms']:>7.2f} "
              f"{row['gradient_sync_exposed_ms']:>7.2f} {row['node_gpu_images_per_s']:>10,.0f} "
              f"{row['node_input_images_per_s']:>11,.0f}{mark}")
    print("\nper-node input ceilings, img/s (main rows):")
    for row in rows:
        if row["main_table"]:
            ceilings = ", ".join(f"{k} {v:,.0f}" for k, v in row["node_input_ceilings"].items())
            print(f"  {row['decode']:<7}{row['layout']:<6} {ceilings}")


def print_targets(rows: list[dict]) -> list[dict]:
    """Issue #15's projection targets (device decode), PASS/FAIL with the binding input."""
    print("\ntargets (issue #15, decode=device):")
    out = []
    for row in rows:
        bound = TARGET_MINUTES.get((row["layout"], row["nodes"]))
        if row["decode"] != "device" or not row["main_table"] or bound is None:
            continue
        met = row["minutes_90_epochs"] <= bound
        out.append({"layout": row["layout"], "nodes": row["nodes"], "minutes": row["minutes_90_epochs"],
                    "bound_minutes": bound, "met": met, "binding": row["bottleneck"]})
        print(f"  {row['layout']} on {row['nodes']} node(s): {row['minutes_90_epochs']:.1f} min <= {bound:g} min "
              f"{'PASS' if met else 'FAIL'} (binding: {row['bottleneck']})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-vcpus", type=int, default=192, help="vCPUs per 8-GPU node (p5.48xlarge: 192)")
    parser.add_argument("--cpus-per-worker", type=float, default=2.0, help="CPUs reserved per training worker")
    parser.add_argument("--system-cpus", type=float, default=4.0, help="CPUs for raylet, object store, driver, OS")
    parser.add_argument("--batch", type=int, default=256, help="images per replica step")
    parser.add_argument("--t1-images-per-s", type=float, default=0.0, help="override: T=1 step rate (img/s per GPU)")
    parser.add_argument("--device-decode-per-gpu", type=float, default=0.0, help="override: decoded img/s per GPU")
    parser.add_argument("--grad-bytes", type=int, default=4, choices=(2, 4), help="4 = fp32 all-reduce, 2 = bf16 compression")
    parser.add_argument("--gpu-bench", default=str(RESULTS / "gpu_bench.json"))
    parser.add_argument("--device-decode", default=str(RESULTS / "device_decode.json"))
    parser.add_argument("--input-pipeline", default=str(RESULTS / "input_pipeline.json"))
    parser.add_argument("--out", default=str(RESULTS / "projection.json"))
    args = parser.parse_args()

    gpu = _load(Path(args.gpu_bench))
    if gpu and gpu.get("dry_run"):
        gpu = None  # a CPU dry run measures nothing
    decode_per_gpu, decode_source = device_decode_input(args, gpu, _load(Path(args.device_decode)))
    costs, cost_sources = input_costs(_load(Path(args.input_pipeline)), decode_per_gpu, decode_source)
    compute, compute_sources = tower_compute_inputs(args, gpu)
    node = Node(args.node_vcpus, args.cpus_per_worker, args.system_cpus, ASSUMED_SMT_EFFICIENCY,
                PCIE5.gb_per_s * PCIE5.efficiency)
    cases = [  # layout, tower link, replica link, in the main table
        (Layout(1, 2), NVLINK4, NVLINK4, True),
        (Layout(4, 2), NVLINK4, NVLINK4, True),
        (Layout(1, 8), NVLINK4, NVLINK4, True),
        (Layout(16, 8, nodes=16), NVLINK4, IB400, True),
        (Layout(16, 8, nodes=16), NVLINK4, IB100, False),
        (Layout(4, 2), PCIE5, PCIE5, False),
        (Layout(1, 8), PCIE5, PCIE5, False),
        (Layout(8, 1), NVLINK4, NVLINK4, False),
    ]
    rows = []
    for mode in ("cpu", "device"):
        for layout, tower_link, replica_link, main_table in cases:
            if mode == "cpu" and not main_table:
                continue  # sensitivity rows for the default GPU mode only
            spec = alexnet_spec(towers=layout.towers)
            step = StepInputs(batch=args.batch, compute_s=compute[layout.towers], gradient_bytes=args.grad_bytes)
            row = project(spec, layout, step, node, costs[mode], tower_link, replica_link)
            row["main_table"] = main_table
            row["measured"] = {
                "input": cost_sources[mode],
                "tower_step": compute_sources[layout.towers],
                "smt_efficiency": f"assumed: {ASSUMED_SMT_EFFICIENCY}",
                "links": "assumed: datasheet bandwidth x NCCL efficiency (bench/projection.py)",
            }
            rows.append(row)

    print_table(rows)
    print("\ninputs:")
    for mode, item in costs.items():
        print(f"  decode={mode}: read tasks {item.read_cpu_s * 1e3:.3f} + Ray {item.system_cpu_s * 1e3:.3f} CPU ms/image, "
              f"consumer {item.consumer_cpu_s * 1e3:.3f} ms/image (ceiling {1 / item.consumer_cpu_s:,.0f} img/s per "
              f"process), {item.host_to_device_bytes / 1e3:.1f} kB/image to the device"
              + (f", device decode {item.device_decode_per_s:,.0f} img/s per GPU" if item.device_decode_per_s else ""))
        print(f"    ({cost_sources[mode]})")
    print(f"  node: {args.node_vcpus} vCPUs x {ASSUMED_SMT_EFFICIENCY} (SMT, assumed), {args.cpus_per_worker:g} per "
          f"training worker, {args.system_cpus:g} for the system; host->device {node.host_to_device_gb_per_s:g} GB/s "
          f"per GPU (PCIe 5 x16, assumed)")
    for towers in TOWER_COUNTS:
        spec = alexnet_spec(towers=towers)
        forward, backward = exchange_bytes_per_image(spec, 2)
        print(f"  T={towers}: tower step {compute[towers] * 1000:.2f} ms at batch {args.batch} ({compute_sources[towers]}); "
              f"exchange {forward / 1e3:.1f} + {backward / 1e3:.1f} kB/image fwd+bwd (bf16); "
              f"gradients {tower_parameters(spec) * args.grad_bytes / 1e6:.0f} MB per tower")
    print("  links: " + "; ".join(f"{link.name} {link.gb_per_s:g} GB/s x {link.efficiency:g}, {link.latency_s * 1e6:.0f} us"
                                  for link in (NVLINK4, PCIE5, IB400, IB100)))
    targets = print_targets(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "targets": targets}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
