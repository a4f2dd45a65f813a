"""How fast, and at what size, a 90-epoch ImageNet run would go: a projection.

    python bench/project.py [--node-vcpus 192] [--batch 256] [--decode-per-core N] [--t1-images-per-s N]

From measured inputs where they exist, stated assumptions where they do not:
- decode + augment images/s per CPU: `bench/results/gpu_bench.json` (all
  cores of the GPU machine decoding at once), else
  `bench/results/input_pipeline.json` (one process on the dev machine, times
  an SMT factor), else measured here in one process (bench/decode_rate.py);
  times the input pipeline's efficiency (Ray Data steady rate over raw decode:
  from input_pipeline.json, else DESIGN.md's 1.2k/1.6k);
- one tower's step time: gpu_bench.json's "alexnet T=1" and "tower of T=k"
  rows (bf16+cl, eager), else an assumed T=1 rate scaled by each tower's FLOPs
  above a fixed per-step launch floor;
- exchange and gradient bytes from the model spec, link speeds from datasheets
  (bench/projection.py).
Prints the table and the assumptions; writes bench/results/projection.json.
See bench/projection.py for the step model.
"""

from __future__ import annotations

import argparse
import json
import os
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
# Ray Data steady rate / raw decode rate (DESIGN.md: ~1.2k vs ~1.6k per core).
ASSUMED_PIPELINE_EFFICIENCY = 0.75
# What one vCPU of a hyperthreaded pair delivers when both decode, relative to
# one process alone (two threads on one core ~1.3x one thread).
ASSUMED_SMT_EFFICIENCY = 0.65
TOWER_COUNTS = (1, 2, 4, 8)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def decode_input(args, gpu: dict | None, pipeline: dict | None) -> tuple[float, str]:
    """Decode+augment images/s per vCPU with every vCPU busy, and where it came from."""
    if args.decode_per_core:
        return args.decode_per_core, "given on the command line"
    decode = (gpu or {}).get("decode", {}).get("result")
    if decode:
        return decode["per_core_loaded_images_per_s"], (
            f"measured: bench/results/gpu_bench.json, {decode['loaded_processes']} processes at once on "
            f"the GPU machine ({gpu['environment']['device']}, {decode['cpu_cores']} CPUs)")
    if pipeline:
        per_core = pipeline.get("decode_augment_images_per_s_per_core") or pipeline.get("per_core", {}).get(
            "decode_augment") or pipeline.get("per_core", {}).get("transform")
        if per_core:
            return per_core * ASSUMED_SMT_EFFICIENCY, (
                f"measured: bench/results/input_pipeline.json ({pipeline.get('time', 'undated')}), {per_core:.0f}/s "
                f"in one process on the dev machine, x{ASSUMED_SMT_EFFICIENCY} SMT (assumed)")
    from bench import decode_rate

    single = decode_rate.measure(num_images=64, processes=[1], seconds=1.5)["per_core_images_per_s"]
    load = os.getloadavg()[0]
    return single * ASSUMED_SMT_EFFICIENCY, (
        f"measured now: bench/decode_rate.py, {single:.0f}/s in one process on this machine "
        f"({os.cpu_count()} CPUs, load average {load:.1f}), x{ASSUMED_SMT_EFFICIENCY} SMT (assumed)")


def pipeline_input(pipeline: dict | None) -> tuple[float, str]:
    """Ray Data steady images/s over raw decode images/s, and where it came from."""
    per_core = (pipeline or {}).get("per_core", {})
    raw = per_core.get("decode_augment") or per_core.get("transform")
    if raw and per_core.get("pipeline_local_steady"):
        return per_core["pipeline_local_steady"] / raw, "measured: bench/results/input_pipeline.json (steady local pipeline / decode+augment)"
    return ASSUMED_PIPELINE_EFFICIENCY, "assumed: DESIGN.md's ~1.2k (Ray Data) vs ~1.6k (raw) images/s per core"


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


