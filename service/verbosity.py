"""The one switch that brings the libraries' own console chatter back (Ray's INFO
logging, MLflow's registration lines, nvImageCodec's loader errors):
ALEXNET_RAY_VERBOSE=1, documented in the README. A leaf module, so the data,
tracking and cluster code can all read it without importing each other."""

from __future__ import annotations

import os

VERBOSE_ENV = "ALEXNET_RAY_VERBOSE"


def verbose() -> bool:
    """Whether the libraries' own console output is wanted."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")
