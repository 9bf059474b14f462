"""The GPT-B section of `scripts/bench_env.py --gpt-b`: every ratio of the pipeline at LlamaGen GPT-B
geometry (16x16 tokens, 4x4 blocks, 111M parameters, random non-degenerate weights), measured in
one process so the ratios are fair:

* env_overhead_gpt_b   TorchRL env time per step over the bare backbone work of the same step
                       (`gpt.append` of the block + `gpt.query` of the unseen tokens, unchecked),
                       same images and orders (target <= 1.2);
* oracle_speedup_gpt_b batched oracle utilities over the naive cache-free reference on the
                       candidate blocks of one state (target >= 20);
* head_over_step       one OrderHead decision (the GPT-B-sized planner, R latent steps, no grad) over
                       one env step;
* ppo_frames_per_s     PPO frames (planner decisions of one env row) per second over whole
                       iterations, collection plus update;
* memory             the env's state per row (KV cache, hidden states, masks), counted from the
                       tensors; the peak allocated over an episode per row, and over one oracle call
                       at the empty state per state (CUDA allocator peak; on CPU the sampled
                       resident set size, a lower bound).

Lives in orderplan.train because it times the planner and PPO; the env-only timings are
`orderplan.env.benchmark`'s."""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch

from orderplan.planner.orderhead import OrderHead, orderhead_config_for
from orderplan.train.ppo import PPOConfig, train_ppo
from orderplan.model.benchmark import sync
from orderplan.env.benchmark import Stack, env_overhead, oracle_speedup, random_stack
from orderplan.env.core import OrderPlanningCore
from orderplan.env.torchrl_env import OrderPlanningEnv

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gpt_b_stack(device: str, dtype: torch.dtype, n_layer: int = 12, n_images: int = 64) -> Stack:
    """GPT-B (or fewer layers) with random non-degenerate weights over random codes, in `dtype`."""
    stack = random_stack("GPT-B", 4, device, n_images=n_images, n_layer=n_layer)
    stack.bb.gpt.to(dtype)
    stack.note += f", {str(dtype).removeprefix('torch.')}"
    return stack


def _tensor_bytes(obj, batch: int, seen: set[int]) -> int:
    """Bytes of the tensors in `obj` (attributes, lists, dataclasses) whose leading dim is `batch`."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen or obj.dim() == 0 or obj.shape[0] != batch:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, batch, seen) for o in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), batch, seen) for f in fields(obj))
    return 0


def state_bytes_per_row(core: OrderPlanningCore) -> dict[str, float]:
    """The env's persistent per-row state in bytes: the KV cache of the decode state, and every other
    [B, ...] tensor the core holds (token grid, hidden states, masks, losses). Counted, not sampled,
    so it is the same on every device."""
    seen: set[int] = set()
    kv = _tensor_bytes([core.state.k, core.state.v], core.B, seen)
    rest = _tensor_bytes(core.state, core.B, seen) + sum(_tensor_bytes(v, core.B, seen) for v in vars(core).values())
    return {"kv_cache": kv / core.B, "other": rest / core.B, "total": (kv + rest) / core.B}


def _rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def peak_memory_of(fn: Callable[[], Any], device: torch.device, interval_s: float = 0.002) -> tuple[Any, float | None]:
    """Run fn(); return (its result, the peak memory it allocated above what was allocated when it
    started, bytes). CUDA: the caching allocator's peak. CPU: the resident set size sampled every
    `interval_s` by a thread (torch ops release the GIL), so short spikes can be missed and the
    allocator's reuse of freed pages hides some; a lower bound. None where neither is available."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, float(torch.cuda.max_memory_allocated() - base)
    base = _rss_bytes()
    if base is None:
        return fn(), None
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    return out, float(max(peak[0], _rss_bytes() or 0) - base)


