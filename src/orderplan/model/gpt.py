"""LlamaGen-compatible class-to-image GPT that can be driven in any token order.

The network is LlamaGen's `autoregressive/models/gpt.py` architecture (RMSNorm, SwiGLU FFN, 2D RoPE,
class-token prefix with a null class for classifier-free guidance, no biases) with the same
parameter names and shapes, so official `c2i_*_256.pt` checkpoints load unchanged. Two additions
make it usable for order planning (DESIGN.md section 4):

* 2D RoPE is indexed by each token's *spatial* position, never by its sequence index, so any
  generation order gets exact positional information.
* `ta_pos_table` (RAR's target-aware position embedding, zero-initialised): the input at sequence
  step t gets the embedding of the position predicted at step t+1; the class token gets the first
  position's. Because that embedding depends on the *next* decision, the last revealed token is kept
  *pending* (outside the KV cache) until the next target position is known.

Three ways to run it, each an explicit method (no behaviour switch on `self.training`):

* `forward_sequence` / `forward_train`: one causal pass over a whole (prefix of a) sequence in a
  given order; used for training and as the O(L^2) full-recompute reference.
* `init_state` + `append` / `advance` + `feed`: incremental decoding with a per-row KV cache
  (`DecodeState`), O(L) total work for any block order; rows of a batch may be at different
  lengths.
* `query`: `log p(x_j | x_S)` for many unseen positions j in one forward: each query row is the
  pending token carrying `ta(j)` and attends to the cache and to itself only.
* `decode_step` / `append_query`: a commit and query rows in ONE forward (parallel decoding: a
  decision that samples many tokens costs one forward, whatever their number).

Host-device synchronisation: by default the cached methods check their inputs against the state and
size the attention window to the longest cache exactly, which reads device tensors (on a GPU each
read waits for the queue to drain). Hot loops that checked their inputs once at their boundary pass
`validate=False`: nothing is read back from the device, and the window is the caller's host-known
`window` or the state's host bound `DecodeState.kmax_bound`. Masks hide every slot past a row's own
length, so a wider window gives the same attention up to float summation order.

Shapes: B batch, L = grid_h * grid_w tokens, T new tokens, Q query rows, D model dim, V vocabulary,
H heads, Dh head dim, C cache capacity (= L + 1, the last slot is scratch for inactive rows).
Positions are raster token indices p = row * grid_w + col; position -1 denotes the class token."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASS_POS = -1  # position id of the class-token prefix (its RoPE is cos = sin = 0, as in LlamaGen)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    """Architecture of the GPT. Field names follow LlamaGen's `ModelArgs` where they exist."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row used for CFG
    vocab_size: int = 16384
    grid_h: int = 16
    grid_w: int = 16

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def num_tokens(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def null_class(self) -> int:
        """Index of the unconditional (CFG) class embedding row."""
        return self.num_classes

    def validate(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            # 2D RoPE rotates pairs, half of them by row and half by column.
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 for 2D RoPE")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={kv}")
        if self.class_dropout_prob <= 0:
            raise ValueError("class_dropout_prob must be > 0: the null-class row is needed for CFG")

    def to_dict(self) -> dict:
        return asdict(self)


# LlamaGen's class-conditional presets (sizes from its gpt.py: GPT-B is 12 layers, 111M parameters).
PRESETS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    # The embedded MNIST default: a few hundred thousand parameters per layer, same architecture class.
    "tiny": dict(n_layer=6, n_head=4, dim=128, multiple_of=64, num_classes=10, vocab_size=256,
                 grid_h=8, grid_w=8),
}


