"""Future-loss quantities behind the rewards and the oracle (DESIGN.md section 5), all in nats.

For an image with ground-truth tokens x [L], a visible set S (the blocks revealed so far, held in a
`DecodeState`: a KV cache plus a pending last token) and the unseen tokens R:

* `l_j(S) = -log p(x_j | x_S)` for j in R: one `GPT.query` row per j (`unseen_token_nll`);
  generation mode uses predictive entropies `H_j(S)` instead (`unseen_token_entropy`).
* `l_j(S + a)` for every candidate block a and every j in R \\ a (`candidate_nll`): one batched pass
  per layer that shares the visible prefix's cache among all candidates (no per-candidate copy).
* The oracle utility `u(a|S) = L_rest(S) - L_rest(S + a)` with `L_rest(S) = sum_{j in R} l_j(S)`,
  the latter summed over R \\ a, and the extrapolative utility
  `u_x(a|S) = sum_{j in R \\ a} w(j, a) [l_j(S) - l_j(S + a)]` (`oracle_utilities`, weights from
  `extrapolative_weights`).

`naive_candidate_nll` / `naive_oracle_utilities` compute the same numbers with no KV cache at all
(one explicit `forward_sequence` per candidate); they are slow and exist as the test reference.

This module is the KV-shared loss machinery: what the oracle and the env's query rows compute. The
rewards the env pays are formed from these losses in `orderplan.env.rewards`, not here.

Host-device synchronisation: by default every entry point checks its inputs and reads two sizes
from the device (the longest cache, the most unseen tokens of any row). A caller that knows them on
the host passes `sizes=HostSizes(...)` and `validate=False`; the call then reads nothing back from
the device (on a GPU, the launches of the whole pass queue without waiting). The env does so.

Shapes: B batch, L tokens, N blocks, T tokens per block, C candidates, Q query targets per row
(the most unseen tokens of any row), P cached prefix slots, D model dim, V vocabulary, H heads,
Hkv key/value heads (GQA), Dh head dim."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal, NamedTuple

import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.model.gpt import GPT, Attention, DecodeState, apply_rope

__all__ = [
    "HostSizes",
    "UtilityKind",
    "WeightKind",
    "unseen_token_nll",
    "unseen_token_entropy",
    "candidate_nll",
    "extrapolative_weights",
    "oracle_utilities",
    "naive_candidate_nll",
    "naive_oracle_utilities",
    "generic_candidate_chunk_nll",
]

UtilityKind = Literal["future_loss", "extrapolative"]
WeightKind = Literal["uniform", "neighbours", "distance"]
UTILITY_KINDS: tuple[str, ...] = ("future_loss", "extrapolative")
WEIGHT_KINDS: tuple[str, ...] = ("uniform", "neighbours", "distance")


class HostSizes(NamedTuple):
    """Sizes of a state known on the host, so a call need not read them from the device. Exact
    values give exactly the numbers of a call without them; larger ones are correct too (padding
    rows and masked cache slots), up to float summation order."""

    length: int  # the longest cache of any row: max_b DecodeState.length[b]
    unseen: int  # the most unseen tokens of any row: max_b |R_b| (the query width Q)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _unseen_targets(unseen: torch.Tensor, Q: int | None = None) -> torch.Tensor:
    """Query targets for the unseen positions of each row, padded to the longest row.

    unseen [B, L] bool -> targets [B, Q] long (raster positions, ascending; -1 = padding). Q: the
    host-known width (at least max_b |R_b|); None reads it from the device.
    """
    if Q is None:
        Q = int(unseen.sum(1).max()) if unseen.numel() else 0
    # stable sort puts each row's unseen positions first, in raster order
    order = torch.sort((~unseen).to(torch.int8), dim=1, stable=True).indices[:, :Q]  # [B, Q]
    return torch.where(unseen.gather(1, order), order, -1)


def _scatter_targets(values: torch.Tensor, targets: torch.Tensor, L: int) -> torch.Tensor:
    """values [B, ..., Q] at query targets [B, Q] (-1 = padding) -> [B, ..., L], zeros elsewhere."""
    B, Q = targets.shape
    idx = torch.where(targets >= 0, targets, L)  # padding lands in an extra column, dropped below
    idx = idx.view(B, *([1] * (values.dim() - 2)), Q).expand_as(values)
    return values.new_zeros(*values.shape[:-1], L + 1).scatter_(-1, idx, values)[..., :L]


def _nll_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[tokens]: logits [..., V] float, tokens [...] long -> [...] float32."""
    logits = logits.float()
    return logits.logsumexp(-1) - logits.gather(-1, tokens[..., None])[..., 0]


