"""One policy interface for the TorchRL env, the Gymnasium API and plain loops over the core.

Every policy is a `tensordict.nn.TensorDictModuleBase`: `forward(td)` reads its `in_keys` from a
TensorDict with batch [B] and writes `action`; `act(obs)` does the same on a dict of tensors and
returns the action. A policy decides by scoring blocks and, in router mode, picking a budget:

    scores [B, N] (higher = preferred; revealed blocks are masked to -inf here, whatever the scores)
    plain action:  the best block                                     [B] long
    router action: (budget index, the K best blocks in score order)   [B, 1 + K] long, K = max(budgets)

Ties go to the lowest block id (stable sort), so actions are always unrevealed, distinct blocks.
Rows whose episode is over (no unrevealed block) get an arbitrary in-range action, which the env
ignores for inactive rows.

Policies: `FixedOrderPolicy` (raster and the heuristic orders of `orderplan.model.orders`, or any given
order [N] or per-image orders [M, N]), `RandomPolicy` (`orderplan.env.actions.random_valid_action`),
`OraclePolicy` (argmax of the core's oracle utilities: reads the ground truth), the ground-truth-free
policies of the backbone's own beliefs, `EntropyOrderPolicy` (`confident_first`: lowest mean
predictive entropy of the block's tokens, the MaskGIT / ordered-AR rule; `uncertain_first`: highest),
`SpreadConfidentPolicy` (`spread_confident`: confident_first among the unrevealed blocks farthest from
the revealed ones, the sequential form of LPD's locality rule), `SampledConfidencePolicy`
(`confident_sampled`: a block drawn from softmax(-H_j / tau), the stochastic confident_first)
and `ExpectedOraclePolicy` (`expected_oracle`: argmax of the oracle utility with the unknown tokens
replaced by K completions sampled from the model, `OrderPlanningCore.expected_utilities`), and
`OrderHeadPolicy` (the learned planner).

Cost. Every policy counts the backbone forwards it needs per decision (`forwards`, `decisions`;
`forwards_per_decision`), in the unit of `orderplan.oracle.expected`: one causal pass over one branch
of the state. Fixed orders and random: 0. confident_first / uncertain_first / spread_confident /
confident_sampled and the OrderHead: 1
(the one query over the unseen tokens that the env runs each step anyway; it gives the entropies,
the belief features and the last token's hidden state). oracle: 1 + C (C unrevealed blocks: one
candidate pass each). expected_oracle: 1 + K * C.
`make_policy(name, core, **kwargs)` builds any of them for a core; `GymPolicy` adapts one to numpy
observations; `run_episodes` plays full episodes on chosen images (discounting by
`orderplan.env.rewards.discounted_return`, the one discounting rule)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from orderplan.planner.orderhead import OrderHead, load_orderhead
from orderplan.model.blocks import BlockGeometry
from orderplan.model.orders import ORDER_NAMES, block_order
from orderplan.model.parallel import ParallelSchedule
from orderplan.env.actions import random_valid_action
from orderplan.env.core import OrderPlanningCore
from orderplan.env.episodes import Decision, play_episodes
from orderplan.env.rewards import GAMMA
from orderplan.env.rewards import discount_factors, discounted_return

__all__ = [
    "BlockPolicy",
    "FixedOrderPolicy",
    "RandomPolicy",
    "OraclePolicy",
    "OrderHeadPolicy",
    "EntropyOrderPolicy",
    "SpreadConfidentPolicy",
    "SampledConfidencePolicy",
    "ExpectedOraclePolicy",
    "GymPolicy",
    "ScheduledDecoder",
    "POLICY_NAMES",
    "FIXED_ORDERS",
    "make_policy",
    "run_episodes",
]

Obs = Mapping[str, torch.Tensor]  # a dict of tensors or a TensorDict, batch [B]

FIXED_ORDERS: tuple[str, ...] = tuple(n for n in ORDER_NAMES if n != "random")
BELIEF_POLICIES: tuple[str, ...] = ("confident_first", "uncertain_first", "spread_confident", "confident_sampled",
                                     "expected_oracle")  # no ground truth
POLICY_NAMES: tuple[str, ...] = (*ORDER_NAMES, *BELIEF_POLICIES, "oracle", "oracle_extrapolative", "orderhead")


class BlockPolicy(TensorDictModuleBase):
    """Base class. Subclasses implement `decide(obs) -> (scores [B, N], budget index [B] or None)`;
    None means the fixed budget `budget` (a block count from `budgets`, default the smallest).

    budgets: the env's budget list (e.g. [1, 2, 4]) for router actions, None for plain actions.
    """

    def __init__(self, in_keys: Sequence[str], budgets: Sequence[int] | None = None, budget: int | None = None):
        super().__init__()
        self.in_keys = list(dict.fromkeys([*in_keys, "action_mask"]))
        self.out_keys = ["action"]
        self.budgets = None if budgets is None else [int(k) for k in budgets]
        if self.budgets is None:
            if budget is not None:
                raise ValueError(f"budget={budget} needs router mode (budgets=[...])")
            self.budget_default = 0
        else:
            budget = min(self.budgets) if budget is None else int(budget)
            if budget not in self.budgets:
                raise ValueError(f"budget={budget} is not one of the env's budgets {self.budgets}")
            self.budget_default = self.budgets.index(budget)
        # backbone forwards / live rows decided (see module doc): running totals kept as device
        # tensors, so booking a decision never waits for the device; `forwards`/`decisions` read them
        self._forwards: torch.Tensor | int = 0
        self._decisions: torch.Tensor | int = 0
        self.cost: torch.Tensor | None = None  # [B] forwards of the current decision, set by a state-dependent decide
        self.real_rows: int | None = None  # rows >= real_rows are padding (`set_real_rows`)

    forwards_per_row = 0  # forwards per decision of a policy whose cost does not depend on the state
    # reads the per-token query of every step (token entropies): generation must keep env.query=full
    needs_query = False

    def planned_orders(self, image_index: torch.Tensor) -> torch.Tensor | None:
        """The whole block order [B, N] of each row about to start an episode on images image_index [B],
        when it is fixed before the episode starts (nothing the episode reveals can change it); else
        None. Generation then decodes the token order in one KV-cached pass instead of stepping the env."""
        return None

    def set_real_rows(self, n: int | None) -> None:
        """Rows n.. of the batch about to be played are padding (a last, partial batch) whose
        decisions nobody reads; None = every row is real. A costly policy may answer padding rows with
        any legal block (the expected oracle: the lowest unrevealed one) instead of computing them."""
        self.real_rows = None if n is None else int(n)

    def reseed(self, seed: int) -> None:
        """Restart the policy's own random stream (`generator`: random draws, sampled OrderHead
        actions) at `seed`; a no-op for deterministic policies. Generation calls it once per batch, so
        a sample's order depends on its batch's seed only, not on how many batches came before."""
        gen = getattr(self, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(int(seed))

    @property
    def forwards(self) -> int:
        """Backbone forwards booked so far (reads the device once)."""
        return int(self._forwards)

    @property
    def decisions(self) -> int:
        """Live rows decided so far (reads the device once)."""
        return int(self._decisions)

    def forwards_per_decision(self) -> float:
        """Mean backbone forwards per decision so far (the policy's `forwards_per_row` before any)."""
        decisions = self.decisions
        return self.forwards / decisions if decisions else float(self.forwards_per_row)

    def _count(self, legal: torch.Tensor, forwards: torch.Tensor | None = None) -> None:
        """Book one decision on every live row of legal [B, N] (forwards [B] per row, default
        `forwards_per_row`)."""
        live = legal.any(-1)
        n = live.sum()
        self._decisions = self._decisions + n
        if forwards is None:
            self._forwards = self._forwards + self.forwards_per_row * n
        else:
            self._forwards = self._forwards + torch.where(live, forwards.to(live.device), 0).sum()

    @property
    def router(self) -> bool:
        return self.budgets is not None

    @property
    def K(self) -> int:
        return max(self.budgets) if self.budgets else 1

    def decide(self, obs: Obs) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def act(self, obs: Obs) -> torch.Tensor:
        """obs with batch [B] -> action [B] long, or [B, 1 + K] in router mode (on obs' device)."""
        legal = obs["action_mask"].bool()  # [B, N] True = unrevealed
        self.cost = None
        scores, bidx = self.decide(obs)
        self._count(legal, self.cost)
        scores = scores.to(legal.device).float().masked_fill(~legal, float("-inf"))
        ranked = scores.sort(dim=-1, descending=True, stable=True).indices  # ties -> lowest block id
        if not self.router:
            return ranked[:, 0]
        if bidx is None:
            bidx = torch.full((legal.shape[0],), self.budget_default, dtype=torch.long, device=legal.device)
        return torch.cat([bidx.to(legal.device).long()[:, None], ranked[:, : self.K]], 1)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict.set("action", self.act(tensordict))
        return tensordict


class FixedOrderPolicy(BlockPolicy):
    """A fixed block order, played dynamically: the first still-unrevealed block in that order
    (router mode: the first K, with a fixed budget).

    order: a name from `FIXED_ORDERS` (every `orderplan.model.orders.ORDER_NAMES` entry but random; needs
    `geometry`), one order [N] shared by every image, or per-image orders [M, N] where row b follows
    orders[image_index[b] % M] (read from the observation's `image_index`; e.g. the teacher-forced
    oracle's order of a same-class held-out image, played in generation mode). Tensor orders must
    be permutations of the N blocks."""

    def __init__(self, order: str | torch.Tensor, geometry: BlockGeometry | None = None,
                 budgets: Sequence[int] | None = None, budget: int | None = None):
        if isinstance(order, str):
            if order not in FIXED_ORDERS:
                raise ValueError(f"unknown fixed order {order!r}; choose from {FIXED_ORDERS} (random: RandomPolicy)")
            if geometry is None:
                raise ValueError(f"the named order {order!r} needs the block geometry")
            self.order_name: str | None = order
            order = block_order(order, geometry)  # [N]
        else:
            self.order_name = None
            order = torch.as_tensor(order).long()
        if order.dim() not in (1, 2):
            raise ValueError(f"order must be a name, [N] or [M, N], got shape {tuple(order.shape)}")
        N = order.shape[-1]
        if geometry is not None and N != geometry.num_blocks:
            raise ValueError(f"order has {N} blocks, the geometry {geometry.num_blocks}")
        if not bool((order.sort(-1).values == torch.arange(N, device=order.device)).all()):
            raise ValueError("every order must be a permutation of the N blocks")
        self.per_image = order.dim() == 2
        super().__init__(["image_index"] if self.per_image else [], budgets, budget)
        steps = torch.arange(N, device=order.device).expand_as(order).contiguous()
        rank = torch.empty_like(order).scatter_(-1, order, steps)  # [N] or [M, N]: step of each block
        self.register_buffer("rank", rank, persistent=False)
        self.register_buffer("order", order, persistent=False)

    def planned_orders(self, image_index: torch.Tensor) -> torch.Tensor | None:
        if self.router:  # the env clips the last budget: the played order is still this one, but keep it simple
            return None
        B = image_index.shape[0]
        if self.per_image:
            return self.order[image_index.to(self.order.device) % self.order.shape[0]]
        return self.order.expand(B, -1)

    def decide(self, obs: Obs) -> tuple[torch.Tensor, None]:
        B = obs["action_mask"].shape[0]
        if self.per_image:
            idx = obs["image_index"].to(self.rank.device) % self.rank.shape[0]
            return -self.rank[idx].float(), None
        return (-self.rank.float()).expand(B, -1), None


class RandomPolicy(BlockPolicy):
    """Uniform over the unrevealed blocks (router mode: a uniform budget index and K distinct
    blocks), from its own CPU generator: the same seed gives the same actions. The draw is
    `orderplan.env.actions.random_valid_action`, the one random valid action."""

    def __init__(self, seed: int = 0, budgets: Sequence[int] | None = None, num_blocks: int | None = None):
        super().__init__([], budgets)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.num_blocks = num_blocks  # N, needed only by planned_orders

    @torch.no_grad()
    def act(self, obs: Obs) -> torch.Tensor:
        self._count(obs["action_mask"].bool())
        return random_valid_action(obs["action_mask"], self.generator, self.budgets)

    def planned_orders(self, image_index: torch.Tensor) -> torch.Tensor | None:
        """A uniform permutation per row from the policy's generator (the same law as drawing a uniform
        unrevealed block at every step; not the same draws)."""
        if self.router or self.num_blocks is None:
            return None
        return torch.rand(image_index.shape[0], self.num_blocks, generator=self.generator).argsort(-1)


class ScheduledDecoder(BlockPolicy):
    """A fixed parallel-decoding schedule (`orderplan.model.parallel.ParallelSchedule`, names like
    `raster@16` or `confident@8c`): S forwards per image, each sampling many tokens. It is decoded
    directly by `orderplan.model.parallel.generate_parallel` (evaluation's generation), never by
    stepping the env, whose decisions reveal whole blocks; `act` refuses. Its own generator draws the
    random token orders (`random@S`), reseeded per generation batch like RandomPolicy's."""

    def __init__(self, schedule: ParallelSchedule, seed: int = 0):
        super().__init__([])
        self.schedule = schedule
        self.generator = torch.Generator().manual_seed(int(seed))

    def decide(self, obs: Obs) -> tuple[torch.Tensor, None]:
        raise ValueError(f"{self.schedule.label} is a parallel-decoding schedule: it samples tokens, not blocks, "
                         "and runs only in evaluation's generation (orderplan.model.parallel.generate_parallel)")


class OraclePolicy(BlockPolicy):
    """argmax of `core.oracle_utilities(kind, weight)` (ties -> lowest block id; router mode: the K
    blocks of highest utility, with a fixed budget). Reads the core's current state, so it must act on
    that core's own observations (teacher-forced mode only)."""

    def __init__(self, core: OrderPlanningCore, kind: str = "future_loss", weight: str | None = None,
                 budget: int | None = None):
        if core.cfg.mode != "teacher_forced":
            raise ValueError("the oracle needs ground truth: use it on an env.mode=teacher_forced core")
        super().__init__([], core.cfg.budget, budget)
        self.core, self.kind, self.weight = core, kind, weight

    def decide(self, obs: Obs) -> tuple[torch.Tensor, None]:
        _check_current(self, obs)
        self.cost = 1 + (~self.core.revealed).sum(-1)  # one candidate pass per unrevealed block
        return self.core.oracle_utilities(self.kind, self.weight), None


def _check_current(policy: BlockPolicy, obs: Obs) -> None:
    """Policies that read their core's state must act on that core's own current observation."""
    if not torch.equal(obs["action_mask"].bool().to(policy.core.device), ~policy.core.revealed):
        raise ValueError(f"{type(policy).__name__}: the observation is not the current state of its core")


class EntropyOrderPolicy(BlockPolicy):
    """confident_first (`confident=True`): the unrevealed block whose tokens have the lowest mean
    predictive entropy H_j(S) given the current context (the MaskGIT / ordered-AR rule);
    uncertain_first: the highest. No ground truth: the entropies come from the model's predictive
    distribution over each unseen token, the query the env runs each step
    (`OrderPlanningCore.block_entropy`), so it works in both modes. Router mode: the K best blocks,
    fixed budget."""

    forwards_per_row = 1
    needs_query = True

    def __init__(self, core: OrderPlanningCore, confident: bool = True, budget: int | None = None):
        super().__init__([], core.cfg.budget, budget)
        self.core, self.confident = core, bool(confident)

    def decide(self, obs: Obs) -> tuple[torch.Tensor, None]:
        _check_current(self, obs)
        ent = self.core.block_entropy().nan_to_num(0.0)  # revealed blocks are masked by act()
        return (-ent if self.confident else ent), None


class SpreadConfidentPolicy(BlockPolicy):
    """spread_confident: confident_first restricted to the unrevealed blocks farthest from the revealed
    ones (LPD, Locality-aware Parallel Decoding: a block far from every known one is the least
    redundant with the context). No ground truth, both modes. Precisely, on the block grid of
    `core.geom` (block n = br * blocks_w + bc, row-major):

        dist(i, j) = Euclidean distance between the centres of blocks i and j, in blocks
                     (`BlockGeometry.block_distance`: 1 for side neighbours, sqrt(2) diagonally)
        d_j        = min over revealed blocks r of dist(j, r), for each unrevealed block j
                     (+inf when nothing is revealed: the first decision is confident_first's)
        candidates = the unrevealed blocks with d_j >= max_k d_k - 1e-6 (max over unrevealed k)
        choice     = the candidate of lowest mean predictive entropy H_j(S) (`core.block_entropy()`,
                     nats/token), ties to the lowest block id

    Scores: -H_j for candidates; -H_j - (max_k H_k + 1) for the other unrevealed blocks, so each of
    them is strictly below every candidate and they keep confidence order among themselves.
    Router mode (K blocks, fixed budget): the top K of those scores, i.e. the candidates by confidence,
    then the other blocks by confidence; only the first block follows the distance rule exactly (the
    distances are not updated with the blocks chosen in the same decision).

    Not `orderplan.model.parallel`'s `spread_confident` rule: that one decodes many tokens per forward
    and spreads the blocks chosen *together in one step* (not 8-adjacent to each other), measured from
    nothing revealed; this is the sequential policy (one block per decision, one query each), spread
    from the blocks *already revealed*."""

    forwards_per_row = 1
    needs_query = True
    TOL = 1e-6  # distances within TOL of the maximum count as maximal (exact ties of the grid)

    def __init__(self, core: OrderPlanningCore, budget: int | None = None):
        super().__init__([], core.cfg.budget, budget)
        self.core = core
        self.register_buffer("distance", core.geom.block_distance.to(core.device).float(), persistent=False)

    def min_distance(self, revealed: torch.Tensor) -> torch.Tensor:
        """d [B, N]: distance of each block to the nearest revealed block of revealed [B, N] bool
        (+inf on rows with nothing revealed)."""
        dist = self.distance.to(revealed.device)[None].expand(revealed.shape[0], -1, -1)  # [B, N, N]
        return dist.masked_fill(~revealed[:, None, :], float("inf")).amin(-1)

    def decide(self, obs: Obs) -> tuple[torch.Tensor, None]:
        _check_current(self, obs)
        revealed = self.core.revealed
        ent = self.core.block_entropy().nan_to_num(0.0)  # revealed blocks are masked by act()
        d = self.min_distance(revealed).masked_fill(revealed, float("-inf"))
        far = d >= d.amax(-1, keepdim=True) - self.TOL  # inf >= inf when nothing is revealed
        candidate = far & ~revealed
        below = ent.masked_fill(revealed, 0.0).amax(-1, keepdim=True) + 1.0
        return torch.where(candidate, -ent, -ent - below), None


class SampledConfidencePolicy(BlockPolicy):
    """confident_sampled: the stochastic confident_first. The unrevealed block j is drawn with
    probability softmax_j(-H_j / tau) (H_j = `core.block_entropy()`, mean predictive entropy of the
    block's tokens in nats/token; tau > 0, a temperature in nats: tau -> 0 is confident_first,
    tau -> inf uniform). `log_probs(obs)` gives that distribution [B, N] (the anchor of a KL penalty
    for an RL planner); `act` draws exactly from it by Gumbel-max (scores = log_probs + Gumbel noise
    from the policy's own CPU generator, seeded with `seed` and restarted by `reseed` per generation
    batch, like RandomPolicy's). Router mode (K blocks, fixed budget): Gumbel-top-K, K distinct blocks
    drawn without replacement from the same softmax (Plackett-Luce). No ground truth, both modes."""

    forwards_per_row = 1
    needs_query = True

    def __init__(self, core: OrderPlanningCore, tau: float = 0.1, seed: int = 0, budget: int | None = None):
        tau = float(tau)
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"confident_sampled: tau must be a finite temperature > 0 (nats), got {tau}")
        super().__init__([], core.cfg.budget, budget)
        self.core, self.tau = core, tau
        self.generator = torch.Generator().manual_seed(int(seed))

    def log_probs(self, obs: Obs) -> torch.Tensor:
        """[B, N] log-probabilities of each block under the policy at obs (the current state of its
        core): log softmax(-H / tau) over the unrevealed blocks, -inf on revealed ones (every entry of
        a finished row)."""
        _check_current(self, obs)
        legal = ~self.core.revealed
        logits = (-self.core.block_entropy() / self.tau).masked_fill(~legal, float("-inf"))
        lp = logits - logits.logsumexp(-1, keepdim=True)
        return lp.masked_fill(~legal, float("-inf"))  # a finished row: -inf, not nan

    def decide(self, obs: Obs) -> tuple[torch.Tensor, None]:
        lp = self.log_probs(obs)
        u = torch.rand(lp.shape, generator=self.generator, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min_(torch.finfo(torch.float64).tiny)))
        return lp.double() + gumbel.to(lp.device), None


