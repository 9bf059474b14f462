"""The batched dynamics of the order-planning MDP (DESIGN.md section 5), shared by the TorchRL env
and the Gymnasium API so there is exactly one implementation.

State of row b: an image (ground-truth tokens x [L] and its label in teacher-forced mode; a grid
being generated in generation mode), the blocks revealed so far in the order they were revealed
(held in the backbone's any-order KV cache, `DecodeState`), and `token_loss` [L]: the current
per-token loss l_j(S) of every unseen token (nats; predictive entropy H_j(S) in generation mode).

A step reveals one block (or, with the budget router, an ordered list of k blocks) through the KV
cache, then runs one batch of query rows over the still-unseen tokens. That single query gives the
new per-token losses (hence every reward), and one extra target-free row gives the hidden state
of the new pending token. Nothing is recomputed from scratch.

Beliefs: the same query gives the model's predictive entropy H_j(S) of every unseen token
(`token_entropy`, kept in both modes: `block_entropy` is what confident_first ranks) and, with
env.beliefs, the target-aware query hidden states pooled per unrevealed block (`query_hidden`); both
join the observation with env.beliefs. `expected_utilities` is the ground-truth-free oracle
(src/orderplan/oracle/expected.py) on the current state.

Generation mode samples tokens with classifier-free guidance (env.sampling), but the step's query
reads the conditional model alone unless env.guided_beliefs: the entropy reward and the belief
features are then the same quantities the teacher-forced planners were trained on (no CFG there),
expected_utilities uses the same model, and the query costs half. env.query=pending drops the
query over the unseen tokens altogether (one target-free row per image keeps the pending token's
hidden state): generation for evaluation of planners that read no beliefs then costs what KV
decoding costs; rewards are nan there.

Rewards: the core hands the per-token losses before and after each decision to
`orderplan.env.rewards.information_reward` and `decision_reward`; every reward formula (`env.reward=`
future_loss | extrapolative | anytime | likelihood | entropy, and the decision cost) and the one
discounting rule live in orderplan.env.rewards, and only there. The KV-shared loss machinery behind the
oracle (query rows over every candidate block, `oracle_utilities`) lives in src/orderplan/oracle/future_loss.py;
`OrderPlanningCore.oracle_utilities` only calls it on the current state.

Semi-MDP discounting (`gamma=` set, router only). Time is counted in blocks, not decisions: a
decision at block-time tau revealing b_1..b_k gets R = sum_{i<k} gamma^i r_i - decision_cost, where
r_i is the one-block reward of revealing b_i after b_1..b_{i-1} (anytime: -L_rest(after b_i)/L;
likelihood: log p(b_i | S, b_1..b_{i-1}); extrapolative: with w(., b_i)), and the discount to the
next decision is gamma^k (`decision_blocks` holds k). The SMDP return sum_t gamma^tau_t R_t then
equals the per-block discounted return of the same block order (minus the discounted decision
costs), so router and one-block policies are on one scale. Cost: one query per revealed block (k
per decision) instead of one per decision. With gamma=None a decision's reward comes from one query
as above (the undiscounted sum over its blocks for future_loss); plain actions (k = 1) are the same
either way.

Parallel decoding (env.parallel, generation mode). Every query also draws a token for each unseen
position (`proposal`, from the sampler's distribution: CFG, temperature, top-k / top-p, either noise).
A decision's k blocks take their proposed tokens, all sampled from the state before the decision,
each independently; then ONE forward commits them (rows of different k padded) and queries the
unseen tokens (`GPT.append_query`). So a decision costs one forward whatever k is
(`forward_passes` counts them per row; the unconditional CFG half runs beside it). The reward is
the decision's entropy drop (undiscounted inside it, even with env.gamma: its blocks share one
query) plus env.coherence times its coherence (orderplan.env.rewards.coherence_reward), minus the
decision cost. With one token per decision this generates what token-by-token decoding does.

Shapes: B batch rows, L tokens, N blocks, T tokens per block, K max blocks per decision, D model dim."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple, get_args

import torch

from orderplan.oracle.expected import BeliefUtilities, expected_utilities
from orderplan.oracle.future_loss import HostSizes, WeightKind, _scatter_targets, extrapolative_weights, oracle_utilities
from orderplan.model.loading import Backbone
from orderplan.model.sampling import SamplingConfig, check_sampling, guided, row_keys, sample_logits
from orderplan.infra.validation import check_budgets, check_choice, check_gamma, check_int, check_range
from orderplan.env.rewards import REWARDS, coherence_reward, decision_reward, discounted_return, information_reward

MODES = ("teacher_forced", "generate")


class _StepPlan(NamedTuple):
    """Host-side sizes of one step (Python ints; entry i is about the i-th block of the decision),
    read from the device together with the action check: the step's one host-device synchronisation.
    They size the cache windows and query widths exactly as reading the device at each call would."""

    first: list[int]  # longest cache among the rows revealing an i-th block, before it (-1: no such row)
    length: list[int]  # longest cache of any row after the i-th block
    unseen: list[int]  # most unseen tokens of any row after the i-th block


class QueryResult(NamedTuple):
    """What one query over the unseen tokens gives (`OrderPlanningCore._query_losses`)."""

    loss: torch.Tensor  # [B, L] float32 l_j(S) (nats; H_j(S) in generation mode), 0 on revealed tokens
    entropy: torch.Tensor  # [B, L] float32 H_j(S) (nats), 0 on revealed tokens
    query_hidden: torch.Tensor | None  # [B, N, D] block means of the query rows (env.beliefs only)
    pending_hidden: torch.Tensor  # [B, D] the pending token's target-free hidden state
    proposal: torch.Tensor | None = None  # [B, L] long: a token drawn for every unseen position (env.parallel)
    proposal_logp: torch.Tensor | None = None  # [B, L] float32 log p(proposal_j | S), the conditional model


class _Commit(NamedTuple):
    """Tokens a parallel step commits in the forward of its query (`GPT.append_query`)."""

    tokens: torch.Tensor  # [B, K*T] the decision's tokens, blocks in order, padded past counts
    positions: torch.Tensor  # [B, K*T] their raster positions
    counts: torch.Tensor  # [B] tokens committed per row (k * T, >= 1)
    active: torch.Tensor  # [B] bool rows that decided
    in_pos: torch.Tensor  # [B, K*T] positions of the committed inputs (pending first; -1 = padding)


@dataclass
class EnvConfig:
    """The `env` config group (presets src/orderplan/configs/env/*.yaml); every default lives here. The
    defaults (preset env/default.yaml, which overrides nothing) are the order-planning MDP in teacher-forced
    mode with the future-loss reward and the belief observation."""

    mode: str = "teacher_forced"  # teacher_forced | generate
    split: str = "train"  # images drawn at reset: train | heldout
    # future_loss | extrapolative | anytime | likelihood (teacher_forced) | entropy (generate)
    reward: str = "future_loss"
    weight: str = "uniform"  # extrapolative weights w(j, a): uniform | neighbours | distance
    neighbour_weight: float = 0.5  # w for tokens in the 8-neighbourhood of a (weight=neighbours)
    # token: [B, L, D] per-token hidden states | block: [B, N, D] block means (smaller rollouts)
    hidden: str = "token"
    budget: list[int] | None = None  # e.g. [1, 2, 4] turns on the budget router action (budget index + ordered blocks)
    decision_cost: float = 0.0  # nats charged per planner decision
    gamma: float | None = None  # router only: semi-MDP discount per block (see module doc); None = per decision
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # generation mode (LlamaGen knobs)
    oracle_chunk: int | None = None  # candidates per batched oracle pass (memory bound); None = all
    beliefs: bool = True  # observation adds entropy [B, L] and query_hidden [B, N, D] (the model's beliefs); false: hidden states and mask only
    belief_samples: int = 4  # K: sampled completions per candidate block of `expected_utilities`
    # generation mode: the step's query reads the conditional model (false) or the CFG-guided one (true)
    guided_beliefs: bool = False
    # full: query every unseen token each step (rewards, beliefs) | pending: only the pending token's
    # target-free row (generation without rewards or beliefs: what decoding alone costs, reward nan)
    query: str = "full"
    # generation mode: a decision's tokens (all its blocks) are sampled in parallel from the previous
    # step's query and committed with the next query in ONE forward (module doc, "Parallel decoding")
    parallel: bool = False
    # env.parallel: weight of the coherence term added to each decision's reward (orderplan.env.rewards,
    # coherence_reward: what sampling a decision's tokens together cost, nats; 0 = off)
    coherence: float = 0.0


def check_env_config(cfg: EnvConfig, num_blocks: int | None = None) -> None:
    """Raise ValueError naming the first bad field (`env.<field>`) and its allowed values.
    `num_blocks`: the backbone geometry's N, the upper bound of env.budget entries (unchecked
    when None; OrderPlanningCore checks it against its geometry)."""
    if cfg.mode not in MODES:
        raise ValueError(f"env.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.reward not in REWARDS:
        raise ValueError(f"env.reward must be one of {REWARDS}, got {cfg.reward!r}")
    if cfg.mode == "generate" and cfg.reward != "entropy":
        raise ValueError("generation mode has no ground truth: its reward is env.reward=entropy")
    if cfg.mode == "teacher_forced" and cfg.reward == "entropy":
        raise ValueError("env.reward=entropy is the generation-mode reward; use env.mode=generate")
    check_choice("env.weight", cfg.weight, get_args(WeightKind))
    if cfg.hidden not in ("token", "block"):
        raise ValueError(f"env.hidden must be token or block, got {cfg.hidden!r}")
    if cfg.split not in ("train", "heldout"):
        raise ValueError(f"env.split must be train or heldout, got {cfg.split!r}")
    check_budgets("env.budget", cfg.budget, num_blocks, allow_none=True)
    check_gamma("env.gamma", cfg.gamma, allow_none=True, note=" (null: per-decision rewards)")
    check_int("env.belief_samples", cfg.belief_samples, 1)
    check_range("env.neighbour_weight", cfg.neighbour_weight, 0.0)
    check_range("env.decision_cost", cfg.decision_cost, 0.0, note=" (nats per decision)")
    check_int("env.oracle_chunk", cfg.oracle_chunk, 1, allow_none=True, note=" (null = all candidates)")
    check_sampling(cfg.sampling, "env.sampling")
    if cfg.query not in ("full", "pending"):
        raise ValueError(f"env.query must be full or pending, got {cfg.query!r}")
    if cfg.parallel and (cfg.mode != "generate" or cfg.query != "full"):
        raise ValueError("env.parallel samples a decision's tokens from the step's query over the unseen tokens: "
                         "it needs env.mode=generate and env.query=full")
    check_range("env.coherence", cfg.coherence, 0.0, note=" (weight of the parallel-decoding coherence reward)")
    if cfg.coherence > 0 and not cfg.parallel:
        raise ValueError("env.coherence weighs the coherence of tokens sampled together: it needs env.parallel=true")
    if cfg.query == "pending" and (cfg.mode != "generate" or cfg.beliefs):
        raise ValueError("env.query=pending skips the per-token query that rewards and belief features come "
                         "from: it needs env.mode=generate and env.beliefs=false")


class OrderPlanningCore:
    """Batched, device-resident dynamics. All tensors live on the backbone's device; no Python loop
    runs over the batch. A step reads the device once (the action check, which also brings back the
    sizes of the step's cache windows and queries); the oracle reads it not at all.

    codes [M, L] long / labels [M] long: the image pool of the split (teacher-forced ground truth;
    in generation mode only the labels are used, as conditioning classes).
    """

    _sizes: HostSizes | None = None  # the current state's sizes on the host, set by every query of it

    def __init__(self, backbone: Backbone, codes: torch.Tensor, labels: torch.Tensor, cfg: EnvConfig,
                 batch_size: int, seed: int | None = None):
        check_int("batch_size", batch_size, 1, note=" (env rows)")
        check_env_config(cfg, num_blocks=backbone.geometry.num_blocks)
        self.bb, self.cfg, self.B = backbone, cfg, int(batch_size)
        self.gpt, self.geom = backbone.gpt, backbone.geometry
        dev = self.device = backbone.device
        g = self.gpt.cfg
        self.L, self.N, self.T, self.D = g.num_tokens, self.geom.num_blocks, self.geom.tokens_per_block, g.dim
        if codes.shape[1] != self.L:
            raise ValueError(f"images have {codes.shape[1]} tokens; the backbone expects {self.L}")
        self.codes, self.labels = codes.to(dev), labels.to(dev)
        self.num_images = codes.shape[0]
        self.dtype = self.gpt.output.weight.dtype
        self.block_tokens, self.token_block = (t.to(dev) for t in (self.geom.block_tokens, self.geom.token_block))
        self.budgets = torch.tensor(cfg.budget or [1], device=dev)
        self.K = int(self.budgets.max())
        self.router = cfg.budget is not None
        # semi-MDP: per-block rewards discounted inside a decision (plain actions reveal 1 block: no-op)
        self.smdp = self.router and cfg.gamma is not None
        self.use_cfg = cfg.mode == "generate" and cfg.sampling.cfg_scale > 1.0
        self.sc = cfg.sampling
        self.weights = extrapolative_weights(self.geom, cfg.weight, cfg.neighbour_weight).to(dev)  # [N, L]
        B = self.B
        self.x = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        self.label = torch.zeros(B, dtype=torch.long, device=dev)
        self.image_index = torch.zeros(B, dtype=torch.long, device=dev)
        self.revealed = torch.zeros(B, self.N, dtype=torch.bool, device=dev)
        self.history = torch.full((B, self.N), -1, dtype=torch.long, device=dev)  # blocks in reveal order
        self.steps = torch.zeros(B, dtype=torch.long, device=dev)
        # k of each row's last decision (blocks it revealed; 0 after a reset): the SMDP discount is gamma^k
        self.decision_blocks = torch.zeros(B, dtype=torch.long, device=dev)
        # sequential backbone forwards each row's episode has cost so far (the reset's query included;
        # the unconditional CFG half runs beside the conditional one and is not counted apart)
        self.forward_passes = torch.zeros(B, dtype=torch.long, device=dev)
        # env.parallel: the coherence (nats, orderplan.env.rewards.coherence_reward) of each row's last decision
        self.coherence = torch.zeros(B, dtype=torch.float32, device=dev)
        self.hidden_tok = torch.zeros(B, self.L, self.D, dtype=self.dtype, device=dev)
        self.token_loss = torch.zeros(B, self.L, dtype=torch.float32, device=dev)
        # env.parallel: the token each unseen position would get, drawn from the last query
        self.proposal = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        self.proposal_logp = torch.zeros(B, self.L, dtype=torch.float32, device=dev)
        # the model's beliefs about the unseen tokens, from the same query rows as token_loss
        self.token_entropy = torch.zeros(B, self.L, dtype=torch.float32, device=dev)  # H_j(S), nats
        self.query_hidden = torch.zeros(B, self.N, self.D, dtype=self.dtype, device=dev)  # block means of query rows
        self.needs_reset = torch.ones(B, dtype=torch.bool, device=dev)
        self.state = self.gpt.init_state(self.label)
        self.ustate = self.gpt.init_state(torch.full_like(self.label, g.null_class)) if self.use_cfg else None
        self.generator = torch.Generator(device="cpu")
        self.sample_generator = torch.Generator(device=dev)
        self.belief_generator = torch.Generator(device=dev)  # expected_utilities' sampled completions
        self.seed(seed)

    # -- bookkeeping ------------------------------------------------------------------------------

    def seed(self, seed: int | None) -> int:
        """Seed image selection and generation-mode sampling; returns the seed used."""
        # os.urandom, not torch.seed(): that would reseed torch's global generator as a side effect
        seed = int.from_bytes(os.urandom(8), "little") % (2**62) if seed is None else int(seed)
        self.generator.manual_seed(seed)
        self.sample_generator.manual_seed(seed + 1)
        self.belief_generator.manual_seed(seed + 2)
        # sampling.noise = position: row b's noise key is a function of (seed, b), so batch j of a set
        # seeded per batch has one key per sample; an evaluation device, since a row that plays several
        # episodes under one seed reads the same noise in each
        self.row_key = row_keys(seed, torch.arange(self.B, device=self.device))
        return seed

    @property
    def unseen(self) -> torch.Tensor:
        """[B, L] bool: tokens of unrevealed blocks."""
        return ~self.revealed[:, self.token_block]

    @property
    def done(self) -> torch.Tensor:
        return self.revealed.all(-1)

    def observation(self) -> dict[str, torch.Tensor]:
        """Fresh tensors (safe to store): hidden [B, L, D] or [B, N, D], block_mask / action_mask
        [B, N] bool, label, step, image_index [B]; in generation mode also tokens [B, L] (-1 where
        not generated yet) and image [B, C, H, W] (decoded where the episode is done, else 0).
        With env.beliefs: entropy [B, L] float32 (H_j(S) in nats of every unseen token, 0 on
        revealed ones) and query_hidden [B, N, D] (each unrevealed block's mean of the target-aware
        query rows' hidden states of its tokens, 0 on revealed blocks)."""
        if self.cfg.hidden == "token":
            hidden = self.hidden_tok.clone()
        else:
            hidden = self.geom.pool_blocks(self.hidden_tok)  # [B, N, D]
        obs = {"hidden": hidden, "block_mask": self.revealed.clone(), "action_mask": ~self.revealed,
               "label": self.label.clone(), "step": self.steps.clone(), "image_index": self.image_index.clone()}
        if self.cfg.beliefs:
            obs["entropy"] = self.token_entropy.clone()
            obs["query_hidden"] = self.query_hidden.clone()
        if self.cfg.mode == "generate":
            obs["tokens"] = torch.where(self.unseen, -1, self.x)
            obs["image"] = self.decode_images(self.done)
        return obs

    def image_shape(self) -> tuple[int, int, int]:
        vq = self.bb.vq
        if vq is None:
            return (1, 1, 1)
        down = vq.config.downsample_factor
        return (vq.config.in_channels, self.gpt.cfg.grid_h * down, self.gpt.cfg.grid_w * down)

    @torch.no_grad()
    def decode_images(self, rows: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] of the current grids on `rows` (zeros elsewhere, and
        everywhere when no VQ is loaded)."""
        out = torch.zeros(self.B, *self.image_shape(), device=self.device)
        if self.bb.vq is not None and bool(rows.any()):
            grid = self.x[rows].clamp(min=0).view(-1, self.gpt.cfg.grid_h, self.gpt.cfg.grid_w)
            out[rows] = self.bb.vq.decode_codes(grid).float()
        return out

    # -- reset ------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self, rows: torch.Tensor | None = None, image_index: torch.Tensor | None = None) -> None:
        """Start new episodes on `rows` ([B] bool, default all): draw images (or take
        `image_index` [B], an integer tensor: floats and bools raise ValueError), empty the cache,
        compute l_j(empty) for every token."""
        dev = self.device
        rows = torch.ones(self.B, dtype=torch.bool, device=dev) if rows is None else rows.to(dev).bool()
        if image_index is None:
            image_index = torch.randint(self.num_images, (self.B,), generator=self.generator).to(dev)
        else:
            image_index = torch.as_tensor(image_index, device=dev)
            # no silent truncation: .long() would turn [0.9, 1.7] into images [0, 1]
            if image_index.dtype == torch.bool or image_index.is_floating_point() or image_index.is_complex():
                raise ValueError(f"image_index must be an integer tensor (image ids), got dtype {image_index.dtype}")
            image_index = image_index.long()
            if image_index.shape != (self.B,):
                raise ValueError(f"image_index must have shape [B={self.B}], got {tuple(image_index.shape)}")
            bad = rows & ((image_index < 0) | (image_index >= self.num_images))
            if bool(bad.any()):
                raise ValueError(f"rows {_rows(bad)}: image_index out of range [0, {self.num_images})")
        self.image_index = torch.where(rows, image_index, self.image_index)
        self.label = torch.where(rows, self.labels[self.image_index], self.label)
        if self.cfg.mode == "teacher_forced":
            self.x = torch.where(rows[:, None], self.codes[self.image_index], self.x)
        else:
            self.x = torch.where(rows[:, None], torch.zeros_like(self.x), self.x)
        self.revealed[rows] = False
        self.history[rows] = -1
        self.steps[rows] = 0
        self.decision_blocks[rows] = 0
        self.forward_passes[rows] = 1  # the query below
        self.hidden_tok[rows] = 0
        self.state.reset_rows_(rows, self.label[rows])
        if self.ustate is not None:
            self.ustate.reset_rows_(rows, torch.full_like(self.label[rows], self.gpt.cfg.null_class))
        q = self._query_losses()
        self._keep_query(q, rows)
        self.needs_reset = self.needs_reset & ~rows

    # -- actions ----------------------------------------------------------------------------------

    def parse_action(self, action: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate an action without touching the state. Plain: block ids [B]. Router:
        [B, 1 + K] = (budget index, K ordered block choices; entries past the clipped budget are
        ignored). Rows outside `active` ([B] bool, default all) are not checked and reveal nothing.
        Returns blocks [B, K] (-1 past each row's count) and counts k [B].
        Raises ValueError naming the offending rows. All value checks are one read of the device."""
        blocks, k, _ = self._parse_action(action, active)
        return blocks, k

    def _parse_action(self, action: torch.Tensor, active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, _StepPlan]:
        """`parse_action`, plus the host-side `_StepPlan` of the step, read in the same single transfer."""
        B, N = self.B, self.N
        if not isinstance(action, torch.Tensor):
            raise ValueError(f"action must be a torch.Tensor, got {type(action).__name__}")
        if action.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"action must be an integer tensor, got dtype {action.dtype}")
        action = action.to(self.device).long()
        want = (B, 1 + self.K) if self.router else (B,)
        if self.router and action.shape != want:
            raise ValueError(f"router action must have shape {want} (budget index, {self.K} blocks), "
                             f"got {tuple(action.shape)}")
        if not self.router:
            if action.shape == (B, 1):
                action = action[:, 0]
            if action.shape != want:
                raise ValueError(f"action must have shape {want} (one block index per row), got {tuple(action.shape)}")
        act = torch.ones(B, dtype=torch.bool, device=self.device) if active is None else active.to(self.device).bool()
        # every check is computed on the device (none depends on an earlier one passing: indices are
        # clamped), then all are read in one transfer with the step plan
        stale = act & (self.needs_reset | self.done)
        if self.router:
            bidx, choice = action[:, 0], action[:, 1:]
            bad_budget = act & ((bidx < 0) | (bidx >= len(self.budgets)))
            left = (~self.revealed).sum(-1)
            k = torch.minimum(self.budgets[bidx.clamp(0, len(self.budgets) - 1)], left)
        else:
            choice, k = action[:, None], torch.ones(B, dtype=torch.long, device=self.device)
            bad_budget = torch.zeros_like(act)
        k = torch.where(act, k, 0)
        K = choice.shape[1]
        used = torch.arange(K, device=self.device)[None, :] < k[:, None]  # [B, K]
        out_of_range = used & ((choice < 0) | (choice >= N))
        safe = choice.clamp(0, N - 1)
        revealed = used & self.revealed.gather(1, safe)
        dup = used[:, :, None] & used[:, None, :] & (safe[:, :, None] == safe[:, None, :])
        dup = dup & ~torch.eye(K, dtype=torch.bool, device=self.device)
        bad = torch.stack([stale, bad_budget, out_of_range.any(-1), revealed.any(-1), dup.flatten(1).any(-1)])  # [5, B]
        host = torch.cat([bad.any(-1).long(), self._step_plan(k, K).flatten()]).tolist()  # the one read
        failed = [i for i, flag in enumerate(host[:5]) if flag]
        if failed:  # the first failing check, in the order they were always raised
            rows = _rows(bad[failed[0]])
            raise ValueError((
                f"rows {rows} have finished episodes (or were never reset); reset them first",
                f"rows {rows}: budget index out of range [0, {len(self.budgets)})",
                f"rows {rows}: block index out of range [0, {N})",
                f"rows {rows}: block already revealed",
                f"rows {rows}: the same block chosen twice in one decision",
            )[failed[0]])
        plan = _StepPlan(host[5:5 + K], host[5 + K:5 + 2 * K], host[5 + 2 * K:])
        return torch.where(used, safe, -1), k, plan

    def _step_plan(self, k: torch.Tensor, K: int) -> torch.Tensor:
        """The `_StepPlan` of a step revealing k [B] blocks per row, still on the device: [3, K] long.
        Every revealed block adds T entries to a row's cache (one append of T inputs in
        teacher-forced mode, T advances in generation mode) and removes T unseen tokens."""
        i = torch.arange(K, device=self.device)
        length = self.state.length[:, None]  # [B, 1]
        first = torch.where(k[:, None] > i, length + self.T * i, -1).max(0).values
        after = torch.minimum(k[:, None], i + 1)  # [B, K] blocks each row has revealed after the i-th
        unseen = (~self.revealed).sum(-1, keepdim=True) - after
        return torch.stack([first, (length + self.T * after).max(0).values, (self.T * unseen).max(0).values])

    # -- step -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, action: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply an action to every row (or only to `active` rows [B] bool: the others keep their
        state and get reward 0). Returns reward [B] (float32, nats) and done [B] bool; the blocks
        each active row revealed are in `decision_blocks` [B] (inactive rows keep theirs).
        Invalid actions raise ValueError before anything changes."""
        blocks, k, plan = self._parse_action(action, active)  # the step's only read of the device
        if self.cfg.parallel:
            reward = self._step_parallel(blocks, k, plan)
        else:
            reward = self._step_smdp(blocks, plan) if self.smdp else self._step_decision(blocks, k, plan)
        self.steps += k
        self.decision_blocks = torch.where(k > 0, k, self.decision_blocks)  # inactive rows keep their state
        self.forward_passes += self._passes(k)
        return torch.where(k > 0, reward, 0.0), self.done

    def _passes(self, k: torch.Tensor) -> torch.Tensor:
        """Backbone forwards [B] of a decision revealing k [B] blocks: per block one append (teacher
        forced) or T advances (generation: one per sampled token), then one query per decision (per
        block with semi-MDP rewards)."""
        if self.cfg.parallel:  # the commit of all k blocks rides in the query's forward
            return (k > 0).long()
        per_block = self.T if self.cfg.mode == "generate" else 1
        queries = k if self.smdp else (k > 0).long()
        return k * per_block + queries

    def _step_decision(self, blocks: torch.Tensor, k: torch.Tensor, plan: _StepPlan) -> torch.Tensor:
        """Reveal blocks [B, K] (-1 = none), then one query: reward [B] of the whole decision (nats)."""
        unseen_before = self.unseen
        loss_before = self.token_loss
        loglik = torch.zeros(self.B, device=self.device)
        for i in range(blocks.shape[1]):
            if plan.first[i] < 0:  # no row reveals an i-th block
                break
            active = blocks[:, i] >= 0
            loglik += self._reveal_block(blocks[:, i], active, i, plan.first[i])
        q = self._query_losses(HostSizes(plan.length[-1], plan.unseen[-1]))
        self._store_pending_hidden(q.pending_hidden, torch.ones(self.B, dtype=torch.bool, device=self.device))
        reward = self._reward(blocks, k, unseen_before, loss_before, self.unseen, q.loss, loglik)
        self._keep_query(q, k > 0)
        return reward

    def _step_smdp(self, blocks: torch.Tensor, plan: _StepPlan) -> torch.Tensor:
        """Semi-MDP step: reveal blocks [B, K] (-1 = none) one at a time with a query after each, and
        return R [B] = sum_i gamma^i r_i - decision_cost (nats), r_i the one-block reward of block i."""
        one = torch.ones(self.B, dtype=torch.long, device=self.device)
        per_block = []  # r_i [B] of the i-th block of each row's decision (0 past its k)
        for i in range(blocks.shape[1]):
            if plan.first[i] < 0:  # no row reveals an i-th block
                break
            active = blocks[:, i] >= 0
            unseen_before, loss_before = self.unseen, self.token_loss
            loglik = self._reveal_block(blocks[:, i], active, i, plan.first[i])
            q = self._query_losses(HostSizes(plan.length[i], plan.unseen[i]))
            self._store_pending_hidden(q.pending_hidden, active)
            r = self._information_reward(blocks[:, i:i + 1], one, unseen_before, loss_before, self.unseen, q.loss, loglik)
            per_block.append(torch.where(active, r, 0.0))
            self._keep_query(q, active)
        if not per_block:
            return decision_reward(torch.zeros(self.B, dtype=torch.float64, device=self.device), self.cfg.decision_cost)
        # block i of the decision is discounted by gamma^i (block time inside the decision)
        total = discounted_return(torch.stack(per_block, 1), float(self.cfg.gamma))
        return decision_reward(total, self.cfg.decision_cost)

    def _step_parallel(self, blocks: torch.Tensor, k: torch.Tensor, plan: _StepPlan) -> torch.Tensor:
        """env.parallel: the decision's k blocks take the tokens the last query drew for them
        (`proposal`: each token from p(x_j | S), independently), then ONE forward commits them all and
        queries the unseen tokens (`GPT.append_query`, rows of different k padded). Returns the
        decision's reward [B] (nats; with env.gamma the whole decision's, undiscounted inside it:
        its blocks share one query, so there are no per-block rewards)."""
        unseen_before, loss_before = self.unseen, self.token_loss
        K, T, B = blocks.shape[1], self.T, self.B
        act = k > 0
        pos = self.block_tokens[blocks.clamp(min=0)].flatten(1)  # [B, K*T], blocks in decision order
        counts = k * T
        valid = torch.arange(K * T, device=self.device)[None, :] < counts[:, None]
        tokens = self.proposal.gather(1, pos)
        # padding entries write into an extra column, never onto a real token
        grid = torch.cat([self.x, self.x.new_zeros(B, 1)], 1)
        grid.scatter_(1, torch.where(valid, pos, self.L), tokens)
        self.x = grid[:, :self.L]
        for i in range(K):
            if plan.first[i] < 0:
                break
            self._mark_revealed(blocks[:, i], blocks[:, i] >= 0, i)
        marginal = self.proposal_logp.gather(1, pos)  # log p(x_t | S), from the query the tokens came from
        in_pos = torch.cat([self.state.pending_pos[:, None], pos[:, :-1]], 1)
        commit = _Commit(tokens, pos, counts.clamp(min=1), act, torch.where(valid, in_pos, -1))
        q = self._query_losses(HostSizes(plan.length[-1], plan.unseen[-1]), commit)
        self._store_pending_hidden(q.pending_hidden, act)
        self.coherence = torch.where(act, coherence_reward(self._commit_logp, marginal, valid), 0.0)
        reward = self._reward(blocks, k, unseen_before, loss_before, self.unseen, q.loss,
                              torch.zeros(B, device=self.device))
        if self.cfg.coherence > 0:
            reward = reward + self.cfg.coherence * self.coherence
        self._keep_query(q, act)
        return reward

    def _mark_revealed(self, block: torch.Tensor, active: torch.Tensor, i: int) -> None:
        """Book block [B] (the i-th of this decision) as revealed on active rows [B] bool."""
        blk = block.clamp(min=0)
        # one index per row with where() instead of boolean-mask indexing, which reads the device
        rows = torch.arange(self.B, device=self.device)
        self.revealed[rows, blk] = self.revealed[rows, blk] | active
        col = torch.where(active, self.steps + i, 0)  # inactive rows rewrite their own slot 0
        self.history[rows, col] = torch.where(active, blk, self.history[rows, col])

    def _reveal_block(self, block: torch.Tensor, active: torch.Tensor, i: int, first: int) -> torch.Tensor:
        """Reveal block [B] (the i-th of this decision) on active rows [B] bool, whose longest cache
        is `first` entries (host int, from the step plan); returns its teacher-forced
        log-likelihood [B] (nats; 0 in generation mode and on inactive rows)."""
        blk = block.clamp(min=0)
        positions = self.block_tokens[blk]  # [B, T]
        if self.cfg.mode == "teacher_forced":
            loglik = self._reveal_teacher_forced(positions, active, first + self.T)
        else:
            self._reveal_generated(positions, active, first)
            loglik = torch.zeros(self.B, device=self.device)
        self._mark_revealed(block, active, i)
        return loglik

    def _store_pending_hidden(self, hid: torch.Tensor, rows: torch.Tensor) -> None:
        """hidden_tok[b, pending position] := hid [B, D] (the query's target-free row) on rows [B]."""
        pend = self.state.pending_pos
        idx = torch.arange(self.B, device=self.device)
        keep = self.hidden_tok[idx, pend.clamp(min=0)]
        self.hidden_tok[idx, pend.clamp(min=0)] = torch.where(((pend >= 0) & rows)[:, None], hid, keep)

    def _reveal_teacher_forced(self, positions: torch.Tensor, active: torch.Tensor, window: int) -> torch.Tensor:
        """Append the ground-truth tokens of one block per active row (longest cache after it:
        `window`); returns their log-likelihood [B]."""
        tokens = self.x.gather(1, positions)
        prev = self.state.pending_pos.clone()
        # the action was checked at the step's boundary: no further checks (they read the device)
        logits, hid = self.gpt.append(self.state, tokens, positions, active=active, validate=False, window=window)
        # input 0 was the previously pending token (the class token at the start: no spatial slot)
        in_pos = torch.cat([prev[:, None], positions[:, :-1]], 1)
        self._store_hidden(in_pos, hid, active)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0].sum(-1)
        return torch.where(active, logp, 0.0)

    def _reveal_generated(self, positions: torch.Tensor, active: torch.Tensor, first: int) -> None:
        """Sample one block per active row token by token (in-block raster order) with CFG; `first`:
        the active rows' longest cache before the block (host int)."""
        for t in range(positions.shape[1]):
            pos = positions[:, t]
            prev = self.state.pending_pos.clone()
            logits, hid = self.gpt.advance(self.state, pos, active=active, validate=False, window=first + t + 1)
            if self.ustate is not None:  # the unconditional cache moves in lockstep with the conditional one
                ulogits, _ = self.gpt.advance(self.ustate, pos, active=active, validate=False, window=first + t + 1)
                logits = guided(torch.cat([logits, ulogits]), self.sc.cfg_scale)
            tok = sample_logits(logits, self.sc, self.sample_generator, self.row_key, pos)
            self._store_hidden(prev[:, None], hid[:, None], active)
            self.gpt.feed(self.state, tok, pos, active=active, validate=False)
            if self.ustate is not None:
                self.gpt.feed(self.ustate, tok, pos, active=active, validate=False)
            rows = torch.arange(self.B, device=self.device)
            self.x[rows, pos] = torch.where(active, tok, self.x[rows, pos])

    def _store_hidden(self, positions: torch.Tensor, hidden: torch.Tensor, active: torch.Tensor) -> None:
        """hidden_tok[b, positions[b, t]] := hidden[b, t] on active rows (positions < 0 skipped).

        Every (b, t) writes, so no nonzero() (a read of the device) picks the real entries: a
        skipped entry repeats a real write of its row (same slot, same value), or rewrites its
        slot's current value when its row has none, so no two writes to one slot disagree."""
        ok = active[:, None] & (positions >= 0)  # [B, T]; a row's real positions are distinct
        first = ok.to(torch.int8).argmax(1, keepdim=True)  # [B, 1]: a real entry of the row, if any
        has = ok.any(1, keepdim=True)
        slot = torch.where(ok, positions, positions.gather(1, first)).clamp(min=0)  # [B, T]
        rows = torch.arange(self.B, device=self.device)[:, None].expand_as(slot)
        hidden = hidden.to(self.dtype)
        twin = hidden.gather(1, first[..., None].expand(-1, 1, hidden.shape[-1])).expand_as(hidden)
        value = torch.where(ok[..., None], hidden, torch.where(has[..., None], twin, self.hidden_tok[rows, slot]))
        self.hidden_tok[rows, slot] = value

    def _query_losses(self, sizes: HostSizes | None = None, commit: _Commit | None = None) -> QueryResult:
        """One query over every unseen token plus one target-free row per image: per-token losses
        l_j(S) (H_j(S) in generation mode), entropies H_j(S), the block-pooled query hidden states
        (with env.beliefs) and the pending token's hidden state; see `QueryResult`.

        sizes: the state's longest cache and most unseen tokens, known on the host (a step's plan);
        None reads both from the device in one transfer (reset). Kept for the oracle on this state."""
        if sizes is None:
            length, unrevealed = torch.stack([self.state.length.max(), (~self.revealed).sum(-1).max()]).tolist()
            sizes = HostSizes(length, self.T * unrevealed)
        self._sizes = sizes
        window = max(sizes.length, 1)
        unseen = self.unseen
        if self.cfg.query == "pending":  # one target-free row per image: the pending token's hidden state
            _, hid = self.gpt.query(self.state, torch.full((self.B, 1), -1, device=self.device, dtype=torch.long),
                                    validate=False, window=window)
            nan = torch.full((self.B, self.L), float("nan"), device=self.device)
            return QueryResult(torch.where(unseen, nan, 0.0), torch.where(unseen, nan, 0.0), None, hid[:, -1])
        Q = sizes.unseen
        # unseen positions first (ascending), padding and the summary row carry target -1
        key = torch.where(unseen, torch.arange(self.L, device=self.device), self.L)
        targets = key.sort(-1).values[:, :Q]
        targets = torch.cat([torch.where(targets < self.L, targets, -1),
                             torch.full((self.B, 1), -1, device=self.device, dtype=torch.long)], 1)
        logits, hid = self._forward_query(self.state, targets, window, commit, store=True)
        ulogits = None
        if self.ustate is not None and (self.cfg.guided_beliefs or self.cfg.parallel):
            ulogits, _ = self._forward_query(self.ustate, targets, window, commit, store=False)
        proposal = proposal_logp = None
        if self.cfg.parallel and Q > 0:  # a token for every unseen position, from the sampler's (guided) distribution
            draw = logits if ulogits is None else guided(torch.cat([logits[:, :Q], ulogits[:, :Q]]), self.sc.cfg_scale)
            flat = sample_logits(draw[:, :Q].reshape(self.B * Q, -1), self.sc, self.sample_generator,
                                 self.row_key[:, None].expand(-1, Q).reshape(-1),
                                 targets[:, :Q].clamp(min=0).reshape(-1)).view(self.B, Q)
            slots = torch.where(targets[:, :Q] >= 0, targets[:, :Q], self.L)
            proposal = torch.cat([self.proposal, self.proposal.new_zeros(self.B, 1)], 1).scatter(1, slots, flat)[:, :self.L]
            lp = torch.log_softmax(logits[:, :Q].float(), -1).gather(-1, flat[..., None])[..., 0]  # conditional model
            proposal_logp = torch.cat([self.proposal_logp, self.proposal_logp.new_zeros(self.B, 1)], 1).scatter(
                1, slots, lp)[:, :self.L]
        if ulogits is not None and self.cfg.guided_beliefs:
            logits = ulogits + self.sc.cfg_scale * (logits - ulogits)
        # every loss, entropy and reward is float32 whatever the backbone dtype (bf16 on GPU): the GPT's
        # head returns float32 logits (`GPT._head`), and the log-softmax over V codes and the per-token
        # sums below stay in float32 (tests/test_bf16.py measures what bf16 hidden states still cost)
        logp = torch.log_softmax(logits[:, :Q].float(), -1)
        valid = targets[:, :Q] >= 0
        ent = (-(logp.exp() * logp).sum(-1)).clamp(min=0.0)  # [B, Q]; rounding can dip below 0
        if self.cfg.mode == "teacher_forced":
            per = -logp.gather(-1, self.x.gather(1, targets[:, :Q].clamp(min=0))[..., None])[..., 0]
        else:
            per = ent
        # padding rows (target -1) land in a dropped extra column, never on token 0
        def scatter(v: torch.Tensor) -> torch.Tensor:
            return torch.where(unseen, _scatter_targets(torch.where(valid, v, 0.0), targets[:, :Q], self.L), 0.0)

        losses, entropy = scatter(per), scatter(ent)
        query_hidden = None
        if self.cfg.beliefs:
            # each query row's hidden state at its target's raster slot, then block means (unrevealed
            # blocks are wholly unseen, so the mean is over all T of their tokens)
            idx = torch.where(valid, targets[:, :Q], self.L)[..., None].expand(-1, -1, self.D)
            tok = hid.new_zeros(self.B, self.L + 1, self.D).scatter_(1, idx, hid[:, :Q])[:, :self.L]
            query_hidden = self.geom.pool_blocks(tok)
        return QueryResult(losses, entropy, query_hidden, hid[:, -1], proposal, proposal_logp)

    def _forward_query(self, state, targets: torch.Tensor, window: int, commit: _Commit | None,
                       store: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The query's forward on `state`: a plain query, or (env.parallel) the commit of a decision's
        tokens and the query in one forward, whose committed inputs' hidden states are stored when
        `store` (the conditional state)."""
        if commit is None:
            return self.gpt.query(state, targets, validate=False, window=window)
        clogits, chid, logits, hid = self.gpt.append_query(state, commit.tokens, commit.positions, targets,
                                                           commit.active, counts=commit.counts, validate=False,
                                                           window=window)
        if store:
            self._store_hidden(commit.in_pos, chid, commit.active)
            # input t's output predicts the decision's token t given S and tokens < t: its coherence
            self._commit_logp = torch.log_softmax(clogits.float(), -1).gather(-1, commit.tokens[..., None])[..., 0]
        return logits, hid

    def _keep_query(self, q: QueryResult, rows: torch.Tensor) -> None:
        """Store a query's per-token losses and beliefs on rows [B] bool (the others keep theirs)."""
        if q.proposal is not None:
            self.proposal = torch.where(rows[:, None], q.proposal, self.proposal)
            self.proposal_logp = torch.where(rows[:, None], q.proposal_logp, self.proposal_logp)
        self.token_loss = torch.where(rows[:, None], q.loss, self.token_loss)
        self.token_entropy = torch.where(rows[:, None], q.entropy, self.token_entropy)
        if q.query_hidden is not None:
            self.query_hidden = torch.where(rows[:, None, None], q.query_hidden.to(self.dtype), self.query_hidden)

    def _reward(self, blocks, k, unseen_before, loss_before, unseen_after, loss_after, loglik) -> torch.Tensor:
        """Reward [B] (float32, nats) of a decision that revealed blocks [B, K] (k [B] of them), decision
        cost included."""
        r = self._information_reward(blocks, k, unseen_before, loss_before, unseen_after, loss_after, loglik)
        return decision_reward(r, self.cfg.decision_cost)

    def _information_reward(self, blocks, k, unseen_before, loss_before, unseen_after, loss_after,
                            loglik) -> torch.Tensor:
        """`orderplan.env.rewards.information_reward` of this core's reward kind (nats, no decision cost)."""
        return information_reward(self.cfg.reward, blocks, k, unseen_before, loss_before, unseen_after, loss_after,
                                  loglik, self.weights)

    # -- oracle -----------------------------------------------------------------------------------

    @torch.no_grad()
    def oracle_utilities(self, kind: str = "future_loss", weight: str | None = None,
                         candidates: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] utility of revealing each block next (nats; -inf for revealed blocks and finished
        rows), from the current state in one batched pass sharing the prefix cache."""
        if self.cfg.mode != "teacher_forced":
            raise ValueError("oracle utilities need ground truth: use env.mode=teacher_forced")
        live = ~self.done
        util = torch.full((self.B, self.N), float("-inf"), device=self.device)
        sizes = self._sizes
        if sizes is None:  # never reset: read them (the last step or reset keeps them otherwise)
            sizes = HostSizes(int(self.state.length.max()), self.T * int((~self.revealed).sum(-1).max()))
        if sizes.unseen == 0:  # every row is done
            return util
        if candidates is not None:
            candidates = candidates.to(self.device)
            candidates = torch.where((candidates >= 0) & ~self.revealed.gather(1, candidates.clamp(min=0)), candidates, -1)
        # the core's own state, and candidates made unrevealed above: nothing to check, no read of the device
        out = oracle_utilities(self.gpt, self.state, self.x, self.revealed, self.geom, kind=kind,
                               weight=weight or self.cfg.weight, candidates=candidates,
                               chunk=self.cfg.oracle_chunk, neighbour_weight=self.cfg.neighbour_weight,
                               validate=False, sizes=sizes)
        return torch.where(live[:, None], out, util)

    @torch.no_grad()
    def expected_utilities(self, K: int | None = None, candidates: torch.Tensor | None = None,
                           rows: int | None = None) -> BeliefUtilities:
        """The ground-truth-free oracle: û(a|S) [B, N] (nats; -inf on revealed blocks and finished rows)
        of revealing each block next, with the unknown tokens replaced by K completions sampled from
        the model (`orderplan.oracle.expected.expected_utilities`; K defaults to env.belief_samples).
        Works in both modes (it never reads `x` beyond the revealed blocks); draws from the core's
        `belief_generator`. The returned `forwards` [B] is its cost in backbone forwards.
        rows: compute only rows 0..rows-1 (the others, padding of a partial batch, get -inf, no
        candidates and 0 forwards); the computed rows are what a core of `rows` rows would give."""
        K = self.cfg.belief_samples if K is None else int(K)
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"rows must be a number of leading rows >= 1 (or None = all), got {rows!r}")
        if rows is None or rows >= self.B:
            return expected_utilities(self.gpt, self.state, self.revealed, self.geom, K, self.belief_generator,
                                      candidates=candidates, chunk=self.cfg.oracle_chunk)
        keep = torch.arange(rows, device=self.device)
        out = expected_utilities(self.gpt, self.state.select(keep), self.revealed[:rows], self.geom, K,
                                 self.belief_generator, candidates=None if candidates is None else candidates[:rows],
                                 chunk=self.cfg.oracle_chunk)

        def pad(x: torch.Tensor, fill: float) -> torch.Tensor:  # [rows, ...] -> [B, ...]
            return torch.cat([x, x.new_full((self.B - rows, *x.shape[1:]), fill)])

        return BeliefUtilities(pad(out.util, float("-inf")), pad(out.entropy, 0.0), pad(out.candidates, -1),
                               pad(out.samples, 0), pad(out.sample_logp, 0.0), pad(out.forwards, 0))

    def block_entropy(self) -> torch.Tensor:
        """[B, N] mean predictive entropy H_j(S) (nats/token) of each block's tokens given the current
        state; nan on revealed blocks. No extra forward: the step's query computed it."""
        ent = self.geom.pool_blocks(self.token_entropy[..., None])[..., 0]
        return ent.masked_fill(self.revealed, float("nan"))


def _rows(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask.flatten()).flatten().tolist()
