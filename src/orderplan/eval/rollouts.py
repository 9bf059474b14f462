"""Rollouts behind `scripts/evaluate.py`: teacher-forced metrics of a policy's block order on held-out
images, and generation-mode samples for FID.

Teacher-forced (ground truth known): the policy plays each image once (`order_of`), then its block
order is replayed one block per step under every reward (`replay_order`), which gives on one scale
for every policy (plain or router):
* returns[reward]   discounted return (gamma per block), nats;
* order NLL         -log p(image | order) / (L ln 2), bits per token (the likelihood reward);
* remaining-loss curve  L_rest(S_t) / L after t blocks, t = 0..N, nats per token; its area
                    (trapezoid over the fraction revealed in [0, 1]) is `auc_remaining_loss`.

Generation mode (no ground truth): sample i is conditioned on class `labels[i]` and every policy
gets the same labels and the same sampler seed per batch. A policy that needs ground truth (the
oracle) is played by `FixedOrderPolicy` (orderplan.planner.policies) with the teacher-forced order of a
held-out image of the same class (order transfer), which is the closest the oracle comes to generation.

Every full episode here goes through `orderplan.env.episodes.play_episodes` (per-step recording in its `act`
and `after_step` callables), every discount through `orderplan.env.rewards.discounted_return`, and every
choice of class-balanced images through `balanced_images`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

import time

from orderplan.planner.policies import BlockPolicy, ScheduledDecoder, run_episodes
from orderplan.data.datasets import class_interleaved_order
from orderplan.model.loading import Backbone
from orderplan.model.parallel import generate_parallel, step_sizes
from orderplan.model.sampling import generate
from orderplan.env.core import EnvConfig, OrderPlanningCore
from orderplan.env.episodes import Decision, play_episodes
from orderplan.env.rewards import discounted_return
from orderplan.infra.seeding import derive_seed

PolicyFactory = Callable[[OrderPlanningCore], BlockPolicy]


def index_batches(image_index: torch.Tensor, batch: int):
    """Chunks of exactly `batch` entries of image_index [M] (the last one padded by repeating its last
    entry); yields (chunk [batch], number of real entries)."""
    for i in range(0, len(image_index), batch):
        chunk = image_index[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - n)])
        yield chunk, n


def balanced_images(labels: torch.Tensor, num_images: int | None = None) -> torch.Tensor:
    """The image indices [min(num_images, M)] every policy is scored on: the split's images (labels
    [M]) in class-interleaved order, first `num_images` of them (all when None). The embedded splits
    are sorted by class, so a plain prefix would hold only the first digits; any prefix of this
    order covers every class. The one class-balancing rule of the held-out report and the evaluate
    run."""
    order = class_interleaved_order(torch.as_tensor(labels).cpu())
    return order if num_images is None else order[:num_images]


# -- teacher-forced ------------------------------------------------------------------------------


@torch.no_grad()
def order_of(make: PolicyFactory, core: OrderPlanningCore, image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Play a fresh policy from `make(core)` on images `image_index` [M] of the core's split.
    Returns blocks [M, N] (reveal order) and decisions [M] (< N for router policies)."""
    policy = make(core)
    blocks, decisions = [], []
    for idx, real in index_batches(image_index.cpu(), core.B):
        out = run_episodes(policy, core, idx.to(core.device))
        blocks.append(out["blocks"][:real].cpu())
        decisions.append(out["decisions"][:real].cpu())
    return torch.cat(blocks), torch.cat(decisions)


@dataclass
class Replay:
    """One block order replayed on ground truth (M images, N blocks)."""

    rewards: torch.Tensor  # [M, N] reward of each block, nats
    remaining: torch.Tensor  # [M, N + 1] L_rest(S_t) / L, nats per token, t = blocks revealed


@torch.no_grad()
def replay_order(backbone: Backbone, codes: torch.Tensor, labels: torch.Tensor, env: EnvConfig,
                 blocks: torch.Tensor, batch_size: int, image_index: torch.Tensor | None = None) -> Replay:
    """Replay the block orders `blocks` [M, N] on images `image_index` [M] (default 0..M-1) of
    (codes [M', L], labels [M']) one block per step under `env.reward` (teacher-forced, no router, no
    decision cost)."""
    cfg = replace(env, mode="teacher_forced", budget=None, decision_cost=0.0)
    core = OrderPlanningCore(backbone, codes, labels, cfg, batch_size, seed=0)
    M = blocks.shape[0]
    image_index = torch.arange(M) if image_index is None else image_index.cpu()
    rewards, remaining = [], []
    for idx, real in index_batches(torch.arange(M), batch_size):
        order = blocks[idx].to(core.device)  # [B, N]
        rest: list[torch.Tensor] = []  # L_rest(S_t) before each decision (token_loss is 0 on revealed tokens)
        r: list[torch.Tensor] = []

        def act(obs: dict[str, torch.Tensor], order: torch.Tensor = order, rest: list = rest) -> torch.Tensor:
            rest.append(core.token_loss.sum(-1))
            # one block per step, so `step` (blocks revealed) is the index into the order
            return order.gather(1, obs["step"].to(core.device)[:, None])[:, 0]

        play_episodes(core, image_index[idx].to(core.device), act, lambda d, r=r: r.append(d.reward))
        rest.append(core.token_loss.sum(-1))  # after the last block: 0
        rewards.append(torch.stack(r, 1)[:real].double().cpu())
        remaining.append((torch.stack(rest, 1)[:real] / core.L).double().cpu())
    return Replay(torch.cat(rewards), torch.cat(remaining))


