"""Parallel decoding: S forward passes per image instead of one per token.

A decision samples m tokens at once from ONE forward (`GPT.decode_step`): the forward commits the
previous decision's tokens to the KV cache and, in the same pass, predicts every target of this
decision (p(x_j | x_S) for each chosen j, the target-aware query rows). The m tokens are drawn
independently from those conditionals with LlamaGen's sampler (CFG, temperature, top-k, top-p, and
either noise of `orderplan.model.sampling`). So an image costs S forwards, whatever the sizes m_s.

A schedule is the sizes m_1..m_S (sum L) and a rule for the token order, which is blocks in some
order with the tokens of a block in raster order, as the env reveals them (the backbone is trained
on such orders: a token-level raster or random order is out of its distribution; the two
TOKEN_ORDERS, which are not whole blocks, exist only to measure that). Step s samples the next m_s
tokens of that order, so with S = N one block per forward, with S < N several
blocks, with S > N part of a block. Rules:

* `order`: a block order fixed in advance (raster, random, halton), given as its token order [B, L].
  Targets are known before the forward, so it queries only them.
* `confident`: whenever the step needs tokens of blocks not yet chosen, it chooses the blocks of
  lowest mean predictive entropy H_j(S) over their tokens (nats, the conditional model's, as the env's
  confident_first), most confident first. Such a step's forward queries every unseen token to rank
  the blocks (the same single forward, wider: the last sampled token stays pending and carries each
  unseen target, as the env's query does); a step inside already chosen blocks queries only them.
  With S = L this is the env's confident_first, sample for sample (tests/eval/test_eval_run.py).
* `spread_confident`: confident, but the blocks chosen together are spread (LPD's lesson: tokens
  sampled together should not be neighbours, since each is drawn without seeing the others).
  Greedily, one block at a time: the unchosen block of lowest mean entropy among those at
  Chebyshev distance >= 2 on the block grid (not 8-adjacent) from every block chosen in this step;
  when no such block is left, the lowest-entropy remaining one.

With m_s = 1 for every step and rule `order`, this is `generate` bit for bit (`decode_step` with one
target is `advance`).

Shapes: B images, L tokens, N blocks of T tokens, V codes, S steps, m_s tokens at step s."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.model.gpt import GPT
from orderplan.model.orders import block_order
from orderplan.model.sampling import SamplingConfig, _with_null, guided, sample_logits

RULES = ("order", "confident", "spread_confident")
SCHEDULES = ("equal", "cosine")


def step_sizes(L: int, steps: int, kind: str = "equal") -> list[int]:
    """Tokens revealed at each of `steps` decisions, summing to L, each >= 1.

    equal: L / steps each (the first L % steps steps take one more). cosine: MaskGIT's schedule, the
    tokens still hidden after step s are floor(L * cos(pi / 2 * s / steps)), so early steps reveal
    few tokens and late ones many; clipped so that every step reveals at least one."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= L:
        raise ValueError(f"steps must be an integer in [1, L={L}], got {steps!r}")
    if kind == "equal":
        q, r = divmod(L, steps)
        return [q + (1 if s < r else 0) for s in range(steps)]
    if kind != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    hidden = [L]
    for s in range(1, steps + 1):
        h = math.floor(L * math.cos(math.pi / 2 * s / steps) + 1e-9)
        # at least one token per step, and enough hidden to give the remaining steps one each
        hidden.append(max(min(h, hidden[-1] - 1), steps - s))
    hidden[-1] = 0
    return [a - b for a, b in zip(hidden, hidden[1:])]


def chebyshev_near(cells: torch.Tensor, grid_w: int) -> torch.Tensor:
    """[..., P, P] bool: grid cells (row-major ids [..., P] on a grid grid_w wide) at Chebyshev
    distance <= 1 (8-adjacent or equal)."""
    r, c = cells // grid_w, cells % grid_w
    return ((r[..., :, None] - r[..., None, :]).abs() <= 1) & ((c[..., :, None] - c[..., None, :]).abs() <= 1)


