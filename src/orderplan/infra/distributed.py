"""One process group per run under torchrun: discovery, strided sharding and the gathers that undo it.

`init_distributed` is the one place a process group is started: backbone training, oracle
building, BC, PPO and evaluation all come through it, and only the context that started the group
ends it (a job run inside another, e.g. BC building its oracle set, leaves the group to its owner).
Every job shards the same way: rank r of W owns rows r, r + W, r + 2W, ... of
whatever is split (images, oracle states, samples). `gather_strided` puts those rows back in their
global order on every rank, so a result computed from the gathered tensor does not depend on W.

gloo on CPU (and for object gathers), NCCL when the job runs on CUDA. Without torchrun
(WORLD_SIZE unset) everything here is a no-op with rank 0 of 1."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from orderplan.infra.run_utils import dist_info, setup_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank of world, and the device it computes on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # True when this context initialised the process group (and must close it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "cpu", timeout_minutes: float = 60.0, backend: str | None = None) -> DistContext:
    """Discover torchrun's rank and world size, pick the device (one GPU per process) and start
    the process group when W > 1 and none is running yet (`backend`: None = NCCL on CUDA, gloo
    otherwise). A group already running (started by the job that called this one) is used as is."""
    rank, world, local_rank = dist_info()
    dev = setup_device(device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        owns = True
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev, owns_group=owns)


def close_distributed(ctx: DistContext) -> None:
    """Wait for every rank, then end the group if `ctx` started it."""
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def distributed(device: str = "cpu") -> Iterator[DistContext]:
    """`with distributed(run.device) as ctx:` the group lives for the block (closed on success only:
    after an exception the other ranks may never reach the barrier, so the group is left to die
    with the process)."""
    ctx = init_distributed(device)
    yield ctx
    close_distributed(ctx)


def shard_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """Global row indices owned by `rank`: [rank, rank + world, ...] below n (LongTensor [ceil])."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return torch.arange(rank, max(n, rank), world, dtype=torch.long)


def gather_strided(local: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """Inverse of `shard_indices`: each rank holds rows `shard_indices(n, rank, W)` of a [n, ...]
    tensor (`local` [n_r, ...]); every rank gets the whole tensor in global row order. Rows are
    moved, never reduced, so the result is bit-identical to computing all n rows in one process.
    (`gather_rows` with the strided partition.)"""
    if not ctx.distributed:
        if len(local) != n:
            raise ValueError(f"one process must hold all {n} rows, got {len(local)}")
        return local
    return gather_rows(local, shard_indices(n, ctx.rank, ctx.world), n, ctx)


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, ctx: DistContext, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` (picklable), in rank order, on rank `dst` only (None on the others): for
    payloads only one rank reads, so the other ranks do not hold W copies. [obj] in one process."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def gather_rows(local: torch.Tensor, rows: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """Like `gather_strided` for any partition of the rows: rank r holds rows `rows` [n_r] (global
    indices; the ranks' rows together are range(n), each once) of a [n, ...] tensor as `local`
    [n_r, ...] (shares may be uneven, e.g. whole episodes per rank). Every rank gets the whole
    tensor in global row order; rows are moved, never reduced. ValueError unless the rows partition
    range(n)."""
    rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
    if len(local) != len(rows):
        raise ValueError(f"rank {ctx.rank} holds {len(local)} rows but names {len(rows)}")
    if not ctx.distributed:
        parts_rows, parts = [rows], [local]
    else:
        counts = all_gather_objects(len(rows), ctx)
        m = max(counts)
        comm_dev = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
        # gloo gathers equal shapes of numeric dtypes: pad to the largest share, bool travels as uint8
        wire = torch.uint8 if local.dtype == torch.bool else local.dtype
        pad = torch.zeros((m, *local.shape[1:]), dtype=wire, device=comm_dev)
        pad[:len(rows)] = local.to(comm_dev, wire)
        idx = torch.full((m,), -1, dtype=torch.long, device=comm_dev)
        idx[:len(rows)] = rows.to(comm_dev)
        got, got_idx = [torch.empty_like(pad) for _ in counts], [torch.empty_like(idx) for _ in counts]
        if m:
            dist.all_gather(got, pad)
            dist.all_gather(got_idx, idx)
        parts = [g[:c].to(local.device, local.dtype) for g, c in zip(got, counts)]
        parts_rows = [g[:c].cpu() for g, c in zip(got_idx, counts)]
    every = torch.cat(parts_rows)
    if len(every) != n or not torch.equal(every.sort().values, torch.arange(n)):
        raise ValueError(f"the ranks' rows do not cover range({n}) once each")
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r_rows, part in zip(parts_rows, parts):
        out[r_rows.to(local.device)] = part
    return out
