"""Sampling from the GPT in any token order: LlamaGen's logit processing (CFG, temperature, top-k,
top-p) and two generators that give the same distribution at very different costs:

* `generate`: incremental, KV-cached, O(L) forwards of one token each, any order.
* `generate_recompute`: the O(L^2) full-recompute sampler of the seed experiments (a full forward
  of the whole prefix at every step); kept as the reference the benchmark compares against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orderplan.model.gpt import GPT
from orderplan.infra.validation import check_choice, check_int, check_probability, check_range


@dataclass
class SamplingConfig:
    """LlamaGen's sampling knobs. top_k = 0 and top_p = 1.0 disable those filters; cfg_scale <= 1.0
    disables classifier-free guidance (no unconditional batch is run), as in LlamaGen.

    The one sampling config: generation mode's `env.sampling` (orderplan.env.core.EnvConfig, the `sampling:`
    keys of configs/env/*.yaml and configs/evaluate.yaml) is this dataclass. Not frozen, because
    OmegaConf cannot merge YAML values into a frozen nested dataclass."""

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # stream: torch.multinomial from the sampler's generator (LlamaGen's).
    # position: Gumbel-max with noise that is a fixed function of (row key, token position, code), see
    # `position_gumbel`: common random numbers across orders, for paired comparisons of policies.
    noise: str = "stream"


NOISES = ("stream", "position")
_M32 = 0xFFFFFFFF


def check_sampling(sc: SamplingConfig, key: str = "sampling") -> None:
    """Raise ValueError naming `{key}.<field>` and its range: cfg_scale >= 0 (<= 1 turns guidance
    off), temperature >= 0 (0 is greedy: logits are divided by max(temperature, 1e-5)), top_k >= 0
    (0 = off), top_p in [0, 1] (1 = off; the most likely token is always kept), noise in NOISES."""
    check_range(f"{key}.cfg_scale", sc.cfg_scale, 0.0, note=" (<= 1 disables guidance)")
    check_range(f"{key}.temperature", sc.temperature, 0.0)
    check_int(f"{key}.top_k", sc.top_k, 0, note=" (0 = no top-k filter)")
    check_probability(f"{key}.top_p", sc.top_p, note=" (1 = no top-p filter)")
    check_choice(f"{key}.noise", sc.noise, NOISES)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds, constants from Wellons' hash prospector)
    of int64 tensors, elementwise; returns int64 in [0, 2^32). Both constants are below 2^31, so no
    product leaves int64, on any device."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def row_keys(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Noise keys [B] (int64) of sample indices `index` [B] under a sampler seed."""
    s = torch.tensor([int(seed) & _M32, (int(seed) >> 32) & _M32], dtype=torch.long, device=index.device)
    base = hash32(hash32(s[0:1]) ^ s[1:2])
    return hash32(base ^ hash32(index.long() + 0x5BD1E995))


def position_gumbel(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [B, V] (float32) that depends only on (keys [B], positions [B], code):
    the same row key reads the same noise at a token position whatever the order that reaches it.
    Uniforms on a 2^-24 grid, open at both ends, so the noise is finite (|g| < 17.4)."""
    h = hash32(keys.long() ^ hash32(positions.long() * 0x9E3779B1 + 1))  # [B]
    h = hash32(h[:, None] + torch.arange(vocab, device=keys.device))  # [B, V]
    u = ((h >> 8).float() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits [B, V] outside the top-k and outside the smallest set with mass >= top_p (-inf)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # LlamaGen's rule: drop a token once the mass *before* it exceeds top_p, so the token
        # that crosses top_p and the most likely token are always kept.
        drop = torch.zeros_like(cum, dtype=torch.bool)
        drop[..., 1:] = cum[..., :-1] > top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, sc: SamplingConfig, generator: torch.Generator | None = None,
                  keys: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from logits [B, V] -> LongTensor [B]. sc.noise = position needs the
    rows' noise `keys` [B] and the token `positions` [B] being sampled (raster indices)."""
    logits = filter_logits(logits / max(sc.temperature, 1e-5), sc.top_k, sc.top_p)
    if sc.noise == "stream":
        # torch.multinomial's own one-sample algorithm (argmax of p / q, q ~ Exp(1), from the same
        # generator: the same draws), without its validity checks, which read the device every token
        probs = logits.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1)
    if sc.noise != "position":
        raise ValueError(f"sampling.noise must be one of {NOISES}, got {sc.noise!r}")
    if keys is None or positions is None:
        raise ValueError("sampling.noise=position needs the rows' noise keys and token positions")
    # Gumbel-max: argmax(logits + g) is a draw from softmax(logits); -inf (filtered) codes never win
    return (logits.float() + position_gumbel(keys, positions, logits.shape[-1])).argmax(-1)


def guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Combine a [2B, V] batch (conditional rows first) into guided logits [B, V]:
    uncond + cfg_scale * (cond - uncond), LlamaGen's formula."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def _with_null(model: GPT, cond: torch.Tensor, sc: SamplingConfig) -> torch.Tensor:
    if sc.cfg_scale <= 1.0:  # as LlamaGen: guidance only for scales above 1
        return cond
    return torch.cat([cond, torch.full_like(cond, model.cfg.null_class)])


@torch.no_grad()
def generate(model: GPT, cond: torch.Tensor, order: torch.Tensor, sc: SamplingConfig | None = None,
             generator: torch.Generator | None = None, keys: torch.Tensor | None = None,
             validate: bool = True) -> torch.Tensor:
    """Sample images with the KV cache. cond [B]; order [B, L] raster positions in generation order;
    sc None = SamplingConfig() defaults; keys [B] the rows' noise keys (sc.noise = position).
    Returns token grids [B, L] in raster layout.

    `order` is checked once, here (one read of the device; validate=False skips it); the decode
    loop itself reads nothing back: every row moves in lockstep, so the state's host bound is the
    exact cache length."""
    sc = SamplingConfig() if sc is None else sc
    B, L = order.shape
    if validate and bool(((order < 0) | (order >= model.cfg.num_tokens)).any()):
        raise ValueError(f"order must hold raster positions in [0, {model.cfg.num_tokens})")
    rows = torch.arange(B, device=cond.device)
    cond2 = _with_null(model, cond, sc)
    rep = cond2.shape[0] // B
    state = model.init_state(cond2)
    out = torch.zeros(B, L, dtype=torch.long, device=cond.device)
    for t in range(L):
        pos = order[:, t]
        logits, _ = model.advance(state, pos.repeat(rep), validate=False)
        if rep == 2:
            logits = guided(logits, sc.cfg_scale)
        tok = sample_logits(logits, sc, generator, keys, pos)
        out[rows, pos] = tok
        model.feed(state, tok.repeat(rep), pos.repeat(rep), validate=False)
    return out


@torch.no_grad()
def generate_recompute(model: GPT, cond: torch.Tensor, order: torch.Tensor,
                       sc: SamplingConfig | None = None, generator: torch.Generator | None = None,
                       max_steps: int | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """The O(L^2) reference sampler: a full forward of the prefix at every step. Same arguments and
    result as `generate`; `max_steps` stops early (the rest of the grid stays 0), for timing."""
    sc = SamplingConfig() if sc is None else sc
    B, L = order.shape
    cond2 = _with_null(model, cond, sc)
    rep = cond2.shape[0] // B
    order2 = order.repeat(rep, 1)
    seq = torch.zeros(B * rep, 0, dtype=torch.long, device=cond.device)
    out = torch.zeros(B, L, dtype=torch.long, device=cond.device)
    rows = torch.arange(B, device=cond.device)
    for t in range(L if max_steps is None else min(L, max_steps)):
        logits, _ = model.forward_sequence(cond2, seq, order2[:, :t], order2[:, : t + 1])
        logits = logits[:, -1]
        if rep == 2:
            logits = guided(logits, sc.cfg_scale)
        tok = sample_logits(logits, sc, generator, keys, order[:, t])
        out[rows, order[:, t]] = tok
        seq = torch.cat([seq, tok.repeat(rep)[:, None]], 1)
    return out
