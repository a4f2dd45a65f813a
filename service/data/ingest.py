"""The ingest job: raw ImageNet layout -> Parquet shards + meta.json + report.

Plan (a Ray Data job; every stage runs in parallel Ray tasks):

1. List the raw layout on the driver (`readers.list_layout`); archives of the
   `ilsvrc-tars` layout are indexed in Ray tasks, one per inner class tar,
   each one sequential streaming pass.
2. Inputs that cannot be labelled are quarantined right away. The rest are
   shuffled per split with `seed` and cut into units of `shard_size` images,
   so every shard holds a random mix of classes (a per-class shard would
   make the training-time block/file shuffle useless).
3. One Ray task per unit (`map_batches`, batch_size=1) fetches the bytes
   (whole files or tar-member byte ranges), fixes each image to upright RGB
   with shorter side `resize_size` (`formats.normalize_image`), writes ONE
   Parquet shard straight to a fresh staging prefix, and returns only small
   per-image rows: status, quarantine reason, pixel sums. Images never pass
   through the object store, so nothing spills however large the dataset.
4. The driver sums the pixel statistics (mean/std/PCA), swaps the staging
   prefix into `<dest>/shards`, then writes `ingest_report.json` and, last,
   `meta.json`, whose presence marks a complete dataset.

Idempotent: shards of a run go to `<dest>/_staging/<run id>/` and replace
`<dest>/shards` only when every task succeeded; a re-run whose report says
complete for the same source listing and settings is skipped (`force=True`
re-ingests). Stale staging prefixes of interrupted runs are deleted first.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from service.config import ConfigError
from service.data import formats, readers, storage
from service.data.checks import check_ingest_dest, check_ingest_source
from service.data.meta import META_FILE, REPORT_FILE, SHARDS_DIR, DatasetMeta, save_meta
from service.data.options import LAYOUTS, S3Keys
from service.progress import ProgressPrinter

STAGING_DIR = "_staging"


@dataclass
class IngestConfig(S3Keys):
    """What to ingest and how (the schema of `python -m service.ingest`, conf/ingest.yaml);
    the s3_* keys come from `S3Keys`."""

    # -- Raw dataset root: local path, file:// or s3:// (required).
    source: str = ""
    # -- Dataset root to write (shards/, meta.json, ingest_report.json); new,
    #    empty, or holding an earlier ingest (required).
    dest: str = ""
    # -- "auto" or one of service.data.options.LAYOUTS.
    layout: str = "auto"
    # -- Shorter side of stored images (paper: 256).
    resize_size: int = 256
    # -- JPEG quality of the re-encoded images (1-100).
    quality: int = 90
    # -- Images per Parquet shard (~25 MB at 256 px with the default).
    shard_size: int = 1000
    # -- Seed of the assignment of images to shards.
    seed: int = 0
    # -- Re-ingest even when dest holds a complete ingest of the same input.
    force: bool = False
    # -- CPUs per ingest task.
    num_cpus_per_task: float = 1.0

    @property
    def s3(self) -> storage.S3Settings:
        """The S3 settings of source and dest."""
        return storage.S3Settings.from_fields(self)

    def validate(self) -> None:
        """`ConfigError` (a ValueError) naming the first bad key and what is accepted."""
        if not self.source or not self.dest:
            raise ConfigError("source= and dest= are required: python -m service.ingest source=<raw> dest=<root>")
        if self.layout not in ("auto",) + LAYOUTS:
            raise ConfigError(f"layout={self.layout!r} is not allowed; choose one of {['auto', *LAYOUTS]}")
        for key, value, low, high in (("resize_size", self.resize_size, 8, None), ("shard_size", self.shard_size, 1, None),
                                      ("quality", self.quality, 1, 100), ("s3_max_attempts", self.s3_max_attempts, 1, None)):
            if value < low or (high is not None and value > high):
                raise ConfigError(f"{key}={value} must be >= {low}" + (f" and <= {high}" if high else ""))
        if self.num_cpus_per_task <= 0:
            raise ConfigError(f"num_cpus_per_task={self.num_cpus_per_task} must be > 0")


def _fingerprint(cfg: IngestConfig, listing: readers.Listing) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.source, listing.layout, cfg.resize_size, cfg.quality, cfg.shard_size, cfg.seed]).encode())
    for item in listing.items:
        h.update(f"{item.key}\0{item.size}\0{item.reason}\n".encode())
    for tar_range in listing.tar_ranges:
        h.update(f"{tar_range.path}\0{tar_range.offset}\0{tar_range.size}\n".encode())
    return h.hexdigest()


def _index_tars(listing: readers.Listing, s3: storage.S3Settings, num_cpus: float) -> None:
    """Expand every TarRange into labelled Items (Ray tasks, one per archive)."""
    if not listing.tar_ranges:
        return
    import ray.data

    ranges = listing.tar_ranges

    def index(batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for i in batch["index"]:
            members = readers.index_tar_range(ranges[int(i)], s3)
            rows.append(json.dumps([asdict(m) for m in members]))
        return {"index": batch["index"], "members": rows}

    ds = ray.data.from_items([{"index": i} for i in range(len(ranges))], override_num_blocks=len(ranges))
    results = ds.map_batches(index, batch_size=1, num_cpus=num_cpus).take_all()
    for row in sorted(results, key=lambda r: int(r["index"])):
        tar_range = ranges[int(row["index"])]
        members = [readers.TarMember(**m) for m in json.loads(row["members"])]
        listing.items.extend(readers.items_from_members(listing, tar_range, members))
    listing.tar_ranges = []


def _process_unit(unit: dict, labels: dict[str, int], cfg: IngestConfig, s3: storage.S3Settings,
                  staging: str) -> list[dict]:
    """Fetch, fix and write one shard; per-image outcome rows (runs in a Ray task)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    handles: dict[str, Any] = {}
    rows, shard_rows = [], {name: [] for name in formats.SHARD_SCHEMA.names}
    try:
        for item in unit["items"]:
            outcome = {"key": item["key"], "split": unit["split"], "source": item["source"], "wnid": item["wnid"],
                       "status": "ok", "reason": "", "detail": "", "conversions": "", "shard": unit["shard"],
                       "pixel_sum": [0.0] * 3, "pixel_outer": [0.0] * 9, "pixel_count": 0}
            try:
                if item["path"] not in handles:
                    fs, path = storage.arrow_filesystem(item["path"], s3)
                    handles[item["path"]] = fs.open_input_file(path)
                handle = handles[item["path"]]
                offset, size = (0, handle.size()) if item["offset"] < 0 else (item["offset"], item["size"])
                data = storage.with_retries(lambda: handle.read_at(size, offset), s3.max_attempts)
            except Exception as err:  # noqa: BLE001 - a failed read is a quarantine reason, not a crash
                outcome.update(status="quarantined", reason=formats.READ_ERROR, detail=f"{type(err).__name__}: {err}"[:200])
                rows.append(outcome)
                continue
            image = formats.normalize_image(data, cfg.resize_size, cfg.quality)
            if not image.ok:
                outcome.update(status="quarantined", reason=image.reason, detail=image.detail)
                rows.append(outcome)
                continue
            outcome["conversions"] = ",".join(image.conversions)
            if unit["split"] == "train":
                outcome.update(pixel_sum=image.pixel_sum.tolist(), pixel_outer=image.pixel_outer.tolist(),
                               pixel_count=image.pixel_count)
            rows.append(outcome)
            for name, value in (("key", item["key"]), ("jpeg", image.jpeg), ("label", labels[item["wnid"]]),
                                ("wnid", item["wnid"]), ("height", image.height), ("width", image.width),
                                ("source", item["source"])):
                shard_rows[name].append(value)
    finally:
        for handle in handles.values():
            handle.close()
    if shard_rows["key"]:
        table = pa.Table.from_pydict(shard_rows, schema=formats.SHARD_SCHEMA)
        fs, path = storage.arrow_filesystem(storage.join(staging, unit["shard"]), s3)
        storage.make_parent_dirs(fs, path)
        pq.write_table(table, path, filesystem=fs, compression="none", row_group_size=max(len(table), 1))
    else:
        for row in rows:
            row["shard"] = ""
    return rows


