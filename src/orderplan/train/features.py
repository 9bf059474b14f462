"""State features for training the planner: the one replay of stored states through the env core,
and the block-pooled hidden states of stored states (incremental, or one differentiable causal pass).

A stored state is (image index, revealed-block prefix [N] in reveal order, -1 padded, length), as
the oracle data set keeps it (`orderplan.train.oracle_data`). `replay` is the only code that turns
such records back into env states: `replay_states` (the observation at each record's own length)
and `episode_observations` (every record of an episode read off one replay of its longest prefix,
with the belief features when the core has env.beliefs) are both views of it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.model.gpt import GPT
from orderplan.env.core import OrderPlanningCore

__all__ = ["check_replay_core", "replay", "replay_states", "episode_observations", "episode_features", "state_features"]

# visit(t, obs): called before step t with the observation of every row (rows whose length < t have
# stopped at their own last state)
Visitor = Callable[[int, dict[str, torch.Tensor]], None]


def check_replay_core(core: OrderPlanningCore) -> None:
    """Stored states are teacher-forced one-block states: refuse a core that cannot replay them."""
    if core.cfg.mode != "teacher_forced":
        raise ValueError("oracle data needs ground truth: build it in env.mode=teacher_forced")
    if core.router:
        raise ValueError("oracle data uses plain one-block actions: set env.budget=null")


@torch.no_grad()
def replay(core: OrderPlanningCore, image_index: torch.Tensor, prefix: torch.Tensor, length: torch.Tensor,
           visit: Visitor | None = None, until: int | None = None) -> dict[str, torch.Tensor]:
    """Reset `core` on `image_index` [n] (n <= core.B) and replay row i's `prefix[i]` [N] up to
    `length[i]` blocks, all rows in one batch: row i is active at step t only while t < length[i],
    so ragged rows stop at their own length and their -1 padding is never played.

    `visit(t, obs)` (optional) sees the observation before step t, for t = 0 .. `until` (default:
    the longest length); returning early is the caller's business (`until`). Returns the final
    observation restricted to the n rows. Rows past n in the core replay image_index[0] with an
    empty prefix."""
    check_replay_core(core)
    dev = core.device
    image_index = torch.as_tensor(image_index).long().flatten().to(dev)
    prefix, length = torch.as_tensor(prefix).to(dev).long(), torch.as_tensor(length).long().flatten().to(dev)
    n, B, N = image_index.shape[0], core.B, core.N
    if not 0 < n <= B or prefix.shape != (n, N) or length.shape != (n,):
        raise ValueError(f"replay needs image_index [n], prefix [n, N={N}], length [n] with 0 < n <= B={B}; got "
                         f"{tuple(image_index.shape)}, {tuple(prefix.shape)}, {tuple(length.shape)}")
    if bool(((length < 0) | (length > N)).any()):
        raise ValueError(f"length must lie in [0, {N}], got {length.tolist()}")
    steps = torch.arange(N, device=dev)
    played = prefix.masked_fill(steps[None] >= length[:, None], -1)
    if bool(((played >= N) | ((played < 0) & (steps[None] < length[:, None]))).any()):
        raise ValueError(f"prefix entries within each row's length must be blocks in [0, {N})")
    pad = B - n
    image_index = torch.cat([image_index, image_index[:1].expand(pad)])
    played = torch.cat([played, played.new_full((pad, N), -1)])
    length = torch.cat([length, length.new_zeros(pad)])
    core.reset(image_index=image_index)
    last = int(length.max()) if until is None else until
    for t in range(last + 1):
        if visit is not None:
            visit(t, core.observation())
        if t == last:
            break
        active = length > t
        core.step(played[:, t].clamp(min=0), active=active)
    obs = core.observation()
    return {k: v[:n] for k, v in obs.items()}


def replay_states(core: OrderPlanningCore, image_index: torch.Tensor, prefix: torch.Tensor,
                  length: torch.Tensor) -> dict[str, torch.Tensor]:
    """The observation of each stored state (`replay` to its own length): hidden states, block /
    action masks, label, step, image_index, restricted to the n rows."""
    return replay(core, image_index, prefix, length)


def _episodes(image_index: torch.Tensor, prefix: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [E], longest record of each image [E]); raises unless every record of an image is a
    prefix of that image's longest record (records of one episode, as `collect_states` writes)."""
    images = image_index.unique()
    longest = torch.empty(len(images), dtype=torch.long)
    steps = torch.arange(prefix.shape[1])
    for e, img in enumerate(images.tolist()):
        recs = torch.nonzero(image_index == img).flatten()
        top = recs[length[recs].argmax()]
        longest[e] = top
        within = steps[None] < length[recs, None]
        if bool(((prefix[recs] != prefix[top][None]) & within).any()):
            raise ValueError(f"records of image {img} do not come from one episode (a stored prefix is not a "
                             "prefix of the longest): episode_features replays one episode per image")
    return images, longest


