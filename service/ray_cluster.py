"""Ray cluster start-up and sizing (driver side): joining or starting the
cluster, deciding how many decode tasks it can feed, saying when it is too
small, and keeping Ray's own console chatter down.

Token authentication stays on (Ray 2.60's default): a local cluster started
here generates its own token; a submitted job inherits its cluster's.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import ray

from service.config import Config
from service.verbosity import VERBOSE_ENV
from service.verbosity import verbose as ray_verbose

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow")


def quiet_ray_start() -> None:
    """Before `ray.init` in a command's driver, unless ALEXNET_RAY_VERBOSE=1: no
    token-authentication notice (auth stays on; the README says how it works)
    and Ray Data's console at warnings (its logging config, loaded on the first
    dataset, would reset a level set on the logger). Ray's C++ core-worker
    lines are left alone: RAY_BACKEND_LOG_LEVEL would hide them, but makes
    every Ray process print a line saying so."""
    if ray_verbose():
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


def quiet_ray_logging() -> None:
    """Ray's INFO chatter (per-dataset execution banners, "Reporting training
    result", placement-group cleaner notes) down to warnings, unless
    ALEXNET_RAY_VERBOSE=1. Called in the driver and in every worker."""
    if ray_verbose():
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Train logs "Reporting training result ..." through a logger named
    # after its file path, which only the root logger's level governs.
    logging.getLogger().setLevel(logging.WARNING)
    # Ray Data warns once that the progress bars it was told to hide are hidden.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # MLflow sets its own logger's level when first imported; this is its switch.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow prints "View run ... / View experiment at ..." on every run end against a
    # tracking server, twice per job; its experiment link opens the GenAI overview. The
    # summary's own link opens the run page.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
    except ImportError:  # ray[data] not installed: nothing to quieten
        pass


def training_cpus(cfg: Config) -> float:
    """CPUs the tower workers reserve together."""
    return cfg.parallel.replicas * cfg.parallel.towers * cfg.cluster.cpus_per_worker


def training_job_cpus(cfg: Config) -> float:
    """Logical CPUs a local cluster needs for the training workers plus at
    least one read task per lane, i.e. per tower worker (or data.decode_concurrency)."""
    return training_cpus(cfg) + max(cfg.data.decode_concurrency, cfg.parallel.replicas * cfg.parallel.towers)


def local_cluster_env() -> dict[str, str]:
    """The environment of every process of a cluster this driver starts itself
    (`make demo`); the user's own values of these variables win."""
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        VERBOSE_ENV: os.environ.get(VERBOSE_ENV, ""),
        # Ray Train's controller takes each report (a checkpoint) on its health-check
        # poll, 2 s apart by default, and the workers wait for it: on a laptop's short
        # epochs that is a third of the run.
        POLL_ENV: os.environ.get(POLL_ENV, "0.25"),
        # Ray Train's preemption watcher follows cloud nodes being drained; a cluster
        # this process starts on its own machine has none, and the watcher's actor costs
        # a process per run and prints a core_worker error line about its own restart
        # policy. Clusters the job joins (ray job submit, KubeRay) keep it.
        PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0"),
    }


def connect(address: str = "", min_cpus: float = 0) -> None:
    """Join the cluster at `address`, the one a submitted job runs in
    (RAY_ADDRESS), or start a local one with at least `min_cpus` logical CPUs."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    quiet_ray_start()
    level = "INFO" if ray_verbose() else "WARNING"
    runtime = {"logging_config": ray.LoggingConfig(log_level=level), "log_to_driver": True}
    if address:
        # An existing cluster (or the one a submitted job runs in): inherit its
        # runtime env; adding ours would conflict with the job's.
        ray.init(address=address, **runtime)
    else:
        # Logical CPUs are oversubscribed on purpose on small machines: the
        # workers and the decode tasks each reserve CPUs, and on a 2-core laptop
        # they would otherwise wait for each other forever; the OS shares the cores.
        num_cpus = int(max(4, os.cpu_count() or 1, math.ceil(min_cpus)))
        env = local_cluster_env()
        # The dashboard serves Ray's state API, which Ray Train's placement-group
        # cleaner polls (it warns every second without it); bound to loopback.
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, include_dashboard=True,
                 dashboard_host="127.0.0.1", **runtime)
    quiet_ray_logging()


@dataclass(frozen=True)
class DecodePlan:
    """How many decode tasks the job runs, and why."""

    total: int
    # -- Read tasks of each lane (one lane per tower worker).
    per_lane: int
    reason: str


def plan_decode(cfg: Config, cluster_cpus: float) -> DecodePlan:
    """Read/decode concurrency: data.decode_concurrency when set, else every CPU
    of the cluster that training workers do not reserve (at least one per lane,
    i.e. per tower worker)."""
    from service.data.pipeline import decode_tasks_per_lane

    replicas = cfg.parallel.replicas
    lanes = replicas * cfg.parallel.towers
    free = cluster_cpus - training_cpus(cfg)
    per_lane = decode_tasks_per_lane(cfg.data.decode_concurrency, free, lanes)
    if cfg.data.decode_concurrency:
        reason = "data.decode_concurrency"
    else:
        reason = (f"auto: {cluster_cpus:g} cluster CPUs - {training_cpus(cfg):g} reserved by "
                  f"{replicas * cfg.parallel.towers} training workers")
    return DecodePlan(total=per_lane * lanes, per_lane=per_lane, reason=reason)


def cluster_cpus() -> float:
    """Logical CPUs of the cluster as it is now (an autoscaler may add more)."""
    return float(ray.cluster_resources().get("CPU", 0))


def warn_if_short(cfg: Config, decode: DecodePlan) -> None:
    """Say so when the cluster cannot hold the job right now (it would wait;
    an autoscaling cluster may still grow, so this is not an error)."""
    resources = ray.cluster_resources()
    world = cfg.parallel.replicas * cfg.parallel.towers
    need_cpus = training_cpus(cfg) + decode.total
    problems = []
    if resources.get("CPU", 0) < need_cpus:
        problems.append(
            f"{need_cpus:g} CPUs ({world} workers x cluster.cpus_per_worker={cfg.cluster.cpus_per_worker:g} "
            f"+ {decode.total} decode tasks) but the cluster has {resources.get('CPU', 0):g}"
        )
    if cfg.cluster.use_gpu and resources.get("GPU", 0) < world:
        problems.append(f"{world} GPUs (one per tower worker) but the cluster has {resources.get('GPU', 0):g}")
    if problems:
        print(
            "[train] WARNING: the job needs " + "; and ".join(problems)
            + ". It will wait for resources (lower cluster.cpus_per_worker or data.decode_concurrency, or add nodes).",
            flush=True,
        )