def _check_state(state: DecodeState, x: torch.Tensor | None, unseen: torch.Tensor, L: int,
                 validate: bool = True) -> None:
    """Shapes always (host-side); the pending tokens only when validating (a read of the device)."""
    B = state.batch_size
    if unseen.shape != (B, L) or unseen.dtype != torch.bool:
        raise ValueError(f"unseen must be a bool tensor [B={B}, L={L}], got {unseen.dtype} {tuple(unseen.shape)}")
    if x is not None and x.shape != (B, L):
        raise ValueError(f"x must be [B={B}, L={L}], got {tuple(x.shape)}")
    if validate and not bool(state.has_pending.all()):
        raise ValueError("the state needs a pending token on every row (call feed() after advance())")


# ----------------------------------------------------------------------------------------------
# l_j(S) and H_j(S): one query row per unseen token
# ----------------------------------------------------------------------------------------------


def _query(gpt: GPT, state: DecodeState, targets: torch.Tensor, validate: bool,
           sizes: HostSizes | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`gpt.query` with the host-known window when there is one (a non-GPT model: plain call)."""
    if not isinstance(gpt, GPT):
        return gpt.query(state, targets)
    return gpt.query(state, targets, validate=validate, window=None if sizes is None else max(sizes.length, 1))


@torch.no_grad()
def unseen_token_nll(gpt: GPT, state: DecodeState, x: torch.Tensor, unseen: torch.Tensor, *,
                     validate: bool = True, sizes: HostSizes | None = None) -> torch.Tensor:
    """l_j(S) = -log p(x_j | x_S) in nats at the unseen positions, 0 elsewhere.

    x [B, L] ground-truth tokens (raster layout); unseen [B, L] bool (R, may differ in size per
    row). One `gpt.query` of Q = max_b |R_b| rows. Returns [B, L] float32. The state is unchanged.
    validate, sizes: see the module doc.
    """
    L = gpt.cfg.num_tokens
    _check_state(state, x, unseen, L, validate)
    targets = _unseen_targets(unseen, None if sizes is None else sizes.unseen)
    if targets.shape[1] == 0:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    logits, _ = _query(gpt, state, targets, validate, sizes)  # [B, Q, V]
    nll = _nll_from_logits(logits, x.gather(1, targets.clamp(min=0)))  # [B, Q]
    return _scatter_targets(nll, targets, L)


@torch.no_grad()
def unseen_token_entropy(gpt: GPT, state: DecodeState, unseen: torch.Tensor,
                         temperature: float = 1.0, *, validate: bool = True,
                         sizes: HostSizes | None = None) -> torch.Tensor:
    """H_j(S): entropy in nats of p(. | x_S) / temperature at the unseen positions, 0 elsewhere.

    The generation-mode stand-in for l_j(S) (no ground truth needed). unseen [B, L] bool.
    Returns [B, L] float32. The state is unchanged. validate, sizes: see the module doc.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    L = gpt.cfg.num_tokens
    _check_state(state, None, unseen, L, validate)
    targets = _unseen_targets(unseen, None if sizes is None else sizes.unseen)
    if targets.shape[1] == 0:
        return torch.zeros(unseen.shape, dtype=torch.float32, device=unseen.device)
    logits, _ = _query(gpt, state, targets, validate, sizes)
    logp = (logits.float() / temperature).log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)  # [B, Q]
    return _scatter_targets(ent, targets, L)


