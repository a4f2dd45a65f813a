"""What every benchmark record carries: the git revision and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_revision() -> dict:
    """Commit and dirty flag of the checkout that ran the benchmark."""
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {"commit": run("git", "rev-parse", "HEAD") or "none", "dirty": bool(run("git", "status", "--porcelain"))}


def machine() -> dict:
    """CPUs, platform, Python and the load average at the time of the call (these VMs are shared)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0]}
