"""OrderHead: the latent next-block planner of seed 000 (Algorithm 3) with the budget router of
Algorithm 4, as one small transformer over per-block features.

    f   = Norm(Proj(mean of each block's token hidden states) + row/col embedding + revealed embedding
               [+ for unrevealed blocks, with cfg.beliefs: Proj(mean query-row hidden state of the
                block's tokens) + Proj(the block's T per-token predictive entropies)])
    z0  = Pool(f)                          n_latents learned queries cross-attend to the blocks
    z_r = PlannerCore(z_{r-1}, f)          r = 1..R, ONE shared core (R can grow 0 -> 1 -> 2 -> 4
                                           on the same parameters; R=0 means z_R = z0)
    q   = Score(blocks cross-attend to z_R)    next-block logits, -inf on revealed blocks
    v   = Value(mean of z_R)                   PPO critic
    b   = Router(mean of z_R)                  budget logits (only after `enable_router`)

Shapes: B rows, L tokens, N blocks, T tokens per block, D backbone width, d = d_model,
Z = n_latents. The env writes zeros into the hidden states of unrevealed tokens, so the block mean
of an unrevealed block is 0 and the revealed embedding says which blocks are visible. With
`beliefs` the planner also sees what the backbone believes about each candidate block before it is
revealed (env.beliefs: observation keys `entropy` [B, L] and `query_hidden` [B, N, D]).

Dtype. The planner keeps float32 weights whatever the backbone's dtype, and casts its bf16 inputs
(hidden states, query_hidden: what a GPU backbone gives) to float32 before anything else: it is
small (0.4-7 M parameters, a few percent of the backbone's time), so bf16 would save little, while
its training needs float32 (bf16 keeps 8 significant bits: an Adam step of lr 3e-4 rounds away on
any weight above 1/8 in magnitude; PPO's ratio exp(log p_new - log p_old) is a difference of nearly
equal log-probabilities).
Logits, value and budget logits leave `plan` as float32 in any case.

Checkpoints are safetensors files whose metadata carries the config (`save_orderhead` /
`load_orderhead`); R is a forward argument, not a parameter, so any R runs on any checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from orderplan.model.blocks import BlockGeometry
from orderplan.infra.checkpoint import load_safetensors, load_state_dict_checked, save_safetensors
from orderplan.config.common import BackboneConfig
from orderplan.model.loading import check_random_weights_tag

__all__ = [
    "OrderHeadConfig",
    "OrderHeadOutput",
    "OrderHead",
    "PlannerCore",
    "orderhead_config_for",
    "save_orderhead",
    "load_orderhead",
    "FORMAT",
]

FORMAT = "orderhead/v1"  # metadata["format"] of an OrderHead checkpoint


@dataclass
class OrderHeadConfig:
    """Sizes of the planner. The geometry fields (grid_h, grid_w, block) are BlockGeometry's
    arguments, so N, T and the block grid are derived from them, never stored twice."""

    hidden_dim: int = 128  # D: width of the backbone's hidden states
    grid_h: int = 8  # token grid rows
    grid_w: int = 8  # token grid columns
    block: int = 2  # block side in tokens (T = block ** 2)
    d_model: int = 128  # planner width d
    n_heads: int = 4  # attention heads (d_model % n_heads == 0)
    n_latents: int = 4  # Z: latent scratchpad tokens
    mlp_ratio: float = 2.0  # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0
    R: int = 1  # default number of latent reasoning steps (a forward argument overrides it)
    budgets: list[int] | None = None  # e.g. [1, 2, 4]: block counts of the router head; None = no router
    num_classes: int | None = None  # class conditioning (the label observation); None = unconditional
    beliefs: bool = False  # read the env's belief features of candidate blocks (env.beliefs=true)
    # the backbone's `random_weights_tag` (None: weights from a file): a planner trained on seeded
    # random weights is refused on any other backbone of the same width (`load_orderhead(backbone=)`)
    backbone_weights: str | None = None
    # residual on confidence order (the quality planner, orderplan.train.quality): logits = score -
    # H_block / anchor_tau, H_block the block's mean predictive entropy (nats/token, from the belief
    # features), and the score layer starts at 0, so a fresh head IS confident_sampled(tau) (greedy:
    # confident_first). None: plain logits. Needs beliefs.
    anchor_tau: float | None = None

    def __post_init__(self) -> None:
        self.geometry = BlockGeometry(self.grid_h, self.grid_w, self.block)  # validates the grid
        if self.anchor_tau is not None:
            self.anchor_tau = float(self.anchor_tau)
            if not (self.anchor_tau > 0 and math.isfinite(self.anchor_tau)):
                raise ValueError(f"anchor_tau must be a finite temperature > 0 (nats), got {self.anchor_tau}")
            if not self.beliefs:
                raise ValueError("anchor_tau ranks blocks by the model's entropy: it needs beliefs=true")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.R < 0 or self.n_latents < 1 or self.hidden_dim < 1:
            raise ValueError(f"need R >= 0, n_latents >= 1, hidden_dim >= 1; got {self.R}, "
                             f"{self.n_latents}, {self.hidden_dim}")
        if self.budgets is not None:
            self.budgets = [int(k) for k in self.budgets]
            if not self.budgets or min(self.budgets) < 1:
                raise ValueError(f"budgets must be a non-empty list of positive block counts, got {self.budgets}")

    # derived sizes
    @property
    def num_blocks(self) -> int:
        return self.geometry.num_blocks

    @property
    def tokens_per_block(self) -> int:
        return self.geometry.tokens_per_block

    @property
    def num_tokens(self) -> int:
        return self.geometry.num_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OrderHeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OrderHeadConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def orderhead_config_for(backbone_dim: int, geometry: BlockGeometry, **overrides: Any) -> OrderHeadConfig:
    """A config sized for a backbone: d_model = clamp(D // 2, 128, 512) rounded to a multiple of 64,
    n_heads = d_model // 64 (at least 4); d_model / n_heads given as None are scaled the same way.
    Parameters (N=16; they barely depend on N):
    tiny (D=128): d=128, 0.43 M; GPT-B (D=768): d=384, 4.0 M; GPT-L/XL (D=1024/1280): d=512, 7.1-7.2 M."""
    d_model = overrides.pop("d_model", None) or max(128, min(512, (backbone_dim // 2) // 64 * 64))
    n_heads = overrides.pop("n_heads", None) or max(4, d_model // 64)  # follows a given d_model too
    base = dict(hidden_dim=int(backbone_dim), grid_h=geometry.grid_h, grid_w=geometry.grid_w,
                block=geometry.block, d_model=d_model, n_heads=n_heads)
    return OrderHeadConfig(**{**base, **overrides})


class OrderHeadOutput(NamedTuple):
    logits: torch.Tensor  # [B, N] next-block logits, -inf exactly on revealed blocks
    value: torch.Tensor  # [B] state value
    budget_logits: torch.Tensor | None  # [B, len(budgets)], None without a router head
    latents: torch.Tensor  # [B, Z, d] z_R


# -- layers ---------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    def __init__(self, d: int, ratio: float, dropout: float, d_out: int | None = None):
        hidden = int(round(ratio * d))
        super().__init__(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out or d))


class CrossBlock(nn.Module):
    """Pre-norm residual cross-attention, optionally followed by a residual MLP: x attends to ctx.
    x [B, S, d], ctx [B, M, d] -> [B, S, d]."""

    def __init__(self, cfg: OrderHeadConfig, mlp: bool = True):
        super().__init__()
        d = cfg.d_model
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d) if mlp else None
        self.mlp = MLP(d, cfg.mlp_ratio, cfg.dropout) if mlp else None

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(ctx)
        x = x + self.attn(self.norm_q(x), kv, kv, need_weights=False)[0]
        return x if self.mlp is None else x + self.mlp(self.norm_mlp(x))


class PlannerCore(nn.Module):
    """One latent reasoning step z_r = Core(z_{r-1}, f) (pre-norm, residual): the latents
    cross-attend to the block features, self-attend among themselves, then an MLP.
    z [B, Z, d], f [B, N, d] -> [B, Z, d]."""

    def __init__(self, cfg: OrderHeadConfig):
        super().__init__()
        d = cfg.d_model
        self.cross = CrossBlock(cfg, mlp=False)
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.mlp_ratio, cfg.dropout)

    def forward(self, z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        z = self.cross(z, f)  # latents -> blocks
        h = self.norm_self(z)
        z = z + self.self_attn(h, h, h, need_weights=False)[0]
        return z + self.mlp(self.norm_mlp(z))


# -- the planner ----------------------------------------------------------------------------------


class OrderHead(nn.Module):
    """Latent planner (seed 000 Alg. 3/4). `forward(obs, R=None)` reads obs["hidden"] ([B, L, D]
    token states or [B, N, D] block means) and obs["block_mask"] ([B, N] bool, True = revealed)."""

    def __init__(self, cfg: OrderHeadConfig):
        super().__init__()
        self.cfg = cfg
        g, d = cfg.geometry, cfg.d_model
        self.register_buffer("block_row", g.block_rc[:, 0].clone(), persistent=False)  # [N]
        self.register_buffer("block_col", g.block_rc[:, 1].clone(), persistent=False)  # [N]
        # per-block features
        self.in_norm = nn.LayerNorm(cfg.hidden_dim)
        self.in_proj = nn.Linear(cfg.hidden_dim, d)
        self.row_emb = nn.Embedding(g.blocks_h, d)
        self.col_emb = nn.Embedding(g.blocks_w, d)
        self.state_emb = nn.Embedding(2, d)  # 0 = unrevealed, 1 = revealed
        if cfg.beliefs:  # candidate blocks: what the backbone predicts there, and how sure it is
            self.belief_norm = nn.LayerNorm(cfg.hidden_dim)
            self.belief_proj = nn.Linear(cfg.hidden_dim, d)
            self.entropy_proj = nn.Linear(g.tokens_per_block, d)
        self.feat_norm = nn.LayerNorm(d)
        # z0 = Pool(H, mask, positions)
        self.latent_queries = nn.Parameter(torch.randn(cfg.n_latents, d) * 0.02)
        # At the empty state nothing is revealed: the class is the only thing to plan from.
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.pool = CrossBlock(cfg, mlp=False)
        # the shared reasoning step
        self.core = PlannerCore(cfg)
        # heads
        self.readout = CrossBlock(cfg)  # blocks attend to z_R
        self.score = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
        if cfg.anchor_tau is not None:  # start exactly at the anchor (cfg.anchor_tau)
            nn.init.zeros_(self.score[1].weight)
            nn.init.zeros_(self.score[1].bias)
        self.summary_norm = nn.LayerNorm(d)
        self.value = MLP(d, 1.0, 0.0, d_out=1)
        self.router: nn.Module | None = None
        if cfg.budgets is not None:
            self.router = self._new_router(len(cfg.budgets))

    def _new_router(self, n: int) -> nn.Module:
        return MLP(self.cfg.d_model, 1.0, 0.0, d_out=n)

    @property
    def input_keys(self) -> list[str]:
        """The observation keys `forward` reads, in `plan`'s argument order."""
        return (["hidden", "block_mask"] + (["label"] if self.class_emb is not None else [])
                + (["entropy", "query_hidden"] if self.cfg.beliefs else []))

    @property
    def has_router(self) -> bool:
        return self.router is not None

    def enable_router(self, budgets: list[int]) -> None:
        """Add a freshly initialised budget-router head (Stage 6) without touching any other weight.
        With the same budgets as the current router this is a no-op."""
        budgets = [int(k) for k in budgets]
        if self.router is not None and self.cfg.budgets == budgets:
            return
        self.cfg = replace(self.cfg, budgets=budgets)  # validates
        ref = self.in_proj.weight
        self.router = self._new_router(len(budgets)).to(device=ref.device, dtype=ref.dtype)

    # -- inputs -----------------------------------------------------------------------------------

    def block_features(self, hidden: torch.Tensor, block_mask: torch.Tensor, entropy: torch.Tensor | None = None,
                       query_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, L, D] or [B, N, D], block_mask [B, N] bool (with cfg.beliefs also entropy [B, L]
        nats and query_hidden [B, N, D]) -> f [B, N, d]."""
        cfg = self.cfg
        N, L, D = cfg.num_blocks, cfg.num_tokens, cfg.hidden_dim
        if hidden.dim() != 3 or hidden.shape[-1] != D:
            raise ValueError(f"hidden must be [B, L={L}, D={D}] or [B, N={N}, D={D}] for this OrderHead, "
                             f"got {tuple(hidden.shape)}")
        B = hidden.shape[0]
        if block_mask.shape != (B, N):
            raise ValueError(f"block_mask must be [B={B}, N={N}], got {tuple(block_mask.shape)}")
        hidden = hidden.to(self.in_proj.weight.dtype)  # a GPU backbone's bf16 -> the planner's float32 (module doc)
        if hidden.shape[1] == L:
            pooled = self.cfg.geometry.pool_blocks(hidden)  # as env.hidden=block
        elif hidden.shape[1] == N:
            pooled = hidden
        else:
            raise ValueError(f"hidden has {hidden.shape[1]} rows: expected L={L} tokens or N={N} blocks")
        pos = self.row_emb(self.block_row) + self.col_emb(self.block_col)  # [N, d]
        f = self.in_proj(self.in_norm(pooled)) + pos + self.state_emb(block_mask.long())
        if cfg.beliefs:
            if entropy is None or query_hidden is None:
                raise ValueError("this OrderHead reads belief features: pass entropy [B, L] and query_hidden "
                                 "[B, N, D] (an env with env.beliefs=true)")
            if entropy.shape != (B, L) or query_hidden.shape != (B, N, D):
                raise ValueError(f"entropy must be [B={B}, L={L}] and query_hidden [B={B}, N={N}, D={D}], got "
                                 f"{tuple(entropy.shape)} and {tuple(query_hidden.shape)}")
            dt = self.in_proj.weight.dtype
            block_tokens, _ = cfg.geometry._on(entropy.device)
            ent = entropy.to(dt)[:, block_tokens]  # [B, N, T] per-token entropies, in-block raster order
            belief = self.belief_proj(self.belief_norm(query_hidden.to(dt))) + self.entropy_proj(ent)
            f = f + belief * (~block_mask)[..., None]  # revealed blocks have no beliefs (their inputs are 0)
        elif entropy is not None or query_hidden is not None:
            raise ValueError("this OrderHead was built without belief features (cfg.beliefs=false); "
                             "use an env with env.beliefs=false or a belief planner")
        return self.feat_norm(f)

    # -- forward ----------------------------------------------------------------------------------

    def plan(self, hidden: torch.Tensor, block_mask: torch.Tensor, R: int | None = None,
             label: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
             query_hidden: torch.Tensor | None = None) -> OrderHeadOutput:
        """Alg. 3 (and the router of Alg. 4) on tensors; see `OrderHeadOutput` for the shapes.
        label [B] (class ids) is required when the planner is class-conditioned (cfg.num_classes);
        entropy [B, L] and query_hidden [B, N, D] when it reads beliefs (cfg.beliefs)."""
        R = self.cfg.R if R is None else int(R)
        if R < 0:
            raise ValueError(f"R must be >= 0, got {R}")
        block_mask = block_mask.bool()
        f = self.block_features(hidden, block_mask, entropy, query_hidden)  # [B, N, d]
        queries = self.latent_queries.expand(f.shape[0], -1, -1)
        if self.class_emb is not None:
            if label is None:
                raise ValueError("this OrderHead is class-conditioned: pass label [B]")
            queries = queries + self.class_emb(label.long().clamp(0, self.cfg.num_classes))[:, None]
        z = self.pool(queries, f)  # z0 [B, Z, d]
        for _ in range(R):
            z = self.core(z, f)  # the same weights at every step
        h = self.readout(f, z)  # [B, N, d]
        logits = self.score(h)[..., 0].float()
        if self.cfg.anchor_tau is not None:
            logits = logits + self.anchor_logits(entropy)
        logits = logits.masked_fill(block_mask, float("-inf"))  # [B, N]
        s = self.summary_norm(z.mean(1))  # [B, d]
        value = self.value(s)[..., 0].float()
        budget_logits = self.router(s).float() if self.router is not None else None
        return OrderHeadOutput(logits, value, budget_logits, z)

    def anchor_logits(self, entropy: torch.Tensor) -> torch.Tensor:
        """[B, N] float32 -H_block / anchor_tau from the per-token entropies [B, L] (nats): the
        logits of confident_sampled (orderplan.planner.policies.SampledConfidencePolicy), unmasked."""
        if self.cfg.anchor_tau is None:
            raise ValueError("this OrderHead has no anchor (cfg.anchor_tau is None)")
        block_entropy = self.cfg.geometry.pool_blocks(entropy.float()[..., None])[..., 0]
        return -block_entropy / self.cfg.anchor_tau

    def forward(self, obs: Mapping[str, torch.Tensor], R: int | None = None) -> OrderHeadOutput:
        """obs: a dict or TensorDict with the keys of `input_keys` ("hidden", "block_mask", "label"
        when class-conditioned, "entropy" and "query_hidden" with beliefs), batch [B]; R defaults to cfg.R."""
        return self.plan(obs["hidden"], obs["block_mask"], R, **self.optional_inputs(obs))

    def optional_inputs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword inputs of `plan` this planner reads from `obs` (label, entropy, query_hidden)."""
        keys = [k for k in self.input_keys if k not in ("hidden", "block_mask")]
        missing = [k for k in keys if k not in obs.keys()]
        if missing:
            raise ValueError(f"this OrderHead reads {keys}; the observation lacks {missing}"
                             + (" (set env.beliefs=true)" if "entropy" in missing else ""))
        return {k: obs[k] for k in keys}

    def check_compatible(self, hidden_dim: int, geometry: BlockGeometry) -> None:
        """Raise ValueError unless this planner reads a backbone of width hidden_dim on geometry."""
        c = self.cfg
        want = (c.hidden_dim, c.grid_h, c.grid_w, c.block)
        got = (int(hidden_dim), geometry.grid_h, geometry.grid_w, geometry.block)
        if want != got:
            raise ValueError(f"OrderHead expects (D, grid_h, grid_w, block) = {want}; the backbone/env has {got}")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- checkpoint I/O -------------------------------------------------------------------------------


def save_orderhead(model: OrderHead, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Atomically write the weights to a safetensors file; metadata gets the config under
    "orderhead_config" and FORMAT under "format" (JSON-serialisable user entries are kept)."""
    meta = {**(metadata or {}), "format": FORMAT, "orderhead_config": model.cfg.to_dict()}
    return save_safetensors(model.state_dict(), path, meta)


def load_orderhead(path: str | Path, *, hidden_dim: int | None = None, geometry: BlockGeometry | None = None,
                   device: str | torch.device = "cpu", backbone: BackboneConfig | None = None) -> OrderHead:
    """Rebuild an OrderHead from `save_orderhead`'s file (in eval mode). With hidden_dim / geometry
    given, a checkpoint made for another backbone width or block grid raises ValueError; with
    `backbone` given, so does one trained on other random weights (`cfg.backbone_weights`)."""
    state, meta = load_safetensors(path)
    if meta.get("format") != FORMAT or "orderhead_config" not in meta:
        raise ValueError(f"{path} is not an OrderHead checkpoint (metadata format={meta.get('format')!r})")
    cfg = OrderHeadConfig.from_dict(meta["orderhead_config"])
    if backbone is not None:
        check_random_weights_tag(cfg.backbone_weights, backbone, path)
    model = OrderHead(cfg)
    if hidden_dim is not None or geometry is not None:
        model.check_compatible(cfg.hidden_dim if hidden_dim is None else hidden_dim, geometry or cfg.geometry)
    load_state_dict_checked(model, state, context=f"OrderHead checkpoint {path}")
    return model.to(device).eval()
