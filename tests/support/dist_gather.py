"""Rank function of tests/backbone/test_distributed.py (spawned processes import it by module name)."""

import torch

from orderplan.infra.distributed import close_distributed, gather_strided, init_distributed, shard_indices


def gather_rank(n: int) -> list:
    ctx = init_distributed("cpu")
    full = torch.arange(n * 3, dtype=torch.float64).view(n, 3) ** 1.5
    local = full[shard_indices(n, ctx.rank, ctx.world)]
    got = gather_strided(local, n, ctx)
    close_distributed(ctx)
    return [bool(torch.equal(got, full)), ctx.world]
