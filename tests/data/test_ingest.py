"""The ingest job on a local Ray: every layout, every bad-input kind, idempotency."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from service.data import storage
from service.data.ingest import IngestConfig, run_ingest
from service.data.meta import REPORT_FILE, load_meta
from tests.helpers import REPO, ray_env

pytestmark = pytest.mark.integration


def _shard_rows(root: str, split: str) -> list[dict]:
    meta = load_meta(root)
    rows = []
    for rel in meta.shards[split]:
        rows += pq.read_table(os.path.join(root, rel)).to_pylist()
    return rows


def _ingest_command_line(ray_session, raw: str, dest: str) -> dict:
    """`python -m service.ingest` as a user runs it, joining the session's cluster: its
    console is the service's own lines (progress included), no Ray or MLflow chatter."""
    command = [sys.executable, "-m", "service.ingest", f"source={raw}", f"dest={dest}", "resize_size=40",
               "shard_size=7"]
    result = subprocess.run(command, cwd=REPO, env=ray_env(ray_session), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert lines and all(line.startswith("ingest: ") for line in lines), lines
    assert any(re.fullmatch(r"ingest: (\d+)/\1 inputs \(100%\), \d+ inputs/s, ETA 0 s", line) for line in lines), lines
    assert lines[-1].startswith("ingest: done in "), lines
    return json.loads(Path(dest, REPORT_FILE).read_text())


@pytest.mark.parametrize("layout", ["imagefolder", "kaggle", "ilsvrc-tars"])
def test_ingest_every_layout_with_bad_inputs(ray_local, synth_dataset, tmp_path, layout):
    raw, manifest = synth_dataset(layout, bad_inputs=True)
    if layout == "kaggle":  # one layout through the command line
        report = _ingest_command_line(ray_local, raw, str(tmp_path))
    else:
        report = run_ingest(IngestConfig(source=raw, dest=str(tmp_path), resize_size=40, shard_size=7))
    counts = report["counts"]
    # Nothing dropped silently: every input is written or quarantined, with a reason.
    assert counts["input"] == manifest["num_inputs"] == counts["written"] + counts["quarantined"]
    assert counts["written"] == manifest["expected"]["written"]
    assert counts["quarantined_by_reason"] == manifest["expected"]["quarantined_by_reason"]
    assert counts["converted_by_kind"] == manifest["expected"]["converted_by_kind"]
    assert len(report["quarantine"]) == counts["quarantined"] and all(q["reason"] for q in report["quarantine"])
    assert counts["by_split"]["train"]["input"] == manifest["num_train_inputs"]

    meta = load_meta(str(tmp_path))
    assert meta.wnids == manifest["wnids"] and meta.names == manifest["names"] and meta.layout == layout
    train, val = _shard_rows(str(tmp_path), "train"), _shard_rows(str(tmp_path), "val")
    assert (len(train), len(val)) == (meta.num_train, meta.num_val)
    assert meta.num_train + meta.num_val == counts["written"]
    assert len({r["key"] for r in train + val}) == counts["written"], "no image written twice"
    for row in train + val:
        assert meta.wnids[row["label"]] == row["wnid"]
        img = Image.open(io.BytesIO(row["jpeg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 40
        assert img.size == (row["width"], row["height"])
    # The EXIF-rotated input (stored portrait-rotated) is upright: landscape like its siblings.
    rotated = [r for r in train if r["key"].endswith("_90004.JPEG")]
    reference = [r for r in train if r["key"].endswith("_90005.JPEG")]
    assert (rotated[0]["width"], rotated[0]["height"]) == (reference[0]["width"], reference[0]["height"])
    # Shards mix classes (ingest scatters images randomly over shards).
    first = pq.read_table(os.path.join(str(tmp_path), meta.shards["train"][0])).column("label").to_pylist()
    assert len(set(first)) > 1
    # Pixel statistics in 0-255 units, PCA in [0, 1] units.
    assert all(20 < m < 235 for m in meta.mean) and all(10 < s < 128 for s in meta.std)
    assert meta.eigval[0] >= meta.eigval[1] >= meta.eigval[2] > 0 and meta.eigval[0] < 0.25


def test_reingest_is_idempotent(ray_local, synth_dataset, tmp_path):
    raw, _manifest = synth_dataset("imagefolder")
    cfg = IngestConfig(source=raw, dest=str(tmp_path), resize_size=40, shard_size=5)
    first = run_ingest(cfg)
    files = sorted(e.rel for e in storage.list_files(str(tmp_path)))
    again = run_ingest(cfg)
    assert again["run_id"] == first["run_id"], "a complete ingest of the same input is skipped"
    assert sorted(e.rel for e in storage.list_files(str(tmp_path))) == files
    cfg.force = True
    forced = run_ingest(cfg)
    assert forced["run_id"] != first["run_id"]
    assert sorted(e.rel for e in storage.list_files(str(tmp_path))) == files, "no duplicated shards"
    assert len(_shard_rows(str(tmp_path), "train")) == first["counts"]["by_split"]["train"]["written"]
    # A leftover staging prefix of an interrupted run is removed by the next run.
    os.makedirs(tmp_path / "_staging" / "dead-run" / "train")
    (tmp_path / "_staging" / "dead-run" / "train" / "part-00000.parquet").write_bytes(b"partial")
    run_ingest(cfg)
    assert not (tmp_path / "_staging").exists()
    assert sorted(e.rel for e in storage.list_files(str(tmp_path))) == files
