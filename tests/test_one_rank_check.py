"""bench/one_rank_check.py and the compile-row toolchain check of bench/gpu_bench.py
(the checks themselves run in the gpu_bench dry run, on gloo)."""

from __future__ import annotations

import torch

from bench.gpu_bench import compile_toolchain_problem, run_steps
from bench.one_rank_check import run_checks
from bench.step_rate import RowPlan


def test_each_check_is_timed_and_a_broken_one_does_not_hide_the_others():
    def broken(device):
        raise RuntimeError("NCCL error: unhandled system error")

    rows = run_checks([("fine", lambda device: (True, "ok")), ("wrong", lambda device: (False, "differs")),
                       ("broken", broken)], torch.device("cpu"))
    assert [(row["name"], row["passed"]) for row in rows] == [("fine", True), ("wrong", False), ("broken", False)]
    assert "NCCL error" in rows[2]["error"] and all(row["seconds"] >= 0 for row in rows)


def test_compile_rows_are_skipped_without_a_c_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert compile_toolchain_problem().startswith("skipped: no C compiler")
    rows = []

    class Args:
        dry_run, steps, warmup, shape = True, 1, 0, None

    run_steps([RowPlan("alexnet T=1", 4, "bf16+cl+compile")], torch.device("cpu"), Args, 0.0, lambda _: None, rows.append)
    assert rows == [{"model": "alexnet T=1", "batch": 4, "mode": "bf16+cl+compile",
                     "skipped": compile_toolchain_problem()}]

