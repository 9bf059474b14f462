"""The expected oracle: a one-step planner utility, in nats, that needs no ground truth.

The ground-truth oracle of `orderplan.oracle.future_loss` scores a candidate block a at the visible set S by
u(a|S) = L_rest(S) - L_rest(S + a), with l_j the loss of the true token x_j. In generation there is
no x: this module replaces every unknown token by the model's own beliefs. Under the model,
E[l_j(S)] = E_{x_j ~ p(. | x_S)}[-log p(x_j | x_S)] = H_j(S), the predictive entropy, so
sum_{j in R} H_j(S) is the expected L_rest(S); and the expected L_rest(S + a) is the same sum over
R \\ a after revealing a, averaged over what a may turn out to be, estimated by Monte Carlo:

    û(a|S) = sum_{j in R} H_j(S) - (1/K) sum_{k=1..K} sum_{j in R \\ a} H_j(S ∪ {x_a = x̃_a^(k)})

R: the unseen tokens (those of the unrevealed blocks); H_j(S): entropy in nats of p(x_j | x_S);
x̃_a^(k) ~ p(x_a | x_S), k = 1..K: independent samples of block a's T tokens, drawn jointly, token by
token in in-block raster order (`geom.block_tokens[a]`), at temperature 1 with no top-k / top-p and
no classifier-free guidance (the conditional model of the state's class, `state.cond`).

* `sample_candidate_blocks`: branches every (row, candidate) K times with `DecodeState.select` and
  samples the block with `GPT.advance` / `GPT.feed`; returns the samples, their log-probabilities
  and the branched state (positioned after the block).
* `expected_utilities`: û for every unrevealed block (or given candidates) of every row, all
  (b, c, k) branches of a chunk in one batch; `samples` given = teacher-forced with `GPT.append`
  instead of drawn (tests, reproducing a run).
* `naive_expected_utilities`: the same numbers for given samples with no KV cache at all (explicit
  `forward_sequence` passes); slow, the test reference.

Cost unit (`BeliefUtilities.forwards`): one backbone forward = one causal pass over one branch of
the state for one candidate continuation (the T tokens of the block appended, sampled token by token
or teacher-forced, plus the query that reads the other unseen tokens, count as 1); the base query
for H_j(S) counts 1. Per row: 1 + K * C_b, C_b the row's real candidates (0 for a finished row).
The ground-truth oracle (`oracle_utilities`) costs 1 + C_b in the same unit.

Shapes: B batch, L tokens, N blocks, T tokens per block, C candidates (-1 = padding), K samples
per candidate, M real (row, candidate) pairs of a chunk, V vocabulary. util [B, N], entropy [B, L],
samples [B, C, K, T], sample_logp [B, C, K]. All entropies, utilities and log-probabilities in nats."""

from __future__ import annotations

from typing import NamedTuple

import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.oracle.future_loss import _naive_prefix, unseen_token_entropy
from orderplan.model.gpt import GPT, DecodeState

__all__ = [
    "BeliefUtilities",
    "sample_candidate_blocks",
    "expected_utilities",
    "naive_expected_utilities",
]

# Bad (row, slot) pairs shown in an error message before it is cut short.
_MAX_REPORTED = 8


class BeliefUtilities(NamedTuple):
    """What `expected_utilities` returns (all float tensors float32, in nats)."""

    util: torch.Tensor  # [B, N] û(a|S); -inf on revealed blocks and blocks not computed
    entropy: torch.Tensor  # [B, L] H_j(S); 0 on revealed tokens
    candidates: torch.Tensor  # [B, C] long block ids, -1 = padding
    samples: torch.Tensor  # [B, C, K, T] long sampled block tokens (0 at padded candidates)
    sample_logp: torch.Tensor  # [B, C, K] log p(x̃_a^(k) | x_S) of each sample (0 at padding)
    forwards: torch.Tensor  # [B] long backbone forwards this call cost per row (module docstring)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_K(K: int) -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K (samples per candidate) must be an int >= 1, got {K!r}")
    return K


def _check_candidates(candidates: torch.Tensor, B: int, N: int) -> None:
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2 or candidates.shape[0] != B \
            or candidates.dtype != torch.long:
        got = f"{candidates.dtype} {tuple(candidates.shape)}" if isinstance(candidates, torch.Tensor) \
            else type(candidates).__name__
        raise ValueError(f"candidates must be a long tensor [B={B}, C], got {got}")
    bad = (candidates < -1) | (candidates >= N)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(1)).flatten().tolist()
        raise ValueError(f"candidate block ids must lie in [0, {N}) (or -1 for padding); rows "
                         f"{rows[:_MAX_REPORTED]} have {candidates[bad].tolist()[:_MAX_REPORTED]}")


