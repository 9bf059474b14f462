"""Action distributions of the planner for TorchRL's `ProbabilisticActor`.

Plain mode (one block per decision) uses TorchRL's `MaskedCategorical(logits, mask=action_mask)`.
Router mode (seed 000 Alg. 4) uses `RouterDistribution` below, whose actions are the env's router
actions [*, 1 + K]: a budget index, then K ordered block ids.

    budget index   b ~ Categorical(softmax(budget_logits))
    k_eff          = min(budgets[b], number of unrevealed blocks)
    blocks a_1..a_k_eff ~ Plackett-Luce(block_logits restricted to unrevealed blocks), i.e. drawn
                   one after the other WITHOUT replacement, each from the softmax over the blocks
                   still available
    a_k_eff+1..a_K placeholders the env ignores (see `sample`): they carry no probability

    log p(action) = log p(b) + sum_{i <= k_eff} [ l(a_i) - logsumexp_{j available at draw i} l(j) ]

Everything is vectorised over the batch (the only loop-like axis is the K <= 4 draws, which is
handled with a [*, K, N] mask, not a Python loop). Shapes: `*` batch dims, N blocks, nb budgets,
K = max(budgets)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import distributions as D
from torchrl.modules import MaskedCategorical

__all__ = ["MaskedCategorical", "RouterDistribution"]


class RouterDistribution(D.Distribution):
    """Budget index + ordered blocks without replacement (Plackett-Luce), for router actions.

    Args:
        budget_logits: [*, nb] unnormalised log-probabilities of the budget indices.
        block_logits: [*, N] unnormalised block scores; values on masked blocks are ignored (they may
            be -inf, as `OrderHead.plan` writes them).
        mask: [*, N] bool, True = the block may be chosen (unrevealed): the env's `action_mask`.
        budgets: the block count of each budget index, e.g. [1, 2, 4].

    `entropy()` is H(budget) + H(first block): a lower bound on the exact entropy of the joint
    action (exact when every budget is one block), since H(b, blocks) = H(b) + E_b H(blocks | b)
    and H(blocks | b) >= H(first block), whose distribution does not depend on b. The exact value
    would need a sum over every ordered subset; the bound is what the PPO entropy bonus pushes up.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, budget_logits: torch.Tensor, block_logits: torch.Tensor, mask: torch.Tensor,
                 budgets: Sequence[int] | torch.Tensor, validate_args: bool | None = False):
        budgets = torch.as_tensor(budgets, dtype=torch.long, device=block_logits.device).flatten()
        if budgets.numel() != budget_logits.shape[-1]:
            raise ValueError(f"{budgets.numel()} budgets but budget_logits has {budget_logits.shape[-1]} entries")
        if budgets.numel() == 0 or int(budgets.min()) < 1:
            raise ValueError(f"budgets must be positive block counts, got {budgets.tolist()}")
        if mask.shape != block_logits.shape:
            raise ValueError(f"mask {tuple(mask.shape)} and block_logits {tuple(block_logits.shape)} differ")
        batch_shape = block_logits.shape[:-1]
        if budget_logits.shape[:-1] != batch_shape:
            raise ValueError(f"budget_logits {tuple(budget_logits.shape)} and block_logits "
                             f"{tuple(block_logits.shape)} have different batch shapes")
        self.budgets = budgets
        self.K = int(budgets.max())
        self.N = block_logits.shape[-1]
        self.mask = mask.bool()
        self.budget_log_probs = torch.log_softmax(budget_logits.float(), -1)  # [*, nb]
        # finite everywhere (masked entries are excluded by masks below, never by their value), so
        # no -inf - -inf = nan reaches the values or the gradients
        self.block_scores = block_logits.float().masked_fill(~self.mask, 0.0)  # [*, N]
        self.n_left = self.mask.sum(-1)  # [*] unrevealed blocks
        super().__init__(batch_shape, torch.Size([1 + self.K]), validate_args=validate_args)

    # -- helpers ----------------------------------------------------------------------------------

    def k_eff(self, budget_index: torch.Tensor) -> torch.Tensor:
        """[*] blocks a decision with these budget indices actually reveals."""
        k = self.budgets[budget_index.clamp(0, len(self.budgets) - 1)]
        return torch.minimum(k, self.n_left.expand_as(k))

    def _masked_scores(self) -> torch.Tensor:
        return self.block_scores.masked_fill(~self.mask, float("-inf"))

    # -- torch.distributions API ------------------------------------------------------------------

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> torch.Tensor:
        """[*sample_shape, *, 1 + K] long. The blocks are a Gumbel-top-K draw, whose first k_eff
        entries are an exact Plackett-Luce sample. The placeholders past k_eff are the next
        blocks of that same draw: unrevealed blocks while there are any left, then arbitrary
        (distinct, in-range) revealed ones, which the env ignores."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            b = torch.distributions.Categorical(logits=self.budget_log_probs.expand(*shape, -1)).sample()
            u = torch.rand(*shape, self.N, device=self.block_scores.device).clamp_(1e-20, 1.0 - 1e-7)
            gumbel = -torch.log(-torch.log(u))
            perturbed = self._masked_scores().expand(*shape, -1) + gumbel
            blocks = perturbed.topk(min(self.K, self.N), dim=-1).indices  # distinct, sorted descending
        return torch.cat([b[..., None], _pad_blocks(blocks, self.K)], -1)

    @property
    def mode(self) -> torch.Tensor:
        """Argmax budget, then the top-K blocks by score (ties to the lowest block id, as
        `orderplan.planner.policies.OrderHeadPolicy` does greedily)."""
        with torch.no_grad():
            b = self.budget_log_probs.argmax(-1)
            ranked = self._masked_scores().sort(dim=-1, descending=True, stable=True).indices[..., : self.K]
        return torch.cat([b[..., None], _pad_blocks(ranked, self.K)], -1)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.mode

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """value [*, 1 + K] (or with extra leading sample dims) -> [*] exact log-probability;
        -inf for an action whose first k_eff blocks are not distinct unrevealed blocks."""
        value = value.long()
        b, blocks = value[..., 0], value[..., 1:]  # [*], [*, K]
        shape = b.shape
        scores = self.block_scores.expand(*shape, -1)  # [*, N]
        mask = self.mask.expand(*shape, -1)
        k = self.k_eff(b)  # [*]
        used = torch.arange(self.K, device=value.device) < k[..., None]  # [*, K]
        in_range = (blocks >= 0) & (blocks < self.N)
        safe = blocks.clamp(0, self.N - 1)
        # removed[..., i, j]: block j was drawn before draw i
        onehot = torch.nn.functional.one_hot(safe, self.N).bool() & used[..., None]  # [*, K, N]
        removed = (onehot.long().cumsum(-2) - onehot.long()).bool()
        avail = mask[..., None, :] & ~removed  # [*, K, N]
        # unused draws see every block (finite, discarded below) so logsumexp never sees an empty set
        lse = torch.where(avail | ~used[..., None], scores[..., None, :], float("-inf")).logsumexp(-1)  # [*, K]
        chosen = scores.gather(-1, safe)  # [*, K]
        ok = avail.gather(-1, safe[..., None])[..., 0] & in_range  # drawn block was available
        terms = torch.where(used, chosen - lse, 0.0).sum(-1)
        valid = (ok | ~used).all(-1) & (b >= 0) & (b < len(self.budgets))
        b_safe = b.clamp(0, len(self.budgets) - 1)
        lp_budget = self.budget_log_probs.expand(*shape, -1).gather(-1, b_safe[..., None])[..., 0]
        return torch.where(valid, lp_budget + terms, float("-inf"))

    def entropy(self) -> torch.Tensor:
        """[*] H(budget) + H(first block): a lower bound on the exact entropy (see the class doc)."""
        pb = self.budget_log_probs
        h_budget = -(pb.exp() * pb).sum(-1)
        mask = self.mask | (self.n_left == 0)[..., None]  # a finished row: any finite value, dropped below
        lp = torch.log_softmax(self.block_scores.masked_fill(~mask, float("-inf")), -1)
        h_first = -(lp.exp() * lp.masked_fill(~mask, 0.0)).sum(-1)
        return h_budget + torch.where(self.n_left > 0, h_first, 0.0)


def _pad_blocks(blocks: torch.Tensor, K: int) -> torch.Tensor:
    """Pad [*, k] block ids to [*, K] by repeating the last column (only when K > N)."""
    if blocks.shape[-1] >= K:
        return blocks
    return torch.cat([blocks, blocks[..., -1:].expand(*blocks.shape[:-1], K - blocks.shape[-1])], -1)