@torch.no_grad()
def episode_peak_per_row(stack: Stack, batch: int, seed: int = 0) -> float | None:
    """Peak memory of building an env of `batch` rows and playing one episode (random order), per
    row (bytes; `peak_memory_of`)."""
    dev = stack.bb.device

    def episode() -> None:
        core = stack.core(batch, seed=seed)
        core.reset()
        order = torch.rand(batch, core.N, generator=torch.Generator().manual_seed(seed)).argsort(-1).to(dev)
        for t in range(core.N):
            core.step(order[:, t])
            core.observation()

    _, peak = peak_memory_of(episode, dev)
    return None if peak is None else peak / batch


@torch.no_grad()
def oracle_peak_per_state(stack: Stack, batch: int = 1, seed: int = 0) -> float | None:
    """Peak memory of one batched oracle call at the empty state (every block a candidate: the
    largest call of an episode) over `batch` rows, per state (bytes; `peak_memory_of`)."""
    core = stack.core(batch, seed=seed)
    core.reset()
    _, peak = peak_memory_of(lambda: core.oracle_utilities(), core.device)
    return None if peak is None else peak / batch


@dataclass
class HeadTiming:
    head_s: float  # one OrderHead decision for the whole batch
    step_s: float  # one env step for the whole batch
    params: int

    @property
    def ratio(self) -> float:
        return self.head_s / self.step_s


def planner_for(core: OrderPlanningCore, R: int = 2) -> OrderHead:
    """The GPT-B-sized OrderHead (`orderhead_config_for`: d = 384, about 4 M parameters), class
    conditioned, in float32 on the env's device (it reads the backbone's hidden states cast up)."""
    cfg = orderhead_config_for(core.D, core.geom, R=R, num_classes=core.gpt.cfg.num_classes, dropout=0.0)
    return OrderHead(cfg).to(core.device).eval()


@torch.no_grad()
def head_over_step(stack: Stack, batch: int, repeats: int = 2, R: int = 2, seed: int = 0) -> HeadTiming:
    """Planner decisions over env steps along whole episodes: at every state the OrderHead's decision
    and the env step that follows are timed separately; each total is the best of `repeats` episodes."""
    env = OrderPlanningEnv(stack.core(batch, seed=seed))
    core, dev = env.core, env.core.device
    model = planner_for(core, R)
    order = torch.rand(batch, core.N, generator=torch.Generator().manual_seed(seed)).argsort(-1).to(dev)
    best_head = best_step = float("inf")
    for _ in range(repeats):
        td = env.reset()
        head_s = step_s = 0.0
        for t in range(core.N):
            obs = {k: td[k] for k in model.input_keys}
            sync(dev)
            t0 = time.perf_counter()
            model(obs)
            sync(dev)
            t1 = time.perf_counter()
            td.set("action", order[:, t])
            td = env.step(td)["next"]
            sync(dev)
            head_s, step_s = head_s + t1 - t0, step_s + time.perf_counter() - t1
        best_head, best_step = min(best_head, head_s), min(best_step, step_s)
    return HeadTiming(best_head / core.N, best_step / core.N, sum(p.numel() for p in model.parameters()))


