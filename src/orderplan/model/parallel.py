"""Parallel decoding: S forward passes per image instead of one per token.

A decision samples m tokens at once from ONE forward (`GPT.decode_step`): the forward commits the
previous decision's tokens to the KV cache and, in the same pass, predicts every target of this
decision (p(x_j | x_S) for each chosen j, the target-aware query rows). The m tokens are drawn
independently from those conditionals with LlamaGen's sampler (CFG, temperature, top-k, top-p, and
either noise of `orderplan.model.sampling`). So an image costs S forwards, whatever the sizes m_s.

A schedule is the sizes m_1..m_S (sum L) and a rule that picks which unseen tokens the next m_s are:

* `order`: the next m_s tokens of a given token order [B, L] (raster, random or halton block
  orders, tokens of a block in raster order, as the env reveals them). Targets are known before the
  forward, so it queries only them.
* `confident`: the m_s unseen tokens of lowest predictive entropy H_j(S) (nats, the conditional
  model's, as the env's confident_first ranks blocks), MaskGIT's rule at token level. The forward
  queries every unseen token to rank them (the same single forward, wider).
* `spread_confident`: confident, but spread within the step (LPD's lesson: tokens sampled together
  should not be neighbours, since each is drawn without seeing the others). Greedily, m_s times:
  the unseen, not yet chosen token of lowest entropy among those at Chebyshev distance >= 2 (not
  8-adjacent) from every token already chosen in this step; when no such token is left, the
  lowest-entropy remaining one.

Within a decision the chosen tokens enter the cache in ascending raster position (rule `order`:
in the order's order). With m_s = 1 for every step and rule `order`, this is `generate` bit for bit
(`decode_step` with one target is `advance`).

Shapes: B images, L tokens, V codes, S steps, m_s tokens at step s."""

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


def chebyshev_near(positions: torch.Tensor, grid_w: int) -> torch.Tensor:
    """[..., P, P] bool: positions (raster ids [..., P]) at Chebyshev distance <= 1 (8-adjacent or equal)."""
    r, c = positions // grid_w, positions % grid_w
    return ((r[..., :, None] - r[..., None, :]).abs() <= 1) & ((c[..., :, None] - c[..., None, :]).abs() <= 1)


def spread_pick(entropy: torch.Tensor, candidates: torch.Tensor, m: int, grid_w: int) -> torch.Tensor:
    """The `spread_confident` choice (module doc): indices [B, m] into candidates [B, U] (raster
    positions) given their entropies [B, U]. Ties go to the lower index (candidates ascend)."""
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


@dataclass
class ParallelSamples:
    """What `generate_parallel` returns."""

    tokens: torch.Tensor  # [B, L] long, raster layout
    order: torch.Tensor  # [B, L] raster positions in the order they entered the cache
    step_of: torch.Tensor  # [B, L] long: the decision (0..S-1) that sampled each raster position
    forwards: int  # backbone forwards run (= S)


