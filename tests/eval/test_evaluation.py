"""The held-out report against hand-computed numbers: on the key-block toy (whose utilities are known
in closed form) the returns, regret and oracle agreement of a raster policy and of the oracle; on a
random model, a policy that follows the oracle on a known fraction of decisions; and every policy is
scored on the same class-balanced images."""

import math

import pytest
import torch

from orderplan.eval.report import evaluate, oracle_comparison
from orderplan.planner.policies import make_policy
from tests.conftest import toy_core
from tests.support.keyblock_toy import make_toy_core


def _keyblock_rewards(k: int, N: int, L: int, T: int, V: int, eps: float) -> torch.Tensor:
    """future_loss rewards [N] (nats) of a one-block-per-step order that reveals the key block at step
    k (from the toy's known answers): before the key every block is uniform, T log V; the key block
    determines every unseen token, T log V + (|R| - T)(log V + log(1 - eps)) with |R| = L - kT unseen;
    after it each block is worth T * -log(1 - eps)."""
    r = torch.full((N,), T * math.log(V), dtype=torch.float64)
    r[k] += (L - (k + 1) * T) * (math.log(V) + math.log1p(-eps))
    r[k + 1:] = -T * math.log1p(-eps)
    return r


def test_report_on_the_keyblock_toy_matches_hand_computed_numbers():
    """5 images (classes 0, 1, 2, 3, 0) in batches of 3, so the last batch has a padding row that must
    not be scored. Raster reveals block t at step t, so it finds the key block k(c) at step k(c)."""
    core = make_toy_core(batch_size=3, num_images=5, reward="future_loss")
    toy = core.bb.gpt.cfg
    N, L, T, V, eps, gamma = core.N, core.L, core.L // core.N, toy.vocab_size, toy.eps, 0.9
    keys = core.bb.gpt.key_block[core.labels].tolist()  # raster step of each image's key block
    assert len(set(keys)) == 4 and min(keys) > 0  # the key is never raster's first block
    policies = {"raster": make_policy("raster", core), "random": make_policy("random", core, seed=0),
                "oracle": make_policy("oracle", core), "learned": make_policy("raster", core)}
    rep = evaluate(policies, core, num_images=5, gamma=gamma)

    disc = gamma ** torch.arange(N, dtype=torch.float64)
    oracle = float((_keyblock_rewards(0, N, L, T, V, eps) * disc).sum())  # the oracle reveals the key first
    raster = sum(float((_keyblock_rewards(k, N, L, T, V, eps) * disc).sum()) for k in keys) / len(keys)
    assert rep["returns"]["oracle"] == pytest.approx(oracle, rel=1e-5)
    assert rep["returns"]["learned"] == pytest.approx(raster, rel=1e-5)
    assert rep["returns"]["raster"] == pytest.approx(raster, rel=1e-5)
    for name in policies:  # future_loss telescopes to L_rest(empty) = L log V for every order
        assert rep["returns_undiscounted"][name] == pytest.approx(L * math.log(V), rel=1e-5)
    random = rep["returns"]["random"]
    assert rep["gap_closed"] == pytest.approx((raster - random) / (oracle - random), rel=1e-4)

    # regret at step t < k: u(key) - u(raster block) = (L - (t + 1) T)(log V + log(1 - eps)); 0 from k on
    regret = sum((L - (t + 1) * T) * (math.log(V) + math.log1p(-eps)) for k in keys for t in range(k))
    assert rep["regret"] == pytest.approx(regret / (len(keys) * N), rel=1e-4)
    # agreement: 0 before the key (the oracle's argmax is the key), 1 at it; after it every block is
    # worth the same up to float noise, so the oracle's argmax there is a coin toss
    lo = len(keys) / (len(keys) * N)
    hi = sum(N - k for k in keys) / (len(keys) * N)
    assert lo <= rep["oracle_agreement"] <= hi


class _OracleOnEvenSteps:
    """Plays the oracle's argmax at even steps and its argmin (the worst unrevealed block) at odd
    steps; records max - min of the utilities at odd steps per image, the regret it incurs there."""

    def __init__(self, core):
        self.core = core
        self.gaps: dict[int, list[float]] = {}

    def act(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        util = self.core.oracle_utilities("future_loss")  # [B, N], -inf on revealed
        worst = torch.where(torch.isinf(util), float("inf"), util)
        odd = obs["step"] % 2 == 1
        for b in torch.nonzero(odd & ~self.core.done).flatten().tolist():
            # a padding row repeats its batch's last image: the same gaps, recorded once
            self.gaps.setdefault(int(obs["step"][b]), {})[int(obs["image_index"][b])] = float(util[b].max() - worst[b].min())
        return torch.where(odd, worst.argmin(-1), util.argmax(-1))


def test_a_policy_matching_the_oracle_on_a_known_fraction_of_decisions():
    """N = 16 steps: 8 even steps follow the oracle, the 7 odd steps before the last do not (a random
    model has no ties), and at step 15 the only block left is both argmin and argmax: agreement 9/16.
    3 images in batches of 2: a padding row that were scored would weight image 2 twice."""
    core = toy_core(batch_size=2, n_images=3, reward="future_loss")
    assert core.N == 16
    policy = _OracleOnEvenSteps(core)
    out = oracle_comparison(policy, core, torch.arange(3))
    assert out["oracle_agreement"] == pytest.approx(9 / 16)
    gaps = [g for step in policy.gaps.values() for g in step.values()]
    assert len(gaps) == 3 * 8 and gaps.count(0.0) == 3  # step 15: one block left, no regret
    assert out["regret"] == pytest.approx(sum(gaps) / (3 * 16), rel=1e-6)


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
    from orderplan.planner.policies import run_episodes

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


def test_balanced_images_cover_every_class():
    """The embedded splits are sorted by class: the report (and the evaluate run) must not score only
    the first digits. One rule picks the images of both."""
    from orderplan.eval.rollouts import balanced_images

    labels = torch.arange(40) // 10  # sorted by class, as the embedded MNIST splits are
    images = balanced_images(labels, 8)
    assert torch.bincount(labels[images], minlength=4).tolist() == [2, 2, 2, 2]
    assert sorted(balanced_images(labels).tolist()) == list(range(40))
    assert torch.equal(balanced_images(labels, 100), balanced_images(labels))