def gpt_config(preset: str, **overrides) -> GPTConfig:
    """Config of a named preset (`GPT-B`, `GPT-L`, `GPT-XL`, `tiny`) with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = GPTConfig(**{**PRESETS[preset], **overrides})
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------
# Building blocks (LlamaGen names)
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 even under bf16, as LlamaGen does; the fused kernel computes LlamaGen's
        # x * rsqrt(mean(x^2) + eps) in one pass (bit-identical on CPU float32, 2x faster)
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class LabelEmbedder(nn.Module):
    """Class embedding table [num_classes + 1, D]; row `num_classes` is the null class for CFG.

    Unlike LlamaGen, label dropout is not done here: the training loop replaces labels by the null
    class explicitly, so a frozen backbone never drops labels by accident.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def rope_table_2d(grid_h: int, grid_w: int, head_dim: int, base: float) -> torch.Tensor:
    """cos/sin table [1 + L, head_dim // 2, 2]; row 0 is the class token (all zeros), row 1 + p is
    raster position p. Pair i < head_dim // 4 is rotated by the row index, the rest by the column
    index, with LlamaGen's frequencies base ** (-2k / (head_dim / 2))."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [Dh/4]
    rows = torch.arange(grid_h).float()[:, None] * freqs  # [H, Dh/4]
    cols = torch.arange(grid_w).float()[:, None] * freqs  # [W, Dh/4]
    grid = torch.cat(
        [rows[:, None, :].expand(-1, grid_w, -1), cols[None, :, :].expand(grid_h, -1, -1)], dim=-1
    )  # [H, W, Dh/2]
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # [L, Dh/2, 2]
    return torch.cat([torch.zeros(1, half, 2), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]). x [B, T, H, Dh], rope [B, T, Dh/2, 2] (cos, sin)."""
    # one complex multiply instead of six real elementwise ops: the same products, about 10x less time
    # on CPU, where elementwise kernels dominate a small model's decode step
    xs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, T, H, Dh/2]
    rot = torch.view_as_complex(rope.float().contiguous())[:, :, None]  # [B, T, 1, Dh/2]
    return torch.view_as_real(xs * rot).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.dim, self.n_head, self.head_dim = cfg.dim, cfg.n_head, cfg.head_dim
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, ctx: "_CacheContext | None" = None,
                layer: int = 0) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. Without `ctx`: causal attention within x. With `ctx`: the
        cached modes (append: write keys into the cache, then attend to it; query: attend to the
        cache and to the row itself)."""
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        if ctx is None:
            keys, values, mask, causal = k, v, None, True
        else:
            keys, values = ctx.keys_values(layer, k, v)
            mask, causal = ctx.mask, False
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # cache may be kept in another dtype
        rep = self.n_head // self.n_kv_head
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )  # [B, H, T, Dh]
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, self.dim)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, ctx: "_CacheContext | None" = None,
                layer: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, ctx, layer)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------------------------
# Incremental decoding state
# ----------------------------------------------------------------------------------------------


@dataclass
class DecodeState:
    """Per-row KV cache and pending token of an incremental any-order decode.

    k, v: one [B, Hkv, C, Dh] tensor per layer. `length` [B]: committed cache entries (the class
    token counts as one). `pending_tok`/`pending_pos` [B]: the last revealed token, not yet in the
    cache because its target-aware embedding needs the next position (-1/-1 = the class token).
    `has_pending` [B] bool: False between `advance` and `feed`. `cond` [B]: class labels.
    `kmax_bound`: a host-side upper bound of `length.max()` (a Python int, advanced by every commit),
    so attention windows can be sized without reading the device; exact while rows move in lockstep.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: torch.Tensor
    pending_tok: torch.Tensor
    pending_pos: torch.Tensor
    has_pending: torch.Tensor
    cond: torch.Tensor
    capacity: int = field(default=0)
    kmax_bound: int = 0

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    def clone(self) -> "DecodeState":
        return replace(
            self, k=[t.clone() for t in self.k], v=[t.clone() for t in self.v],
            length=self.length.clone(), pending_tok=self.pending_tok.clone(),
            pending_pos=self.pending_pos.clone(), has_pending=self.has_pending.clone(),
            cond=self.cond.clone(),
        )

    def select(self, rows: torch.Tensor) -> "DecodeState":
        """A new state holding rows `rows` (LongTensor [B'], repeats allowed: used to branch one
        visible prefix into several candidates)."""
        return replace(
            self, k=[t[rows] for t in self.k], v=[t[rows] for t in self.v],
            length=self.length[rows], pending_tok=self.pending_tok[rows],
            pending_pos=self.pending_pos[rows], has_pending=self.has_pending[rows],
            cond=self.cond[rows],
        )

    def copy_rows_(self, rows: torch.Tensor, other: "DecodeState") -> None:
        """In place: rows `rows` [B'] of this state := all rows of `other` (batch B')."""
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[rows] = src
        for name in ("length", "pending_tok", "pending_pos", "has_pending", "cond"):
            getattr(self, name)[rows] = getattr(other, name)
        self.kmax_bound = max(self.kmax_bound, other.kmax_bound)

    def reset_rows_(self, rows: torch.Tensor, cond: torch.Tensor) -> None:
        """In place: restart rows `rows` (bool [B] or LongTensor) from the class token `cond`.
        `kmax_bound` stays (still an upper bound: which rows restart is not known on the host)."""
        self.length[rows] = 0
        self.pending_tok[rows] = CLASS_POS
        self.pending_pos[rows] = CLASS_POS
        self.has_pending[rows] = True
        self.cond[rows] = cond