def spread_pick(entropy: torch.Tensor, candidates: torch.Tensor, m: int, grid_w: int) -> torch.Tensor:
    """The `spread_confident` choice (module doc): indices [B, m] into candidates [B, U] (cell ids on
    a grid grid_w wide) given their entropies [B, U] (inf: not available). Ties go to the lower index."""
    B, U = entropy.shape
    near = chebyshev_near(candidates, grid_w)  # [B, U, U]
    taken = torch.zeros(B, U, dtype=torch.bool, device=entropy.device)
    blocked = torch.zeros_like(taken)
    picks = []
    rows = torch.arange(B, device=entropy.device)
    inf = torch.tensor(float("inf"), device=entropy.device)
    for _ in range(m):
        far = torch.where(taken | blocked, inf, entropy)
        any_far = torch.isfinite(far).any(-1, keepdim=True)
        score = torch.where(any_far, far, torch.where(taken, inf, entropy))
        i = score.argmin(-1)  # argmin returns the first minimum: the lower index on ties
        picks.append(i)
        taken[rows, i] = True
        blocked |= near[rows, i]
    return torch.stack(picks, 1)


def choose_blocks(rule: str, block_entropy: torch.Tensor, n: int, blocks_w: int) -> torch.Tensor:
    """The next n blocks [B, n] of rule confident / spread_confident, in choice order, from the mean
    entropies block_entropy [B, N] (inf on blocks already chosen)."""
    if rule == "confident":
        return block_entropy.argsort(dim=-1, stable=True)[:, :n]
    ids = torch.arange(block_entropy.shape[1], device=block_entropy.device).expand_as(block_entropy)
    return spread_pick(block_entropy, ids, n, blocks_w)


@dataclass
class ParallelSamples:
    """What `generate_parallel` returns."""

    tokens: torch.Tensor  # [B, L] long, raster layout
    order: torch.Tensor  # [B, L] raster positions in the order they entered the cache
    step_of: torch.Tensor  # [B, L] long: the decision (0..S-1) that sampled each raster position
    forwards: int  # backbone forwards run (= S)
    nll: torch.Tensor | None = None  # [B] float64 nats per image, teacher forcing only (`forced`)