class ExpectedOraclePolicy(BlockPolicy):
    """expected_oracle: argmax of û(a|S), the future-loss oracle utility with the unknown tokens
    replaced by the model's beliefs (K completions of each candidate block sampled from the model;
    `orderplan.oracle.expected.expected_utilities` states the formula). No ground truth, both modes;
    K = env.belief_samples unless given. Costs 1 + K * C forwards per decision."""

    def __init__(self, core: OrderPlanningCore, K: int | None = None, budget: int | None = None):
        super().__init__([], core.cfg.budget, budget)
        self.core, self.K_samples = core, K

    def decide(self, obs: Obs) -> tuple[torch.Tensor, None]:
        _check_current(self, obs)
        out = self.core.expected_utilities(self.K_samples, rows=self.real_rows)
        self.cost = out.forwards
        if self.real_rows is None or self.real_rows >= self.core.B:
            return out.util, None
        # padding rows were not computed: score every block 0, so act() takes the lowest legal one
        pad = torch.arange(self.core.B, device=out.util.device) >= self.real_rows
        return out.util.masked_fill(pad[:, None], 0.0), None


class OrderHeadPolicy(BlockPolicy):
    """The learned planner. greedy: argmax of the masked logits (router: argmax budget, then the
    top-K logits); otherwise sampled: the budget from softmax(budget_logits) and the blocks by
    Gumbel-top-K (sampling without replacement from softmax(logits)), from its own generator.
    router: None = whether the model has a router head."""

    def __init__(self, model: OrderHead, greedy: bool = True, R: int | None = None, router: bool | None = None,
                 seed: int = 0):
        router = model.has_router if router is None else bool(router)
        if router and not model.has_router:
            raise ValueError("router mode needs an OrderHead with a router head (model.enable_router(budgets))")
        super().__init__(model.input_keys, model.cfg.budgets if router else None)
        self.model, self.greedy, self.R = model, bool(greedy), R
        self.forwards_per_row = 1  # the env's query behind its observation
        self.generator = torch.Generator().manual_seed(int(seed))

    def _gumbel(self, shape: torch.Size) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator).clamp_(1e-9, 1 - 1e-9)
        return -torch.log(-torch.log(u))

    def decide(self, obs: Obs) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = next(self.model.parameters()).device
        extra = {k: v.to(dev) for k, v in self.model.optional_inputs(obs).items()}
        out = self.model.plan(obs["hidden"].to(dev), obs["block_mask"].to(dev), self.R, **extra)
        scores, blog = out.logits, out.budget_logits
        if not self.greedy:
            scores = scores + self._gumbel(scores.shape).to(dev)
            if blog is not None:
                blog = blog + self._gumbel(blog.shape).to(dev)
        bidx = blog.argmax(-1) if self.router else None
        return scores, bidx