# ----------------------------------------------------------------------------------------------
# l_j(S + a) for every candidate block a: one batched pass sharing the prefix cache
# ----------------------------------------------------------------------------------------------


def _candidate_attention(attn: Attention, h: torch.Tensor, rope: torch.Tensor, k_pre: torch.Tensor,
                         v_pre: torch.Tensor, prefix_vis: torch.Tensor, block_vis: torch.Tensor,
                         T: int) -> torch.Tensor:
    """One attention layer for all candidate row groups, sharing the cached prefix.

    h [B, C, R, D]: per candidate (b, c), R = T + Q rows: the T block inputs, then the Q query rows.
    rope [B * C, R, Dh/2, 2]. k_pre, v_pre [B, Hkv, P, Dh]: row b's cached prefix (a view of the
    cache, never copied per candidate). prefix_vis [B, P] bool: cache slots < length_b.
    block_vis [R, T] bool: block input t sees block inputs <= t, query rows see all T.

    Every row attends to three pieces, normalised by one float32 softmax over their concatenation:
    [prefix of b (P) | block inputs of (b, c) (T) | the row itself (1)]. Returns [B, C, R, D].
    """
    B, C, R, D = h.shape
    H, Hkv, Dh = attn.n_head, attn.n_kv_head, attn.head_dim
    rep, P = H // Hkv, k_pre.shape[2]
    q, k, v = attn.wqkv(h).split([attn.dim, Hkv * Dh, Hkv * Dh], dim=-1)
    q = apply_rope(q.reshape(B * C, R, H, Dh), rope)
    k = apply_rope(k.reshape(B * C, R, Hkv, Dh), rope)
    # query head g * rep + r reads kv head g (what repeat_interleave does in Attention.forward)
    q = q.view(B, C, R, Hkv, rep, Dh).permute(0, 3, 1, 4, 2, 5)  # [B, Hkv, C, rep, R, Dh]
    k = k.view(B, C, R, Hkv, Dh).permute(0, 3, 1, 2, 4)  # [B, Hkv, C, R, Dh]
    v = v.view(B, C, R, Hkv, Dh).permute(0, 3, 1, 2, 4)  # [B, Hkv, C, R, Dh]
    k_blk, v_blk = k[:, :, :, :T], v[:, :, :, :T]  # [B, Hkv, C, T, Dh]
    k_pre, v_pre = k_pre.to(q.dtype), v_pre.to(q.dtype)
    scale = 1.0 / math.sqrt(Dh)
    neg = float("-inf")

    # prefix: (C, rep, R) folded into the row dim so the matmul batches over (B, Hkv) only and
    # every candidate reads row b's keys in place
    s_pre = (q.reshape(B, Hkv, C * rep * R, Dh) @ k_pre.transpose(-1, -2)).view(B, Hkv, C, rep, R, P)
    s_pre = s_pre.float().masked_fill_(~prefix_vis[:, None, None, None, None, :], neg)
    s_blk = (q.reshape(B, Hkv, C, rep * R, Dh) @ k_blk.transpose(-1, -2)).view(B, Hkv, C, rep, R, T)
    s_blk = s_blk.float().masked_fill_(~block_vis, neg)
    s_self = (q.float() * k[:, :, :, None].float()).sum(-1, keepdim=True)  # [B, Hkv, C, rep, R, 1]
    s_self[..., :T, :] = neg  # block inputs see themselves through the causal block piece

    scores = torch.cat([s_pre, s_blk, s_self], -1).mul_(scale)  # float32 [..., P + T + 1]
    del s_pre, s_blk, s_self  # the pieces are the largest tensors here: free them before the softmax
    probs = scores.softmax(-1)
    del scores
    p_pre, p_blk, p_self = probs.split([P, T, 1], -1)
    out = (p_pre.to(v.dtype).reshape(B, Hkv, C * rep * R, P) @ v_pre).view(B, Hkv, C, rep, R, Dh).float()
    out = out + (p_blk.to(v.dtype).reshape(B, Hkv, C, rep * R, T) @ v_blk).view(B, Hkv, C, rep, R, Dh).float()
    out = out + p_self * v[:, :, :, None].float()
    out = out.to(h.dtype).permute(0, 2, 4, 1, 3, 5).reshape(B, C, R, D)  # heads back in (g, r) order
    return attn.wo(out)


