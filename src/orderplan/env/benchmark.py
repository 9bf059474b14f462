"""Env benchmarks (`scripts/bench_env.py`), all timed in one process with `time.perf_counter`
(best of a few repeats) so ratios are fair:

* throughput of the TorchRL env under a random valid policy, full episodes, at several batch sizes
  (batched env steps/s, transitions/s = rows x steps/s, episodes/s = images/s in teacher-forced mode);
* env overhead: the env's time per step over the bare backbone work of the same step, i.e. the
  `gpt.append` of the chosen block plus the `gpt.query` over the unseen tokens (+ one summary row)
  timed directly on the GPT with the same tensors (target <= 1.2);
* oracle speedup: the batched oracle utilities (`OrderPlanningCore.oracle_utilities`, one pass per
  state sharing the prefix cache) over the naive cache-free reference (`naive_oracle_utilities`),
  summed over every state of whole episodes (target >= 5);
* optionally the oracle speedup at GPT-B geometry (16x16 tokens, 4x4 blocks, random weights) on a
  few candidate blocks of one late-episode state (the naive reference is minutes long earlier on).

The tiny default is `make_core("tiny_mnist")` (needs `artifacts/tiny_mnist/{gpt,vq}.safetensors`);
without the artifacts a random GPT of the same preset and geometry over random codes stands in
(timings depend on shapes, not on weights) and the output says so."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torchrl.envs.utils import step_mdp

from orderplan.model.benchmark import best_time, sync
from orderplan.model.blocks import BlockGeometry
from orderplan.config.common import BackboneConfig
from orderplan.infra.paths import PACKAGE_ROOT
from orderplan.oracle.future_loss import naive_oracle_utilities
from orderplan.model.gpt import GPT, gpt_config
from orderplan.model.loading import Backbone, freeze, randomize_gpt
from orderplan.env.core import EnvConfig, OrderPlanningCore
from orderplan.env.torchrl_env import OrderPlanningEnv

TINY_ARTIFACTS = ("artifacts/tiny_mnist/gpt.safetensors", "artifacts/tiny_mnist/vq.safetensors")


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """A backbone and an image pool to build cores of any batch size from."""

    bb: Backbone
    codes: torch.Tensor
    labels: torch.Tensor
    note: str

    def core(self, batch_size: int, seed: int = 0, **env_fields) -> OrderPlanningCore:
        return OrderPlanningCore(self.bb, self.codes, self.labels, EnvConfig(**env_fields), batch_size, seed=seed)


def _randomize(gpt: GPT, seed: int) -> GPT:
    """Non-degenerate random weights (LlamaGen zero-initialises the output layer and ta table), frozen:
    the weights of `backbone.random_weights=seed` (`randomize_gpt`)."""
    return freeze(randomize_gpt(gpt, seed))


def random_stack(preset: str, block: int, device: str, n_images: int = 512, seed: int = 0,
                 **gpt_overrides) -> Stack:
    cfg = gpt_config(preset, **gpt_overrides)
    gpt = _randomize(GPT(cfg), seed).to(device)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.vocab_size, (n_images, cfg.num_tokens), generator=g)
    labels = torch.arange(n_images) % cfg.num_classes
    bb = Backbone(cfg=BackboneConfig(), gpt=gpt, geometry=BlockGeometry(cfg.grid_h, cfg.grid_w, block), vq=None)
    return Stack(bb, codes, labels, f"random-weight {preset} (n_layer={cfg.n_layer}, dim={cfg.dim}, "
                                    f"L={cfg.num_tokens}, N={bb.geometry.num_blocks}) over random codes")


def tiny_default_stack(device: str = "cpu", seed: int = 0) -> Stack:
    """The embedded tiny default (make_core("tiny_mnist")), or a random stand-in of the same shape."""
    missing = [p for p in TINY_ARTIFACTS if not (PACKAGE_ROOT / p).exists()]
    if not missing:
        from orderplan.env.factory import make_core

        core = make_core("tiny_mnist", batch_size=1, device=device, seed=seed)
        return Stack(core.bb, core.codes, core.labels, "tiny default (make_core('tiny_mnist'), trained artifacts)")
    stack = random_stack("tiny", 2, device, seed=seed)
    stack.note = (f"FALLBACK: {', '.join(missing)} missing -> {stack.note} "
                  f"(the tiny default's preset and geometry; timings depend on shapes only)")
    return stack


def _random_orders(core: OrderPlanningCore, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(core.B, core.N, generator=g).argsort(-1).to(core.device)


# ----------------------------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    batch: int
    episode_s: float  # best wall time of one full batched episode (reset + N steps)
    num_blocks: int

    @property
    def env_steps_per_s(self) -> float:  # batched env.step calls per second
        return self.num_blocks / self.episode_s

    @property
    def transitions_per_s(self) -> float:  # rows x steps per second
        return self.batch * self.num_blocks / self.episode_s

    @property
    def episodes_per_s(self) -> float:  # = images/s in teacher-forced mode (one image per episode)
        return self.batch / self.episode_s


@torch.no_grad()
def env_throughput(stack: Stack, batch: int, repeats: int = 3, seed: int = 0, **env_fields) -> Throughput:
    """Full episodes of the TorchRL env under its random valid policy (`env.rand_action`)."""
    env = OrderPlanningEnv(stack.core(batch, seed=seed, **env_fields))
    dev = env.core.device

    def episode() -> float:
        t0 = time.perf_counter()
        td = env.reset()
        while True:
            td = env.step(env.rand_action(td))
            if bool(td["next", "done"].all()):
                break
            td = step_mdp(td)
        sync(dev)
        return time.perf_counter() - t0

    episode()  # warm-up
    return Throughput(batch, min(episode() for _ in range(repeats)), env.core.N)


# ----------------------------------------------------------------------------------------------
# Env overhead over the bare backbone work
# ----------------------------------------------------------------------------------------------


@dataclass
class Overhead:
    batch: int
    env_s: float  # TorchRL env: env.step + step_mdp, per episode (N steps)
    core_s: float  # the core alone: core.step + core.observation(), per episode
    bare_s: float  # gpt.append + gpt.query of the same steps, per episode

    @property
    def env_ratio(self) -> float:
        return self.env_s / self.bare_s

    @property
    def core_ratio(self) -> float:
        return self.core_s / self.bare_s


def _bare_inputs(core: OrderPlanningCore, orders: torch.Tensor):
    """Per step: the block's tokens/positions [B, T] and the query targets [B, Q + 1] (unseen
    positions ascending, -1 padded, plus the target-free summary row), as the core builds them."""
    L, dev = core.L, core.device
    revealed = torch.zeros(core.B, core.N, dtype=torch.bool, device=dev)
    steps = []
    for t in range(core.N):
        blk = orders[:, t]
        pos = core.block_tokens[blk]
        revealed[torch.arange(core.B, device=dev), blk] = True
        unseen = ~revealed[:, core.token_block]
        Q = int(unseen.sum(-1).max())
        key = torch.where(unseen, torch.arange(L, device=dev), L).sort(-1).values[:, :Q]
        targets = torch.cat([torch.where(key < L, key, -1), torch.full((core.B, 1), -1, device=dev)], 1)
        steps.append((core.x.gather(1, pos), pos, targets))
    return steps


@torch.no_grad()
def env_overhead(stack: Stack, batch: int = 16, repeats: int = 3, seed: int = 0) -> Overhead:
    """Same images, same block orders for the three timings; each is the best of `repeats` episodes
    of N steps (resets and input preparation are outside the timed region)."""
    env = OrderPlanningEnv(stack.core(batch, seed=seed))
    core, dev = env.core, env.core.device
    orders = _random_orders(core, seed)
    images = torch.randint(stack.codes.shape[0], (batch,), generator=torch.Generator().manual_seed(seed))

    def env_episode() -> float:
        from tensordict import TensorDict

        td = env.reset(TensorDict({"image_index": images.to(dev)}, batch_size=[batch], device=dev))
        sync(dev)
        t0 = time.perf_counter()
        for t in range(core.N):
            td.set("action", orders[:, t])
            td = step_mdp(env.step(td))
        sync(dev)
        return time.perf_counter() - t0

    def core_episode() -> float:
        core.reset(image_index=images)
        sync(dev)
        t0 = time.perf_counter()
        for t in range(core.N):
            core.step(orders[:, t])
            core.observation()
        sync(dev)
        return time.perf_counter() - t0

    core.reset(image_index=images)
    inputs = _bare_inputs(core, orders)
    gpt = core.gpt

    def bare_episode() -> float:
        state = gpt.init_state(core.label)
        sync(dev)
        t0 = time.perf_counter()
        for tok, pos, targets in inputs:
            gpt.append(state, tok, pos, validate=False)  # the env checks nothing inside a step either
            gpt.query(state, targets, validate=False)
        sync(dev)
        return time.perf_counter() - t0

    for fn in (env_episode, core_episode, bare_episode):  # warm-up
        fn()
    # interleave the repeats so a noisy neighbour hurts all three alike
    times = {"env": [], "core": [], "bare": []}
    for _ in range(repeats):
        times["env"].append(env_episode())
        times["core"].append(core_episode())
        times["bare"].append(bare_episode())
    return Overhead(batch, min(times["env"]), min(times["core"]), min(times["bare"]))


def profile_env_step(stack: Stack, batch: int = 16, seed: int = 0, top: int = 15) -> str:
    """cProfile of env.step over a few episodes: the hot spots by own time (tottime)."""
    import cProfile
    import io
    import pstats

    env = OrderPlanningEnv(stack.core(batch, seed=seed))
    orders = _random_orders(env.core, seed)
    prof = cProfile.Profile()
    with torch.no_grad():
        for _ in range(3):
            td = env.reset()
            prof.enable()
            for t in range(env.core.N):
                td.set("action", orders[:, t])
                td = step_mdp(env.step(td))
            prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Oracle: batched vs naive
# ----------------------------------------------------------------------------------------------


@dataclass
class OracleTimes:
    batch: int
    states: int
    batched_s: float
    naive_s: float
    max_abs_diff: float

    @property
    def speedup(self) -> float:
        return self.naive_s / self.batched_s


def _prefix(core: OrderPlanningCore) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] revealed tokens in reveal order and their positions, -1 padded (naive reference input)."""
    P = max(int(core.steps.max()) * core.T, 1)
    tok = torch.zeros(core.B, P, dtype=torch.long, device=core.device)
    pos = torch.full((core.B, P), -1, dtype=torch.long, device=core.device)
    for b in range(core.B):
        blocks = core.history[b, : int(core.steps[b])]
        p = core.block_tokens[blocks].reshape(-1)
        tok[b, : p.numel()], pos[b, : p.numel()] = core.x[b, p], p
    return tok, pos


