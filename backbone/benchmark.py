"""Throughput of the three samplers on one model, measured in one process so ratios are fair:
KV-cached raster, KV-cached random block order, and the O(L^2) full-recompute sampler.

Imports `backbone.blocks`, `backbone.gpt`, `backbone.orders`, `backbone.sampling` from this package;
never envs or agents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from backbone.blocks import BlockGeometry
from backbone.gpt import GPT
from backbone.orders import block_order
from backbone.sampling import SamplingConfig, generate, generate_recompute


@dataclass
class SamplerTimes:
    """Generated tokens per second of each sampler (batch * tokens / wall seconds)."""

    raster_kv: float
    random_kv: float
    recompute: float
    recompute_steps: int

    @property
    def any_order_vs_raster(self) -> float:
        return self.random_kv / self.raster_kv

    @property
    def any_order_vs_recompute(self) -> float:
        return self.random_kv / self.recompute


def sync(device: torch.device | None = None) -> None:
    """Wait for queued GPU work (timings would otherwise measure only the launch)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device: torch.device | None = None):
    """(best wall time in seconds over `repeats` calls of fn, fn's last output), synchronising the
    GPU around each call."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


@torch.no_grad()
def time_samplers(model: GPT, geom: BlockGeometry, batch: int, repeats: int = 3,
                  recompute_steps: int | None = None, sc: SamplingConfig | None = None,
                  seed: int = 0) -> SamplerTimes:
    """Best-of-`repeats` tokens/s of each sampler. The recompute sampler may be stopped after
    `recompute_steps` steps (tokens/s over the steps it ran; its per-token cost grows with t, so a
    truncated run *overstates* its speed and the reported speedup is a lower bound)."""
    sc = sc or SamplingConfig()
    dev = model.output.weight.device
    cond = torch.arange(batch, device=dev) % model.cfg.num_classes
    gen = torch.Generator(device=dev).manual_seed(seed)
    raster = geom.token_order(block_order("raster", geom)).expand(batch, -1).to(dev)
    rnd = geom.token_order(block_order("random", geom, batch=batch, generator=torch.Generator().manual_seed(seed))).to(dev)
    L = geom.num_tokens
    generate(model, cond, raster, sc, gen)  # warm-up (allocator, kernels)
    generate(model, cond, rnd, sc, gen)
    # interleaved, best of `repeats`: load from other processes hits both samplers alike
    t_raster = t_random = float("inf")
    for _ in range(repeats):
        t_raster = min(t_raster, best_time(lambda: generate(model, cond, raster, sc, gen), 1)[0])
        t_random = min(t_random, best_time(lambda: generate(model, cond, rnd, sc, gen), 1)[0])
    steps = L if recompute_steps is None else min(L, recompute_steps)
    t_re = best_time(lambda: generate_recompute(model, cond, rnd, sc, gen, max_steps=steps), 1)[0]
    return SamplerTimes(batch * L / t_raster, batch * L / t_random, batch * steps / t_re, steps)