def _candidate_chunk_nll(gpt: GPT, state: DecodeState, x: torch.Tensor, targets: torch.Tensor,
                         blocks: torch.Tensor, geom: BlockGeometry, P: int | None = None) -> torch.Tensor:
    """-log p(x_j | x_S, x_a) at every query target j, for candidate blocks `blocks` [B, C] (valid
    ids only). targets [B, Q] (-1 = padding); P: the host-known longest cache (None: read it).
    Returns [B, C, Q] float32 (meaningless at padding and at j in a; the caller masks them)."""
    B, C = blocks.shape
    Q = targets.shape[1]
    block_tokens, _ = geom._on(x.device)
    T = geom.tokens_per_block
    blk_pos = block_tokens[blocks]  # [B, C, T] raster positions of each candidate block
    blk_tok = x[:, None, :].expand(B, C, -1).gather(2, blk_pos)  # [B, C, T]

    # Rows of group (b, c): T block inputs (the pending token then the block's first T - 1 tokens,
    # each carrying ta of the next position in the block), then Q query rows (the block's last
    # token, now pending, carrying ta(j)).
    pend_tok = state.pending_tok[:, None, None].expand(B, C, 1)
    pend_pos = state.pending_pos[:, None, None].expand(B, C, 1)
    tok = torch.cat([pend_tok, blk_tok[..., :-1], blk_tok[..., -1:].expand(B, C, Q)], 2)  # [B, C, R]
    pos = torch.cat([pend_pos, blk_pos[..., :-1], blk_pos[..., -1:].expand(B, C, Q)], 2)
    ta = torch.cat([blk_pos, targets[:, None, :].expand(B, C, Q)], 2)
    R = T + Q
    cond = state.cond[:, None].expand(B, C).reshape(B * C)
    emb, rope = gpt._embed(cond, tok.reshape(B * C, R), pos.reshape(B * C, R), ta.reshape(B * C, R))
    h = emb.view(B, C, R, -1)

    if P is None:
        P = int(state.length.max())
    prefix_vis = torch.arange(P, device=x.device)[None, :] < state.length[:, None]  # [B, P]
    # block input t sees block inputs <= t (itself included); query rows (t >= T) see all T
    block_vis = torch.arange(T, device=x.device)[None, :] <= torch.arange(R, device=x.device)[:, None]  # [R, T]
    for i, layer in enumerate(gpt.layers):
        k_pre, v_pre = state.k[i][:, :, :P], state.v[i][:, :, :P]  # views: no copy
        h = h + _candidate_attention(layer.attention, layer.attention_norm(h), rope, k_pre, v_pre,
                                     prefix_vis, block_vis, T)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    logits, _ = gpt._head(h[:, :, T:])  # [B, C, Q, V]; only the query rows need the head
    return _nll_from_logits(logits, x.gather(1, targets.clamp(min=0))[:, None, :].expand(B, C, Q))