# -- registry -------------------------------------------------------------------------------------


def make_policy(name: str, core: OrderPlanningCore, **kwargs: Any) -> BlockPolicy:
    """A policy for `core` (plain or router actions as the core's env.budget says).

    name: raster | random | zigzag | diagonal | spiral | center_spiral | column_major | reverse | halton |
    confident_first | uncertain_first | spread_confident | confident_sampled | expected_oracle | oracle |
    oracle_extrapolative | orderhead, or a
    parallel-decoding schedule `<raster|random|halton|confident|spread_confident>@<S>[c]` (ScheduledDecoder).
    kwargs: `budget=` (fixed orders, belief policies, oracles), `seed=` (random, confident_sampled,
    sampled orderhead), `tau=` (confident_sampled, nats; default 0.1), `weight=` (oracles), `K=` (expected_oracle; default env.belief_samples), and for orderhead
    exactly one of `checkpoint=path` / `model=OrderHead`, plus `greedy=`, `R=`.
    """
    budgets = core.cfg.budget
    schedule = ParallelSchedule.parse(name)
    if schedule is not None:
        return ScheduledDecoder(schedule, **kwargs)
    if name in FIXED_ORDERS:
        return FixedOrderPolicy(name, core.geom, budgets, **kwargs).to(core.device)
    if name == "random":
        return RandomPolicy(budgets=budgets, num_blocks=core.N, **kwargs)
    if name in ("confident_first", "uncertain_first"):
        return EntropyOrderPolicy(core, name == "confident_first", **kwargs)
    if name == "spread_confident":
        return SpreadConfidentPolicy(core, **kwargs)
    if name == "confident_sampled":
        return SampledConfidencePolicy(core, **kwargs)
    if name == "expected_oracle":
        return ExpectedOraclePolicy(core, **kwargs)
    if name in ("oracle", "oracle_extrapolative"):
        return OraclePolicy(core, "future_loss" if name == "oracle" else "extrapolative", **kwargs)
    if name == "orderhead":
        model, path = kwargs.pop("model", None), kwargs.pop("checkpoint", None)
        if (model is None) == (path is None):
            raise ValueError("make_policy('orderhead') needs exactly one of checkpoint=path or model=OrderHead")
        if path is not None:
            model = load_orderhead(Path(path), hidden_dim=core.D, geometry=core.geom)
        model.check_compatible(core.D, core.geom)
        if model.cfg.beliefs and not core.cfg.beliefs:
            raise ValueError("this OrderHead reads belief features: build the env with env.beliefs=true")
        if core.router and model.cfg.budgets != list(budgets):
            raise ValueError(f"the env's budgets are {list(budgets)}, the OrderHead's router has {model.cfg.budgets}")
        return OrderHeadPolicy(model.to(core.device), router=core.router, **kwargs)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


