"""Real servers for the integration tests: a Ray head, an MLflow tracking
server (sqlite or PostgreSQL backend), PostgreSQL itself and an MLflow model
server (`mlflow models serve`).

Each binds 127.0.0.1 on a free port, is polled (never slept on) until it
answers, and is stopped by the PID we started (the process group we started,
for servers that fork workers).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tests.helpers import VENV_BIN, free_port, http_ok, wait_until


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
        # Ray Train's controller takes each checkpoint report on its poll (2 s by
        # default) while the workers wait; the tests' short runs checkpoint often.
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
        # No preemption watcher, as on the clusters the service starts itself: nothing on one
        # machine is preempted, and its actor is one more process (~2 CPU-s) per training run.
        # (Written out, not taken from service.ray_cluster.local_cluster_env: importing that
        # imports Ray, which reads RAY_AUTH_MODE once, before this environment is set.)
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        # MLflow's system-metrics sampler (10 s by default) would take no sample in a test's
        # short run; the Ray head passes this on to every worker it starts.
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
        PYTHONUNBUFFERED="1",
        # As if the venv were activated: `python` in a job's entrypoint is the
        # venv's, like for a user who ran `ray start` from an activated venv.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def stop(process: subprocess.Popen, timeout_s: float = 30, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_group(process: subprocess.Popen, timeout_s: float = 30, sig: int = signal.SIGTERM) -> None:
    """Stop a server started with `start_new_session=True` and the workers it
    forked: its own process group (pgid = its PID), nothing else."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    try:  # workers that outlived the parent
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
    # A test cluster: no clean exit to wait for. Most processes are gone within a second of
    # SIGTERM; the ones that are not (a Python worker finishing a task) took the full 5 s this
    # used to wait, twice per run.
    terminate(victims, timeout_s=1)


def terminate(processes: list, timeout_s: float) -> None:
    """SIGTERM each of `processes` (psutil.Process), SIGKILL those still alive after `timeout_s`."""
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


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
        # The job agent's HTTP port is 52365 by default: a second Ray on this machine (another
        # session's) would hold it, and `ray job submit` would find no agent.
        "--dashboard-agent-listen-port", str(free_port()),
        # 10001 by default: the other pytest-xdist worker's cluster (tests/conftest.py) would hold it.
        "--ray-client-server-port", str(free_port()),
        "--num-cpus", str(num_cpus),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{result.stdout}\n{result.stderr}")
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", temp_dir, env)
    wait_until(lambda: http_ok(f"{head.dashboard_url}/api/version", env["RAY_AUTH_TOKEN"]), 120, "Ray dashboard")
    return head


def _launch_http_server(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """Start `command` in a process group of its own, its console to `log_path`; do not wait."""
    return subprocess.Popen(command, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _await_http_server(process: subprocess.Popen, log_path: Path, ready_path: str, port: int, what: str) -> None:
    """Poll http://127.0.0.1:<port><ready_path> until it answers; stop the server and fail with
    its log's end if it exits or does not answer in time."""
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}{ready_path}"), 180, what, process)
    except Exception:
        stop_group(process)
        raise RuntimeError(f"{what} did not start:\n{log_path.read_text()[-3000:]}")


def _start_http_server(command: list[str], env: dict, log_path: Path, ready_path: str, port: int,
                       what: str) -> subprocess.Popen:
    """Start `command` in a process group of its own; poll http://127.0.0.1:<port><ready_path>."""
    process = _launch_http_server(command, env, log_path)
    _await_http_server(process, log_path, ready_path, port, what)
    return process


@dataclass
class MlflowServer:
    """An `mlflow server` on 127.0.0.1 that can be stopped and started again
    at the same address on the same store (an outage, then recovery)."""

    folder: Path
    backend_store_uri: str
    port: int
    workers: int = 1
    process: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> "MlflowServer":
        """Start it (again), serving artifacts itself; returns once /health answers."""
        command = [
            str(VENV_BIN / "mlflow"), "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--workers", str(self.workers),
        ]
        # MLflow's job runner (7 huey consumers for its GenAI jobs, none used by tracking) would
        # double the server's start time and memory here.
        env = {**quiet_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = _start_http_server(command, env, self.folder / "mlflow-server.log", "/health",
                                          self.port, "mlflow server")
        return self

    def stop(self) -> None:
        """Stop it at once (SIGKILL to its process group), as a crash or a lost
        machine would: no graceful shutdown; `start()` brings it back."""
        if self.process is not None:
            stop_group(self.process, sig=signal.SIGKILL)
            self.process = None


def start_mlflow_server(folder: Path, backend_store_uri: str | None = None, workers: int = 1) -> MlflowServer:
    """`mlflow server` with a sqlite store in `folder` unless `backend_store_uri` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(folder, backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}", free_port(), workers)
    return server.start()


@dataclass
class ModelServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> "ModelServer":
        """Return once it answers /ping (or fail with its log's end)."""
        _await_http_server(self.process, self.log_path, "/ping", self.port, "mlflow models serve")
        return self

    def stop(self) -> None:
        stop_group(self.process)


def launch_model_server(model_uri: str, tracking_uri: str, folder: Path) -> ModelServer:
    """`mlflow models serve -m <model_uri> --env-manager local` on 127.0.0.1 (the
    command `make serve` runs), with this venv's `service` package importable.
    Returns at once: call `wait_ready()` before using it. (A start is mostly one
    process importing MLflow and torch on one core: two servers launched side by
    side are ready sooner than one after the other.)"""
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    env = {**quiet_env(), "MLFLOW_TRACKING_URI": tracking_uri}
    log_path = folder / "model-server.log"
    process = _launch_http_server(command, env, log_path)
    return ModelServer(process, port, log_path)


@dataclass
class Postgres:
    uri: str
    process: subprocess.Popen
    folder: Path

    def stop(self) -> None:
        import shutil

        stop(self.process, sig=signal.SIGINT)  # "fast" shutdown: ends sessions, then exits
        shutil.rmtree(self.folder, ignore_errors=True)


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, postgres), if installed."""
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


def start_postgres() -> Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, user `mlflow`)
    in its own temp folder, removed by `stop()`.

    PostgreSQL refuses to run as root: as root (CI) the cluster belongs to,
    and runs as, the `postgres` system user Debian's package creates (hence a
    folder directly under /tmp: pytest's own temp tree is private to root).
    """
    import pwd
    import tempfile

    binaries = postgres_bin()
    if binaries is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    data, sockets = folder / "pgdata", folder / "pgsock"
    sockets.mkdir(parents=True, exist_ok=True)
    user = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        os.chown(folder, account.pw_uid, account.pw_gid)
        os.chown(sockets, account.pw_uid, account.pw_gid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [str(binaries / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync"],
        capture_output=True, text=True, timeout=180, env=env, cwd=folder, **user,
    )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
    port = free_port()
    log_path = folder / "postgres.log"
    process = subprocess.Popen(
        [str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(sockets), "-c", "fsync=off", "-c", "max_connections=100"],
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True, **user,
    )
    ready = binaries / "pg_isready"
    wait_until(
        lambda: subprocess.run([str(ready), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode == 0,
        60, "postgres", process,
    )
    return Postgres(f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/postgres", process, folder)