def _check_samples(samples: torch.Tensor, shape: tuple[int, ...], is_cand: torch.Tensor, V: int) -> None:
    if not isinstance(samples, torch.Tensor) or samples.dtype != torch.long or tuple(samples.shape) != shape:
        got = f"{samples.dtype} {tuple(samples.shape)}" if isinstance(samples, torch.Tensor) \
            else type(samples).__name__
        raise ValueError(f"samples must be a long tensor [B, C, K, T] = {list(shape)}, got {got}")
    # padded candidates may hold anything (the cached call leaves 0 there); real ones must be tokens
    bad = ((samples < 0) | (samples >= V)).flatten(2).any(-1) & is_cand.to(samples.device)
    if bool(bad.any()):
        pairs = torch.nonzero(bad).tolist()
        raise ValueError(f"samples must be token ids in [0, {V}); (row, slot) {pairs[:_MAX_REPORTED]} are not")


# ----------------------------------------------------------------------------------------------
# Branching and sampling
# ----------------------------------------------------------------------------------------------


def _branch_blocks(gpt: GPT, state: DecodeState, rows: torch.Tensor, blocks: torch.Tensor,
                   geom: BlockGeometry, K: int, generator: torch.Generator | None,
                   active: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, DecodeState]:
    """Branch row rows[m] of `state` K times (order m-major, then k) and reveal block blocks[m] in
    each branch: sampled (tokens None) or teacher-forced (tokens [M, K, T]). rows, blocks [M] long;
    active [M] bool (None = all): inactive branches are left as the input row (their outputs are
    meaningless), so padding never touches a cache that may be full.

    Returns samples [M, K, T] long, log p(sample | x_S) [M, K] float32 (0 where inactive) and the
    branched state [M * K] with each active branch's last block token pending."""
    M, T = rows.shape[0], geom.tokens_per_block
    block_tokens, _ = geom._on(rows.device)
    branch = state.select(rows.repeat_interleave(K))  # indexing copies: the input state is untouched
    pos = block_tokens[blocks].repeat_interleave(K, 0)  # [M * K, T]
    act = None if active is None else active.repeat_interleave(K)
    if tokens is not None:
        tok = tokens.reshape(M * K, T)
        logits, _ = gpt.append(branch, tok, pos, active=act)  # [M * K, T, V]
        logp = logits.float().log_softmax(-1).gather(-1, tok[..., None])[..., 0].sum(-1)
    else:
        tok = torch.empty(M * K, T, dtype=torch.long, device=rows.device)
        logp = torch.zeros(M * K, dtype=torch.float32, device=rows.device)
        for t in range(T):  # one token at a time: token t is drawn given the block's tokens < t
            logits, _ = gpt.advance(branch, pos[:, t], active=act)
            lp = logits.float().log_softmax(-1)  # temperature 1, unfiltered, unguided
            tok[:, t] = torch.multinomial(lp.exp(), 1, generator=generator)[:, 0]
            logp += lp.gather(-1, tok[:, t:t + 1])[:, 0]
            gpt.feed(branch, tok[:, t], pos[:, t], active=act)
    if act is not None:
        tok = torch.where(act[:, None], tok, 0)
        logp = torch.where(act, logp, 0.0)
    return tok.view(M, K, T), logp.view(M, K), branch


@torch.no_grad()
def sample_candidate_blocks(gpt: GPT, state: DecodeState, candidates: torch.Tensor, geom: BlockGeometry,
                            K: int, generator: torch.Generator | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, DecodeState]:
    """K samples x̃_a^(k) ~ p(x_a | x_S) of every candidate block a of every row.

    state: the visible prefix S (pending token on every row). candidates [B, C] long, -1 = padding
    (they are not checked against what is revealed here; `expected_utilities` does). `generator`: a
    torch.Generator on the state's device (None = the global one).

    Returns samples [B, C, K, T] long (0 at padding), sample_logp [B, C, K] float32 (0 at padding)
    and the branched state [B * C * K], rows ordered b-major then c then k, each positioned after its
    sampled block (the block's last token pending); padded branches are copies of their input row.
    The input state is unchanged.
    """
    _check_K(K)
    B, N = state.batch_size, geom.num_blocks
    if geom.num_tokens != gpt.cfg.num_tokens:
        raise ValueError(f"geometry has {geom.num_tokens} tokens but the GPT {gpt.cfg.num_tokens}")
    if not bool(state.has_pending.all()):
        raise ValueError("the state needs a pending token on every row (call feed() after advance())")
    dev = state.length.device
    candidates = candidates.to(dev) if isinstance(candidates, torch.Tensor) else candidates
    _check_candidates(candidates, B, N)
    C, T = candidates.shape[1], geom.tokens_per_block
    rows = torch.arange(B, device=dev).repeat_interleave(C)
    flat = candidates.reshape(-1)
    samples, logp, branch = _branch_blocks(gpt, state, rows, flat.clamp(min=0), geom, K, generator,
                                           active=flat >= 0)
    return samples.view(B, C, K, T), logp.view(B, C, K), branch


