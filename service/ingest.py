"""`python -m service.ingest source=<raw> dest=<root> [key=value ...]`: raw ImageNet -> shards.

A Ray Data job (see `service/data/ingest.py`): reads ImageFolder, official
ILSVRC2012 tars or Kaggle CLS-LOC from a local folder or s3://, writes
Parquet shards, `meta.json` and `ingest_report.json` under `dest`. Uses
RAY_ADDRESS when set, else starts a local Ray. Keys are Hydra overrides on
`conf/ingest.yaml` (schema `IngestConfig`); `--help` lists them. A bad value,
path, bucket, endpoint or credential exits with status 2 and one line on
stderr, before Ray starts.
"""

from __future__ import annotations

import sys

from service import hydra_app
from service.data.ingest import IngestConfig


def main(cfg: IngestConfig) -> int:
    """Run the ingest; 0 when complete, 2 for a bad input (message printed)."""
    from service.data.checks import DataInputError
    from service.data.ingest import run_ingest

    try:
        report = run_ingest(cfg)
    except DataInputError as err:
        print(f"service.ingest: {err}", file=sys.stderr)
        return 2
    return 0 if report["status"] == "complete" else 1


if __name__ == "__main__":
    hydra_app.run("ingest", IngestConfig, IngestConfig.validate, main)