def print_targets(rows: list[dict], node: Node) -> None:
    """For each one-node layout: what 1 h and 20 min would need from decode and from the GPUs."""
    print()
    for label, seconds in (("1 h", 3600), ("20 min", 1200)):
        needed = EPOCH_IMAGES * EPOCHS / seconds
        print(f"under {label}: {needed:,.0f} img/s")
        for row in rows:
            if not (row["main_table"] and row["nodes"] == 1):
                continue
            decode_x, gpu_x = needed / row["node_decode_images_per_s"], needed / row["node_gpu_images_per_s"]
            state = "met" if max(decode_x, gpu_x) <= 1 else "NOT met"
            per_cpu = node.decode_per_cpu * decode_x
            print(f"  {row['layout']}: {state}; decode x{decode_x:.2f} ({per_cpu:,.0f} img/s per decode vCPU at "
                  f"pipeline efficiency {node.pipeline_efficiency:.2f}), GPUs x{gpu_x:.2f} (<= 1: enough)")
    print("levers: decode on the GPU (nvJPEG: torchvision.io.decode_jpeg on CUDA, or DALI) takes decode off the CPUs; "
          "a leaner pipeline (Ray Data steady / raw decode) is worth up to 1/efficiency; smaller stored JPEGs "
          "(quality, or a short side nearer 224) cut decode time roughly with the bytes; fewer CPUs reserved per worker; "
          "torch.compile / CUDA graphs lower the per-step launch floor that dominates narrow towers (T=4, 8).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-vcpus", type=int, default=192, help="vCPUs per 8-GPU node (p5.48xlarge: 192)")
    parser.add_argument("--cpus-per-worker", type=float, default=2.0, help="CPUs reserved per training worker")
    parser.add_argument("--system-cpus", type=float, default=4.0, help="CPUs for raylet, object store, driver, OS")
    parser.add_argument("--batch", type=int, default=256, help="images per replica step")
    parser.add_argument("--decode-per-core", type=float, default=0.0, help="override: decode+augment img/s per busy vCPU")
    parser.add_argument("--t1-images-per-s", type=float, default=0.0, help="override: T=1 step rate (img/s per GPU)")
    parser.add_argument("--grad-bytes", type=int, default=4, choices=(2, 4), help="4 = fp32 all-reduce, 2 = bf16 compression")
    parser.add_argument("--gpu-bench", default=str(RESULTS / "gpu_bench.json"))
    parser.add_argument("--input-pipeline", default=str(RESULTS / "input_pipeline.json"))
    parser.add_argument("--out", default=str(RESULTS / "projection.json"))
    args = parser.parse_args()

    gpu = _load(Path(args.gpu_bench))
    if gpu and gpu.get("dry_run"):
        gpu = None  # a CPU dry run measures nothing
    pipeline = _load(Path(args.input_pipeline))
    decode_per_cpu, decode_source = decode_input(args, gpu, pipeline)
    efficiency, efficiency_source = pipeline_input(pipeline)
    compute, compute_sources = tower_compute_inputs(args, gpu)
    node = Node(args.node_vcpus, args.cpus_per_worker, args.system_cpus, decode_per_cpu, efficiency)
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
    for layout, tower_link, replica_link, main_table in cases:
        spec = alexnet_spec(towers=layout.towers)
        step = StepInputs(batch=args.batch, compute_s=compute[layout.towers], gradient_bytes=args.grad_bytes)
        row = project(spec, layout, step, node, tower_link, replica_link)
        row["main_table"] = main_table
        row["measured"] = {
            "decode_per_cpu": decode_source,
            "pipeline_efficiency": efficiency_source,
            "tower_step": compute_sources[layout.towers],
            "links": "assumed: datasheet bandwidth x NCCL efficiency (bench/projection.py)",
        }
        rows.append(row)

    print(f"\nprojected 90-epoch ImageNet ({EPOCHS} x {EPOCH_IMAGES:,} images), per-replica batch {args.batch}")
    header = (f"{'layout':<6} {'nodes':>5} {'GPUs/node':>9} {'links (towers / replicas)':<34} {'img/s':>10} "
              f"{'90 ep':>8} {'bottleneck':<13} {'step ms':>7} {'xchg ms':>7} {'grad ms':>7} {'GPU img/s':>10} {'decode img/s':>12}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        links = row["tower_link"].split(" ")[0] + " " + row["tower_link"].split(" ")[1]
        if row["replica_link"]:
            links += " / " + " ".join(row["replica_link"].split(" ")[:2])
        hours = row["hours_90_epochs"]
        when = f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.0f} min"
        mark = "" if row["main_table"] else "  (sensitivity)"
        print(f"{row['layout']:<6} {row['nodes']:>5} {row['gpus_per_node']:>9} {links:<34} {row['images_per_s']:>10,.0f} "
              f"{when:>8} {row['bottleneck']:<13} {row['compute_ms']:>7.2f} {row['exchange_ms']:>7.2f} "
              f"{row['gradient_sync_exposed_ms']:>7.2f} {row['node_gpu_images_per_s']:>10,.0f} {row['node_decode_images_per_s']:>12,.0f}{mark}")
    print("\ninputs:")
    print(f"  decode+augment per busy vCPU: {decode_per_cpu:,.0f} img/s ({decode_source})")
    print(f"  pipeline efficiency: {efficiency:.2f} ({efficiency_source})")
    print(f"  node: {args.node_vcpus} vCPUs, {args.cpus_per_worker:g} per training worker, {args.system_cpus:g} for the system")
    for towers in TOWER_COUNTS:
        spec = alexnet_spec(towers=towers)
        forward, backward = exchange_bytes_per_image(spec, 2)
        print(f"  T={towers}: tower step {compute[towers] * 1000:.2f} ms at batch {args.batch} ({compute_sources[towers]}); "
              f"exchange {forward / 1e3:.1f} + {backward / 1e3:.1f} kB/image fwd+bwd (bf16); "
              f"gradients {tower_parameters(spec) * args.grad_bytes / 1e6:.0f} MB per tower")
    print("  links: " + "; ".join(f"{link.name} {link.gb_per_s:g} GB/s x {link.efficiency:g}, {link.latency_s * 1e6:.0f} us"
                                  for link in (NVLINK4, PCIE5, IB400, IB100)))
    print_targets(rows, node)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