# ----------------------------------------------------------------------------------------------
# The expected oracle
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def expected_utilities(gpt: GPT, state: DecodeState, revealed: torch.Tensor, geom: BlockGeometry,
                       K: int = 4, generator: torch.Generator | None = None,
                       candidates: torch.Tensor | None = None, chunk: int | None = None,
                       samples: torch.Tensor | None = None) -> BeliefUtilities:
    """û(a|S) in nats for every candidate block a of every row (formula: module docstring).

    state: the visible prefix S (pending token on every row), consistent with revealed [B, N] bool.
    K: samples per candidate. candidates [B, C] long (-1 = padding; each must be unrevealed); None =
    every unrevealed block, packed to the left in ascending order (as `oracle_utilities`).
    chunk: at most this many candidate columns per pass; the branch count (and the copied KV cache)
    is at most B * chunk * K, the entropy logits B * chunk * K * |R| * V floats; None = all at once.
    samples [B, C, K, T] long: block tokens to use instead of drawing them (teacher-forced; their
    log-probabilities are still computed). Rows with no unrevealed block get -inf everywhere.

    Only the real (row, candidate) pairs of a chunk are branched (padding costs nothing). The input
    state is unchanged. Returns `BeliefUtilities`.
    """
    _check_K(K)
    B, N, L, T = state.batch_size, geom.num_blocks, gpt.cfg.num_tokens, geom.tokens_per_block
    if geom.num_tokens != L:
        raise ValueError(f"geometry has {geom.num_tokens} tokens but the GPT {L}")
    if not isinstance(revealed, torch.Tensor) or revealed.shape != (B, N) or revealed.dtype != torch.bool:
        got = f"{revealed.dtype} {tuple(revealed.shape)}" if isinstance(revealed, torch.Tensor) \
            else type(revealed).__name__
        raise ValueError(f"revealed must be a bool tensor [B={B}, N={N}], got {got}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of candidates or None, got {chunk!r}")
    dev = state.length.device
    revealed = revealed.to(dev)
    if candidates is None:
        # stable sort keeps each row's unrevealed blocks first, in ascending id order
        C = int((~revealed).sum(1).max()) if B else 0
        idx = torch.sort(revealed.to(torch.int8), dim=1, stable=True).indices[:, :C]
        candidates = torch.where(revealed.gather(1, idx), -1, idx)
    else:
        candidates = candidates.to(dev) if isinstance(candidates, torch.Tensor) else candidates
        _check_candidates(candidates, B, N)
        bad = (candidates >= 0) & revealed.gather(1, candidates.clamp(min=0))
        if bool(bad.any()):
            rows = torch.nonzero(bad.any(1)).flatten().tolist()
            raise ValueError(f"candidates name blocks that are already revealed in rows {rows[:_MAX_REPORTED]} "
                             f"((row, slot) {torch.nonzero(bad).tolist()[:_MAX_REPORTED]})")
    C = candidates.shape[1]
    is_cand = candidates >= 0
    if samples is not None:
        _check_samples(samples, (B, C, K, T), is_cand, gpt.cfg.vocab_size)
        samples = torch.where(is_cand[:, :, None, None], samples.to(dev), 0)

    unseen = geom.block_mask_to_token_mask(~revealed)  # [B, L]: R
    entropy = unseen_token_entropy(gpt, state, unseen)  # H_j(S), one query
    _, token_block = geom._on(dev)

    util_c = torch.zeros(B, C, dtype=torch.float32, device=dev)
    out_samples = torch.zeros(B, C, K, T, dtype=torch.long, device=dev)
    out_logp = torch.zeros(B, C, K, dtype=torch.float32, device=dev)
    step = max(C, 1) if chunk is None else chunk
    for c0 in range(0, C, step):
        sl = slice(c0, c0 + step)
        pair_b, pair_c = torch.nonzero(is_cand[:, sl], as_tuple=True)  # the chunk's real pairs, [M]
        if pair_b.numel() == 0:
            continue
        pair_c = pair_c + c0
        blocks = candidates[pair_b, pair_c]
        given = None if samples is None else samples[pair_b, pair_c]
        tok, logp, branch = _branch_blocks(gpt, state, pair_b, blocks, geom, K, generator, tokens=given)
        # the branch's unseen set is R \ a
        br = pair_b.repeat_interleave(K)
        rest = unseen[br] & (token_block[None, :] != blocks.repeat_interleave(K)[:, None])  # [M * K, L]
        after = unseen_token_entropy(gpt, branch, rest).sum(1).view(-1, K)  # [M, K]
        del branch
        util_c[pair_b, pair_c] = entropy[pair_b].sum(1) - after.mean(1)
        out_samples[pair_b, pair_c] = tok
        out_logp[pair_b, pair_c] = logp

    util = torch.full((B, N + 1), float("-inf"), device=dev)  # column N collects the padding
    util.scatter_(1, torch.where(is_cand, candidates, N), util_c)
    forwards = 1 + K * is_cand.sum(1)
    return BeliefUtilities(util[:, :N].contiguous(), entropy, candidates, out_samples, out_logp, forwards)


