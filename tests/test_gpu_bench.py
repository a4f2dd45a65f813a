"""bench/gpu_bench.py: its CPU dry run, with what the GPU machines lack made unimportable."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from bench.gpu_bench import DRY_SHAPE, device_peaks, plan_rows
from bench.one_rank_check import CHECKS
from bench.step_rate import MODELS, TOWER_MODELS, row_flops_per_image
from tests.helpers import REPO

# Not on the GPU machines (Python 3.12, torch, numpy, Pillow, pyarrow, torchvision only).
ABSENT = ("ray", "mlflow", "hydra", "omegaconf", "yaml", "boto3", "botocore", "psutil", "scipy", "simplejpeg",
          "nvidia")

_RUN_WITHOUT = """
import runpy, sys
absent = set(sys.argv[1].split(","))

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in absent:
            raise ImportError(f"{name} is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("name,bf16", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
])
def test_peak_is_looked_up_by_device_name(name, bf16):
    peaks, source = device_peaks(name)
    assert peaks["bf16"] == bf16
    assert "datasheet" in source


def test_unknown_device_has_no_peak_and_says_how_to_give_one():
    peaks, source = device_peaks("cpu (x86_64)")
    assert peaks is None and "--peak-bf16-tflops" in source


def test_compile_rows_come_after_every_eager_row():
    plans = plan_rows([128, 256, 512], [256], True, 256)
    modes = [plan.mode for plan in plans]
    assert modes.index("bf16+cl+compile") == len(plans) - len(MODELS)
    assert len(plans) == len(MODELS) * 3 * 2 + len(TOWER_MODELS) + len(MODELS)


def test_dry_run_needs_only_torch_numpy_pillow(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT, ",".join(ABSENT), str(REPO / "bench" / "gpu_bench.py"),
         "--dry-run", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_bench_dry_run.json").read_text())
    assert record["dry_run"] and record["complete"]
    steps = {(row["model"], row["mode"]): row for row in record["steps"]}
    timed = record["config"]["steps"]
    for model in MODELS:
        for mode in ("fp32", "bf16+cl"):
            row = steps[(model, mode)]
            assert "error" not in row, row.get("traceback")
            _consistent_step_row(row, timed)
    for model in TOWER_MODELS:
        _consistent_step_row(steps[(model, "bf16+cl")], timed)
    decode = record["decode"]["result"]
    # service.data's transform code imported without Ray: the measured code is the service's.
    assert decode["transform_code"] == "service.data.transforms"
    _consistent_decode(decode)
    for row in record["copy"]["result"]:  # rates follow from the timed ms (the dry run copies batches of 8)
        assert row["batches_per_s"] == pytest.approx(1000 / row["ms_per_batch"], rel=1e-6)
        assert row["gb_per_s"] == pytest.approx(8 * 224 * 224 * 3 / (row["ms_per_batch"] / 1000) / 1e9, rel=1e-6)
    # Device decode: nvImageCodec is absent, as on the GPU machine: a row that says so, not a crash.
    device_decode = record["device_decode"]["result"]["rows"]
    assert any(row["library"] == "nvImageCodec" and "nvidia is not installed" in row.get("skipped", "")
               for row in device_decode), device_decode
    # The one-rank collective check on gloo: every named check ran and passed.
    check = record["one_rank"]["result"]
    assert check["backend"] == "gloo" and check["passed"], check
    assert [row["name"] for row in check["checks"]] == [name for name, _ in CHECKS]


def _consistent_step_row(row: dict, timed: int) -> None:
    """A step row's times fit together and its rates follow from its timed step and the model's FLOPs."""
    # On the CPU the span rate is batch / mean step: the timed steps took this long in all,
    # within the row's wall time (which adds the build and the warm-up).
    timed_s = timed * row["batch"] / row["images_per_s_span"]
    assert 0 < row["step_ms_min"] <= row["step_ms"] <= 1000 * timed_s <= 1000 * row["wall_s"], row
    if timed == 2:  # the dry run's two steps: their median is their mean
        assert row["step_ms"] == pytest.approx(1000 * timed_s / timed, rel=1e-6)
    assert row["images_per_s"] == pytest.approx(row["batch"] / (row["step_ms"] / 1000), rel=1e-6)
    assert row["train_gflop_per_image"] == pytest.approx(row_flops_per_image(row["model"], DRY_SHAPE) / 1e9)
    assert row["achieved_tflops"] == pytest.approx(row["train_gflop_per_image"] * row["images_per_s"] / 1e3)


def _consistent_decode(decode: dict) -> None:
    """The decode rates follow from the runs and processes the record holds."""
    runs = decode["per_core_runs"]
    assert len(runs) == 3 and min(runs) > 0  # three timed single-process runs
    assert decode["per_core_images_per_s"] == statistics.median(runs)
    assert [r["processes"] for r in decode["scaling"]] == [1, 2] and decode["loaded_processes"] == 2
    for row in decode["scaling"]:
        # N processes at once deliver at most N times one process's rate (for 1 and 2 the
        # median is the mean; 1% for the wall clock the span is read on).
        assert 0 < row["images_per_s"] <= row["processes"] * row["images_per_s_per_process"] * 1.01, row
    widest = decode["scaling"][-1]
    assert decode["per_core_loaded_images_per_s"] == pytest.approx(widest["images_per_s"] / widest["processes"],
                                                                   rel=1e-12)
