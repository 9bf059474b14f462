"""The one uniformly random *valid* action of the order-planning MDP.

Everything that needs a random legal action draws it here: `RandomPolicy` (orderplan.planner.policies),
`OrderPlanningEnv.rand_action` (TorchRL), the Gymnasium action spaces' `sample()` (orderplan.env.gym_api) and
the random behaviour of the oracle data set (orderplan.train.oracle_data). The action format is the
core's (`OrderPlanningCore.parse_action`): a block index per row, or with the budget router
(budget index, then K = max(budgets) ordered blocks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["random_valid_action"]


def random_valid_action(action_mask: torch.Tensor, generator: torch.Generator,
                        budgets: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """A uniformly random valid action for every row of `action_mask` [B, N] (True / nonzero =
    unrevealed, a legal block), on the mask's device.

    Plain (`budgets` None): block ids [B] long, by the rule
        torch.rand(B, N, generator).masked_fill(~action_mask, -1).argmax(-1)
    i.e. the unrevealed block with the largest uniform draw (the oracle data set's random behaviour
    is defined by exactly this rule and draw order; do not change either).
    Router (`budgets`, e.g. [1, 2, 4]): [B, 1 + K] long = (uniform budget index, then the K blocks of
    largest draw: the unrevealed ones first in random order, then revealed ones by ascending id, which
    the core ignores past the clipped budget). Draws: the [B, N] uniforms, then the [B] budget indices.

    Rows with no legal block (finished episodes) get block 0 / blocks 0..K-1, in range and ignored by
    the core for inactive rows. The draws come from `generator` (on its own device): the same
    generator state gives the same actions.
    """
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must have shape [B, N], got {tuple(action_mask.shape)}")
    legal = action_mask.bool()
    B, N = legal.shape
    noise = torch.rand(B, N, generator=generator, device=generator.device).to(legal.device)
    scores = noise.masked_fill(~legal, -1.0)  # uniforms lie in [0, 1): every legal block beats -1
    if budgets is None:
        return scores.argmax(-1)
    budgets = [int(k) for k in budgets]
    K = max(budgets)
    if K > N:
        raise ValueError(f"a budget of {K} blocks exceeds the {N} blocks of the image")
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices[:, :K]  # ties (revealed) -> lowest id
    bidx = torch.randint(len(budgets), (B,), generator=generator, device=generator.device).to(legal.device)
    return torch.cat([bidx[:, None], ranked], 1)
