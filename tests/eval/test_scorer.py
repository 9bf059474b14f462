"""The one scorer (`orderplan.eval.scorer`): its per-image agreement and regret against a naive
step-by-step computation on a router core (images with different numbers of decisions, where
per-image and per-decision averages differ), and the same numbers through the report, the order
comparison and the held-out summary."""

import torch

from orderplan.eval.comparison import score_policy
from orderplan.eval.report import evaluate, oracle_comparison, policy_returns
from orderplan.eval.rollouts import balanced_images
from orderplan.eval.scorer import score_episodes
from orderplan.planner.policies import make_policy
from tests.conftest import toy_core

IMAGES = torch.tensor([1, 4, 6])


def _naive(core, name: str, images: torch.Tensor, seed: int):
    """Per image, alone in a batch of its own: the oracle utilities before each decision, the
    first block chosen, the per-image means."""
    policy = make_policy(name, core, seed=seed)
    agree, regret = [], []
    for i in images.tolist():
        core.reset(None, torch.full((core.B,), i))
        hits, gaps = [], []
        while not bool(core.done[0]):
            util = core.oracle_utilities("future_loss")[0]
            action = policy.act(core.observation())
            first = int(action[0] if action.dim() == 1 else action[0, 1])
            hits.append(float(first == int(util.argmax())))
            gaps.append(float(util.max() - util[first]))
            core.step(action)
        agree.append(sum(hits) / len(hits))
        regret.append(sum(gaps) / len(gaps))
    return torch.tensor(agree, dtype=torch.float64), torch.tensor(regret, dtype=torch.float64)


def test_router_agreement_and_regret_are_per_image_means():
    core = toy_core(1, budget=[1, 2, 4])
    s = score_episodes(make_policy("random", core, seed=7), core, IMAGES, 0.9, agreement_images=len(IMAGES))
    assert len(set(s.decisions.tolist())) > 1  # images took different numbers of decisions
    agree, regret = _naive(core, "random", IMAGES, seed=7)
    torch.testing.assert_close(s.agreement, agree, atol=1e-12, rtol=0)
    torch.testing.assert_close(s.regret, regret, atol=1e-5, rtol=1e-6)
    # a pooled (per-decision) average would weigh long episodes more: not what is reported
    assert s.order_return is not None and s.order_return.shape == (len(IMAGES),)


def test_report_comparison_and_summary_read_one_number():
    core = toy_core(2)
    policy = lambda c: make_policy("confident_first", c)  # noqa: E731
    row = score_policy("confident_first", policy, core, IMAGES, 0.9, agreement_images=len(IMAGES))
    report = oracle_comparison(policy(core), core, IMAGES)
    assert float(row.agreement.mean()) == report["oracle_agreement"] and float(row.regret.mean()) == report["regret"]
    returns = policy_returns(policy(core), core, IMAGES, 0.9)
    assert float(row.returns.mean()) == returns["discounted"]
    # the held-out summary's agreement and regret are the comparison's, on the summary's own images
    summary = evaluate({"learned": policy(core), "random": make_policy("random", core, seed=0),
                        "oracle": make_policy("oracle", core)}, core, num_images=4, gamma=0.9)
    direct = oracle_comparison(policy(core), core, balanced_images(core.labels, 4))
    assert summary["num_images"] == 4
    assert summary["oracle_agreement"] == direct["oracle_agreement"] and summary["regret"] == direct["regret"]
    assert summary["returns"]["learned"] == policy_returns(policy(core), core, balanced_images(core.labels, 4),
                                                           0.9)["discounted"]