# ----------------------------------------------------------------------------------------------
# Naive reference (tests only): no KV cache, explicit forwards
# ----------------------------------------------------------------------------------------------


def _naive_entropy(gpt: GPT, cond: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                   js: torch.Tensor) -> torch.Tensor:
    """H of p(x_j | tokens) for each j in js [J], by explicit forwards of [cls, tokens] whose last
    input carries ta(j); one batch row per j. cond: scalar; tokens, positions [n]. Returns [J]."""
    J, n = js.shape[0], tokens.shape[0]
    targets = torch.cat([positions[None, :].expand(J, n), js[:, None]], 1)
    logits, _ = gpt.forward_sequence(cond.reshape(1).expand(J), tokens[None, :].expand(J, n),
                                     positions[None, :].expand(J, n), targets)
    logp = logits[:, -1].float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def naive_expected_utilities(gpt: GPT, cond: torch.Tensor, prefix_tokens: torch.Tensor,
                             prefix_pos: torch.Tensor, geom: BlockGeometry, candidates: torch.Tensor,
                             samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `expected_utilities` with given samples and no KV cache.

    cond [B]; prefix_tokens, prefix_pos [B, P]: the revealed tokens in the order they were revealed
    and their raster positions, right-padded with position -1; candidates [B, C] (-1 = padding);
    samples [B, C, K, T]. For each row, candidate a and sample k: one forward of
    [cls, prefix, sample[:-1]] for log p(sample | prefix), and one of [cls, prefix, sample] with the
    last input carrying ta(j) per j in R \\ a for the entropies after. Returns util [B, N] float32
    (-inf where not computed) and sample_logp [B, C, K] float32 (0 at padding).
    """
    B, C, K, T = samples.shape
    N, L = geom.num_blocks, geom.num_tokens
    dev = samples.device
    util = torch.full((B, N), float("-inf"))
    logp_out = torch.zeros(B, C, K)
    for b in range(B):
        pt, pp = _naive_prefix(prefix_tokens, prefix_pos, b)
        seen = torch.zeros(L, dtype=torch.bool, device=dev)
        seen[pp] = True
        R = torch.nonzero(~seen).flatten()
        h_before = float(_naive_entropy(gpt, cond[b], pt, pp, R).sum()) if R.numel() else 0.0
        for c in range(C):
            a = int(candidates[b, c])
            if a < 0:
                continue
            blk = geom.block_tokens[a].to(dev)
            rest = R[geom.token_block.to(dev)[R] != a]
            h_after = []
            for k in range(K):
                s = samples[b, c, k]
                logits, _ = gpt.forward_sequence(cond[b:b + 1], torch.cat([pt, s[:-1]])[None],
                                                 torch.cat([pp, blk[:-1]])[None], torch.cat([pp, blk])[None])
                lp = logits[0, pt.shape[0]:].float().log_softmax(-1)  # outputs that predict the block
                logp_out[b, c, k] = float(lp.gather(-1, s[:, None]).sum())
                h_after.append(float(_naive_entropy(gpt, cond[b], torch.cat([pt, s]), torch.cat([pp, blk]),
                                                    rest).sum()) if rest.numel() else 0.0)
            util[b, a] = h_before - sum(h_after) / K
    return util.to(dev), logp_out.to(dev)
