"""Object storage that throttles and drops connections: nothing lost.

A fault proxy (tests/fixtures/s3_faults.py) in front of the moto S3 server
answers a fraction of requests with 503 SlowDown and resets a fraction of
connections. Through it: ingest finishes with every image, an epoch reads
every shard (each key exactly once), checkpoint-style writes land. The
retries are pyarrow's (AwsStandardS3RetryStrategy(max_attempts)); pyarrow
does not count them, so the proxy's count of injected faults is reported.
"""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from service.config import DataConfig
from service.data import storage
from service.data.epochs import Lane, open_source
from service.data.ingest import IngestConfig, run_ingest
from service.data.pipeline import iter_shares, lane_dataset
from service.data.read import lane_keys

pytest_plugins = ["tests.fixtures.s3_faults"]
pytestmark = pytest.mark.integration

SLOWDOWN, RESET = 0.05, 0.03


def _report(name: str, proxy) -> None:
    counts = proxy.counts
    print(f"[s3 faults] {name}: {counts.requests} requests, {counts.slowdown} answered 503 SlowDown, "
          f"{counts.reset} connections reset, all retried by pyarrow")


def test_ingest_train_and_checkpoint_through_a_faulty_s3(ray_local, s3_server, s3_fault_proxy, synth_dataset,
                                                         tmp_path):
    raw, manifest = synth_dataset("ilsvrc-tars", bad_inputs=True)
    bucket = s3_server.create_bucket()
    storage.copy_tree(raw, f"s3://{bucket}/raw", s3_server.settings())  # set-up, straight to the server
    proxy = s3_fault_proxy(slowdown=SLOWDOWN, reset=RESET, seed=1)
    s3 = proxy.settings(s3_server)
    dest = f"s3://{bucket}/imagenet"

    report = run_ingest(IngestConfig(source=f"s3://{bucket}/raw", dest=dest, resize_size=40, shard_size=6,
                                     **s3.as_fields()))
    counts = report["counts"]
    assert counts["input"] == manifest["num_inputs"] and counts["written"] == manifest["expected"]["written"]
    assert counts["quarantined_by_reason"] == manifest["expected"]["quarantined_by_reason"], \
        "no image lost to a storage fault (read_error would show here)"
    _report("ingest", proxy)
    ingest_faults = proxy.counts.faults

    source = open_source(DataConfig(root=dest, resize_size=40, **s3.as_fields()), 32, 2)
    for replica in range(2):
        lane = Lane(replica, 2)
        dataset = lane_dataset(source, "train", 0, lane, 8, concurrency=2, with_keys=True)
        rows = [k for share in iter_shares(dataset, 8, source.decode) for k in share["key"]]
        assert rows == lane_keys(source, "train", 0, lane, 8), "every planned key, once, in order"
    assert len(rows) == (source.meta.num_train // 2) // 8 * 8
    _report("ingest + epoch", proxy)

    path, fs = storage.checkpoint_filesystem(f"s3://{bucket}/checkpoints", s3)
    for number in range(3):
        folder = tmp_path / f"checkpoint_{number:06d}"
        folder.mkdir()
        for tower in range(2):
            (folder / f"tower_{tower}.pt").write_bytes(bytes([number]) * 50_000)
        (folder / "progress.json").write_text(f'{{"step": {number}}}')
        pafs.copy_files(str(folder), f"{path}/run/{folder.name}", destination_filesystem=fs, use_threads=True)
    written = storage.list_files(f"s3://{bucket}/checkpoints/run", s3)
    assert len(written) == 9 and all(e.size for e in written)
    assert storage.read_bytes(f"s3://{bucket}/checkpoints/run/checkpoint_000002/tower_1.pt", s3) == b"\2" * 50_000
    _report("ingest + epoch + checkpoints", proxy)
    assert ingest_faults > 0 and proxy.counts.slowdown > 0 and proxy.counts.reset > 0, "faults were injected"
