"""Small helpers every test file shares, each written once: polling with a
deadline, a free port, reading a running command's output up to a line,
`python -m service.train` command lines, secret scans and pyproject.toml."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Optional

from service.parallel.local import free_port  # the one free-port helper (tests and production share it)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

__all__ = ["IN_CI", "NO_AWS_CREDENTIALS", "REPO", "STEP_KEYS", "VENV_BIN", "assert_complete_history", "assert_no_secret", "closed_port", "free_port", "http_ok",
           "lines_until", "pyproject", "ray_env", "run_until", "skip_or_fail_in_ci", "the_run", "TINY_DATA_READ", "train_command", "train_worker_pids",
           "wait_until", "without_aws_credentials"]

# No AWS credentials anywhere: no shared files, no instance metadata probe (the
# AWS_* keys themselves are removed by `without_aws_credentials`).
NO_AWS_CREDENTIALS = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                      "AWS_CONFIG_FILE": "/nonexistent/config"}


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str,
               process: Optional[subprocess.Popen] = None, interval_s: float = 0.2) -> None:
    """Poll `ready()` until it is true; fail after `timeout_s`, or at once when
    `process` (the thing being waited for) has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready")
        if ready():
            return
        time.sleep(interval_s)  # polling interval, not a wait for an event
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (a free port, left unbound)."""
    return free_port()


def http_ok(url: str, token: str = "") -> bool:
    """Whether GET `url` answers 200 (with a bearer token when given)."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


def lines_until(process: subprocess.Popen, pattern: str, seen: Optional[list] = None) -> list[str]:
    """Read a running command's merged output until a line matches `pattern`;
    the lines read (also appended to `seen`). Fails if the command ends first."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if seen is not None:
            seen.append(line)
        if re.search(pattern, line):
            return lines
    process.wait()
    raise AssertionError(f"the command ended (rc {process.returncode}) before printing {pattern!r}:\n"
                         + "".join(lines[-40:]))


def run_until(command: list[str], env: dict, pattern: str, cwd: Path = REPO) -> tuple[subprocess.Popen, list[str]]:
    """Start `command`; return it, still running, once a line matching `pattern` was printed."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    try:
        return process, lines_until(process, pattern)
    except BaseException:
        process.kill()
        process.wait()
        raise


# One read task per tower's lane (the job gives each lane at least one): ~80 tiny
# images a lane need no more, and every further task is a cold Ray worker process
# (~1-2 s each on 2 cores, measured: a smoke run 23.4 s with the automatic 4,
# 18.1-18.8 s with one a lane). With 2 (the value before), a one-tower job had two.
TINY_DATA_READ = ("data.decode_concurrency=1",)

# What the training loop reports to MLflow at each logged step.
STEP_KEYS = ("loss", "lr", "images_per_s", "data_wait_s", "epoch")


def train_overrides(data_root: str, storage: str | Path, *overrides: str, tracking_uri: str = "",
                    experiment: str = "tests", name: str = "run") -> list[str]:
    """The overrides of a smoke training on `data_root`: checkpoints under `storage`
    (a folder or s3://), MLflow at `tracking_uri` with model `<experiment>-model`
    (tracking off when empty), run `name`. Later overrides win over earlier ones."""
    tracking = (
        [f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
         f"tracking.registered_model={experiment}-model"]
        if tracking_uri else ["tracking.enabled=false"]
    )
    return ["experiment=smoke", f"data.root={data_root}", *tracking, f"storage.path={storage}", f"run.name={name}",
            *TINY_DATA_READ, *overrides]


def train_command(data_root: str, storage: str | Path, hydra_dir: Path, *overrides: str,
                  tracking_uri: str = "", experiment: str = "tests", name: str = "run") -> list[str]:
    """`python -m service.train` with `train_overrides`, Hydra's output in `hydra_dir`."""
    return [sys.executable, "-m", "service.train",
            *train_overrides(data_root, storage, f"hydra.run.dir={hydra_dir}", *overrides, tracking_uri=tracking_uri,
                             experiment=experiment, name=name)]


def without_aws_credentials() -> dict:
    """This process's environment with no AWS_* variable and `NO_AWS_CREDENTIALS`:
    a command started with it finds no S3 credentials but the ones it is given."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **NO_AWS_CREDENTIALS}


def ray_env(ray_head, **extra: str) -> dict:
    """The environment of a command that joins the session's Ray cluster."""
    return {**os.environ, **ray_head.env, "RAY_ADDRESS": ray_head.address, **extra}


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers on the session's cluster (this process is its driver)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [actor.pid for actor in actors if "RayTrainWorker" in actor.class_name]


def the_run(client, experiment: str, name: str):
    """The one MLflow run of `experiment` named `name` (run.name)."""
    from service.tracking.mlflow_tracker import RUN_NAME_TAG

    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name} in {experiment}, found {len(runs)}"
    return runs[0]


def assert_complete_history(client, run_id: str, keys: Iterable[str], total_steps: int, every: int,
                            val_steps: Optional[list[int]] = None) -> None:
    """Each of `keys` logged at every `every`-th step up to `total_steps`, each
    step exactly once; `val_top1_error` exactly at `val_steps` (when given),
    and the run's best_* metrics those of its lowest validation error."""
    expected = list(range(every, total_steps + 1, every))
    for key in keys:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == expected, f"{key}: {steps}"
    if val_steps is None:
        return
    history = client.get_metric_history(run_id, "val_top1_error")
    assert sorted(m.step for m in history) == val_steps
    best = client.get_run(run_id).data.metrics
    assert best["best_val_top1_error"] == min(m.value for m in history)
    assert 1 <= best["best_epoch"] <= len(val_steps)


def assert_no_secret(secret: str, texts: Iterable[str] = (), folders: Iterable[Path] = ()) -> None:
    """`secret` appears in none of `texts` and in no file under `folders`."""
    for text in texts:
        assert secret not in text, f"a secret in {text[:200]!r}"
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"a secret in {path}"


def pyproject() -> dict:
    """pyproject.toml, parsed."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared_requirements() -> list:
    """Every requirement pyproject.toml declares (dependencies and all optional extras),
    as `packaging` Requirements."""
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    texts = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    return [Requirement(text) for text in texts]


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip on a developer machine that lacks something; fail under CI=true,
    where .ci/run guarantees it exists (a skip there would hide a broken setup)."""
    import pytest

    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)