@torch.no_grad()
def candidate_nll(gpt: GPT, state: DecodeState, x: torch.Tensor, unseen: torch.Tensor,
                  geom: BlockGeometry, candidates: torch.Tensor, chunk: int | None = None, *,
                  validate: bool = True, sizes: HostSizes | None = None) -> torch.Tensor:
    """l_j(S + a) in nats for every candidate block a and every unseen token j outside a.

    state: the visible prefix S (pending token on every row; rows may have different lengths).
    x [B, L] ground truth; unseen [B, L] bool (R); candidates [B, C] long block ids, -1 = padding;
    each candidate block must be entirely unseen. `chunk`: at most this many candidates per pass
    (bounds memory, ~ B * chunk * H * (T + Q) * (P + T + 1) attention scores and
    B * chunk * Q * V logits); None = all at once.

    All candidates run in one pass per chunk that reads row b's cached prefix in place (no copy of
    the KV cache per candidate). Returns [B, C, L] float32: 0 for j in a, for j in S and for padded
    candidates. The state is unchanged. validate, sizes: see the module doc (with `sizes`, a chunk
    of padding only is computed and zeroed rather than skipped after a read of the device).
    """
    L, N = gpt.cfg.num_tokens, geom.num_blocks
    _check_state(state, x, unseen, L, validate)
    if geom.num_tokens != L:
        raise ValueError(f"geometry has {geom.num_tokens} tokens but the GPT {L}")
    B = state.batch_size
    if candidates.dim() != 2 or candidates.shape[0] != B or candidates.dtype != torch.long:
        raise ValueError(f"candidates must be a long tensor [B={B}, C], got {candidates.dtype} "
                         f"{tuple(candidates.shape)}")
    if validate and bool(((candidates < -1) | (candidates >= N)).any()):
        raise ValueError(f"candidate block ids must lie in [0, {N}) (or -1 for padding)")
    block_tokens, token_block = geom._on(x.device)
    is_cand = candidates >= 0
    blocks = candidates.clamp(min=0)  # padded candidates run as block 0 and are zeroed below
    if validate:
        blk_unseen = unseen.gather(1, block_tokens[blocks].flatten(1)).view(*blocks.shape, -1).all(-1)
        if bool((is_cand & ~blk_unseen).any()):
            bad = torch.nonzero(is_cand & ~blk_unseen).tolist()
            raise ValueError(f"candidates (row, slot) {bad[:8]} name blocks that are already (partly) revealed")

    C = candidates.shape[1]
    out = torch.zeros(B, C, L, dtype=torch.float32, device=x.device)
    targets = _unseen_targets(unseen, None if sizes is None else sizes.unseen)
    if C == 0 or targets.shape[1] == 0:
        return out
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of candidates, got {chunk}")
    step = C if chunk is None else int(chunk)
    for c0 in range(0, C, step):
        sl = slice(c0, c0 + step)
        if sizes is None and not bool(is_cand[:, sl].any()):
            continue
        # a model that is not our GPT (tests/support/keyblock_toy.py) takes the generic path: no shared-prefix kernel
        if isinstance(gpt, GPT):
            nll = _candidate_chunk_nll(gpt, state, x, targets, blocks[:, sl], geom,
                                       None if sizes is None else sizes.length)  # [B, c, Q]
        else:
            nll = generic_candidate_chunk_nll(gpt, state, x, targets, blocks[:, sl], geom)
        out[:, sl] = _scatter_targets(nll, targets, L)
    # keep j in R \ a only, and nothing for padded candidates
    keep = unseen[:, None, :] & (token_block[None, None, :] != candidates[:, :, None]) & is_cand[:, :, None]
    return out * keep


# ----------------------------------------------------------------------------------------------
# Generic path: any backbone with init_state / append / query whose state has select()
# ----------------------------------------------------------------------------------------------


def generic_candidate_chunk_nll(gpt, state, x: torch.Tensor, targets: torch.Tensor, blocks: torch.Tensor,
                                geom: BlockGeometry) -> torch.Tensor:
    """`_candidate_chunk_nll` for a model that is not a `GPT` (e.g. the exact toy model of
    tests/support/keyblock_toy.py), through its public interface only: branch the state once per candidate
    (`state.select`), `append` the candidate block, `query` the targets. Copies the state per
    candidate, so it is slower than the shared-prefix kernel; same contract: blocks [B, C] (valid
    ids), targets [B, Q] (-1 = padding) -> [B, C, Q] float32 (meaningless at padding and at j in a)."""
    B, C = blocks.shape
    Q = targets.shape[1]
    block_tokens, _ = geom._on(x.device)
    rows = torch.arange(B, device=x.device).repeat_interleave(C)  # [B * C]: row b once per candidate
    branch = state.select(rows)
    pos = block_tokens[blocks.reshape(-1)]  # [B * C, T]
    gpt.append(branch, x[rows].gather(1, pos), pos)
    logits, _ = gpt.query(branch, targets[rows])  # [B * C, Q, V]
    nll = _nll_from_logits(logits, x[rows].gather(1, targets[rows].clamp(min=0)))
    return nll.view(B, C, Q)


