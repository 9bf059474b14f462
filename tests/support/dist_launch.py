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


def launch(fn: Callable, world: int, *args: Any, timeout: float = 900.0) -> list[Any]:
    """fn must be importable (module level); its return value must pickle. Results are read while
    the ranks run (a large result would otherwise fill the pipe and block its rank's exit)."""
    import queue as queue_mod
    import time

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, fn, world, port, results, args)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, value = results.get(timeout=0.5)
                out[rank] = value
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # a rank died: do not wait for the others' deadlock
    finally:
        for p in procs:
            p.join(5 if len(out) == world else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in procs]
    if len(out) < world or any(c != 0 for c in codes):
        raise RuntimeError(f"a rank failed or timed out: exit codes {codes}, results from ranks {sorted(out)}")
    return [out[r] for r in range(world)]
