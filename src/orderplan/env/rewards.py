"""Every reward the env pays, and the one discounting rule (DESIGN.md section 5).

The env core (`orderplan.env.core`) moves the state (KV-cached reveal, one batch of query rows) and hands the
per-token losses before and after a decision to `information_reward`; this module turns them into
nats. The KV-shared loss machinery (query rows, batched oracle utilities over every candidate
block) lives in `orderplan.oracle.future_loss`: the oracle's utility of a block equals the `future_loss`
reward the env would pay for revealing it, but it is computed there, not here.

Rewards (nats per decision; `env.reward=`):
* future_loss:   L_rest(S_t) - L_rest(S_t+1), L_rest(S) = sum over unseen j of l_j(S). Telescopes:
                 the undiscounted return is L_rest(empty), so it only ranks orders under gamma < 1.
* extrapolative: sum_{j in R_t+1} w(j, A) [l_j(S_t) - l_j(S_t+1)], A the blocks revealed by the
                 decision (w(j, A) = min over a in A of w(j, a); w from `extrapolative_weights`).
* anytime:       -k * L_rest(S_t+1) / L for a decision revealing k blocks (area under the
                 remaining-loss curve, each block counted at the loss left after the decision).
* likelihood:    log p(revealed blocks | S_t), teacher-forced (the return is the image
                 log-likelihood under the chosen order).
* entropy:       H_rest(S_t) - H_rest(S_t+1), the reward of generation mode (no ground truth).
Every decision also costs `decision_cost` (`decision_reward`).

Parallel decoding (env.parallel) adds, with weight `env.coherence`, the coherence of a decision's
tokens (`coherence_reward`): sum over its tokens t of log p(x_t | S, x_<t) - log p(x_t | S), the
tokens in the order they enter the cache. The tokens were drawn independently from p(x_t | S), so
its expectation is minus the expected KL(p(x_t | S) || p(x_t | S, x_<t)): 0 for a decision of one
token, and the more negative the more the tokens sampled together should have seen each other. The
entropy reward cannot see that loss (it pays the same whether tokens come together or one by one)."""

from __future__ import annotations

import torch

__all__ = ["REWARDS", "information_reward", "coherence_reward", "decision_reward", "discount_factors",
           "discounted_return"]

REWARDS = ("future_loss", "extrapolative", "anytime", "likelihood", "entropy")


def information_reward(kind: str, blocks: torch.Tensor, k: torch.Tensor, unseen_before: torch.Tensor,
                       loss_before: torch.Tensor, unseen_after: torch.Tensor, loss_after: torch.Tensor,
                       loglik: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reward [B] (nats, no decision cost) of revealing blocks [B, K] (k [B] of them, -1 past k)
    between the states (unseen_before [B, L] bool, loss_before [B, L] nats) and (unseen_after,
    loss_after). loglik [B]: the blocks' teacher-forced log-likelihood (likelihood reward);
    weights [N, L]: w(j, a) of the extrapolative reward (row a = revealed block)."""
    rest_before = (loss_before * unseen_before).sum(-1)
    rest_after = (loss_after * unseen_after).sum(-1)
    if kind in ("future_loss", "entropy"):
        return rest_before - rest_after
    if kind == "extrapolative":
        if weights is None:
            raise ValueError("the extrapolative reward needs the weights w(j, a) [N, L]")
        w = weights[blocks.clamp(min=0)]  # [B, K, L]
        w = torch.where((blocks >= 0)[..., None], w, float("inf")).min(1).values
        return (w * (loss_before - loss_after) * unseen_after).sum(-1)
    if kind == "anytime":
        return -k.to(rest_after.dtype) * rest_after / loss_after.shape[-1]
    if kind == "likelihood":
        return loglik
    raise ValueError(f"unknown reward {kind!r}; use one of {REWARDS}")


def coherence_reward(logp_joint: torch.Tensor, logp_marginal: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Coherence [B] (nats) of a parallel decision (module doc): logp_joint [B, T] = log p(x_t | S,
    x_<t) (the commit's outputs), logp_marginal [B, T] = log p(x_t | S) (the query the tokens were
    drawn from), summed over valid [B, T] entries."""
    return torch.where(valid, logp_joint - logp_marginal, 0.0).sum(-1)


# The project's one discount, per decision (per block in semi-MDP mode): the default of PPO's
# ppo.gamma, of every report's eval.gamma and of `run_episodes`. < 1 on purpose: future_loss rewards
# telescope, so with gamma = 1 every order has the same return (L_rest(empty)) and nothing to rank.
GAMMA = 0.9


def decision_reward(information: torch.Tensor, decision_cost: float) -> torch.Tensor:
    """What the env pays for a decision: its information reward minus the decision cost (float32)."""
    return (information - decision_cost).float()


def discount_factors(times: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma ** times (float64): the discount of a reward received at `times` (decision index, or
    block time in semi-MDP mode), any shape."""
    return float(gamma) ** times.double()


def discounted_return(rewards: torch.Tensor, gamma: float, times: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t gamma^times[t] r_t of rewards [B, T] -> [B] float64; `times` [B, T] defaults to
    0..T-1 (one reward per step). The one discounting rule of the project."""
    if times is None:
        times = torch.arange(rewards.shape[-1], device=rewards.device).expand_as(rewards)
    return (rewards.double() * discount_factors(times, gamma)).sum(-1)
