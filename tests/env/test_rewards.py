"""The reward formulas and the discounting rule (orderplan.env/rewards.py) on small hand-computed cases: every
expected number below is worked out by hand in the comments, not by calling the code's formula."""

import pytest
import torch

from orderplan.env.rewards import REWARDS, decision_reward, discount_factors, discounted_return, information_reward

# L = 6 tokens in N = 3 blocks of 2: block 0 = tokens 0, 1; block 1 = tokens 2, 3; block 2 = tokens 4, 5.
# Row 0 reveals block 0 (k = 1); row 1 reveals blocks 2 then 1 in one decision (k = 2). Both start
# from the empty state. Entries of loss_after on revealed tokens are junk (9.0): a formula that
# forgot the unseen mask would pick them up.
BLOCKS = torch.tensor([[0, -1], [2, 1]])
K = torch.tensor([1, 2])
UNSEEN_BEFORE = torch.ones(2, 6, dtype=torch.bool)
LOSS_BEFORE = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])  # L_rest(empty) = 21 in both rows
UNSEEN_AFTER = torch.tensor([[False, False, True, True, True, True],
                             [True, True, False, False, False, False]])
LOSS_AFTER = torch.tensor([[9.0, 9.0, 2.0, 3.0, 4.0, 5.0],    # L_rest = 2 + 3 + 4 + 5 = 14
                           [0.5, 1.5, 9.0, 9.0, 9.0, 9.0]])   # L_rest = 0.5 + 1.5 = 2
LOGLIK = torch.tensor([-1.5, -4.0])
# w(j, a): row a = the revealed block, column j = a token
WEIGHTS = torch.tensor([[0.0, 0.0, 0.5, 0.5, 1.0, 1.0],
                        [0.5, 0.5, 0.0, 0.0, 0.5, 0.5],
                        [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]])

EXPECTED = {
    # L_rest(before) - L_rest(after): 21 - 14, 21 - 2
    "future_loss": [7.0, 19.0],
    "entropy": [7.0, 19.0],
    # -k L_rest(after) / L: -1 * 14 / 6, -2 * 2 / 6
    "anytime": [-14.0 / 6.0, -4.0 / 6.0],
    # the blocks' log-likelihood, as given
    "likelihood": [-1.5, -4.0],
    # row 0, A = {0}: 0.5 (3 - 2) + 0.5 (4 - 3) + 1 (5 - 4) + 1 (6 - 5) = 3
    # row 1, A = {2, 1}: w(j, A) = min(w(j, 2), w(j, 1)) = min(1, 0.5) = 0.5 on tokens 0, 1:
    #        0.5 (1 - 0.5) + 0.5 (2 - 1.5) = 0.5
    "extrapolative": [3.0, 0.5],
}


@pytest.mark.parametrize("kind", REWARDS)
def test_information_reward_hand_computed(kind):
    got = information_reward(kind, BLOCKS, K, UNSEEN_BEFORE, LOSS_BEFORE, UNSEEN_AFTER, LOSS_AFTER, LOGLIK, WEIGHTS)
    torch.testing.assert_close(got, torch.tensor(EXPECTED[kind]), atol=1e-6, rtol=0)


def test_information_reward_errors():
    with pytest.raises(ValueError, match="weights"):
        information_reward("extrapolative", BLOCKS, K, UNSEEN_BEFORE, LOSS_BEFORE, UNSEEN_AFTER, LOSS_AFTER, LOGLIK)
    with pytest.raises(ValueError, match="unknown reward"):
        information_reward("nope", BLOCKS, K, UNSEEN_BEFORE, LOSS_BEFORE, UNSEEN_AFTER, LOSS_AFTER, LOGLIK, WEIGHTS)


def test_decision_reward_subtracts_the_cost():
    got = decision_reward(torch.tensor([7.0, 19.0], dtype=torch.float64), 0.25)
    assert got.dtype == torch.float32
    assert got.tolist() == [6.75, 18.75]


def test_discounting_hand_computed():
    # gamma = 0.5: factors at times 0, 1, 3 are 1, 0.5, 0.125
    assert discount_factors(torch.tensor([0, 1, 3]), 0.5).tolist() == [1.0, 0.5, 0.125]
    rewards = torch.tensor([[1.0, 2.0, 4.0], [8.0, 0.0, -4.0]])
    # default times 0, 1, 2: 1 + 2 * 0.5 + 4 * 0.25 = 3;  8 + 0 - 4 * 0.25 = 7
    assert discounted_return(rewards, 0.5).tolist() == [3.0, 7.0]
    # block times (semi-MDP): row 0 at 0, 2, 3: 1 + 2 * 0.25 + 4 * 0.125 = 2; row 1 at 0, 1, 4: 8 - 4 / 16 = 7.75
    times = torch.tensor([[0, 2, 3], [0, 1, 4]])
    assert discounted_return(rewards, 0.5, times).tolist() == [2.0, 7.75]
    assert discounted_return(rewards, 0.5).dtype == torch.float64
