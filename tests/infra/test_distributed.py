"""orderplan.infra.distributed: strided shards cover every row once, and gathering them restores the
one-process tensor exactly, in 2 real gloo processes."""

import torch

from orderplan.infra.distributed import DistContext, gather_strided, shard_indices
from tests.support.dist_gather import gather_rank
from tests.support.dist_launch import launch


def test_shards_partition_rows():
    for n in (0, 1, 5, 8, 13):
        for world in (1, 2, 3):
            idx = torch.cat([shard_indices(n, r, world) for r in range(world)])
            assert sorted(idx.tolist()) == list(range(n))


def test_one_process_is_identity():
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    x = torch.randn(7, 3)
    assert gather_strided(x, 7, ctx) is x


def test_gather_two_processes_odd_rows():
    out = launch(gather_rank, 2, 7)
    assert out == [[True, 2], [True, 2]]
