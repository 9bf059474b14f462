"""What PPO does differently under torchrun: one env batch per rank, one model.

Rank r of W collects its own batch of frames_per_batch / W frames from its own env (B rows, seeded
from (ppo.seed, rank) by `rank_seed`); the W local batches together are the iteration's batch, and
every update is the update of that one big batch:

* gradients: each rank's loss is the mean over its local minibatch (minibatch_size / W frames, the
  same size on every rank), so the global mean's gradient is the mean of the ranks' gradients
  (`average_gradients`, one all-reduce per update, before clipping and the optimiser step);
* statistics that are not sums of per-frame terms are computed over the global batch: advantage
  normalisation per minibatch (`standardize`), the reward scale's RMS (`global_rms`), metric means
  (`global_means`);
* control flow that depends on data (target_kl's early stop) reads the all-reduced value, so every
  rank takes the same branch and the collectives stay matched.

Weights then stay identical on every rank (same initial weights, broadcast from rank 0 by
`broadcast_module`; identical reduced gradients; deterministic optimiser). With W = 1 nothing here
runs a collective or changes a number: `rank_seed` and `rank_stream` return the plain run's seeds."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from orderplan.infra.distributed import DistContext
from orderplan.infra.seeding import derive_seed

__all__ = ["single_process", "rank_seed", "rank_stream", "broadcast_module", "average_gradients",
           "all_reduce_sum", "global_means", "global_rms", "standardize"]


def single_process(device: torch.device) -> DistContext:
    """The context of a plain (non-torchrun) run on `device`."""
    return DistContext(rank=0, world=1, local_rank=0, device=device)


def rank_seed(seed: int, ctx: DistContext) -> int:
    """The env seed of this rank: `seed` itself in one process (so W = 1 equals a plain run), else
    the named stream (seed, "ppo", "env", "rank", r) (`orderplan.infra.seeding.derive_seed`), distinct per rank."""
    return int(seed) if not ctx.distributed else derive_seed(seed, "ppo", "env", "rank", ctx.rank)


def rank_stream(ctx: DistContext, *names: str | int) -> tuple[str | int, ...]:
    """The names of this rank's RNG stream: `names` in one process, names + ("rank", r) otherwise
    (each rank samples its own actions and minibatch permutations)."""
    return names if not ctx.distributed else (*names, "rank", ctx.rank)


def _comm(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """`t` where the backend reduces: gloo on the CPU, NCCL on this rank's GPU."""
    return t.to(ctx.device if dist.get_backend() == "nccl" else torch.device("cpu"))


def all_reduce_sum(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of `x` (any shape) over ranks, on x's device and dtype; `x` itself in one process."""
    if not ctx.distributed:
        return x
    buf = _comm(x.detach().clone(), ctx)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(x.device)


@torch.no_grad()
def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place), as DDP does at construction."""
    if not ctx.distributed:
        return
    for t in [*module.parameters(), *module.buffers()]:
        buf = _comm(t.detach().clone(), ctx)
        dist.broadcast(buf, src=0)
        t.copy_(buf.to(t.device))


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Replace every .grad by its mean over ranks (one flat all-reduce). A parameter without a
    gradient counts as a zero gradient in the mean and keeps None (its use is decided by the model's
    structure, not by the data, so it is None on every rank alike)."""
    if not ctx.distributed:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = _comm(torch.cat([g.reshape(-1) for g in grads]), ctx)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = (flat / ctx.world).to(grads[0].device)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is not None:
            p.grad.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def global_means(pairs: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]],
                 ctx: DistContext) -> dict[str, float]:
    """{key: (sum, count)} of this rank -> {key: global sum / global count} (one all-reduce, float64);
    keys whose global count is 0 are left out."""
    if not pairs:
        return {}
    t = torch.tensor([[float(s), float(c)] for s, c in pairs.values()], dtype=torch.float64)  # [K, 2]
    t = all_reduce_sum(t, ctx)
    return {k: float(s / c) for k, (s, c) in zip(pairs, t.tolist()) if c > 0}


def global_rms(x: torch.Tensor, ctx: DistContext) -> float:
    """sqrt(mean(x^2)) over every rank's elements of x (float64 sums)."""
    s = x.detach().double().pow(2).sum().reshape(1)
    n = torch.tensor([float(x.numel())], dtype=torch.float64, device=s.device)
    s, n = all_reduce_sum(torch.cat([s, n]), ctx).tolist()
    return (s / n) ** 0.5 if n > 0 else 0.0


def standardize(adv: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """(adv - mean) / std over the union of every rank's `adv` (the global minibatch), with
    TorchRL's convention (`ClipPPOLoss(normalize_advantage=True)`: unbiased std, clamped below at
    float32 resolution). Two passes (mean, then squared deviations) for accuracy; one process
    returns TorchRL's own result up to float reduction order. A global minibatch of one element
    is returned as is, as TorchRL does."""
    n = adv.numel() * ctx.world
    if n <= 1:
        return adv
    mean = all_reduce_sum(adv.detach().double().sum(), ctx) / n
    var = all_reduce_sum((adv.detach().double() - mean).pow(2).sum(), ctx) / (n - 1)
    std = var.sqrt().to(adv.dtype).clamp_min(torch.finfo(torch.float).resolution)
    return (adv - mean.to(adv.dtype)) / std
