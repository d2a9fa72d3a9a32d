"""Run a function in N gloo processes on CPU, for tests: a free port, a timeout on every wait.

A failing or hung worker fails the test within `timeout` seconds instead of hanging CI.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, timeout: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # One thread per process: N processes share the CI machine's few cores.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    fn(rank, world_size, *args)  # an exception propagates: spawn reports it and the test fails
    # Leave without C++ teardown, as train/__main__.py does under torchrun: gloo's threads and
    # objects that outlive the process group (FSDP state, meshes, work holding tensors) abort the
    # interpreter's shutdown now and then ("terminate called without an active exception").
    # The barrier keeps a rank from vanishing while a peer still talks to it.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    """Call `fn(rank, world_size, *args)` in `world_size` spawned processes joined by gloo.

    `fn` must be importable (a module-level function). Raises if a worker raises, exits
    non-zero, or the whole group runs past `timeout` seconds."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), timeout, args),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__}: {world_size} workers still running after {timeout:.0f} s")
