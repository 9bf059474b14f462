"""A toy order-planning problem whose answer is known, for testing BC / PPO / the oracle pipeline.

Data: each image has a class c and a *key block* k(c) (a fixed block per class, different classes
have different key blocks when there are enough blocks). The key block's T tokens are uniform
random; every other token is a function of them:

    x_j = (key[slot(j)] + shift[c, j]) mod V        slot(j) = j's index inside its own block

so revealing the key block determines the whole image, and nothing else tells anything about it.

Model (`KeyBlockModel`): an exact conditional model of that data, behind the same interface the
core uses from the GPT (`init_state`, `append`, `query`, `advance`, `feed`, `cfg`, `output.weight`,
`num_params`). p(x_j | x_S) is uniform over the V tokens until every token of k(c) is in S; after
that it puts 1 - eps on the determined value (eps spread over the others). The null class (CFG)
never knows its key. Hidden states are fixed random embeddings of (class, position, token, key
known?) so a planner can learn from them.

Known answers (uniform utilities, L tokens, N blocks of T tokens):
* empty state: u(k(c)) = T log V + (L - T)(log V + log(1 - eps)), every other block T log V.
* once k(c) is revealed, every utility is T * -log(1 - eps) ~ 0.
* the future-loss return telescopes to L_rest(empty) = L log V for every order.
* optimal policy: reveal k(label) first (the `label` observation is enough to find it).

`make_toy_core` wraps it all in an `orderplan.env.core.OrderPlanningCore` (no artifacts, milliseconds per
step). The core's oracle works on it through `orderplan.oracle.future_loss`'s generic candidate path
(branch the state per candidate with `select`, `append`, `query`).

Shapes: B batch rows, L tokens, N blocks, T tokens per block, Q query targets, V vocab, D dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from orderplan.model.blocks import BlockGeometry
from orderplan.config.common import BackboneConfig, DataSpec
from orderplan.model.loading import Backbone, freeze

__all__ = ["ToyConfig", "ToyState", "KeyBlockModel", "toy_data", "make_toy_backbone", "make_toy_core"]

CLASS_POS = -1  # the class token's "position", as in orderplan.model.gpt


@dataclass
class ToyConfig:
    """Sizes of the toy. Field names match `orderplan.model.gpt.GPTConfig` where the core reads them."""

    grid_h: int = 8
    grid_w: int = 8
    block: int = 2  # block x block tokens per block
    vocab_size: int = 8
    num_classes: int = 4
    dim: int = 32
    eps: float = 1e-4  # probability mass left off the determined token once the key is known
    seed: int = 0  # key blocks, shifts and hidden-state embeddings

    @property
    def num_tokens(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def null_class(self) -> int:
        return self.num_classes

    def validate(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}")
        BlockGeometry(self.grid_h, self.grid_w, self.block)  # raises on a bad geometry


@dataclass
class ToyState:
    """What the toy model knows about each row: the revealed tokens (the analogue of the GPT's KV
    cache) plus the same pending-token bookkeeping as `orderplan.model.gpt.DecodeState`.

    tokens [B, L] long (-1 = not revealed); cond [B]; pending_tok / pending_pos [B] (-1/-1: the
    class token); has_pending [B] bool (False between `advance` and `feed`); length [B]: revealed
    tokens (informational)."""

    tokens: torch.Tensor
    cond: torch.Tensor
    pending_tok: torch.Tensor
    pending_pos: torch.Tensor
    has_pending: torch.Tensor
    length: torch.Tensor

    _FIELDS = ("tokens", "cond", "pending_tok", "pending_pos", "has_pending", "length")

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]

    def clone(self) -> "ToyState":
        return replace(self, **{f: getattr(self, f).clone() for f in self._FIELDS})

    def select(self, rows: torch.Tensor) -> "ToyState":
        """A new state holding rows `rows` (LongTensor, repeats allowed)."""
        return replace(self, **{f: getattr(self, f)[rows] for f in self._FIELDS})

    def copy_rows_(self, rows: torch.Tensor, other: "ToyState") -> None:
        for f in self._FIELDS:
            getattr(self, f)[rows] = getattr(other, f)

    def reset_rows_(self, rows: torch.Tensor, cond: torch.Tensor) -> None:
        """In place: restart rows `rows` (bool [B] or LongTensor) from the class token `cond`."""
        self.tokens[rows] = -1
        self.cond[rows] = cond
        self.pending_tok[rows] = CLASS_POS
        self.pending_pos[rows] = CLASS_POS
        self.has_pending[rows] = True
        self.length[rows] = 0


class KeyBlockModel(nn.Module):
    """The exact model of the toy data (see the module docstring). Frozen, no learnable weights
    in the logits; `output` is a token readout tied to the token embedding, present (like the
    GPT's) so callers can read the dtype and device from `output.weight`."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.geometry = BlockGeometry(cfg.grid_h, cfg.grid_w, cfg.block)
        geom, L, V, C, D = self.geometry, cfg.num_tokens, cfg.vocab_size, cfg.num_classes, cfg.dim
        g = torch.Generator().manual_seed(cfg.seed)
        N, T = geom.num_blocks, geom.tokens_per_block
        # distinct key blocks per class while there are enough blocks
        key_block = torch.randperm(N, generator=g)[torch.arange(C) % N]
        key_tokens = geom.block_tokens[key_block]  # [C, T]
        shift = torch.randint(V, (C, L), generator=g)
        shift.scatter_(1, key_tokens, 0)  # so x_j = key[slot(j)] holds on the key block itself
        r, c = geom.token_rc[:, 0], geom.token_rc[:, 1]
        slot = (r % cfg.block) * cfg.block + (c % cfg.block)  # [L] index inside the token's block
        self.register_buffer("key_block", key_block, persistent=False)  # [C]
        self.register_buffer("key_tokens", key_tokens, persistent=False)  # [C, T]
        self.register_buffer("shift", shift, persistent=False)  # [C, L]
        self.register_buffer("slot", slot, persistent=False)  # [L]
        # hidden-state embeddings: class, position, token, "key known", target (query rows)
        s = 1.0 / math.sqrt(D)
        self.register_buffer("cls_emb", torch.randn(C + 1, D, generator=g) * s, persistent=False)
        self.register_buffer("pos_emb", torch.randn(L, D, generator=g) * s, persistent=False)
        self.register_buffer("tok_emb", torch.randn(V, D, generator=g) * s, persistent=False)
        self.register_buffer("known_emb", torch.randn(D, generator=g) * s, persistent=False)
        self.register_buffer("ta_emb", torch.randn(L, D, generator=g) * s, persistent=False)
        self.output = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            self.output.weight.copy_(self.tok_emb)
        freeze(self)
        self.log_hit = math.log1p(-cfg.eps)
        self.log_miss = math.log(cfg.eps / (V - 1))
        self.log_uniform = -math.log(V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the data ---------------------------------------------------------------------------------

    def complete(self, cond: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Full token grids [B, L] of classes `cond` [B] whose key blocks hold `key` [B, T]."""
        return (key[:, self.slot] + self.shift[cond]) % self.cfg.vocab_size

    def _known_key(self, tokens: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(known [B] bool, key [B, T]): whether every key-block token of the row's class is revealed."""
        real = cond < self.cfg.num_classes
        c = torch.where(real, cond, 0)
        key = tokens.gather(1, self.key_tokens[c])
        return real & (key >= 0).all(-1), key.clamp(min=0)

    def _logprobs(self, tokens: torch.Tensor, cond: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Exact log p(. at targets [B, Q] | revealed tokens [B, L]) -> [B, Q, V] float32 (target -1:
        uniform)."""
        known, key = self._known_key(tokens, cond)
        B, Q = targets.shape
        V = self.cfg.vocab_size
        t = targets.clamp(min=0)
        c = torch.where(cond < self.cfg.num_classes, cond, 0)
        det = (key.gather(1, self.slot[t]) + self.shift[c].gather(1, t)) % V  # [B, Q]
        hit = torch.nn.functional.one_hot(det, V).bool()
        sure = torch.where(hit, self.log_hit, self.log_miss)
        uniform = torch.full((B, Q, V), self.log_uniform, device=targets.device)
        use = (known[:, None] & (targets >= 0))[..., None]
        return torch.where(use, sure, uniform).float()

    def _hidden(self, tokens: torch.Tensor, cond: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Hidden state [B, D] of input (tok, pos) [B] of class cond given the revealed tokens."""
        known, _ = self._known_key(tokens, cond)
        real = pos >= 0
        h = self.cls_emb[cond] + known[:, None] * self.known_emb
        h = h + real[:, None] * (self.pos_emb[pos.clamp(min=0)] + self.tok_emb[tok.clamp(min=0)])
        return h.to(self.output.weight.dtype)

    # -- the backbone interface -------------------------------------------------------------------

    def init_state(self, cond: torch.Tensor, dtype: torch.dtype | None = None) -> ToyState:
        """An empty state for classes `cond` [B]: the class token is pending."""
        B, dev = cond.shape[0], cond.device
        return ToyState(
            tokens=torch.full((B, self.cfg.num_tokens), -1, dtype=torch.long, device=dev),
            cond=cond.clone().long(),
            pending_tok=torch.full((B,), CLASS_POS, dtype=torch.long, device=dev),
            pending_pos=torch.full((B,), CLASS_POS, dtype=torch.long, device=dev),
            has_pending=torch.ones(B, dtype=torch.bool, device=dev),
            length=torch.zeros(B, dtype=torch.long, device=dev),
        )

    def _active(self, state: ToyState, active: torch.Tensor | None) -> torch.Tensor:
        return torch.ones_like(state.has_pending) if active is None else active.to(state.has_pending.device).bool()

    def append(self, state: ToyState, tokens: torch.Tensor, positions: torch.Tensor,
               active: torch.Tensor | None = None, *, validate: bool = True,
               window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-force `tokens` at `positions` [B, T] (as `GPT.append`). Returns logits [B, T, V]
        (logits[:, t] predicts tokens[:, t] from what was revealed before it) and hidden states
        [B, T, D] of the committed inputs (the previously pending token, then tokens[:, :-1]).
        validate=False skips the value checks; `window` is accepted and unused (no cache here)."""
        B, L, V = state.batch_size, self.cfg.num_tokens, self.cfg.vocab_size
        if tokens.shape != positions.shape or tokens.dim() != 2 or tokens.shape[0] != B or tokens.shape[1] == 0:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must both be "
                             f"[B={B}, T>0]")
        if validate and (bool(((positions < 0) | (positions >= L)).any()) or bool(((tokens < 0) | (tokens >= V)).any())):
            raise ValueError(f"positions must lie in [0, {L}) and token ids in [0, {V})")
        act = self._active(state, active)
        if validate and bool((act & ~state.has_pending).any()):
            raise ValueError("append() needs a pending token on every active row; call feed() after advance()")
        rows = torch.arange(B, device=tokens.device)
        grid = state.tokens.clone()
        logits, hidden = [], []
        in_tok, in_pos = state.pending_tok, state.pending_pos
        for t in range(tokens.shape[1]):
            hidden.append(self._hidden(grid, state.cond, in_tok, in_pos))
            logits.append(self._logprobs(grid, state.cond, positions[:, t:t + 1])[:, 0])
            grid[rows, positions[:, t]] = tokens[:, t]
            in_tok, in_pos = tokens[:, t], positions[:, t]
        state.tokens = torch.where(act[:, None], grid, state.tokens)
        state.pending_tok = torch.where(act, tokens[:, -1], state.pending_tok)
        state.pending_pos = torch.where(act, positions[:, -1], state.pending_pos)
        state.length = state.length + act * tokens.shape[1]
        return torch.stack(logits, 1), torch.stack(hidden, 1)

    def query(self, state: ToyState, targets: torch.Tensor, *, validate: bool = True,
              window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions for positions `targets` [B, Q] (-1: a target-free summary row) without
        changing the state: logits [B, Q, V] (exact log-probabilities) and hidden [B, Q, D].
        validate, window: as in `append`."""
        if validate and not bool(state.has_pending.all()):
            raise ValueError("query() needs a pending token on every row")
        if targets.dim() != 2 or targets.shape[0] != state.batch_size:
            raise ValueError(f"query() targets must be [B={state.batch_size}, Q], got {tuple(targets.shape)}")
        if validate and bool(((targets < -1) | (targets >= self.cfg.num_tokens)).any()):
            raise ValueError(f"query() targets must lie in [0, {self.cfg.num_tokens}) (or -1 for no target)")
        logits = self._logprobs(state.tokens, state.cond, targets)
        h = self._hidden(state.tokens, state.cond, state.pending_tok, state.pending_pos)  # [B, D]
        ta = (targets >= 0)[..., None] * self.ta_emb[targets.clamp(min=0)]
        return logits, (h[:, None, :] + ta).to(h.dtype)

    def advance(self, state: ToyState, target: torch.Tensor, active: torch.Tensor | None = None, *,
                validate: bool = True, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit the pending token and predict `target` [B]: logits [B, V], hidden [B, D]. Follow
        with `feed` (generation mode). validate, window: as in `append`."""
        act = self._active(state, active)
        if validate and bool((act & ~state.has_pending).any()):
            raise ValueError("advance() twice without feed(): the pending token was already committed")
        if validate and bool(((target < 0) | (target >= self.cfg.num_tokens)).any()):
            raise ValueError(f"advance() target must lie in [0, {self.cfg.num_tokens})")
        logits = self._logprobs(state.tokens, state.cond, target[:, None])[:, 0]
        h = self._hidden(state.tokens, state.cond, state.pending_tok, state.pending_pos)
        state.has_pending = state.has_pending & ~act
        return logits, h

    def feed(self, state: ToyState, token: torch.Tensor, position: torch.Tensor,
             active: torch.Tensor | None = None, *, validate: bool = True) -> None:
        """Reveal `token` at `position` [B] and make it the pending token (after `advance`).
        validate=False skips the value checks."""
        act = self._active(state, active)
        if validate and bool(((token < 0) | (token >= self.cfg.vocab_size)).any()):
            raise ValueError(f"feed() token ids must lie in [0, {self.cfg.vocab_size})")
        if validate and bool(((position < 0) | (position >= self.cfg.num_tokens)).any()):
            raise ValueError(f"feed() position must lie in [0, {self.cfg.num_tokens})")
        if validate and bool((act & state.has_pending).any()):
            raise ValueError("feed() without advance(): the previous pending token would be lost")
        rows = torch.arange(state.batch_size, device=token.device)
        state.tokens[rows, position] = torch.where(act, token, state.tokens[rows, position])
        state.pending_tok = torch.where(act, token, state.pending_tok)
        state.pending_pos = torch.where(act, position, state.pending_pos)
        state.has_pending = state.has_pending | act
        state.length = state.length + act.long()


# ----------------------------------------------------------------------------------------------
# Data and env
# ----------------------------------------------------------------------------------------------


def toy_data(model: KeyBlockModel, num_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [M, L] long and labels [M] long (classes in turn, key tokens uniform random)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    labels = torch.arange(num_images) % cfg.num_classes
    key = torch.randint(cfg.vocab_size, (num_images, model.geometry.tokens_per_block), generator=g)
    dev = model.output.weight.device
    return model.complete(labels.to(dev), key.to(dev)).cpu(), labels


def make_toy_backbone(cfg: ToyConfig | None = None, device: str | torch.device = "cpu") -> Backbone:
    """The toy model as a `orderplan.model.loading.Backbone` (no VQ: images decode to zeros)."""
    model = KeyBlockModel(cfg or ToyConfig()).to(device)
    bcfg = BackboneConfig(name="toy", gpt_weights=None, vq_weights=None, data=DataSpec(kind="toy"),
                          block_size=model.cfg.block)
    return Backbone(cfg=bcfg, gpt=model, geometry=model.geometry, vq=None)


def make_toy_core(batch_size: int = 4, num_images: int = 32, seed: int = 0, toy: ToyConfig | None = None,
                  device: str | torch.device = "cpu", **env_fields):
    """An `orderplan.env.core.OrderPlanningCore` over the toy: `num_images` images drawn from `seed`,
    env config fields as keyword arguments (`reward="extrapolative"`, `budget=[1, 2, 4]`, ...)."""
    from orderplan.env.core import EnvConfig, OrderPlanningCore  # orderplan.env imports backbone only; keep agents light

    bb = make_toy_backbone(toy, device)
    codes, labels = toy_data(bb.gpt, num_images, seed)
    return OrderPlanningCore(bb, codes, labels, EnvConfig(**env_fields), batch_size, seed=seed)