def auc(remaining: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under remaining [M, N + 1] over the fraction revealed in [0, 1] -> [M]."""
    n = remaining.shape[1] - 1
    return (remaining[:, :-1] + remaining[:, 1:]).sum(1) / (2 * n)


@torch.no_grad()
def teacher_forced_metrics(blocks: torch.Tensor, backbone: Backbone, codes: torch.Tensor, labels: torch.Tensor,
                           env: EnvConfig, rewards: Sequence[str], gamma: float, batch_size: int,
                           image_index: torch.Tensor | None = None) -> dict:
    """Every per-order metric of the module docstring, averaged over the images of `blocks` [M, N]
    (image `image_index[i]` of (codes, labels) follows blocks[i]; default 0..M-1).
    Returns {"returns": {reward: mean}, "order_nll_bits", "auc_remaining_loss",
    "remaining_curve": [N + 1] list} (plus the per-image tensors under "_per_image")."""
    out: dict = {"returns": {}}
    per_image: dict[str, torch.Tensor] = {}
    kinds = list(dict.fromkeys([*rewards, "likelihood"]))
    curve = None
    for kind in kinds:
        rep = replay_order(backbone, codes, labels, replace(env, reward=kind), blocks, batch_size, image_index)
        if kind in rewards:
            per_image[f"return_{kind}"] = discounted_return(rep.rewards, gamma)
            out["returns"][kind] = float(per_image[f"return_{kind}"].mean())
        if kind == "likelihood":
            L = codes.shape[1]
            per_image["order_nll_bits"] = -rep.rewards.sum(1) / (L * math.log(2))
            out["order_nll_bits"] = float(per_image["order_nll_bits"].mean())
        if curve is None:  # the remaining-loss curve does not depend on the reward
            curve = rep.remaining
    per_image["auc_remaining_loss"] = auc(curve)
    out["auc_remaining_loss"] = float(per_image["auc_remaining_loss"].mean())
    out["remaining_curve"] = curve.mean(0).tolist()
    out["_per_image"] = per_image
    return out


# -- generation mode -----------------------------------------------------------------------------


@dataclass
class Samples:
    """Generation-mode rollouts of one policy (S samples)."""

    images: torch.Tensor  # [S, C, H, W] float in [-1, 1] (CPU)
    tokens: torch.Tensor  # [S, L] long
    labels: torch.Tensor  # [S] conditioning classes
    blocks: torch.Tensor  # [S, N] reveal order
    decisions: torch.Tensor  # [S]
    entropy_return: torch.Tensor | None  # [S] undiscounted entropy-drop return, nats (None: not measured)
    snapshots: torch.Tensor  # [R, Q, C, H, W]: the first R samples after each fraction in `fractions`
    snapshot_masks: torch.Tensor  # [R, Q, N] bool: blocks revealed at each snapshot
    fractions: tuple[float, ...]
    path: str = "env"  # env (the policy stepped the env) | decode (a planned order decoded in one KV pass) | parallel
    forwards: torch.Tensor | None = None  # [S] sequential backbone forwards per sample (float)
    seconds: float = 0.0  # wall seconds of generation (decoding to images included; no features)


def _generation_core(backbone: Backbone, labels: torch.Tensor, env: EnvConfig, batch_size: int, seed: int,
                     query: str) -> OrderPlanningCore:
    cfg = replace(env, mode="generate", reward="entropy", decision_cost=0.0, query=query)
    S, L = len(labels), backbone.gpt.cfg.num_tokens
    return OrderPlanningCore(backbone, torch.zeros(S, L, dtype=torch.long), labels.long(), cfg, batch_size, seed=seed)


POLICY_SEED_OFFSET = 3  # a generation batch seeded s reseeds its policy with s + 3 (the core uses s + 0..2)


@torch.no_grad()
def generate_samples(make: PolicyFactory, backbone: Backbone, labels: torch.Tensor, env: EnvConfig, batch_size: int,
                     seed: int, num_snapshots: int = 8, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                     progress_bar: Callable | None = None, rewards: bool = False, fast: bool = True,
                     first_index: int = 0, draw: int = 0) -> Samples:
    """Generate one image per entry of `labels` [S] with a fresh policy from `make(core)`. Batch j
    reseeds the sampler (and the policy's own generator, `BlockPolicy.reseed`) with seed + j, so the
    samples depend only on (seed, batch_size, labels, policy) and every policy sees the same label
    and sampler stream per sample index.
    `first_index` (a multiple of batch_size) continues a longer set: labels are its samples
    first_index.. and batch j is seeded as that set's batch first_index / batch_size + j, so a set
    generated in chunks is the set generated at once (sampler streams and position-noise keys).
    `draw` > 0 redraws the policy's own random choices (its stream seeded derive_seed(s + 3, "draw",
    draw) instead of s + 3) and keeps everything else: the same labels, sampler stream and, with
    sampling.noise=position, the same noise per token, so draws of a stochastic policy differ only by
    their orders (orderplan.eval.headroom); draw 0 is the evaluation table's stream.

    Cost: a policy whose whole order is known before the episode (`planned_orders`: fixed orders,
    random, replayed oracle orders) is decoded in one KV-cached pass per batch
    (`orderplan.model.sampling.generate`, the same sampler calls as stepping the env), when `fast`. Otherwise
    the policy steps the env; the env's per-step query over every unseen token runs only when something
    reads it: `rewards` (the entropy-drop return), belief features (env.beliefs) or a policy that ranks
    token entropies (`needs_query`); else env.query=pending. `entropy_return` is None unless `rewards`."""
    query = "full" if rewards or env.beliefs or env.parallel else "pending"
    core = _generation_core(backbone, labels, env, batch_size, seed, query)
    policy = make(core)
    if query == "pending" and getattr(policy, "needs_query", False):
        core = _generation_core(backbone, labels, env, batch_size, seed, "full")
        policy = make(core)
    S = len(labels)
    thresholds = [math.ceil(f * core.N) for f in fractions]
    images, tokens, blocks, decisions, ent = [], [], [], [], []
    snaps = torch.zeros(min(num_snapshots, S), len(fractions), *core.image_shape())
    snap_masks = torch.zeros(min(num_snapshots, S), len(fractions), core.N, dtype=torch.bool)
    if first_index % batch_size:
        raise ValueError(f"first_index ({first_index}) must be a multiple of batch_size ({batch_size})")
    batches = list(index_batches(torch.arange(S), batch_size))
    path = "env"
    forwards = []
    t0 = time.perf_counter()
    for j, (idx, real) in enumerate(progress_bar(batches) if progress_bar else batches):
        batch_seed = seed + first_index // batch_size + j
        core.seed(batch_seed)
        policy_seed = batch_seed + POLICY_SEED_OFFSET
        policy.reseed(policy_seed if draw == 0 else derive_seed(policy_seed, "draw", draw))
        policy.set_real_rows(real)  # the padding rows of a last, partial batch are never read
        scheduled = isinstance(policy, ScheduledDecoder)
        orders = policy.planned_orders(idx.to(core.device)) if fast and not rewards and not scheduled else None
        if scheduled:
            path = "parallel"
            x, order, count, total, passes = _decode_parallel(core, labels[idx].to(core.device), policy)
            _snapshots_from_orders(core, x, order, idx, real, thresholds, snaps, snap_masks)
        elif orders is not None:
            path = "decode"
            x, order, count, total = _decode_planned(core, labels[idx].to(core.device), orders.to(core.device))
            _snapshots_from_orders(core, x, order, idx, real, thresholds, snaps, snap_masks)
            passes = torch.full((core.B,), float(core.L))  # one advance per token
        else:
            x, order, count, total = _play_generation(core, policy, idx, real, thresholds, snaps, snap_masks)
            passes = core.forward_passes.double().cpu()
        images.append(_decode(core, x)[:real].cpu())
        tokens.append(x[:real].cpu())
        blocks.append(order[:real].cpu())
        decisions.append(count[:real])
        ent.append(total[:real])
        forwards.append(passes[:real])
    return Samples(torch.cat(images), torch.cat(tokens), labels.long().cpu(), torch.cat(blocks), torch.cat(decisions),
                   torch.cat(ent) if rewards else None, snaps, snap_masks, tuple(fractions), path,
                   torch.cat(forwards).double(), time.perf_counter() - t0)


def _play_generation(core: OrderPlanningCore, policy: BlockPolicy, idx: torch.Tensor, real: int,
                     thresholds: list[int], snaps: torch.Tensor, snap_masks: torch.Tensor):
    """Step the env with the policy on one batch; returns grids [B, L], orders [B, N], decisions [B]
    and the entropy-drop return [B] (nats; nan under env.query=pending)."""
    total = torch.zeros(core.B, dtype=torch.float64)
    count = torch.zeros(core.B, dtype=torch.long)
    taken = torch.zeros(core.B, len(thresholds), dtype=torch.bool)

    def record(d: Decision) -> None:
        total.add_(d.reward.double().cpu())
        count.add_(d.active.long().cpu())
        _take_snapshots(core, idx, real, thresholds, taken, snaps, snap_masks)

    play_episodes(core, idx.to(core.device), policy.act, record)
    return core.x.clone(), core.history.clone(), count, total


def _decode_planned(core: OrderPlanningCore, labels: torch.Tensor, orders: torch.Tensor):
    """KV-cached decoding of block orders [B, N] (tokens in in-block raster order, as the env reveals
    them) with the core's sampler stream (or its rows' noise keys); returns grids [B, L], orders, decisions [B] (= N) and a nan
    return (no query ran)."""
    token_order = core.block_tokens[orders].flatten(1)  # [B, L]
    x = generate(core.gpt, labels, token_order, core.sc, core.sample_generator, core.row_key)
    n = torch.full((core.B,), core.N, dtype=torch.long)
    return x, orders, n, torch.full((core.B,), float("nan"), dtype=torch.float64)


def _decode_parallel(core: OrderPlanningCore, labels: torch.Tensor, policy: ScheduledDecoder):
    """Parallel decoding of a fixed schedule with the core's sampler stream (or its rows' noise keys);
    returns grids [B, L], block orders [B, N] (blocks by the step that sampled their first token, ties
    by raster id), decisions [B] (= S), a nan return and forwards [B] (= S)."""
    sched = policy.schedule
    order = sched.token_orders(core.B, core.geom, policy.generator)
    out = generate_parallel(core.gpt, labels, step_sizes(core.L, sched.steps, sched.kind), sched.rule,
                            None if order is None else order.to(core.device), core.sc, core.sample_generator,
                            core.row_key, core.geom)
    first = torch.full((core.B, core.N), core.L, dtype=torch.long, device=core.device)
    first = first.scatter_reduce(1, core.token_block.expand(core.B, -1), out.step_of, "amin")
    blocks = (first * core.N + torch.arange(core.N, device=core.device)).argsort(-1)
    n = torch.full((core.B,), sched.steps, dtype=torch.long)
    return (out.tokens, blocks, n, torch.full((core.B,), float("nan"), dtype=torch.float64),
            torch.full((core.B,), float(out.forwards)))


def _decode(core: OrderPlanningCore, x: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] of grids x [B, L] (zeros without a VQ)."""
    if core.bb.vq is None:
        return torch.zeros(x.shape[0], *core.image_shape())
    return core.bb.vq.decode_codes(x.view(-1, core.gpt.cfg.grid_h, core.gpt.cfg.grid_w)).float()