# ----------------------------------------------------------------------------------------------
# The oracle utility
# ----------------------------------------------------------------------------------------------


def extrapolative_weights(geom: BlockGeometry, kind: WeightKind, neighbour_weight: float = 0.5) -> torch.Tensor:
    """w(j, a) of the extrapolative utility, indexed [a, j]: [N, L] float32 (CPU).

    uniform: 1. neighbours: `neighbour_weight` on the tokens of the 8 blocks around a, 1 elsewhere.
    distance: d(block(j), a) / max d, the block-centre distance over the largest one on the grid,
    so far tokens count most. The tokens of a itself get 0 in every kind: u_x sums over R \\ a.
    """
    N = geom.num_blocks
    tb = geom.token_block  # [L]
    if kind == "uniform":
        w = torch.ones(N, geom.num_tokens)
    elif kind == "neighbours":
        w = torch.where(geom.block_adjacency[:, tb], float(neighbour_weight), 1.0)
    elif kind == "distance":
        d = geom.block_distance  # [N, N]
        w = d[:, tb] / d.max().clamp(min=1.0)  # clamp: a single-block grid has max d = 0
    else:
        raise ValueError(f"unknown extrapolative weight {kind!r}; choose from {WEIGHT_KINDS}")
    own = tb[None, :] == torch.arange(N)[:, None]
    return w.masked_fill(own, 0.0).float()


@lru_cache(maxsize=16)
def _weights_on(geom: BlockGeometry, kind: WeightKind, neighbour_weight: float, device: torch.device) -> torch.Tensor:
    """`extrapolative_weights` on `device`, cached: a copy from the host every call would wait for the GPU."""
    return extrapolative_weights(geom, kind, neighbour_weight).to(device)