@torch.no_grad()
def generate_parallel(model: GPT, cond: torch.Tensor, sizes: Sequence[int], rule: str = "order",
                      order: torch.Tensor | None = None, sc: SamplingConfig | None = None,
                      generator: torch.Generator | None = None, keys: torch.Tensor | None = None,
                      geometry: BlockGeometry | None = None, forced: torch.Tensor | None = None) -> ParallelSamples:
    """Sample images [B, L] of classes cond [B] in len(sizes) forwards; see the module doc.

    sizes: tokens per decision (`step_sizes`), summing to L. Rule `order` needs `order` [B, L] (raster
    positions, each row a permutation; checked once here); the confidence rules need the block
    `geometry`. sc, generator, keys: as in `orderplan.model.sampling.generate` (sc.noise = position
    draws each token's noise from its row key and raster position, so a token's draw does not depend
    on which step sampled it).

    forced [B, L] (raster layout): teacher forcing. Each step takes these tokens instead of sampling
    and adds -log p(x_j | tokens of the earlier steps) of its targets to `nll` [B] (nats, the
    conditional model's own logits: no CFG, temperature or truncation, so sc.cfg_scale must be 1):
    the likelihood of the data under the factorisation this schedule samples from, every step's
    tokens predicted independently of each other. The confidence rules choose their blocks from the
    same entropies as when sampling."""
    sc = SamplingConfig() if sc is None else sc
    L = model.cfg.num_tokens
    B, dev = cond.shape[0], cond.device
    sizes = [int(m) for m in sizes]
    if sum(sizes) != L or min(sizes) < 1:
        raise ValueError(f"step sizes must be >= 1 and sum to L={L}, got {sizes}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if forced is not None:
        if forced.shape != (B, L) or forced.dtype.is_floating_point:
            raise ValueError(f"forced must be integer tokens [B={B}, L={L}], got {tuple(forced.shape)} {forced.dtype}")
        if sc.cfg_scale != 1.0:
            raise ValueError("teacher forcing (forced=...) scores the conditional model: use sc.cfg_scale=1")
        forced = forced.to(dev).long()
        nll = torch.zeros(B, dtype=torch.float64, device=dev)
    if rule == "order":
        if order is None or order.shape != (B, L):
            raise ValueError(f"rule 'order' needs a token order [B={B}, L={L}]")
        if not bool((order.sort(-1).values == torch.arange(L, device=order.device)).all()):
            raise ValueError("every row of order must be a permutation of the L raster positions")
        plan = order.to(dev)
        planned = L
    else:
        if geometry is None or geometry.num_tokens != L:
            raise ValueError(f"rule {rule!r} chooses blocks: it needs the block geometry of the {L}-token grid")
        plan = torch.zeros(B, L, dtype=torch.long, device=dev)
        planned = 0
        block_tokens = geometry.block_tokens.to(dev)  # [N, T]
        chosen = torch.zeros(B, geometry.num_blocks, dtype=torch.bool, device=dev)
    cond2 = _with_null(model, cond, sc)
    rep = cond2.shape[0] // B
    state = model.init_state(cond2)
    rows = torch.arange(B, device=dev)
    out = torch.zeros(B, L, dtype=torch.long, device=dev)
    seen = torch.zeros(B, L, dtype=torch.bool, device=dev)
    step_of = torch.full((B, L), -1, dtype=torch.long, device=dev)
    rest_tok = rest_pos = None
    done = 0
    for s, m in enumerate(sizes):
        choose = planned < done + m  # this step needs blocks not chosen yet: rank them all
        if choose:  # every unseen token, ascending (rows move in lockstep: the same count per row)
            key = torch.where(seen, L, torch.arange(L, device=dev))
            targets = key.sort(-1).values[:, :L - done]
            # the next token is not known yet, so the tail's last token cannot be committed (its target-aware
            # embedding names the next position): it stays pending and queries every unseen token, while
            # the rest of the tail is committed in the same forward
            if rest_tok is None or rest_tok.shape[1] == 0:
                logits, _ = model.query(state, targets.repeat(rep, 1), validate=False)
            else:
                _, _, logits, _ = model.append_query(state, rest_tok, rest_pos, targets.repeat(rep, 1), validate=False)
        else:
            targets = plan[:, done:done + m]
            logits, _ = model.decode_step(state, targets.repeat(rep, 1), rest_tok, rest_pos, validate=False)
        cond_logits = logits[:B]
        logits = guided(logits, sc.cfg_scale) if rep == 2 else logits  # [B, Q, V]
        if choose:
            logp = torch.log_softmax(cond_logits.float(), -1)
            ent = torch.zeros(B, L + 1, device=dev).scatter(1, targets, -(logp.exp() * logp).sum(-1))[:, :L]
            block_ent = geometry.pool_blocks(ent[..., None])[..., 0].masked_fill(chosen, float("inf"))
            n_new = -(-(done + m - planned) // geometry.tokens_per_block)
            new = choose_blocks(rule, block_ent, n_new, geometry.blocks_w)  # [B, n_new]
            chosen[rows[:, None], new] = True
            plan[:, planned:planned + n_new * geometry.tokens_per_block] = block_tokens[new].flatten(1)
            planned += n_new * geometry.tokens_per_block
            # the logits of this step's targets: rank of each target among the ascending unseen positions
            want = plan[:, done:done + m]
            idx = torch.searchsorted(targets.contiguous(), want.contiguous())
            logits = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
            targets = want
        Q = targets.shape[1]
        flat_keys = None if keys is None else keys[:, None].expand(B, Q).reshape(-1)
        if forced is None:
            tok = sample_logits(logits.reshape(B * Q, -1), sc, generator, flat_keys, targets.reshape(-1)).view(B, Q)
        else:
            tok = forced.gather(1, targets)
            nll -= torch.log_softmax(logits.double(), -1).gather(-1, tok[..., None])[..., 0].sum(1)
        out[rows[:, None], targets] = tok
        seen[rows[:, None], targets] = True
        step_of[rows[:, None], targets] = s
        done += m
        if done == L:  # the last decision's tokens never need the cache
            break
        # the tail (sampled, not yet committed) is the pending token and rest_tok; the next forward commits it
        if choose:  # the pending token stayed: this step's tokens all follow it
            rest_tok, rest_pos = tok.repeat(rep, 1), targets.repeat(rep, 1)
        else:
            model.feed(state, tok[:, 0].repeat(rep), targets[:, 0].repeat(rep), validate=False)
            rest_tok, rest_pos = tok[:, 1:].repeat(rep, 1), targets[:, 1:].repeat(rep, 1)
    return ParallelSamples(out, plan, step_of, len(sizes), nll if forced is not None else None)


# -- named schedules (the baselines of the FID-against-steps table) ---------------------------------

SCHEDULE_ORDERS = ("raster", "random", "halton")  # block orders of rule `order`
# token orders that are not whole blocks (rule `order`): outside the orders the backbone was trained on,
# kept to measure what spreading a step's tokens below the block level would give (docs/results.md)
TOKEN_ORDERS = ("token_raster", "lattice")
SCHEDULE_NAMES = (*SCHEDULE_ORDERS, *TOKEN_ORDERS, "confident", "spread_confident")


def token_level_order(name: str, grid_h: int, grid_w: int) -> torch.Tensor:
    """[L] raster positions of a TOKEN_ORDERS order. token_raster: row-major over single tokens.
    lattice: the grid split into the 16 sub-lattices {(r, c): r = r0, c = c0 (mod 4)}, one after the
    other, the offsets (r0, c0) grouped by parity ((r0 % 2, c0 % 2) = (0,0), (0,1), (1,0), (1,1), then
    row-major) so that consecutive sub-lattices interleave; on an 8x8 grid a 16-step schedule samples
    4 tokens 4 apart in each step. Needs grid sides divisible by 4."""
    if name == "token_raster":
        return torch.arange(grid_h * grid_w)
    if name != "lattice":
        raise ValueError(f"unknown token order {name!r}; expected one of {TOKEN_ORDERS}")
    if grid_h % 4 or grid_w % 4:
        raise ValueError(f"the lattice order needs grid sides divisible by 4, got {grid_h}x{grid_w}")
    offsets = sorted(((r, c) for r in range(4) for c in range(4)), key=lambda o: (o[0] % 2, o[1] % 2, o))
    return torch.tensor([r * grid_w + c for r0, c0 in offsets for r in range(r0, grid_h, 4) for c in range(c0, grid_w, 4)])


@dataclass(frozen=True)
class ParallelSchedule:
    """A fixed parallel-decoding schedule, named `<name>@<S>` (equal sizes) or `<name>@<S>c` (cosine):
    S forwards per image. name: raster | random | halton (block orders of `orderplan.model.orders`:
    row-major, a uniform permutation per image, the 2D Halton order) | token_raster | lattice (token
    orders that are not whole blocks, `token_level_order`) | confident | spread_confident (the rules
    of the module doc)."""

    name: str
    steps: int
    kind: str = "equal"

    @property
    def label(self) -> str:
        return f"{self.name}@{self.steps}{'c' if self.kind == 'cosine' else ''}"

    @property
    def rule(self) -> str:
        return "order" if self.name in SCHEDULE_ORDERS + TOKEN_ORDERS else self.name

    @classmethod
    def parse(cls, entry: str) -> "ParallelSchedule | None":
        """`raster@16` -> ParallelSchedule("raster", 16); `confident@8c` -> cosine sizes; None when
        `entry` has no `@` (not a schedule). A bad name or step count raises ValueError."""
        if "@" not in entry:
            return None
        name, _, rest = entry.partition("@")
        kind = "cosine" if rest.endswith("c") else "equal"
        digits = rest[:-1] if kind == "cosine" else rest
        if name not in SCHEDULE_NAMES or not digits.isdigit() or int(digits) < 1:
            raise ValueError(f"schedule {entry!r}: expected <name>@<steps>[c] with name in {SCHEDULE_NAMES}, "
                             f"steps >= 1 (c: cosine sizes), e.g. raster@16 or confident@8c")
        return cls(name, int(digits), kind)

    def token_orders(self, batch: int, geometry: BlockGeometry, generator: torch.Generator | None) -> torch.Tensor | None:
        """[batch, L] token orders of rule `order`: the named block order, tokens of a block in
        raster order, or a TOKEN_ORDERS order (None for the confidence rules, which choose blocks as
        they decode)."""
        if self.rule != "order":
            return None
        if self.name in TOKEN_ORDERS:
            return token_level_order(self.name, geometry.grid_h, geometry.grid_w).expand(batch, -1).clone()
        return geometry.token_order(block_order(self.name, geometry, batch=batch, generator=generator))