def _snapshots_from_orders(core: OrderPlanningCore, x: torch.Tensor, orders: torch.Tensor, idx: torch.Tensor,
                           real: int, thresholds: list[int], snaps: torch.Tensor, masks: torch.Tensor) -> None:
    """The snapshots `_take_snapshots` records while stepping, rebuilt from finished grids x [B, L] and
    their orders [B, N]: after th blocks, unrevealed tokens decode from code 0."""
    rows = torch.nonzero((idx < snaps.shape[0]) & (torch.arange(core.B) < real)).flatten()
    if len(rows) == 0:
        return
    for q, th in enumerate(thresholds):
        shown = torch.zeros(len(rows), core.N, dtype=torch.bool, device=core.device)
        shown.scatter_(1, orders[rows.to(core.device), :th], True)
        grid = torch.where(shown[:, core.token_block], x[rows.to(core.device)], 0)
        decoded = _decode(core, grid).cpu()
        for i, b in enumerate(rows.tolist()):
            snaps[idx[b], q] = decoded[i]
            masks[idx[b], q] = shown[i].cpu()


def _take_snapshots(core: OrderPlanningCore, idx: torch.Tensor, real: int, thresholds: list[int],
                    taken: torch.Tensor, snaps: torch.Tensor, masks: torch.Tensor) -> None:
    """Decode the grids of samples idx < R (R = len(snaps)) the first time they reach each threshold
    (number of blocks revealed); unrevealed tokens decode from code 0 and are greyed out when plotted."""
    rows = (idx < snaps.shape[0]) & (torch.arange(core.B) < real)
    steps = core.steps.cpu()
    for q, th in enumerate(thresholds):
        new = rows & (steps >= th) & ~taken[:, q]
        if not bool(new.any()):
            continue
        decoded = core.decode_images(new.to(core.device)).cpu()
        for b in torch.nonzero(new).flatten().tolist():
            snaps[idx[b], q] = decoded[b]
            masks[idx[b], q] = core.revealed[b].cpu()
        taken[:, q] |= new
