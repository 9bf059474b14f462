"""The one scorer of played episodes: returns, oracle agreement and regret, per image. The BC and
PPO summaries (`report`), `evaluate`'s teacher-forced rows and `compare_orders`' table all read
their numbers from `score_episodes`, so one name means one number everywhere.

Definitions (nats unless stated; M images, each played once by the policy on a teacher-forced core):
* discounted [M]: sum_t discount_t r_t over the image's decisions, discount_t = gamma^t per
  decision, or gamma^tau_t in block time on a semi-MDP router core (`run_episodes`). Rewards
  include the env's decision cost; `discounted_no_cost` adds it back (the information part).
* undiscounted [M], decisions [M]: sum of rewards, number of decisions.
* order_return [M] (router cores only): the policy's block order replayed one block per step with
  gamma per block and no decision cost, on the scale of one-block policies (`order_returns`).
* agreement [M'] and regret [M'] on the first M' = `agreement_images` images: at every state the
  policy acts in, the oracle utilities u(.|S) of `oracle_kind` are computed before it acts;
  agreement of an image is the share of its decisions whose (first) block is argmax_a u(a|S),
  regret of an image the mean over its decisions of max_a u(a|S) - u(chosen|S).
The reported agreement and regret are means over images: every image weighs the same, whatever
its number of decisions (for one-block policies, the same as pooling all decisions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orderplan.env.core import OrderPlanningCore
from orderplan.eval.rollouts import index_batches, replay_order
from orderplan.env.rewards import discounted_return
from orderplan.planner.policies import BlockPolicy, episode_gamma, run_episodes


@dataclass
class EpisodeScores:
    """Per-image scores of one policy (float64, CPU); see the module docstring for the definitions."""

    discounted: torch.Tensor  # [M]
    undiscounted: torch.Tensor  # [M]
    discounted_no_cost: torch.Tensor  # [M]
    decisions: torch.Tensor  # [M]
    order_return: torch.Tensor | None  # [M], router cores only
    agreement: torch.Tensor  # [M']
    regret: torch.Tensor  # [M']


def order_returns(core: OrderPlanningCore, image_index: torch.Tensor, blocks: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return [B] (float64, CPU) of fixed block sequences `blocks` [B, N] replayed one block
    per step (gamma per block, no decision cost) in a plain copy of `core`. This scores the *order* a
    router policy produced on the same scale as plain policies."""
    rep = replay_order(core.bb, core.codes, core.labels, core.cfg, blocks.cpu(), core.B, image_index)
    return discounted_return(rep.rewards, gamma)


class _OracleWatch:
    """`policy` with the oracle's view of every state it acts in recorded just before it acts."""

    def __init__(self, policy: BlockPolicy, core: OrderPlanningCore, kind: str):
        self.policy, self.core, self.kind = policy, core, kind
        self.hits: list[torch.Tensor] = []  # [B] per decision: 1.0 where the first block is the argmax
        self.gaps: list[torch.Tensor] = []  # [B] per decision: max_a u(a|S) - u(chosen|S), nats

    def act(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        util = self.core.oracle_utilities(self.kind)  # [B, N], -inf on revealed blocks
        best, best_idx = util.max(-1)
        action = self.policy.act(obs)
        first = action if action.dim() == 1 else action[:, 1]  # a router decision: its first block
        self.hits.append((first == best_idx).double())
        self.gaps.append((best - util.gather(1, first[:, None])[:, 0]).double())
        return action


def _per_image_mean(values: list[torch.Tensor], live: torch.Tensor) -> torch.Tensor:
    """Mean over each row's own decisions: values [B] per decision, live [B, S] -> [B] float64. Rows
    that finished early hold nan there (-inf - -inf), masked out."""
    v = torch.stack(values, 1).cpu()
    return torch.where(live, v, 0.0).sum(1) / live.sum(1)


@torch.no_grad()
def score_episodes(policy: BlockPolicy, core: OrderPlanningCore, images: torch.Tensor, gamma: float | None,
                   agreement_images: int = 0, oracle_kind: str = "future_loss") -> EpisodeScores:
    """Play `policy` on `images` [M] of the core's split (teacher-forced core, plain or router actions)
    in batches of core.B and score every image; agreement and regret on the first `agreement_images`
    images, in the same episodes (one batched oracle pass per decision of a batch that holds one).
    gamma: None = `run_episodes`' default (env.gamma on a semi-MDP core, else GAMMA)."""
    if core.cfg.mode != "teacher_forced":
        raise ValueError("episodes are scored against ground truth: use a teacher-forced core (env.mode=teacher_forced)")
    disc, undisc, no_cost, decisions, order, agree, regret = [], [], [], [], [], [], []
    start = 0
    for chunk, n in index_batches(images.cpu(), core.B):
        measured = min(max(agreement_images - start, 0), n)  # rows of this batch whose agreement counts
        start += n
        player = _OracleWatch(policy, core, oracle_kind) if measured else policy
        out = run_episodes(player, core, chunk.to(core.device), gamma=gamma)
        live = out["live"].cpu()
        d = (out["rewards"].double() * out["discount"]).sum(1).cpu()  # float64, as the module defines it
        disc.append(d[:n])
        undisc.append(out["rewards"].double().sum(1).cpu()[:n])
        # each decision's cost at that decision's discount (block time in semi-MDP mode)
        refund = (live.double() * core.cfg.decision_cost * out["discount"].cpu()).sum(1)
        no_cost.append((d + refund)[:n])
        decisions.append(live.sum(1).double()[:n])
        if core.router:
            order.append(order_returns(core, chunk, out["blocks"], episode_gamma(core, gamma))[:n].cpu())
        if measured:
            agree.append(_per_image_mean(player.hits, live)[:measured])
            regret.append(_per_image_mean(player.gaps, live)[:measured])
    empty = torch.zeros(0, dtype=torch.float64)
    return EpisodeScores(torch.cat(disc), torch.cat(undisc), torch.cat(no_cost), torch.cat(decisions),
                         torch.cat(order) if order else None, torch.cat(agree or [empty]), torch.cat(regret or [empty]))
