"""Batched JPEG decode on a device, images/s: the decode="device" input path's decoder.

    python bench/device_decode_rate.py [--device cuda] [--batches 128,256] [--repeats 10]

Shard-like JPEGs (shorter side 256, quality 90, made the way ingest stores
them; `bench.decode_rate.make_jpegs`) decoded a batch per call:

- nvImageCodec (what the service uses, `service.data.device_decode`), one
  row per backend it offers on the device: HW_GPU_ONLY (the GPU's JPEG
  engines: A100, H100/H200), GPU_ONLY (nvJPEG on the SMs), CPU_ONLY
  (libjpeg-turbo threads; the CPU dry run's only row);
- torchvision.io.decode_jpeg(list, device=...) (batched nvJPEG), for comparison.

A library or backend that is missing or fails is a row that says so, not a
crash. Timing: after a warm-up batch, CUDA events around each call (the host
clock on CPU); median seconds per batch over `repeats` calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.copy_rate import events_time  # noqa: E402
from bench.decode_rate import make_jpegs  # noqa: E402


def _nvimgcodec_decoders(device: torch.device) -> list[tuple[str, object]]:
    """(backend name, decoder limited to that backend) for each backend nvImageCodec offers here."""
    from service.data.device_decode import _native_output_silenced

    with _native_output_silenced():
        from nvidia import nvimgcodec

        if device.type != "cuda":
            kinds = ["CPU_ONLY"]
            device_id = nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY
        else:
            kinds = ["HW_GPU_ONLY", "GPU_ONLY"]
            device_id = device.index or 0
        return [(kind, nvimgcodec.Decoder(device_id=device_id,
                                          backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))]))
                for kind in kinds]


def _nvimgcodec_rows(device: torch.device, jpegs: list[bytes], batches: list[int], repeats: int) -> list[dict]:
    try:
        decoders = _nvimgcodec_decoders(device)
    except Exception as error:  # noqa: BLE001 - a missing wheel or CUDA library is a row, not a crash
        return [{"library": "nvImageCodec", "backend": "-", "skipped": f"{type(error).__name__}: {error}"}]
    rows = []
    for kind, decoder in decoders:
        for batch in batches:
            chunk = jpegs[:batch]
            stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0

            def decode():
                images = decoder.decode(chunk, cuda_stream=stream)
                if any(image is None for image in images):
                    raise RuntimeError("the backend returned no image for some JPEGs (unsupported by it)")

            rows.append(_row("nvImageCodec", kind, batch, device, decode, repeats))
    return rows


def _torchvision_rows(device: torch.device, jpegs: list[bytes], batches: list[int], repeats: int) -> list[dict]:
    try:
        from torchvision.io import decode_jpeg

        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        decode_jpeg(data[:1], device=device)
    except Exception as error:  # noqa: BLE001 - torchvision's image ops may not load beside this torch
        return [{"library": "torchvision", "backend": "decode_jpeg", "skipped": f"{type(error).__name__}: {error}"}]
    return [_row("torchvision", f"decode_jpeg({device.type})", batch, device,
                 lambda batch=batch: decode_jpeg(data[:batch], device=device), repeats) for batch in batches]


def _row(library: str, backend: str, batch: int, device: torch.device, decode, repeats: int) -> dict:
    try:
        decode()  # warm-up: allocations, the decoder's first-call set-up
        per_batch = events_time(device, decode, repeats)
    except Exception as error:  # noqa: BLE001
        return {"library": library, "backend": backend, "batch": batch, "skipped": f"{type(error).__name__}: {error}"}
    return {"library": library, "backend": backend, "batch": batch, "ms_per_batch": per_batch * 1000,
            "images_per_s": batch / per_batch}


def measure(device: torch.device, batches: list[int] = (128, 256), repeats: int = 10) -> dict:
    """Decode rows for `device`, and where the JPEGs came from."""
    jpegs, origin = make_jpegs(max(batches))
    rows = _nvimgcodec_rows(device, jpegs, list(batches), repeats)
    rows += _torchvision_rows(device, jpegs, list(batches), repeats)
    mean_bytes = sum(len(j) for j in jpegs) / len(jpegs)
    return {"device": str(device), "jpegs": origin, "mean_jpeg_bytes": mean_bytes, "rows": rows}


def print_table(record: dict) -> None:
    print(f"device decode on {record['device']} ({record['mean_jpeg_bytes'] / 1000:.1f} KB JPEGs)")
    print(f"{'library':<14}{'backend':<22}{'batch':>6}{'images/s':>12}{'ms/batch':>10}")
    for row in record["rows"]:
        if "skipped" in row:
            print(f"{row['library']:<14}{row['backend']:<22}{row.get('batch', ''):>6}  skipped: {row['skipped'][:80]}")
        else:
            print(f"{row['library']:<14}{row['backend']:<22}{row['batch']:>6}{row['images_per_s']:>12,.0f}"
                  f"{row['ms_per_batch']:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="128,256")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/device_decode.json")
    args = parser.parse_args()
    record = measure(torch.device(args.device), [int(b) for b in args.batches.split(",")], args.repeats)
    print_table(record)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
