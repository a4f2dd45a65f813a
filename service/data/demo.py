"""`generate_demo_dataset`: synthesize + ingest a small dataset for `make demo`."""

from __future__ import annotations

import json
import os
import time

from service.data import storage
from service.data.ingest import IngestConfig, existing_complete_report, run_ingest
from service.data.synthetic import SynthConfig, generate

DEMO_PARAMS = "demo_params.json"


def generate_demo_dataset(
    out_dir: str,
    classes: int = 10,
    images_per_class: int = 260,
    val_per_class: int = 40,
    seed: int = 0,
    image_side: int = 72,
    *,
    size_scale: float = 0.32,
    shard_size: int = 500,
    workers: int = 0,
    log=print,
) -> str:
    """Generate a synthetic ImageFolder under `<out_dir>/raw` and ingest it into `out_dir`.

    `image_side` is the shorter side of the stored images (use it as
    `data.resize_size`; crops of e.g. 64 are cut from it). `size_scale`
    sets the raw JPEG size (0.32: about 160×120). Returns the dataset root
    (`out_dir`, holding meta.json and shards/). Skipped when `out_dir`
    already holds a complete ingest made with the same parameters.
    `workers` rendering processes (0: one per CPU; the output is the same).
    """
    params = {"classes": classes, "images_per_class": images_per_class, "val_per_class": val_per_class,
              "seed": seed, "image_side": image_side, "size_scale": size_scale, "shard_size": shard_size}
    raw = os.path.join(out_dir, "raw")
    params_path = os.path.join(out_dir, DEMO_PARAMS)
    cfg = IngestConfig(source=raw, dest=out_dir, layout="imagefolder", resize_size=image_side,
                       shard_size=shard_size, seed=seed)
    if os.path.isfile(params_path) and existing_complete_report(cfg) is not None:
        with open(params_path) as f:
            if json.load(f) == params:
                log(f"demo data: {out_dir} is complete; reusing it")
                return out_dir
    start = time.time()
    storage.delete_prefix(raw)
    generate(SynthConfig(out=raw, classes=classes, images_per_class=images_per_class, val_per_class=val_per_class,
                         layout="imagefolder", seed=seed, size_scale=size_scale,
                         workers=workers or os.cpu_count() or 1))
    generated = time.time()
    cfg.force = True
    run_ingest(cfg, log=log)
    with open(params_path, "w") as f:
        json.dump(params, f, indent=2)
    log(f"demo data: generated in {generated - start:.1f} s, ingested in {time.time() - generated:.1f} s -> {out_dir}")
    return out_dir