def _make_units(items: list[readers.Item], cfg: IngestConfig) -> list[dict]:
    units = []
    for split_index, split in enumerate(("train", "val")):
        todo = [i for i in items if i.split == split and not i.reason]
        order = np.random.default_rng([cfg.seed, split_index]).permutation(len(todo))
        todo = [todo[i] for i in order]
        for n, start in enumerate(range(0, len(todo), cfg.shard_size)):
            chunk = todo[start:start + cfg.shard_size]
            units.append({
                "split": split,
                "shard": f"{split}/part-{n:05d}.parquet",
                "items": [{"key": i.key, "path": i.path, "offset": i.offset, "size": i.size,
                           "wnid": i.wnid, "source": i.source} for i in chunk],
            })
    return units


def _build_report(cfg, listing, outcomes, started, run_id, fingerprint) -> dict:
    quarantine = [{"key": i.key, "split": i.split, "source": i.source, "reason": i.reason, "detail": i.detail}
                  for i in listing.items if i.reason]
    converted = []
    by_split = {s: Counter() for s in ("train", "val")}
    for i in listing.items:
        by_split[i.split]["input"] += 1
        if i.reason:
            by_split[i.split]["quarantined"] += 1
    for row in outcomes:
        if row["status"] == "ok":
            by_split[row["split"]]["written"] += 1
            if row["conversions"]:
                converted.append({"key": row["key"], "split": row["split"], "source": row["source"],
                                  "conversions": row["conversions"].split(",")})
        else:
            by_split[row["split"]]["quarantined"] += 1
            quarantine.append({k: row[k] for k in ("key", "split", "source", "reason", "detail")})
    quarantine.sort(key=lambda q: (q["split"], q["key"]))
    converted.sort(key=lambda c: (c["split"], c["key"]))
    counts = {
        "input": len(listing.items),
        "written": sum(c["written"] for c in by_split.values()),
        "quarantined": len(quarantine),
        "converted": len(converted),
        "by_split": {s: {k: c[k] for k in ("input", "written", "quarantined")} for s, c in by_split.items()},
        "quarantined_by_reason": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "converted_by_kind": dict(sorted(Counter(k for c in converted for k in c["conversions"]).items())),
    }
    # Invariant the report promises: every input is either written or quarantined.
    assert counts["input"] == counts["written"] + counts["quarantined"], counts
    return {
        "status": "complete",
        "run_id": run_id,
        "source": cfg.source,
        "dest": cfg.dest,
        "layout": listing.layout,
        "settings": {"resize_size": cfg.resize_size, "quality": cfg.quality, "shard_size": cfg.shard_size,
                     "seed": cfg.seed},
        "fingerprint": fingerprint,
        "started": started,
        "seconds": round(time.time() - started, 2),
        "counts": counts,
        "quarantine": quarantine,
        "converted": converted,
    }


