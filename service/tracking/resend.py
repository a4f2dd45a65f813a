"""`python -m service.tracking.resend <tracking uri> <spill file>...`: log metric
points a training job could not send (see `worker_tracker.file_spill`).

Safe to repeat: a point the store already holds is not added twice.
"""

from __future__ import annotations

import argparse

from service.tracking.worker_tracker import resend_spilled


def main(argv: list[str] | None = None) -> None:
    """Send each spill file's points to their runs and say how many."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tracking_uri", help="e.g. http://mlflow:5000 or sqlite:///mlruns.db")
    parser.add_argument("files", nargs="+", help="unsent_metrics-<run id>-<time>.jsonl files")
    args = parser.parse_args(argv)
    for path in args.files:
        with open(path, "rb") as spill:
            print(f"{path}: {resend_spilled(args.tracking_uri, spill.read())} points sent")


if __name__ == "__main__":
    main()