@torch.no_grad()
def oracle_utilities(gpt: GPT, state: DecodeState, x: torch.Tensor, revealed: torch.Tensor,
                     geom: BlockGeometry, kind: UtilityKind = "future_loss", weight: WeightKind = "uniform",
                     candidates: torch.Tensor | None = None, chunk: int | None = None,
                     neighbour_weight: float = 0.5, *, validate: bool = True,
                     sizes: HostSizes | None = None) -> torch.Tensor:
    """Utility of revealing each block next, in nats: [B, N] float32, -inf where not computed.

    state: the visible prefix S, consistent with revealed [B, N] bool; x [B, L] ground truth.
    kind "future_loss": u(a|S) = L_rest(S) - L_rest(S + a), L_rest(S) summed over all of R and
    L_rest(S + a) over R \\ a (so a's own loss counts: the returns telescope to L_rest(empty)).
    kind "extrapolative": u_x(a|S) = sum_{j in R \\ a} w(j, a) [l_j(S) - l_j(S + a)] with w from
    `extrapolative_weights(geom, weight, neighbour_weight)` (`weight` is ignored for future_loss).
    candidates [B, C] long (-1 = padding): compute only these blocks (they must be unrevealed);
    None = every unrevealed block. `chunk`: see `candidate_nll`. The state is unchanged.
    validate, sizes: see the module doc (with `sizes`, candidates=None packs sizes.unseen / T
    columns, exactly the most unrevealed blocks of any row).
    """
    if kind not in UTILITY_KINDS:
        raise ValueError(f"unknown utility kind {kind!r}; choose from {UTILITY_KINDS}")
    if weight not in WEIGHT_KINDS:
        raise ValueError(f"unknown extrapolative weight {weight!r}; choose from {WEIGHT_KINDS}")
    B, N = state.batch_size, geom.num_blocks
    if revealed.shape != (B, N) or revealed.dtype != torch.bool:
        raise ValueError(f"revealed must be a bool tensor [B={B}, N={N}], got {revealed.dtype} {tuple(revealed.shape)}")
    dev = x.device
    revealed = revealed.to(dev)
    if candidates is None:
        # every unrevealed block, packed to the left (stable sort keeps ascending block ids)
        C = int((~revealed).sum(1).max()) if sizes is None else sizes.unseen // geom.tokens_per_block
        idx = torch.sort(revealed.to(torch.int8), dim=1, stable=True).indices[:, :C]
        candidates = torch.where(revealed.gather(1, idx), -1, idx)
    else:
        candidates = candidates.to(dev)
        bad = (candidates >= 0) & revealed.gather(1, candidates.clamp(min=0))
        if validate and bool(bad.any()):
            raise ValueError(f"candidates (row, slot) {torch.nonzero(bad).tolist()[:8]} are revealed blocks")
    unseen = geom.block_mask_to_token_mask(~revealed)  # [B, L]

    before = unseen_token_nll(gpt, state, x, unseen, validate=validate, sizes=sizes)  # l_j(S), [B, L]
    after = candidate_nll(gpt, state, x, unseen, geom, candidates, chunk,
                          validate=validate, sizes=sizes)  # l_j(S + a), [B, C, L]
    _, token_block = geom._on(dev)
    rest = unseen[:, None, :] & (token_block[None, None, :] != candidates[:, :, None])  # j in R \ a
    if kind == "future_loss":
        util = before.sum(1, keepdim=True) - after.sum(2)  # [B, C]
    else:
        w = _weights_on(geom, weight, float(neighbour_weight), torch.device(dev))[candidates.clamp(min=0)]  # [B, C, L]
        util = (w * rest * (before[:, None, :] - after)).sum(2)

    out = torch.full((B, N + 1), float("-inf"), device=dev)  # column N collects the padding
    out.scatter_(1, torch.where(candidates >= 0, candidates, N), util)
    return out[:, :N].contiguous()


# ----------------------------------------------------------------------------------------------
# Naive references (tests only): no KV cache, one explicit forward per candidate
# ----------------------------------------------------------------------------------------------


def _naive_nll(gpt: GPT, cond: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
               x_row: torch.Tensor, js: torch.Tensor) -> torch.Tensor:
    """-log p(x_j | tokens) for each j in js [J] by explicit forwards of [cls, tokens] whose last
    input carries ta(j); one batch row per j. cond: scalar; tokens, positions [n]. Returns [J]."""
    J, n = js.shape[0], tokens.shape[0]
    targets = torch.cat([positions[None, :].expand(J, n), js[:, None]], 1)  # [J, n + 1]
    logits, _ = gpt.forward_sequence(cond.reshape(1).expand(J), tokens[None, :].expand(J, n),
                                     positions[None, :].expand(J, n), targets)
    return -logits[:, -1].float().log_softmax(-1)[torch.arange(J), x_row[js]]


