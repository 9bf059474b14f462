"""Group-relative policy optimisation (GRPO) of a block-order policy in generation mode, with an
exact KL penalty to an anchor policy (the job is orderplan.train.quality).

Groups. An iteration plays P groups of G episodes. The G rows of a group share their image index
(hence their label, the class that conditions the sample) and their sampler noise key
(`sampling.noise=position`: a token's Gumbel noise is a function of (key, raster position), whatever
the order that reaches it), so two members of a group differ only by the order their policy drew.
With one order they generate the same image (tests/train/test_grpo.py).

Advantage. Each episode has one terminal reward r (orderplan.eval.set_reward); its advantage is
A = (r - mean of its group) / (std of its group + eps), given to every decision of the episode (no
critic). A group whose rewards are all equal teaches nothing (A = 0).

Loss per decision t of episode e, with pi_old the policy that played it:

    ratio = pi(a_t | s_t) / pi_old(a_t | s_t)
    L = -min(ratio A_e, clip(ratio, 1 - eps, 1 + eps) A_e) + beta KL(pi(.|s_t) || pi_anchor(.|s_t))

The KL is exact (both are categorical distributions over the unrevealed blocks), in nats per
decision, so it is 0 exactly when the policy equals its anchor.

Shapes: B = P * G rows, N blocks, S = N decisions per episode (one block each)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from orderplan.infra.validation import check_int, check_range

__all__ = ["GRPOConfig", "check_grpo_config", "group_index", "group_advantages", "categorical_kl",
           "categorical_entropy", "masked_log_softmax", "grpo_loss", "GRPOStats"]


@dataclass
class GRPOConfig:
    """The `grpo` section of configs/quality.yaml."""

    iterations: int = 80  # rollout + update rounds
    groups: int = 16  # P: image indices (labels) per iteration
    group_size: int = 8  # G: episodes per group, differing only by their order
    epochs: int = 2  # passes over an iteration's decisions
    minibatch_size: int = 512  # decisions per gradient step
    lr: float = 1.0e-3
    clip: float = 0.2  # PPO ratio clip
    kl_coef: float = 0.05  # beta: nats of KL to the anchor per unit of advantage
    max_grad_norm: float = 1.0
    adv_eps: float = 1.0e-6  # added to the group std
    ckpt_every: int = 5  # iterations between checkpoints (the last is always saved)
    keep_checkpoints: int = 2


def check_grpo_config(cfg: GRPOConfig, key: str = "grpo") -> None:
    """ValueError naming the first bad field of `cfg`."""
    for name, low in (("iterations", 1), ("groups", 1), ("group_size", 2), ("epochs", 1), ("minibatch_size", 1),
                      ("ckpt_every", 1), ("keep_checkpoints", 1)):
        check_int(f"{key}.{name}", getattr(cfg, name), low)
    check_range(f"{key}.lr", cfg.lr, 0.0, lo_open=True)
    check_range(f"{key}.clip", cfg.clip, 0.0, 1.0, lo_open=True)
    check_range(f"{key}.kl_coef", cfg.kl_coef, 0.0)
    check_range(f"{key}.max_grad_norm", cfg.max_grad_norm, 0.0, lo_open=True)
    check_range(f"{key}.adv_eps", cfg.adv_eps, 0.0, lo_open=True)


def group_index(groups: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[P * G] long: the group of each row; a group's G rows are adjacent."""
    return torch.arange(groups, device=device).repeat_interleave(group_size)


def group_advantages(reward: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """reward [P * G] (groups adjacent) -> advantage [P * G]: (r - group mean) / (group std + eps),
    with the unbiased std; 0 for a group whose rewards are all equal."""
    if reward.dim() != 1 or reward.numel() % group_size:
        raise ValueError(f"reward must be [P * G] with G = {group_size}, got {tuple(reward.shape)}")
    r = reward.double().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True)
    adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return adv.flatten().to(reward.dtype)


def masked_log_softmax(logits: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    """log softmax over the legal entries of logits [B, N] (legal [B, N] bool, >= 1 per row); -inf elsewhere."""
    return F.log_softmax(logits.masked_fill(~legal, float("-inf")), -1)


def categorical_kl(logp: torch.Tensor, logq: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    """KL(p || q) [B] in nats of two categoricals given by log-probabilities [B, N] that are -inf off
    `legal` [B, N] bool (the same support)."""
    p = logp.exp()
    diff = torch.where(legal, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def categorical_entropy(logp: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    """Entropy [B] in nats of a categorical given by log-probabilities [B, N], -inf off `legal`."""
    return -(logp.exp() * torch.where(legal, logp, torch.zeros_like(logp))).sum(-1)


class GRPOStats(NamedTuple):
    """Means over a minibatch's decisions."""

    loss: float
    surrogate: float  # the clipped surrogate (to be maximised)
    kl: float  # KL(pi || anchor), nats per decision
    entropy: float  # policy entropy, nats per decision
    clip_fraction: float  # decisions whose ratio left [1 - eps, 1 + eps]


def grpo_loss(logits: torch.Tensor, anchor_logits: torch.Tensor, legal: torch.Tensor, action: torch.Tensor,
              old_logp: torch.Tensor, advantage: torch.Tensor, clip: float, kl_coef: float
              ) -> tuple[torch.Tensor, GRPOStats]:
    """The loss of the module doc, averaged over decisions. logits / anchor_logits [B, N] (any values
    off `legal` [B, N] bool), action [B] long, old_logp [B] = log pi_old(action), advantage [B]."""
    logp = masked_log_softmax(logits, legal)
    logq = masked_log_softmax(anchor_logits, legal)
    new = logp.gather(1, action[:, None])[:, 0]
    ratio = (new - old_logp).exp()
    surr = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    kl = categorical_kl(logp, logq, legal)
    loss = (-surr + kl_coef * kl).mean()
    with torch.no_grad():
        entropy = categorical_entropy(logp, legal)
        clipped = ((ratio - 1).abs() > clip).float()
        stats = GRPOStats(float(loss), float(surr.mean()), float(kl.mean()), float(entropy.mean()),
                          float(clipped.mean()))
    return loss, stats