@dataclass
class _QueryRows:
    """Query rows run in the same forward as a commit: token `tok` at `pos` [B] carrying ta(`ta`)
    [B, Q] (-1: no target-aware term). `skip_last`: the token is the commit's last input (committed
    there with another target), so the rows must not see that cache entry; otherwise the token is
    not in the cache at all (it stays pending) and the rows see everything committed."""

    tok: torch.Tensor
    pos: torch.Tensor
    ta: torch.Tensor
    skip_last: bool


class _CacheContext:
    """What one cached forward needs in every layer: where to write, what to attend to, the mask."""

    def __init__(self, state: DecodeState, mode: str, write_idx: torch.Tensor | None,
                 kmax: int, mask: torch.Tensor):
        self.state, self.mode, self.write_idx, self.kmax, self.mask = state, mode, write_idx, kmax, mask

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.state.k[layer], self.state.v[layer]
        if self.mode == "append":
            # inputs past write_idx's width are query rows: attended to (their own key) but never cached
            T = self.write_idx.shape[1]
            idx = self.write_idx[:, None, :, None].expand(-1, kc.shape[1], -1, kc.shape[3])
            if T == k.shape[2]:
                kc.scatter_(2, idx, k.to(kc.dtype))
                vc.scatter_(2, idx, v.to(vc.dtype))
                return kc[:, :, : self.kmax], vc[:, :, : self.kmax]
            kc.scatter_(2, idx, k[:, :, :T].to(kc.dtype))
            vc.scatter_(2, idx, v[:, :, :T].to(vc.dtype))
            return (torch.cat([kc[:, :, : self.kmax], k[:, :, T:].to(kc.dtype)], 2),
                    torch.cat([vc[:, :, : self.kmax], v[:, :, T:].to(vc.dtype)], 2))
        # query rows: the cached prefix plus each row's own key
        return (torch.cat([kc[:, :, : self.kmax], k.to(kc.dtype)], 2),
                torch.cat([vc[:, :, : self.kmax], v.to(vc.dtype)], 2))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """LlamaGen c2i Transformer with any-order incremental decoding and query rows."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.ta_pos_table = nn.Embedding(cfg.num_tokens, cfg.dim)
        # Not persistent: LlamaGen keeps its RoPE table out of the state dict too.
        self.register_buffer(
            "rope", rope_table_2d(cfg.grid_h, cfg.grid_w, cfg.head_dim, cfg.rope_base), persistent=False
        )
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Keep the RoPE table in float32 when the model is cast (e.g. .to(torch.bfloat16)):
        # LlamaGen keeps freqs_cis out of the module's dtype casts too.
        rope = self.rope
        out = super()._apply(fn, recurse)
        self.rope = rope.to(device=self.output.weight.device, dtype=torch.float32)
        return out

    def reset_parameters(self) -> None:
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)  # LlamaGen zero-initialises the output layer
        nn.init.zeros_(self.ta_pos_table.weight)  # starts as a no-op, so LlamaGen weights are unchanged

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- embeddings ------------------------------------------------------------------------------

    def _embed(self, cond: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor,
               ta_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings and RoPE for inputs `tok` at positions `pos` [B, T] (pos == -1: the
        class token of `cond` [B]) whose next target is `ta_pos` [B, T] (-1: no target-aware term).
        Returns x [B, T, D] and rope [B, T, Dh/2, 2]."""
        is_cls = pos < 0
        tok_emb = self.tok_embeddings(tok.clamp(min=0))
        cls_emb = self.cls_embedding(cond)[:, None, :].expand_as(tok_emb)
        x = torch.where(is_cls[..., None], cls_emb, tok_emb)
        ta = self.ta_pos_table(ta_pos.clamp(min=0)) * (ta_pos >= 0)[..., None].to(x.dtype)
        return x + ta, self.rope[pos + 1]

    def _head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(h)
        return self.output(h).float(), h

    # -- full sequences (training, reference) ---------------------------------------------------

    def forward_sequence(self, cond: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal pass over [class token, tokens]. cond [B]; tokens, positions [B, T] (token ids
        in generation order and their raster positions, T may be 0); targets [B, T + 1]: the
        position each input predicts, -1 where no target-aware term should be added (plain LlamaGen
        behaviour). Returns logits [B, T + 1, V] (float32; output t predicts the token at
        targets[:, t]) and final-norm hidden states [B, T + 1, D]."""
        B = cond.shape[0]
        cls = torch.full((B, 1), CLASS_POS, dtype=torch.long, device=cond.device)
        x, rope = self._embed(cond, torch.cat([cls, tokens], 1), torch.cat([cls, positions], 1), targets)
        h = self.tok_dropout(x)
        for layer in self.layers:
            h = layer(h, rope)
        return self._head(h)

    def forward_train(self, tokens: torch.Tensor, cond: torch.Tensor, order: torch.Tensor | None = None,
                      use_ta: torch.Tensor | bool = True) -> torch.Tensor:
        """Teacher-forced logits of a whole image in a given order.

        tokens [B, L]: the code grid in raster layout; cond [B] (already dropped to the null class
        where CFG dropout applies); order [B, L]: raster positions in generation order (None =
        raster); use_ta: bool or [B] bool, whether each sample uses the target-aware embedding.
        Returns logits [B, L, V] where logits[:, t] predicts tokens at order[:, t].
        """
        B, L = tokens.shape
        if order is None:
            order = torch.arange(L, device=tokens.device).expand(B, L)
        seq = tokens.gather(1, order)
        use_ta = torch.as_tensor(use_ta, device=tokens.device).expand(B)
        targets = torch.where(use_ta[:, None], order, torch.full_like(order, -1))
        logits, _ = self.forward_sequence(cond, seq[:, :-1], order[:, :-1], targets)
        return logits

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, order: torch.Tensor | None = None,
                use_ta: torch.Tensor | bool = True) -> torch.Tensor:
        """The training forward (`forward_train`); defined so DistributedDataParallel can wrap it."""
        return self.forward_train(tokens, cond, order, use_ta)

    # -- incremental decoding --------------------------------------------------------------------

    def init_state(self, cond: torch.Tensor, dtype: torch.dtype | None = None) -> DecodeState:
        """An empty decode state for classes `cond` [B]: the class token is pending."""
        B, cfg = cond.shape[0], self.cfg
        dtype = dtype or self.output.weight.dtype
        cap = cfg.num_tokens + 1  # cls + (L - 1) tokens ever committed, plus one scratch slot
        shape = (B, cfg.n_kv_head or cfg.n_head, cap, cfg.head_dim)
        dev = cond.device
        # zeros, not empty: masked-out rows may read them and must stay finite
        return DecodeState(
            k=[torch.zeros(shape, dtype=dtype, device=dev) for _ in range(cfg.n_layer)],
            v=[torch.zeros(shape, dtype=dtype, device=dev) for _ in range(cfg.n_layer)],
            length=torch.zeros(B, dtype=torch.long, device=dev),
            pending_tok=torch.full((B,), CLASS_POS, dtype=torch.long, device=dev),
            pending_pos=torch.full((B,), CLASS_POS, dtype=torch.long, device=dev),
            has_pending=torch.ones(B, dtype=torch.bool, device=dev),
            cond=cond.clone().long(),
            capacity=cap,
        )

    def _commit(self, state: DecodeState, tok: torch.Tensor, pos: torch.Tensor, ta_pos: torch.Tensor,
                active: torch.Tensor | None, validate: bool, window: int | None,
                query: "_QueryRows | None" = None, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run inputs [B, T] causally after the cache, write their keys/values and advance `length`
        on active rows. Inactive rows write into the scratch slot and keep their state. The window
        (cache slots attended) is `window`, else exact when validating, else from `kmax_bound`.

        `query` adds Q query rows to the same forward (see `_QueryRows`): they are never cached and
        their outputs follow the T committed ones, so the result is [B, T + Q, V] and [B, T + Q, D].
        `counts` [B] (<= T): only the first counts[b] inputs of row b are committed (a ragged batch;
        the rest is padding, written to the scratch slot, its outputs meaningless)."""
        B, T = tok.shape
        dev = tok.device
        act = torch.ones(B, dtype=torch.bool, device=dev) if active is None else active.to(dev)
        n_in = torch.full((B,), T, dtype=torch.long, device=dev) if counts is None else counts.to(dev).long()
        end = state.length + n_in
        if validate:
            if bool((act & (end > state.capacity - 1)).any()):
                bad = torch.nonzero(act & (end > state.capacity - 1)).flatten().tolist()
                raise ValueError(f"rows {bad}: appending {T} inputs overflows the cache "
                                 f"(capacity {state.capacity - 1}); the image has only {self.cfg.num_tokens} tokens")
            exact = int(torch.where(act, end, 1).max())
            if window is not None and window < exact:
                raise ValueError(f"window={window} is narrower than the longest active cache after the call ({exact})")
            kmax = exact if window is None else window
        else:
            kmax = state.kmax_bound + T if window is None else window
        kmax = min(kmax, state.capacity - 1)  # past that lies only the scratch slot, which no row sees
        steps = torch.arange(T, device=dev)
        write_idx = torch.where(act[:, None] & (steps[None, :] < n_in[:, None]), state.length[:, None] + steps,
                                state.capacity - 1)
        kpos = torch.arange(kmax, device=dev)
        # row b, input t sees cache slots < length + t + 1 (itself included); inactive: slot 0 only
        visible = torch.where(act[:, None], state.length[:, None] + steps + 1, 1)  # [B, T]
        mask = (kpos[None, None, :] < visible[:, :, None])[:, None]  # [B, 1, T, kmax]
        x, rope = self._embed(state.cond, tok, pos, ta_pos)
        if query is not None and query.ta.shape[1] > 0:
            Q = query.ta.shape[1]
            # a query row sees the cache before its own token (minus the last committed input when that
            # input is its token, committed there with another target) and itself, never the others
            seen = state.length + n_in - (1 if query.skip_last else 0)
            q_vis = kpos[None, :] < torch.where(act, seen, 1)[:, None]  # [B, kmax]
            eye = torch.eye(Q, dtype=torch.bool, device=dev)
            mask = torch.cat([
                torch.cat([mask, mask.new_zeros(B, 1, T, Q)], 3),
                torch.cat([q_vis[:, None, None, :].expand(B, 1, Q, kmax), eye.expand(B, 1, Q, Q)], 3)], 2)
            qx, qrope = self._embed(state.cond, query.tok[:, None].expand(B, Q), query.pos[:, None].expand(B, Q),
                                    query.ta)
            x, rope = torch.cat([x, qx], 1), torch.cat([rope, qrope], 1)
        ctx = _CacheContext(state, "append", write_idx, kmax, mask)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, ctx, i)
        state.length = torch.where(act, end, state.length)
        state.kmax_bound = max(state.kmax_bound, kmax)  # active rows now end <= kmax, the others did not move
        return self._head(h)

    def append(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor,
               active: torch.Tensor | None = None, *, validate: bool = True,
               window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-force `tokens` at `positions` [B, T] (e.g. one block in in-block raster order).

        The pending token is committed with ta(positions[:, 0]), tokens[:, :-1] are committed with
        the next position's ta, and tokens[:, -1] becomes pending. `active` [B] bool limits the
        update to some rows (the others are left unchanged; their outputs are meaningless).
        Returns logits [B, T, V] (logits[:, t] predicts tokens[:, t] given everything before: their
        log-softmax gathered at `tokens` is the block's log-likelihood) and hidden states [B, T, D]
        of the committed inputs.

        validate=False skips the checks of tokens, positions and pending tokens (the caller checked
        them) and reads nothing back from the device; `window` (host int): cache slots to attend,
        at least the longest active row's length after the call (default: see the module doc).
        """
        self._check_rows(state, tokens, positions, validate)
        act = torch.ones_like(state.has_pending) if active is None else active.to(torch.bool)
        if validate and bool((act & ~state.has_pending).any()):
            raise ValueError("append() needs a pending token on every active row; call feed() after advance()")
        tok = torch.cat([state.pending_tok[:, None], tokens[:, :-1]], 1)
        pos = torch.cat([state.pending_pos[:, None], positions[:, :-1]], 1)
        out = self._commit(state, tok, pos, positions, act, validate, window)
        state.pending_tok = torch.where(act, tokens[:, -1], state.pending_tok)
        state.pending_pos = torch.where(act, positions[:, -1], state.pending_pos)
        return out

    def advance(self, state: DecodeState, target: torch.Tensor, active: torch.Tensor | None = None, *,
                validate: bool = True, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit the pending token with ta(target) and return the prediction for `target` [B]:
        logits [B, V], hidden [B, D]. Follow with `feed` once the token is known (generation).
        `validate`, `window`: as in `append`."""
        act = torch.ones_like(state.has_pending) if active is None else active.to(torch.bool)
        if validate:
            self._check_positions(target, "advance() target", allow_none=False)
            if bool((act & ~state.has_pending).any()):
                raise ValueError("advance() twice without feed(): the pending token was already committed")
        logits, h = self._commit(state, state.pending_tok[:, None], state.pending_pos[:, None],
                                 target[:, None], act, validate, window)
        state.has_pending = state.has_pending & ~act
        return logits[:, 0], h[:, 0]

    def feed(self, state: DecodeState, token: torch.Tensor, position: torch.Tensor,
             active: torch.Tensor | None = None, *, validate: bool = True) -> None:
        """Make `token` at `position` [B] the pending token (after `advance` predicted it).
        validate=False skips the checks (no read of the device)."""
        act = torch.ones_like(state.has_pending) if active is None else active.to(torch.bool)
        if validate:
            self._check_positions(position, "feed() position", allow_none=False)
            if bool(((token < 0) | (token >= self.cfg.vocab_size)).any()):
                raise ValueError(f"feed() token ids must lie in [0, {self.cfg.vocab_size})")
            if bool((act & state.has_pending).any()):
                raise ValueError("feed() without advance(): the previous pending token would be lost")
        state.pending_tok = torch.where(act, token, state.pending_tok)
        state.pending_pos = torch.where(act, position, state.pending_pos)
        state.has_pending = state.has_pending | act

    def decode_step(self, state: DecodeState, targets: torch.Tensor, tokens: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None, *, validate: bool = True,
                    window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One parallel-decoding decision in ONE forward: commit the pending token and `tokens` at
        `positions` [B, T] (the rest of the previous decision's tokens, T may be 0), then predict
        every target of `targets` [B, Q] given all of them.

        The last committed input carries ta(targets[:, 0]), so its output predicts targets[:, 0]
        exactly as `advance` would; targets[:, 1:] are query rows of that same input carrying their
        own target (it attends to the cache before it and to itself, as `query` rows do). Returns
        logits [B, Q, V] and hidden [B, Q, D]; afterwards no token is pending: `feed` the first
        sampled token and pass the others as the next call's `tokens`. With T = 0 and Q = 1 this is
        `advance` itself (the same forward, bit for bit), so one token per decision is today's decode."""
        if validate:
            if not bool(state.has_pending.all()):
                raise ValueError("decode_step() needs a pending token on every row (feed() the first sampled token)")
            self._check_positions(targets, "decode_step() targets", allow_none=False)
        if targets.dim() != 2 or targets.shape[0] != state.batch_size or targets.shape[1] == 0:
            raise ValueError(f"decode_step() targets must be [B={state.batch_size}, Q >= 1], got {tuple(targets.shape)}")
        tok, pos = state.pending_tok[:, None], state.pending_pos[:, None]
        if tokens is not None and tokens.shape[-1] > 0:
            self._check_rows(state, tokens, positions, validate)
            tok, pos = torch.cat([tok, tokens], 1), torch.cat([pos, positions], 1)
        ta = torch.cat([pos[:, 1:], targets[:, :1]], 1)
        query = _QueryRows(tok[:, -1], pos[:, -1], targets[:, 1:], skip_last=True)
        logits, h = self._commit(state, tok, pos, ta, None, validate, window, query)
        state.has_pending = torch.zeros_like(state.has_pending)
        T = tok.shape[1]
        return logits[:, T - 1:], h[:, T - 1:]

    def append_query(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                     active: torch.Tensor | None = None, *, counts: torch.Tensor | None = None, validate: bool = True,
                     window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`append(tokens, positions)` then `query(targets)` in ONE forward: the same state after it
        and the same outputs up to float summation order. tokens, positions [B, T]; targets [B, Q]
        (-1: the target-free row). Returns the append's logits [B, T, V] and hidden [B, T, D], then the
        query's logits [B, Q, V] and hidden [B, Q, D]. `active`, `validate`, `window`: as in `append`
        (`window` must cover the longest cache after the append). `counts` [B] (1..T): row b appends
        only its first counts[b] tokens (the rest is padding: any valid ids; its outputs are
        meaningless), so rows may append different numbers of tokens in the one forward."""
        self._check_rows(state, tokens, positions, validate)
        act = torch.ones_like(state.has_pending) if active is None else active.to(torch.bool)
        if validate:
            if bool((act & ~state.has_pending).any()):
                raise ValueError("append_query() needs a pending token on every active row")
            self._check_positions(targets, "append_query() targets", allow_none=True)
        if targets.dim() != 2 or targets.shape[0] != state.batch_size:
            raise ValueError(f"append_query() targets must be [B={state.batch_size}, Q], got {tuple(targets.shape)}")
        T = tokens.shape[1]
        if counts is None:
            last_tok, last_pos = tokens[:, -1], positions[:, -1]
        else:
            counts = counts.to(tokens.device).long()
            if validate and bool((act & ((counts < 1) | (counts > T))).any()):
                raise ValueError(f"append_query() counts must lie in [1, {T}] on active rows")
            i = (counts.clamp(1, T) - 1)[:, None]
            last_tok, last_pos = tokens.gather(1, i)[:, 0], positions.gather(1, i)[:, 0]
        tok = torch.cat([state.pending_tok[:, None], tokens[:, :-1]], 1)
        pos = torch.cat([state.pending_pos[:, None], positions[:, :-1]], 1)
        query = _QueryRows(last_tok, last_pos, targets, skip_last=False)
        logits, h = self._commit(state, tok, pos, positions, act, validate, window, query, counts)
        state.pending_tok = torch.where(act, last_tok, state.pending_tok)
        state.pending_pos = torch.where(act, last_pos, state.pending_pos)
        return logits[:, :T], h[:, :T], logits[:, T:], h[:, T:]

    def query(self, state: DecodeState, targets: torch.Tensor, *, validate: bool = True,
              window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions for many positions at once without changing the state.

        targets [B, Q]: raster positions j; row (b, q) is the pending token of row b carrying
        ta(j), attending to row b's cache and to itself only, which is exactly the last output of
        an explicit forward of (prefix, j). targets == -1 gives the pending token's output with no
        target-aware term (a target-free summary). Returns logits [B, Q, V] (log_softmax gathered
        at x_j is log p(x_j | x_S)) and hidden [B, Q, D].

        validate=False skips the checks of targets and pending tokens and reads nothing back from
        the device; `window` (host int): cache slots to attend, at least the longest row's length.
        """
        if validate:
            if not bool(state.has_pending.all()):
                raise ValueError("query() needs a pending token on every row")
            self._check_positions(targets, "query() targets", allow_none=True)
        if targets.dim() != 2 or targets.shape[0] != state.batch_size:
            raise ValueError(f"query() targets must be [B={state.batch_size}, Q], got {tuple(targets.shape)}")
        B, Q = targets.shape
        dev = targets.device
        if validate:
            exact = max(int(state.length.max()), 1)
            if window is not None and window < exact:
                raise ValueError(f"window={window} is narrower than the longest cache ({exact})")
            kmax = exact if window is None else window
        else:
            kmax = max(state.kmax_bound, 1) if window is None else window
        kmax = min(kmax, state.capacity - 1)
        cache_vis = torch.arange(kmax, device=dev)[None, :] < state.length[:, None]  # [B, kmax]
        self_vis = torch.eye(Q, dtype=torch.bool, device=dev)
        mask = torch.cat([cache_vis[:, None, :].expand(B, Q, kmax), self_vis.expand(B, Q, Q)], 2)[:, None]
        ctx = _CacheContext(state, "query", None, kmax, mask)
        tok = state.pending_tok[:, None].expand(B, Q)
        pos = state.pending_pos[:, None].expand(B, Q)
        x, rope = self._embed(state.cond, tok, pos, targets)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, ctx, i)
        return self._head(h)

    def _check_positions(self, pos: torch.Tensor, what: str, allow_none: bool) -> None:
        lo = -1 if allow_none else 0
        if bool(((pos < lo) | (pos >= self.cfg.num_tokens)).any()):
            extra = " (or -1 for no target)" if allow_none else ""
            raise ValueError(f"{what} must lie in [0, {self.cfg.num_tokens}){extra}")

    def _check_rows(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor,
                    validate: bool = True) -> None:
        """Shapes always (host-side, free); value ranges only when validating (they read the device)."""
        if tokens.shape != positions.shape or tokens.dim() != 2 or tokens.shape[0] != state.batch_size:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must "
                             f"both be [B={state.batch_size}, T]")
        if tokens.shape[1] == 0:
            raise ValueError("append() needs at least one token")
        if not validate:
            return
        L, V = self.cfg.num_tokens, self.cfg.vocab_size
        if bool(((positions < 0) | (positions >= L)).any()):
            raise ValueError(f"positions must lie in [0, {L})")
        if bool(((tokens < 0) | (tokens >= V)).any()):
            raise ValueError(f"token ids must lie in [0, {V})")