def existing_complete_report(cfg: IngestConfig, fingerprint: Optional[str] = None) -> Optional[dict]:
    """The report at dest when it says complete (and matches `fingerprint` if given)."""
    s3 = cfg.s3.resolved()
    report_uri, meta_uri = storage.join(cfg.dest, REPORT_FILE), storage.join(cfg.dest, META_FILE)
    if not (storage.exists(report_uri, s3) and storage.exists(meta_uri, s3)):
        return None
    report = storage.read_json(report_uri, s3)
    if report.get("status") != "complete":
        return None
    if fingerprint is not None and report.get("fingerprint") != fingerprint:
        return None
    return report


def run_ingest(cfg: IngestConfig, log=print) -> dict:
    """Ingest `cfg.source` into `cfg.dest`; returns the report (skips if already complete).

    Bad settings, paths, buckets, endpoints or credentials raise ValueError
    (`DataInputError` for the paths) before Ray starts.
    """
    cfg.validate()
    # Resolved here, so Ray tasks need no AWS environment of their own.
    s3 = cfg.s3.resolved()
    check_ingest_source(cfg.source, s3)
    check_ingest_dest(cfg.dest, cfg.source, s3)
    import ray  # after the checks: a bad path fails in a second, not after Ray's import
    import ray.data
    started = time.time()
    listing = readers.list_layout(cfg.source, cfg.layout, s3)
    log(f"ingest: {cfg.source} is layout {listing.layout!r}, {len(listing.wnids)} classes, "
        f"{len(listing.items)} files and {len(listing.tar_ranges)} archives listed")
    fingerprint = _fingerprint(cfg, listing)
    if not cfg.force:
        report = existing_complete_report(cfg, fingerprint)
        if report is not None:
            log(f"ingest: {cfg.dest} already holds a complete ingest of this source; skipping (force=true re-ingests)")
            return report
    if not ray.is_initialized():
        # The cluster in RAY_ADDRESS, else a local one; Ray's console chatter stays
        # off as for training (ALEXNET_RAY_VERBOSE=1 brings it back).
        from service.ray_cluster import connect

        connect()
    _index_tars(listing, s3, cfg.num_cpus_per_task)
    labels = {w: i for i, w in enumerate(listing.wnids)}
    units = _make_units(listing.items, cfg)
    log(f"ingest: {len(listing.items)} inputs, {sum(len(u['items']) for u in units)} to decode in {len(units)} shards")

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]
    storage.delete_prefix(storage.join(cfg.dest, STAGING_DIR), s3)
    staging = storage.join(cfg.dest, STAGING_DIR, run_id)
    ingest_cfg = cfg

    def process(batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for text in batch["unit"]:
            rows.extend(_process_unit(json.loads(text), labels, ingest_cfg, s3, staging))
        return {"outcome": [json.dumps(r) for r in rows]}

    outcomes: list[dict] = []
    if units:
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
        ds = ds.map_batches(process, batch_size=1, num_cpus=cfg.num_cpus_per_task)
        # A line every 10 s: a full ImageNet ingest runs for hours, shard by shard.
        progress = ProgressPrinter(sum(len(u["items"]) for u in units), lambda line: log(f"ingest: {line}"),
                                   unit="inputs", every_s=10.0)
        decoding = time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            outcomes.extend(json.loads(text) for text in batch["outcome"])
            progress(len(outcomes), time.time() - decoding)

    stats = formats.PixelStats()
    shard_rows: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    for row in outcomes:
        if row["status"] == "ok":
            shard_rows[row["split"]][row["shard"]] += 1
            if row["split"] == "train":
                stats.add(row["pixel_sum"], row["pixel_outer"], row["pixel_count"])
    report = _build_report(cfg, listing, outcomes, started, run_id, fingerprint)

    # Swap: old meta/report first (so a crash mid-swap never leaves a meta.json
    # pointing at missing shards), then the shards, then report and meta.
    for name in (META_FILE, REPORT_FILE):
        storage.delete_file(storage.join(cfg.dest, name), s3)
    storage.delete_prefix(storage.join(cfg.dest, SHARDS_DIR), s3)
    if any(shard_rows[s] for s in shard_rows):
        storage.move_prefix(staging, storage.join(cfg.dest, SHARDS_DIR), s3)
    storage.delete_prefix(storage.join(cfg.dest, STAGING_DIR), s3)
    storage.write_json(storage.join(cfg.dest, REPORT_FILE), report, s3)

    summary = stats.summary()
    shards = {s: sorted(shard_rows[s]) for s in shard_rows}
    meta = DatasetMeta(
        num_classes=len(listing.wnids),
        wnids=listing.wnids,
        names=listing.names,
        mean=summary["mean"],
        std=summary["std"],
        eigval=summary["eigval"],
        eigvec=summary["eigvec"],
        num_train=report["counts"]["by_split"]["train"]["written"],
        num_val=report["counts"]["by_split"]["val"]["written"],
        resize_size=cfg.resize_size,
        shards={s: [f"{SHARDS_DIR}/{name}" for name in shards[s]] for s in shards},
        shard_rows={s: [shard_rows[s][name] for name in shards[s]] for s in shards},
        layout=listing.layout,
        source=cfg.source,
        ingest_report=REPORT_FILE,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    save_meta(cfg.dest, meta, s3)
    counts = report["counts"]
    log(f"ingest: done in {report['seconds']:.1f} s: {counts['input']} inputs = {counts['written']} written "
        f"+ {counts['quarantined']} quarantined ({counts['quarantined_by_reason']}); "
        f"{counts['converted']} converted ({counts['converted_by_kind']}); report {storage.join(cfg.dest, REPORT_FILE)}")
    return report