@torch.no_grad()
def generate_parallel(model: GPT, cond: torch.Tensor, sizes: Sequence[int], rule: str = "order",
                      order: torch.Tensor | None = None, sc: SamplingConfig | None = None,
                      generator: torch.Generator | None = None, keys: torch.Tensor | None = None,
                      grid_w: int | None = None) -> ParallelSamples:
    """Sample images [B, L] of classes cond [B] in len(sizes) forwards; see the module doc.

    sizes: tokens per decision (`step_sizes`), summing to L. rule `order` needs `order` [B, L] (raster
    positions, each row a permutation; checked once here). sc, generator, keys: as in
    `orderplan.model.sampling.generate` (sc.noise = position draws each token's noise from its row key
    and raster position, so a token's draw does not depend on which step sampled it)."""
    sc = SamplingConfig() if sc is None else sc
    L = model.cfg.num_tokens
    B, dev = cond.shape[0], cond.device
    sizes = [int(m) for m in sizes]
    if sum(sizes) != L or min(sizes) < 1:
        raise ValueError(f"step sizes must be >= 1 and sum to L={L}, got {sizes}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "order":
        if order is None or order.shape != (B, L):
            raise ValueError(f"rule 'order' needs a token order [B={B}, L={L}]")
        if not bool((order.sort(-1).values == torch.arange(L, device=order.device)).all()):
            raise ValueError("every row of order must be a permutation of the L raster positions")
        order = order.to(dev)
    grid_w = grid_w or model.cfg.grid_w
    cond2 = _with_null(model, cond, sc)
    rep = cond2.shape[0] // B
    state = model.init_state(cond2)
    rows = torch.arange(B, device=dev)
    out = torch.zeros(B, L, dtype=torch.long, device=dev)
    seen = torch.zeros(B, L, dtype=torch.bool, device=dev)
    step_of = torch.full((B, L), -1, dtype=torch.long, device=dev)
    entered = []
    rest_tok = rest_pos = None
    done = 0
    for s, m in enumerate(sizes):
        if rule == "order":
            targets = order[:, done:done + m]
        else:  # every unseen token, ascending (rows move in lockstep: the same count per row)
            key = torch.where(seen, L, torch.arange(L, device=dev))
            targets = key.sort(-1).values[:, :L - done]
        rep_t = targets.repeat(rep, 1)
        logits, _ = model.decode_step(state, rep_t, rest_tok, rest_pos, validate=False)
        cond_logits = logits[:B]
        logits = guided(logits, sc.cfg_scale) if rep == 2 else logits  # [B, Q, V]
        if rule != "order":
            logp = torch.log_softmax(cond_logits.float(), -1)
            ent = -(logp.exp() * logp).sum(-1)  # [B, U] nats
            if rule == "confident":
                pick = ent.argsort(dim=-1, stable=True)[:, :m]
            else:
                pick = spread_pick(ent, targets, m, grid_w)
            pick = pick.gather(1, targets.gather(1, pick).argsort(-1))  # cache order: ascending raster
            targets = targets.gather(1, pick)
            logits = logits.gather(1, pick[..., None].expand(-1, -1, logits.shape[-1]))
        Q = targets.shape[1]
        flat_keys = None if keys is None else keys[:, None].expand(B, Q).reshape(-1)
        tok = sample_logits(logits.reshape(B * Q, -1), sc, generator, flat_keys, targets.reshape(-1)).view(B, Q)
        out[rows[:, None], targets] = tok
        seen[rows[:, None], targets] = True
        step_of[rows[:, None], targets] = s
        entered.append(targets)
        done += m
        if done < L:  # the last decision's tokens never need the cache
            model.feed(state, tok[:, 0].repeat(rep), targets[:, 0].repeat(rep), validate=False)
            rest_tok, rest_pos = tok[:, 1:].repeat(rep, 1), targets[:, 1:].repeat(rep, 1)
    return ParallelSamples(out, torch.cat(entered, 1), step_of, len(sizes))


# -- named schedules (the baselines of the FID-against-steps table) ---------------------------------

SCHEDULE_ORDERS = ("raster", "random", "halton")  # token-level orders of rule `order`
SCHEDULE_NAMES = (*SCHEDULE_ORDERS, "confident", "spread_confident")


@dataclass(frozen=True)
class ParallelSchedule:
    """A fixed parallel-decoding schedule, named `<name>@<S>` (equal sizes) or `<name>@<S>c` (cosine):
    S forwards per image. name: raster | random | halton (token-level orders: row-major, a uniform
    permutation per image, the 2D Halton order of `orderplan.model.orders` on the token grid) |
    confident | spread_confident (the rules of the module doc)."""

    name: str
    steps: int
    kind: str = "equal"

    @property
    def label(self) -> str:
        return f"{self.name}@{self.steps}{'c' if self.kind == 'cosine' else ''}"

    @property
    def rule(self) -> str:
        return "order" if self.name in SCHEDULE_ORDERS else self.name

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

    def token_orders(self, batch: int, grid_h: int, grid_w: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """[batch, L] token orders of rule `order` (None for the confidence rules)."""
        if self.rule != "order":
            return None
        geom = BlockGeometry(grid_h, grid_w, 1)
        return block_order(self.name, geom, batch=batch, generator=generator)
