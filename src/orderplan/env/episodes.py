"""The one full-episode loop over the batched core: reset rows on images, then let a decision rule
act on the observation until every row is done (a finished row is left alone while the others go
on). Everything that plays whole episodes (the policies' `run_episodes`, the held-out report, oracle
data collection, order replay, generation-mode sampling, benchmarks) goes through `play_episodes`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from orderplan.env.core import OrderPlanningCore

__all__ = ["Decision", "play_episodes"]


@dataclass
class Decision:
    """One decision of every row, as `play_episodes` hands it to `after_step`."""

    t: int  # decision index (0 = first decision of the episode)
    active: torch.Tensor  # [B] bool: rows that acted (not done before this decision)
    action: torch.Tensor  # [B] or [B, 1 + K] the action taken (ignored on inactive rows)
    reward: torch.Tensor  # [B] reward of the decision (0 on inactive rows), nats
    blocks_before: torch.Tensor  # [B] long: blocks revealed before the decision (block time)


Act = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def play_episodes(core: OrderPlanningCore, image_index: torch.Tensor | None, act: Act,
                  after_step: Callable[[Decision], None] | None = None, rows: torch.Tensor | None = None) -> int:
    """Reset every row of `core` (on `image_index` [B] when given, else on fresh images) and play
    until all episodes are done: at each decision `act(core.observation())` returns the action of
    every row, the core steps the rows that are not done, and `after_step(Decision)` sees the result.
    `rows` [B] bool (default all) limits the play to those rows: the others (e.g. padding rows of a
    last, partial batch) are reset but never stepped, so batched computations over the state (the
    oracle's candidate blocks) see exactly the rows that matter.
    Returns the number of decisions of the longest episode (at most N: every live row reveals at
    least one block per decision)."""
    core.reset(None, image_index)
    rows = torch.ones(core.B, dtype=torch.bool, device=core.device) if rows is None else rows.to(core.device)
    decisions = 0
    for t in range(core.N):
        active = ~core.done & rows
        if not bool(active.any()):
            break
        blocks_before = core.steps.clone()
        action = act(core.observation())
        reward, _ = core.step(action, active=active)
        decisions += 1
        if after_step is not None:
            after_step(Decision(t, active, action, reward, blocks_before))
    return decisions