# -- Gymnasium adapter ----------------------------------------------------------------------------


class GymPolicy:
    """Calls a policy on Gymnasium observations (`orderplan.env.gym_api`): a numpy dict of one env (no batch
    axis) or of a vector env (leading [B]). Returns np.int64 (plain, single), int64 [1 + K] (router,
    single), or int64 [B] / [B, 1 + K] (vector)."""

    def __init__(self, policy: BlockPolicy, core: OrderPlanningCore):
        self.policy, self.core = policy, core

    def __call__(self, obs: Mapping[str, np.ndarray]) -> np.ndarray | np.int64:
        single = np.asarray(obs["action_mask"]).ndim == 1
        tensors = {}
        for key in self.policy.in_keys:
            arr = np.asarray(obs[key])
            t = torch.from_numpy(arr[None] if single else arr).to(self.core.device)
            tensors[key] = t.bool() if key in ("action_mask", "block_mask") else t
        action = self.policy.act(tensors).cpu().numpy().astype(np.int64)
        if not single:
            return action
        return action[0] if self.policy.router else np.int64(action[0])


# -- episodes -------------------------------------------------------------------------------------


@torch.no_grad()
def run_episodes(policy: BlockPolicy, core: OrderPlanningCore, image_index: torch.Tensor,
                 gamma: float | None = None) -> dict[str, torch.Tensor]:
    """Reset every row of `core` on `image_index` [B] and play until all episodes are done (a finished
    row is left alone while the others go on). Returns, on the core's device:
        return [B]             undiscounted return (nats)
        discounted_return [B]  sum_t discount[t] r_t over the row's decisions
        discount [B, S]        float64 discount of decision t: gamma^t, or in semi-MDP mode
                               (`core.smdp`) gamma^tau_t with tau_t the blocks revealed before it
        rewards [B, S]         reward of decision t (0 after the row finished), S = most decisions
        live [B, S] bool       whether the row made decision t
        decisions [B]          number of decisions of each row
        blocks [B, N]          blocks in the order they were revealed
    gamma: None = env.gamma in semi-MDP mode, else orderplan.env.rewards.GAMMA. In semi-MDP mode the core discounts the
    blocks inside a decision by env.gamma, so a given `gamma` must equal it (ValueError otherwise);
    the discounted return is then the per-block discounted return of the block order minus the
    discounted decision costs.
    """
    gamma = episode_gamma(core, gamma)
    rewards, live, clock = [], [], []

    def record(d: Decision) -> None:
        rewards.append(d.reward)
        live.append(d.active)
        clock.append(d.blocks_before)

    play_episodes(core, image_index, policy.act, record)
    r, lv = torch.stack(rewards, 1), torch.stack(live, 1)  # [B, S]
    if core.smdp:
        t = torch.stack(clock, 1)  # [B, S] block-time of each decision
    else:
        t = torch.arange(r.shape[1], device=r.device).expand_as(r)
    return {
        "return": r.sum(1),
        "discounted_return": discounted_return(r, gamma, t).float(),
        "discount": discount_factors(t, gamma),
        "rewards": r,
        "live": lv,
        "decisions": lv.sum(1),
        "blocks": core.history.clone(),
    }


def episode_gamma(core: OrderPlanningCore, gamma: float | None) -> float:
    """The discount of `run_episodes`: a semi-MDP core fixes it (env.gamma), otherwise `gamma` or GAMMA."""
    if not core.smdp:
        return GAMMA if gamma is None else float(gamma)
    if gamma is not None and not math.isclose(float(gamma), float(core.cfg.gamma), rel_tol=0.0, abs_tol=1e-12):
        raise ValueError(f"the core discounts per block with env.gamma={core.cfg.gamma} (semi-MDP); "
                         f"run its episodes with the same gamma, got {gamma}")
    return float(core.cfg.gamma)
