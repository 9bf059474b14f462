"""Rank functions of tests/agents/test_bc_distributed.py (spawned processes import them by module name)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from orderplan.infra.distributed import close_distributed, gather_rows, init_distributed

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _watch_writes(root: Path, allowed: set[str]) -> list[str]:
    """Record (via a Python audit hook) every file opened for writing, renamed, removed or created
    under `root` whose name is not in `allowed`. Returns the list the hook appends to. Catches what
    Python code writes (torch.save, json, os.replace of atomic writes), which every writer here uses."""
    seen: list[str] = []
    root = root.resolve()

    def under(p) -> str | None:
        try:
            path = Path(os.fsdecode(os.fspath(p))).resolve()
        except TypeError:  # a file descriptor
            return None
        return str(path) if (path == root or root in path.parents) and path.name not in allowed else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            hit = under(path) if writing and path is not None else None
        elif event == "os.rename":
            hit = under(args[1]) or under(args[0])
        elif event == "os.mkdir" and under(args[0]) == str(root):
            return  # run_dir itself, made for the rank's console log
        elif event in ("os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
            hit = under(args[0])
        else:
            return
        if hit:
            seen.append(f"{event} {hit}")

    sys.addaudithook(hook)
    return seen


def bc_rank(run) -> dict:
    """`train_bc(run)` on this rank. Returns its result, its final OrderHead weights and, on ranks
    > 0, every write it made under run_dir other than its own console log (`bc.rank<r>.log`).
    The weights come back as their `state_digest`."""
    from orderplan.train import bc as bc_mod

    rank = int(os.environ.get("RANK", 0))
    writes = _watch_writes(Path(run.run_dir), {f"bc.rank{rank}.log"}) if rank else []
    seen = {}
    real_step = bc_mod._train_step

    def spy(run, step, data, model, *args, **kwargs):
        seen["net"] = model  # the DDP wrapper under W > 1
        return real_step(run, step, data, model, *args, **kwargs)

    bc_mod._train_step = spy
    result = bc_mod.train_bc(run)
    head = getattr(seen["net"], "module", seen["net"])
    # a digest, not the tensors: the launcher joins before it reads the queue, so a return value
    # larger than a pipe buffer would block the exiting rank
    return {"rank": rank, "result": result, "writes": list(writes), "weights_sha256": state_digest(head.state_dict())}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict: equal iff bit-identical."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def gather_rows_rank(n: int) -> list:
    """Uneven shares (rank 0: rows divisible by 3, rank 1: the rest) of a float and a bool tensor,
    gathered back on every rank; True when both equal the whole tensors."""
    ctx = init_distributed("cpu")
    rows = torch.arange(n)
    rows = rows[(rows % 3 == 0) == (ctx.rank == 0)]
    full = torch.arange(n * 2, dtype=torch.float64).view(n, 2) ** 1.5
    mask = torch.arange(n) % 2 == 1
    ok = torch.equal(gather_rows(full[rows], rows, n, ctx), full) and torch.equal(gather_rows(mask[rows], rows, n, ctx),
                                                                                   mask)
    close_distributed(ctx)
    return [ok, len(rows)]
