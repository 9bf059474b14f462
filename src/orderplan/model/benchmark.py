"""Throughput of the three samplers on one model, measured in one process so ratios are fair:
KV-cached raster, KV-cached random block order, and the O(L^2) full-recompute sampler; and the
decode step's overhead ratio (its time over the time its FLOPs take at the measured matmul rate)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.model.gpt import GPT
from orderplan.model.orders import block_order
from orderplan.model.sampling import SamplingConfig, generate, generate_recompute


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


@dataclass
class StepOverhead:
    """How far one KV decode step is from its FLOP bound: measured seconds per step over the
    seconds its FLOPs would take at the matmul throughput measured on the same device in the same
    run. A ratio near 1 is compute bound; a large one is bound by launches, host-side Python and
    host-device synchronisation (kept out of the decode step)."""

    step_s: float  # wall seconds per decode step (one token for every row), sampling included
    flops: float  # FLOPs of one decode step (matmuls and attention; batch included)
    matmul_flops_s: float  # measured dense matmul throughput, FLOP/s

    @property
    def ratio(self) -> float:
        return self.step_s / (self.flops / self.matmul_flops_s)


def decode_step_flops(model: GPT, batch: int, context: float) -> float:
    """FLOPs of one decode step of `batch` rows at a mean cache length `context` (tokens): two per
    weight of every linear layer (output head included; embedding look-ups are free) plus the
    attention scores and the weighted sum, 2 * 2 * dim per cached key and layer."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return batch * (2.0 * linear + 4.0 * model.cfg.n_layer * model.cfg.dim * context)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one n x n x n matmul (2 n^3 FLOPs) on this device and dtype."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    t, _ = best_time(lambda: torch.mm(a, b), repeats, device)
    return 2.0 * n**3 / t


@torch.no_grad()
def decode_overhead(model: GPT, geom: BlockGeometry, batch: int, repeats: int = 3, seed: int = 0) -> StepOverhead:
    """Seconds per token step of `generate` (random block order, best of `repeats` whole images)
    against its FLOP bound; see `StepOverhead`."""
    dev = model.output.weight.device
    cond = torch.arange(batch, device=dev) % model.cfg.num_classes
    gen = torch.Generator(device=dev).manual_seed(seed)
    order = geom.token_order(block_order("random", geom, batch=batch, generator=torch.Generator().manual_seed(seed))).to(dev)
    L = geom.num_tokens
    sc = SamplingConfig()
    generate(model, cond, order, sc, gen)  # warm-up
    t, _ = best_time(lambda: generate(model, cond, order, sc, gen), repeats, dev)
    # the cache holds 1 .. L entries over the image (plus the row's own key): mean (L + 1) / 2 + 1
    flops = decode_step_flops(model, batch, (L + 1) / 2 + 1)
    return StepOverhead(t / L, flops, matmul_flops_per_s(dev, model.output.weight.dtype))


@dataclass
class ParallelTimes:
    """Images per second of token-by-token KV decoding (`generate`, L forwards) and of parallel
    decoding (`generate_parallel`, S forwards), same model, batch, order and sampler, one run."""

    token_by_token: float
    parallel: float
    confident: float  # parallel decoding with rule `confident` (its forwards query every unseen token)
    steps: int

    @property
    def ratio(self) -> float:
        return self.parallel / self.token_by_token


@torch.no_grad()
def time_parallel(model: GPT, batch: int, steps: int = 16, repeats: int = 3, sc: SamplingConfig | None = None,
                  seed: int = 0) -> ParallelTimes:
    """Best-of-`repeats` images/s, interleaved so that load from other processes hits every sampler
    alike: token-by-token raster, raster in `steps` equal decisions, and confident in `steps`."""
    from orderplan.model.parallel import generate_parallel, step_sizes

    sc = sc or SamplingConfig(cfg_scale=2.0)
    dev = model.output.weight.device
    L = model.cfg.num_tokens
    cond = torch.arange(batch, device=dev) % model.cfg.num_classes
    gen = torch.Generator(device=dev).manual_seed(seed)
    # raster over 2x2 blocks (the embedded default's geometry; any order costs the same)
    order = BlockGeometry(model.cfg.grid_h, model.cfg.grid_w, 2).token_order(torch.arange((model.cfg.grid_h // 2) * (model.cfg.grid_w // 2))).to(dev).expand(batch, -1)
    sizes = step_sizes(L, steps)
    runs = {
        "token": lambda: generate(model, cond, order, sc, gen),
        "parallel": lambda: generate_parallel(model, cond, sizes, "order", order, sc, gen),
        "confident": lambda: generate_parallel(model, cond, sizes, "confident", None, sc, gen,
                                               geometry=BlockGeometry(model.cfg.grid_h, model.cfg.grid_w, 2)),
    }
    for fn in runs.values():  # warm-up (allocator, kernels)
        fn()
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            best[k] = min(best[k], best_time(fn, 1, dev)[0])
    return ParallelTimes(batch / best["token"], batch / best["parallel"], batch / best["confident"], steps)