def _naive_prefix(prefix_tokens: torch.Tensor, prefix_pos: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = int((prefix_pos[b] >= 0).sum())
    return prefix_tokens[b, :n], prefix_pos[b, :n]


@torch.no_grad()
def naive_candidate_nll(gpt: GPT, cond: torch.Tensor, prefix_tokens: torch.Tensor, prefix_pos: torch.Tensor,
                        x: torch.Tensor, unseen: torch.Tensor, geom: BlockGeometry,
                        candidates: torch.Tensor) -> torch.Tensor:
    """Reference for `candidate_nll` with no KV cache.

    cond [B]; prefix_tokens, prefix_pos [B, P]: the revealed tokens in the order they were revealed
    and their raster positions, right-padded with position -1 for shorter rows; x [B, L];
    unseen [B, L] bool; candidates [B, C] (-1 = padding). For each row and candidate a, runs
    [cls, prefix, block a in raster order] with the last input carrying ta(j), for every unseen
    j outside a. Returns [B, C, L] float32 (0 for j in a, in S, and for padded candidates).
    """
    B, C = candidates.shape
    out = torch.zeros(B, C, x.shape[1])
    for b in range(B):
        pt, pp = _naive_prefix(prefix_tokens, prefix_pos, b)
        for c in range(C):
            a = int(candidates[b, c])
            if a < 0:
                continue
            blk = geom.block_tokens[a].to(x.device)
            rest = unseen[b].clone()
            rest[blk] = False
            js = torch.nonzero(rest).flatten()
            if js.numel():
                out[b, c, js] = _naive_nll(gpt, cond[b], torch.cat([pt, x[b, blk]]), torch.cat([pp, blk]),
                                           x[b], js).cpu()
    return out.to(x.device)


@torch.no_grad()
def naive_oracle_utilities(gpt: GPT, cond: torch.Tensor, prefix_tokens: torch.Tensor, prefix_pos: torch.Tensor,
                           x: torch.Tensor, geom: BlockGeometry, kind: UtilityKind = "future_loss",
                           weight: WeightKind = "uniform", candidates: torch.Tensor | None = None,
                           neighbour_weight: float = 0.5) -> torch.Tensor:
    """Reference for `oracle_utilities` with no KV cache and the weights written out longhand.

    Inputs as in `naive_candidate_nll`; the revealed blocks are those holding prefix tokens.
    Returns [B, N] float32, -inf for revealed blocks and for blocks not in `candidates`.
    """
    B, N, L = x.shape[0], geom.num_blocks, geom.num_tokens
    tb = geom.token_block
    out = torch.full((B, N), float("-inf"))
    max_dist = max(
        math.dist(geom.block_rc[a].tolist(), geom.block_rc[b].tolist()) for a in range(N) for b in range(N)
    ) or 1.0

    def w(j: int, a: int) -> float:
        ra, rj = geom.block_rc[a].tolist(), geom.block_rc[int(tb[j])].tolist()
        if weight == "uniform":
            return 1.0
        if weight == "neighbours":
            return neighbour_weight if max(abs(ra[0] - rj[0]), abs(ra[1] - rj[1])) == 1 else 1.0
        if weight == "distance":
            return math.dist(ra, rj) / max_dist
        raise ValueError(f"unknown extrapolative weight {weight!r}")

    for b in range(B):
        pt, pp = _naive_prefix(prefix_tokens, prefix_pos, b)
        seen = torch.zeros(L, dtype=torch.bool)
        seen[pp.cpu()] = True
        revealed = [bool(seen[geom.block_tokens[a]].any()) for a in range(N)]
        R = [j for j in range(L) if not seen[j]]
        l_before = dict(zip(R, _naive_nll(gpt, cond[b], pt, pp, x[b], torch.tensor(R, device=x.device)).tolist())) if R else {}
        todo = range(N) if candidates is None else [int(a) for a in candidates[b] if a >= 0]
        for a in todo:
            if revealed[a]:
                continue
            blk = geom.block_tokens[a].to(x.device)
            rest = [j for j in R if int(tb[j]) != a]
            l_after = {}
            if rest:
                nll = _naive_nll(gpt, cond[b], torch.cat([pt, x[b, blk]]), torch.cat([pp, blk]), x[b],
                                 torch.tensor(rest, device=x.device))
                l_after = dict(zip(rest, nll.tolist()))
            if kind == "future_loss":
                out[b, a] = sum(l_before.values()) - sum(l_after.values())
            elif kind == "extrapolative":
                out[b, a] = sum(w(j, a) * (l_before[j] - l_after[j]) for j in rest)
            else:
                raise ValueError(f"unknown utility kind {kind!r}")
    return out.to(x.device)