@torch.no_grad()
def oracle_speedup(core: OrderPlanningCore, kind: str = "future_loss", repeats: int = 3, naive_repeats: int = 1,
                   seed: int = 0, states: list[int] | None = None, candidates: int | None = None) -> OracleTimes:
    """Batched vs naive oracle utilities at the states S_0 .. S_{N-1} of one random-order episode
    (or only at the step indices `states`), each timing the best of its repeats, summed over states.
    `candidates`: restrict both to the first that many unrevealed blocks of each row."""
    core.reset()
    orders = _random_orders(core, seed)
    todo = set(range(core.N) if states is None else states)
    batched_s = naive_s = diff = 0.0
    for t in range(core.N):
        if t in todo:
            cand = None
            if candidates is not None:
                ranked = torch.where(core.revealed, core.N, torch.arange(core.N, device=core.device)).sort(-1).values
                cand = torch.where(ranked[:, :candidates] < core.N, ranked[:, :candidates], -1)
            tb, fast = best_time(lambda: core.oracle_utilities(kind, candidates=cand), repeats, core.device)
            tok, pos = _prefix(core)
            tn, ref = best_time(lambda: naive_oracle_utilities(core.gpt, core.label, tok, pos, core.x, core.geom,
                                                           kind=kind, weight=core.cfg.weight, candidates=cand),
                            naive_repeats, core.device)
            finite = torch.isfinite(ref)
            diff = max(diff, float((fast[finite] - ref[finite]).abs().max()) if bool(finite.any()) else 0.0)
            batched_s, naive_s = batched_s + tb, naive_s + tn
        if max(todo) <= t:
            break
        core.step(orders[:, t])
    return OracleTimes(core.B, len(todo), batched_s, naive_s, diff)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options of the tiny section and of the GPT-B oracle timing (`--gpt-b-*`); the script
    adds the agents' GPT-B options to it."""
    ap = argparse.ArgumentParser(description="Env throughput, env overhead over the bare backbone, oracle speedup.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,4,16,64", help="batch sizes of the throughput table")
    ap.add_argument("--batch", type=int, default=16, help="batch of the overhead and oracle ratios")
    ap.add_argument("--overhead-batches", default="1,16", help="batch sizes of the overhead table")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-repeats", type=int, default=1, help="repeats of the (slow) naive oracle reference")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="profile env.step when the overhead ratio exceeds 1.2 (auto)")
    ap.add_argument("--gpt-b", action="store_true", help="also the oracle speedup at GPT-B geometry (random weights)")
    ap.add_argument("--gpt-b-layers", type=int, default=12)
    ap.add_argument("--gpt-b-candidates", type=int, default=2,
                    help="candidate blocks timed (the naive cost grows with them)")
    ap.add_argument("--gpt-b-revealed", type=int, default=14,
                    help="blocks revealed at the timed state (of 16); earlier states take the naive reference minutes")
    ap.add_argument("--gpt-b-only", action="store_true", help="skip the tiny section")
    return ap