@torch.no_grad()
def episode_observations(core: OrderPlanningCore, image_index: torch.Tensor, prefix: torch.Tensor,
                         length: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the planner reads at each of S stored states (image_index [S], prefix [S, N], length [S]),
    on the CPU: hidden [S, N, D] float32 (block-pooled), block_mask [S, N] bool and, when the core has
    env.beliefs, entropy [S, L] float32 (nats) and query_hidden [S, N, D] float32.

    Records of one image must come from one episode (their prefixes are prefixes of each other),
    as `collect_states` produces; each episode is `replay`ed once, core.B images at a time, and
    every record is read off as the replay passes its length."""
    image_index, prefix, length = image_index.cpu().long(), prefix.cpu().long(), length.cpu().long()
    S, N = prefix.shape
    out = {"hidden": torch.zeros(S, N, core.D), "block_mask": torch.zeros(S, N, dtype=torch.bool)}
    if core.cfg.beliefs:
        out["entropy"] = torch.zeros(S, core.L)
        out["query_hidden"] = torch.zeros(S, N, core.D)
    images, longest = _episodes(image_index, prefix, length)
    for e0 in range(0, len(images), core.B):
        imgs, top = images[e0:e0 + core.B], longest[e0:e0 + core.B]
        # every record of these episodes, with its episode row and length (duplicate records of one
        # state all read it: a table of one record per (episode, length) would leave copies at 0)
        recs = torch.nonzero(torch.isin(image_index, imgs)).flatten()
        row, at = torch.searchsorted(imgs, image_index[recs]), length[recs]  # imgs is sorted (unique)
        replay(core, imgs, prefix[top], length[top], visit=_reader(core, len(imgs), recs, row, at, out))
    return out


def episode_features(core: OrderPlanningCore, image_index: torch.Tensor, prefix: torch.Tensor,
                     length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-pooled hidden states [S, N, D] (float32, CPU) and block masks [S, N] of S stored states:
    the two entries of `episode_observations` every planner reads."""
    obs = episode_observations(core, image_index, prefix, length)
    return obs["hidden"], obs["block_mask"]


def _reader(core: OrderPlanningCore, n: int, recs: torch.Tensor, row: torch.Tensor, at: torch.Tensor,
            out: dict[str, torch.Tensor]) -> Visitor:
    """The `replay` visitor of `episode_observations`: at step t, copy the observation entries of
    `out` (hidden block-pooled) of the episode rows `row` into the records `recs` whose length `at` is t."""

    def read(t: int, obs: dict[str, torch.Tensor]) -> None:
        hit = at == t
        if bool(hit.any()):
            for key, dst in out.items():
                v = obs[key][:n].cpu()
                if key == "hidden" and v.shape[1] != core.N:
                    v = core.geom.pool_blocks(v.float())
                dst[recs[hit]] = v[row[hit]].to(dst.dtype)

    return read


def state_features(gpt: GPT, geom: BlockGeometry, codes: torch.Tensor, labels: torch.Tensor, prefix: torch.Tensor,
                   length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The env's block-pooled hidden states [S, N, D] and block masks [S, N] of stored states, from one
    causal `forward_sequence` per state (differentiable: gradients reach every GPT parameter that
    requires them). codes [S, L] (the states' images), labels [S], prefix [S, N] (revealed blocks in
    order, -1 padded), length [S].

    As in the env (`OrderPlanningCore`): a revealed token's hidden state is the final-norm output of
    its input carrying the target-aware embedding of the next revealed position, the last revealed
    token's is its target-free output (ta = -1), unrevealed tokens hold 0, and blocks are token
    means. Equal to `episode_features` up to float rounding."""
    S, N = prefix.shape
    dev = codes.device
    L, D = gpt.cfg.num_tokens, gpt.cfg.dim
    block_tokens = geom.block_tokens.to(dev)
    T = block_tokens.shape[1]
    length = length.to(dev)
    prefix = prefix.to(dev)
    steps = torch.arange(N, device=dev)
    revealed = steps[None] < length[:, None]  # [S, N] over prefix slots
    mask = torch.zeros(S, N + 1, dtype=torch.bool, device=dev)
    mask.scatter_(1, torch.where(revealed, prefix, N), True)
    mask = mask[:, :N]
    nmax = int(length.max()) if S else 0
    dtype = gpt.output.weight.dtype
    if nmax == 0:  # nothing revealed anywhere: the class token's state is not an observation
        return torch.zeros(S, N, D, device=dev, dtype=dtype), mask
    positions = block_tokens[prefix[:, :nmax].clamp(min=0)].flatten(1)  # [S, M] in reveal order
    M = positions.shape[1]
    ntok = length * T
    tokens = codes.gather(1, positions)
    k = torch.arange(M + 1, device=dev)
    targets = torch.where(k[None] < ntok[:, None], torch.cat([positions, positions[:, :1]], 1), -1)
    _, h = gpt.forward_sequence(labels.to(dev), tokens, positions, targets)  # [S, M + 1, D]
    valid = k[None, :M] < ntok[:, None]
    idx = torch.where(valid, positions, L)[..., None].expand(-1, -1, D)  # padding -> a dropped slot
    hidden_tok = torch.zeros(S, L + 1, D, device=dev, dtype=h.dtype).scatter(1, idx, h[:, 1:])[:, :L]
    return geom.pool_blocks(hidden_tok), mask
