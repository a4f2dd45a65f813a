"""Real servers for the integration tests: a Ray head and an MLflow server.

Each binds 127.0.0.1 on a free port, is polled (never slept on) until it
answers, and is stopped by the PID we started.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from service.parallel.local import free_port

VENV_BIN = Path(sys.executable).parent


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready")
        if ready():
            return
        time.sleep(0.2)  # polling interval, not a wait for an event
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def quiet_env() -> dict:
    """Telemetry off (no network here) and Ray token auth on with a token of
    our own, so nothing is read from or written to ~/.ray."""
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=env.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
        PYTHONUNBUFFERED="1",
        # As if the venv were activated: `python` in a job's entrypoint is the
        # venv's, like for a user who ran `ray start` from an activated venv.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RayHead:
    address: str
    dashboard_url: str
    temp_dir: str
    env: dict

    def stop(self) -> None:
        # `ray stop` would stop every Ray on the machine (by name); stop only
        # the processes of our session, found by our own temp dir, or (the
        # Ray client server, which names neither) by our GCS port.
        _kill_session(self.temp_dir, int(self.address.rsplit(":", 1)[1]))


def _kill_session(temp_dir: str, gcs_port: int) -> None:
    """Kill the processes of the Ray session rooted at `temp_dir` by PID."""
    import re

    import psutil

    ours = re.compile(rf"--address=\S+:{gcs_port}(\s|$)")
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if temp_dir in cmdline or ours.search(cmdline):
            victims.append(proc)
            try:
                victims.extend(proc.children(recursive=True))  # workers retitle themselves
            except psutil.NoSuchProcess:
                pass
    for proc in victims:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=20)
    for proc in alive:
        proc.kill()


def start_ray_head(temp_dir: str, num_cpus: int = 6) -> RayHead:
    """`ray start --head` on 127.0.0.1 with token auth, its own temp dir."""
    env = quiet_env()
    port, dashboard_port = free_port(), free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head",
        "--node-ip-address", "127.0.0.1",
        "--port", str(port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--num-cpus", str(num_cpus),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{result.stdout}\n{result.stderr}")
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", temp_dir, env)
    wait_until(lambda: _http_ok(f"{head.dashboard_url}/api/version", env), 120, "Ray dashboard")
    return head


def _http_ok(url: str, env: dict | None = None) -> bool:
    request = urllib.request.Request(url)
    if env and env.get("RAY_AUTH_TOKEN"):
        request.add_header("Authorization", f"Bearer {env['RAY_AUTH_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        stop(self.process)


def start_mlflow_server(folder: Path) -> MlflowServer:
    """`mlflow server` with a sqlite backend, serving artifacts itself."""
    port = free_port()
    log = open(folder / "mlflow-server.log", "wb")
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"), "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"),
            "--workers", "1",
        ],
        env=quiet_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _http_ok(f"{url}/health"), 120, "mlflow server", process)
    except Exception:
        stop(process)
        raise RuntimeError((folder / "mlflow-server.log").read_text()[-3000:])
    return MlflowServer(url, process)
