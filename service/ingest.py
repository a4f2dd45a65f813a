"""`python -m service.ingest source=<raw> dest=<root> [layout=auto|...]`: raw ImageNet -> shards.

A Ray Data job (see `service/data/ingest.py`): reads ImageFolder, official
ILSVRC2012 tars or Kaggle CLS-LOC from a local folder or s3://, writes
Parquet shards, `meta.json` and `ingest_report.json` under `dest`. Uses
RAY_ADDRESS when set, else starts a local Ray. Arguments are `key=value`;
`help` lists them.
"""

from __future__ import annotations

import sys

from service.data import readers
from service.data.cli_args import Arg, parse_args, parse_bool
from service.data.ingest import IngestConfig, run_ingest
from service.data.storage import S3Settings

SPEC = {
    "source": Arg(str, None, "raw dataset root (path, file:// or s3://)", required=True),
    "dest": Arg(str, None, "dataset root to write (path, file:// or s3://)", required=True),
    "layout": Arg(str, "auto", "raw layout", choices=("auto",) + readers.LAYOUTS),
    "resize_size": Arg(int, 256, "shorter side of stored images"),
    "quality": Arg(int, 90, "JPEG quality of stored images"),
    "shard_size": Arg(int, 1000, "images per Parquet shard"),
    "seed": Arg(int, 0, "seed of the image-to-shard assignment"),
    "force": Arg(parse_bool, False, "re-ingest even if dest is complete for this source"),
    "num_cpus_per_task": Arg(float, 1.0, "CPUs reserved per ingest task"),
    "s3_endpoint": Arg(str, "", "S3 endpoint override, e.g. http://127.0.0.1:9000 (keys from AWS_* env)"),
    "s3_region": Arg(str, "us-east-1", "S3 region"),
}


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv, SPEC, "service.ingest")
    except ValueError as err:
        print(f"service.ingest: {err}", file=sys.stderr)
        return 2
    s3 = S3Settings(endpoint=args.pop("s3_endpoint"), region=args.pop("s3_region"))
    report = run_ingest(IngestConfig(s3=s3, **args))
    return 0 if report["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