def ppo_frames_per_s(stack: Stack, batch: int, iterations: int = 1, seed: int = 0) -> tuple[float, float]:
    """PPO frames per second over `iterations` whole iterations (one episode per env row each:
    collection, GAE, one epoch of updates), and the wall time (s). Timed around `train_ppo`, so it
    also pays the collector's setup and the final weights' write (small next to GPT-B steps)."""
    env = OrderPlanningEnv(stack.core(batch, seed=seed))
    model = planner_for(env.core).train()
    frames = batch * env.core.N
    cfg = PPOConfig(frames_per_batch=frames, total_frames=frames * iterations, minibatch_size=frames, epochs=1,
                    eval_every=0, ckpt_every=iterations, keep_checkpoints=1, seed=seed, resume=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = train_ppo(env, model, cfg, tmp)
        sync(env.core.device)
        wall = time.perf_counter() - t0
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("PPO at GPT-B geometry produced non-finite weights")
    return out["frames"] / wall, wall


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("GPT-B section (--gpt-b)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="backbone dtype of the GPT-B section")
    g.add_argument("--gpt-b-batch", type=int, default=2, help="env rows of the GPT-B env, head and PPO timings")
    g.add_argument("--gpt-b-repeats", type=int, default=1)
    g.add_argument("--gpt-b-ppo-iterations", type=int, default=1)


def report(args: argparse.Namespace) -> dict[str, float]:
    """Print the GPT-B section and return its ratio lines' values."""
    dtype = DTYPES[args.dtype]
    t_start = time.perf_counter()
    gb = gpt_b_stack(args.device, dtype, n_layer=args.gpt_b_layers)
    B = args.gpt_b_batch
    print(f"\n[GPT-B] {gb.note}; batch {B}, device {args.device}, threads {torch.get_num_threads()}")
    out: dict[str, float] = {}

    ov = env_overhead(gb, B, repeats=args.gpt_b_repeats)
    N = gb.bb.geometry.num_blocks
    print(f"  env step {1e3 * ov.env_s / N:.1f} ms, core step {1e3 * ov.core_s / N:.1f} ms, bare backbone "
          f"{1e3 * ov.bare_s / N:.1f} ms  -> env/bare {ov.env_ratio:.3f} (target <= 1.2)")
    out["env_overhead_gpt_b"] = ov.env_ratio

    res = oracle_speedup(gb.core(1), repeats=1, naive_repeats=1, states=[args.gpt_b_revealed],
                         candidates=args.gpt_b_candidates)
    print(f"  oracle, batch 1, {args.gpt_b_revealed} of {N} blocks revealed, {args.gpt_b_candidates} candidates: "
          f"batched {res.batched_s:.3f} s, naive {res.naive_s:.3f} s -> {res.speedup:.1f}x (target >= 20), "
          f"max |diff| {res.max_abs_diff:.2e} nats")
    out["oracle_speedup_gpt_b"] = res.speedup

    ht = head_over_step(gb, B, repeats=max(2, args.gpt_b_repeats))
    print(f"  OrderHead ({ht.params / 1e6:.1f} M params, R=2): decision {1e3 * ht.head_s:.1f} ms, env step "
          f"{1e3 * ht.step_s:.1f} ms -> head/step {ht.ratio:.3f}")
    out["head_over_step"] = ht.ratio

    fps, wall = ppo_frames_per_s(gb, B, iterations=args.gpt_b_ppo_iterations)
    print(f"  PPO: {args.gpt_b_ppo_iterations} iteration(s) of {B} rows x {N} decisions in {wall:.1f} s "
          f"-> {fps:.2f} frames/s")
    out["ppo_frames_per_s"] = fps

    core = gb.core(B)
    core.reset()
    mem = state_bytes_per_row(core)
    del core
    peak = episode_peak_per_row(gb, B)
    orc_peak = oracle_peak_per_state(gb, 1)
    how = "CUDA allocator peak" if gb.bb.device.type == "cuda" else "sampled RSS peak, a lower bound"
    print(f"  memory: env state per row {mem['total'] / 2**20:.1f} MiB (KV cache {mem['kv_cache'] / 2**20:.1f} MiB, "
          f"counted); {how}: an episode {_mib(peak)} MiB per row, one oracle call at the empty state "
          f"{_mib(orc_peak)} MiB per state (batch 1, oracle_chunk {gb.core(1).cfg.oracle_chunk})")
    out["mib_per_env_row"] = mem["total"] / 2**20
    if peak is not None:
        out["peak_mib_per_env_row"] = peak / 2**20
    if orc_peak is not None:
        out["peak_mib_per_oracle_state"] = orc_peak / 2**20
    print(f"  ({time.perf_counter() - t_start:.0f} s)")
    return out
