"""CPU-seconds by process class over a local Ray cluster started by this process (bench/input_pipeline.py).

psutil's per-process user + system times: robust to the other load on a
shared machine, unlike wall-clock rates. Classes: this process ("consumer"),
Ray worker processes ("read tasks": their command line is `ray::...` or
default_worker.py), every other descendant ("ray system": raylet, GCS,
dashboard and its agents, log monitor).
"""

from __future__ import annotations

import time

class ProcessTree:
    """CPU-seconds of this process and its descendants, by class (see the module docstring)."""

    def __init__(self):
        import psutil  # a Ray dependency; imported here so the module imports without it

        self._psutil = psutil
        self.me = psutil.Process()
        self._kinds: dict[int, str] = {}

    def _kind(self, proc) -> str:
        if proc.pid not in self._kinds:
            cmdline = " ".join(proc.cmdline())
            worker = cmdline.startswith("ray::") or "default_worker.py" in cmdline
            self._kinds[proc.pid] = "read tasks" if worker else "ray system"
        return self._kinds[proc.pid]

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """{pid: (class, user + system seconds)} of the cluster's processes (this one: "consumer")."""
        times = self.me.cpu_times()
        out = {self.me.pid: ("consumer", times.user + times.system)}
        for proc in self.me.children(recursive=True):
            try:
                times = proc.cpu_times()
                out[proc.pid] = (self._kind(proc), times.user + times.system)
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        return out

    def thread_times(self) -> dict[int, float]:
        """{thread id: user + system seconds} of this process's threads."""
        return {t.id: t.user_time + t.system_time for t in self.me.threads()}


def cpu_delta(before: dict, after: dict) -> tuple[dict[str, float], int]:
    """CPU-seconds per class between two snapshots (a process new in `after` counts from 0),
    and how many processes of `before` ended in between (their last CPU is lost)."""
    out: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        out[kind] = out.get(kind, 0.0) + seconds - (before[pid][1] if pid in before else 0.0)
    return out, sum(1 for pid in before if pid not in after)


class TimedDecoder:
    """Wraps the ShareLoader's nvImageCodec decoder: the calling thread's CPU time in `decode`."""

    def __init__(self, decoder):
        self.decoder, self.seconds = decoder, 0.0

    def decode(self, *args, **kwargs):
        start = time.thread_time()
        try:
            return self.decoder.decode(*args, **kwargs)
        finally:
            self.seconds += time.thread_time() - start