def run(args: argparse.Namespace) -> dict[str, float]:
    """The tiny section (throughput, overhead, oracle); returns its ratio lines' values."""
    torch.manual_seed(0)

    t_start = time.perf_counter()
    stack = tiny_default_stack(args.device)
    print(f"backbone: {stack.note}")
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"repeats={args.repeats} naive_repeats={args.naive_repeats}")
    geom = stack.bb.geometry
    print(f"L={geom.num_tokens} tokens, N={geom.num_blocks} blocks of T={geom.tokens_per_block}, "
          f"GPT params={stack.bb.gpt.num_params() / 1e6:.2f}M")

    print("\n[throughput] TorchRL env, random valid policy, full episodes (reset + N steps)")
    print(f"{'batch':>6} {'episode_ms':>11} {'env_steps/s':>12} {'transitions/s':>14} {'episodes/s':>11} "
          f"{'images/s':>9}")
    for b in (int(x) for x in args.batches.split(",")):
        r = env_throughput(stack, b, args.repeats)
        print(f"{b:>6} {1e3 * r.episode_s:>11.1f} {r.env_steps_per_s:>12.1f} {r.transitions_per_s:>14.1f} "
              f"{r.episodes_per_s:>11.2f} {r.episodes_per_s:>9.2f}")

    N = geom.num_blocks
    print("\n[overhead] per step, same images and block orders: TorchRL env (env.step + step_mdp), core "
          f"(core.step + observation), bare backbone (gpt.append of the block + gpt.query of the unseen tokens)")
    ov = None
    for b in sorted({*(int(x) for x in args.overhead_batches.split(",")), args.batch}):
        o = env_overhead(stack, b, args.repeats)
        print(f"  batch {b:>3}: env {1e3 * o.env_s / N:8.3f} ms  core {1e3 * o.core_s / N:8.3f} ms  "
              f"bare {1e3 * o.bare_s / N:8.3f} ms   env/bare = {o.env_ratio:.3f}  core/bare = {o.core_ratio:.3f}")
        if b == args.batch:
            ov = o
        if args.profile == "always" or (args.profile == "auto" and o.env_ratio > 1.2):
            print(f"\n[profile] batch {b}: env.step hot spots (cProfile, 3 episodes, by own time):")
            print(profile_env_step(stack, b))
    print(f"  (target at batch {args.batch}: env/bare <= 1.2)")

    core = stack.core(args.batch)
    orc = oracle_speedup(core, repeats=args.repeats, naive_repeats=args.naive_repeats)
    print(f"\n[oracle] batch {args.batch}, future_loss utilities at all {orc.states} states of an episode: "
          f"batched {orc.batched_s:.3f} s, naive {orc.naive_s:.3f} s, speedup {orc.speedup:.1f}x "
          f"(target >= 5), max |batched - naive| = {orc.max_abs_diff:.2e} nats")

    print(f"\n(tiny section {time.perf_counter() - t_start:.0f} s)")
    return {"env_overhead": ov.env_ratio, "oracle_speedup": orc.speedup}
