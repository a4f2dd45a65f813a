"""One progress line at most every few seconds, for commands that run long (evaluation, ingest)."""

from __future__ import annotations

from typing import Callable


class ProgressPrinter:
    """Says `done/total <unit> (pct), rate, ETA` at most every `every_s` seconds, and at the end."""

    def __init__(self, total: int, say: Callable[[str], None], unit: str = "images", every_s: float = 5.0):
        self.total, self.say, self.unit, self.every_s = total, say, unit, every_s
        self.last, self.shown = -1e9, -1

    def __call__(self, done: int, elapsed_s: float, final: bool = False) -> None:
        due = elapsed_s - self.last >= self.every_s or done >= self.total or final
        if not due or done == self.shown:
            return
        self.last, self.shown = elapsed_s, done
        rate = done / max(elapsed_s, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.say(f"{done}/{self.total} {self.unit} ({100 * done / max(1, self.total):.0f}%), {rate:.0f} {self.unit}/s, "
                 f"ETA {eta:.0f} s")
