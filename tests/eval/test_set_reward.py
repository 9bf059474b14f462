"""The quality planner's set-level reward: leave-one-out Fréchet distances against the naive
computation, and the spaces training may read."""

import pytest
import torch

from orderplan.eval.sample_metrics import frechet_from_features
from orderplan.eval.set_reward import SetFrechetReward, check_reward_spaces, leave_one_out_frechet


def test_leave_one_out_matches_removing_each_row():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0]) + 0.3
    fake = torch.randn(12, 5, generator=g) * 1.3
    x = real.double()
    loo, full = leave_one_out_frechet(fake, x.mean(0), torch.cov(x.T))
    assert full == pytest.approx(_fd(real, fake), rel=1e-9, abs=1e-9)
    for i in range(len(fake)):
        rest = torch.cat([fake[:i], fake[i + 1:]])
        assert float(loo[i]) == pytest.approx(_fd(real, rest), rel=1e-7, abs=1e-9), i


def _fd(real, fake):
    # frechet_from_features uses the real set's own statistics, as the reward's reference does
    return frechet_from_features(real, fake)


def test_a_sample_that_pulls_the_batch_to_the_reference_is_paid_more():
    g = torch.Generator().manual_seed(1)
    patterns = torch.randn(3, 1, 8, 8, generator=g) * 0.1
    coef = torch.randn(300, 3, generator=g)
    reference = torch.einsum("mk,kchw->mchw", coef, patterns) + 0.01 * torch.randn(300, 1, 8, 8, generator=g)
    reward = SetFrechetReward(reference, ["pixel_pca"], pca_components=3)
    batch = reference[:20].clone()
    batch[0] = 8 * patterns[0]  # eight standard deviations out along a direction the real images vary in
    paid = reward(batch)
    assert paid.reward.shape == (20,) and paid.reward.dtype == torch.float32
    assert int(paid.reward.argmin()) == 0 and float(paid.reward[0]) < 0  # dropping it lowers the FD
    assert set(paid.fd) == {"pixel_pca"} and paid.fd["pixel_pca"] > 0


@pytest.mark.parametrize("spaces,match", [
    (["autoencoder"], "evaluation-only"), (["classifier"], "evaluation-only"), ([], "at least one"),
    (["pixel_pca", "pixel_pca"], "distinct")])
def test_training_may_not_read_the_evaluation_spaces(spaces, match):
    with pytest.raises(ValueError, match=match):
        check_reward_spaces(spaces)


def test_leave_one_out_needs_three_rows():
    with pytest.raises(ValueError, match="n >= 3"):
        leave_one_out_frechet(torch.zeros(2, 3), torch.zeros(3), torch.eye(3))
