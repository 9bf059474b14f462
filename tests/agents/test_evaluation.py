"""The held-out report: the oracle agrees with itself with zero regret, a fixed order does not,
and every policy is scored on the same images."""

import pytest

from agents.evaluation.report import evaluate
from agents.planner.policies import make_policy
from tests.conftest import toy_core


def test_report_scores_oracle_and_baselines_on_the_same_images():
    core = toy_core(batch_size=3, n_images=5, reward="future_loss")
    policies = {name: make_policy(name, core) for name in ("raster", "random", "oracle")}
    policies["learned"] = make_policy("oracle", core)
    rep = evaluate(policies, core, num_images=5, gamma=0.9)
    assert rep["num_images"] == 5 and rep["gamma"] == 0.9
    assert set(rep["returns"]) == {"raster", "random", "oracle", "learned"}
    assert rep["oracle_agreement"] == 1.0 and rep["regret"] == pytest.approx(0.0, abs=1e-6)
    assert rep["returns"]["learned"] == pytest.approx(rep["returns"]["oracle"])
    assert rep["gap_closed"] == pytest.approx(1.0)
    # future_loss telescopes: undiscounted returns agree across orders (same images)
    und = rep["returns_undiscounted"]
    assert und["raster"] == pytest.approx(und["oracle"], rel=1e-4)
    # greedy oracle beats raster under discounting on a random model
    assert rep["returns"]["oracle"] > rep["returns"]["raster"]


def test_fixed_order_has_regret():
    core = toy_core(batch_size=2, n_images=2)
    rep = evaluate({"learned": make_policy("raster", core)}, core, num_images=2, gamma=0.9)
    assert rep["regret"] > 0 and rep["oracle_agreement"] < 1.0


def test_router_orders_are_scored_per_block():
    """With the router, the block order a policy produced is also scored one block per step, so
    revealing many blocks per decision earns no discount advantage: the k=1 baselines score the
    same per block as per decision."""
    core = toy_core(batch_size=2, n_images=2, budget=[1, 2, 4], decision_cost=0.0)
    rep = evaluate({"raster": make_policy("raster", core)}, core, num_images=2, gamma=0.9, learned=None)
    assert rep["returns_per_block"]["raster"] == pytest.approx(rep["returns"]["raster"], rel=1e-5)


def test_smdp_router_returns_equal_per_block_returns_up_to_costs():
    """Semi-MDP router core (env.gamma = the report's gamma): `returns` are discounted in block time,
    so adding back each decision's cost at its block-time discount gives the per-block return of the
    same order, for mixed budgets (random) and a fixed budget of 4."""
    import torch

    from agents.planner.policies import run_episodes

    lam = 0.5
    core = toy_core(batch_size=2, n_images=3, budget=[1, 2, 4], decision_cost=lam, gamma=0.9)
    policies = {"random": make_policy("random", core, seed=3), "raster4": make_policy("raster", core, budget=4)}
    rep = evaluate(policies, core, num_images=3, gamma=0.9, learned=None)
    assert rep["semi_mdp"] is True
    for name in policies:
        per_block = rep["returns_per_block"][name]
        assert rep["returns_without_decision_cost"][name] == pytest.approx(per_block, rel=1e-5, abs=1e-4), name
        assert rep["returns"][name] < per_block - lam  # the first decision alone costs lam
    assert rep["decisions_per_episode"]["raster4"] == core.N / 4
    # the discount of each decision is gamma^(blocks revealed before it)
    out = run_episodes(policies["raster4"], core, torch.tensor([0, 1]))
    assert torch.allclose(out["discount"][0], 0.9 ** (4.0 * torch.arange(core.N // 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="env.gamma"):
        run_episodes(policies["raster4"], core, torch.tensor([0, 1]), gamma=0.5)


def test_heldout_images_cover_every_class():
    """The embedded splits are sorted by class: the report must not score only the first digits."""
    import torch

    from agents.evaluation.report import heldout_images

    core = toy_core(n_images=40)
    core.labels = torch.arange(40) // 10  # sorted by class, as the embedded MNIST splits are
    images = heldout_images(core, 8)
    assert torch.bincount(core.labels[images], minlength=4).tolist() == [2, 2, 2, 2]
    assert len(set(heldout_images(core, 100).tolist())) == 40
