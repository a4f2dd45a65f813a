"""Run a function on N local processes joined by a gloo process group.

No Ray: `torch.distributed` over TCP on 127.0.0.1, as `torchrun` would set it
up. Used by the multi-process tests and the CPU benchmark.

"""

from __future__ import annotations

import multiprocessing
import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


# Modules the fork server imports once, so that each rank starts as a fork of a process that
# already holds torch instead of importing it again (~1.5 CPU-s a rank; 8 ranks on 2 cores was
# most of a multi-process test's time). Forking is safe there: the server runs no torch op, so no
# OpenMP or CUDA state exists to be copied half-made.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "torch.nn.functional", "service.model.reference",
                      "service.model.tower"]


def run_on_processes(fn: Callable, world_size: int, *args, threads: int = 1) -> None:
    """Call `fn(rank, world_size, *args)` on `world_size` fresh processes (forked by a
    fork server that has torch imported, not by this process, which may have threads).

    Raises if any process fails (with its traceback)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Only the first call's list counts: the fork server starts once per process.
    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
    mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), threads, args),
        nprocs=world_size,
        join=True,
        start_method="forkserver",
    )
