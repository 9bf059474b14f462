"""Run a function in W CPU processes as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
set; gloo), for the 2-process tests. `launch(fn, world, *args)` returns each rank's return value."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, queue, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    queue.put((rank, fn(*args)))


def launch(fn: Callable, world: int, *args: Any) -> list[Any]:
    """fn must be importable (module level); its return value must pickle."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, fn, world, port, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise RuntimeError(f"a rank failed: exit codes {codes}")
    out = dict(queue.get() for _ in range(world))
    return [out[r] for r in range(world)]
