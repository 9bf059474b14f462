"""The order comparison's numbers: per-image returns equal the episodes' own discounted returns,
agreement and regret equal the oracle comparison of the held-out report, intervals cover the right
sources of variation, paired differences of a policy with itself are exactly 0, and the one command
trains, skips what is trained and writes the table."""

import json

import pytest
import torch

from orderplan.eval.comparison import (PolicyScores, bootstrap_mean, comparison_rows, markdown_table,
                                          paired_delta, score_policy)
from orderplan.eval.report import oracle_comparison
from orderplan.planner.policies import make_policy, run_episodes
from tests.conftest import toy_core

IMAGES = torch.tensor([0, 3, 5, 7, 9])


def _scores(name: str, returns, group: str = "baseline") -> PolicyScores:
    r = torch.as_tensor(returns, dtype=torch.float64)
    r = r[None] if r.dim() == 1 else r
    return PolicyScores(name, r, torch.zeros(r.shape[0], 0), torch.zeros(r.shape[0], 0), 0.0, 16.0, 1.0, group)


@pytest.mark.parametrize("name", ["raster", "confident_first", "oracle"])
def test_score_policy_matches_run_episodes_and_the_oracle_comparison(name):
    core = toy_core(2)
    s = score_policy(name, lambda c: make_policy(name, c), core, IMAGES, 0.9, agreement_images=3)
    ref = []
    for i in range(0, len(IMAGES), 2):
        chunk = IMAGES[i:i + 2]
        chunk = torch.cat([chunk, chunk[-1:].expand(2 - len(chunk))])
        ref.append(run_episodes(make_policy(name, core), core, chunk, gamma=0.9)["discounted_return"].double())
    ref = torch.cat(ref)[:len(IMAGES)]
    torch.testing.assert_close(s.returns[0], ref, atol=1e-4, rtol=1e-6)
    assert s.agreement.shape == (1, 3) and s.regret.shape == (1, 3)
    agree = oracle_comparison(make_policy(name, core), core, IMAGES[:3])
    # one scorer behind both: the same numbers, not merely close ones
    assert float(s.agreement.mean()) == agree["oracle_agreement"]
    assert float(s.regret.mean()) == agree["regret"]
    if name == "oracle":
        assert float(s.agreement.mean()) == 1.0 and float(s.regret.abs().max()) < 1e-4
    assert s.forwards_per_decision == {"raster": 0.0, "confident_first": 1.0}.get(name, s.forwards_per_decision)


def test_router_rows_of_different_lengths_get_finite_agreement_and_regret():
    core = toy_core(2, budget=[1, 2, 4])
    s = score_policy("random", lambda c: make_policy("random", c, seed=3), core, IMAGES[:2], 0.9, agreement_images=2)
    assert s.decisions_per_episode < core.N  # multi-block decisions: the rows finish at different steps
    assert bool(torch.isfinite(s.regret).all() and torch.isfinite(s.agreement).all())
    assert bool((s.regret >= 0).all())


def test_bootstrap_intervals():
    const = torch.full((3, 50), 2.5, dtype=torch.float64)
    assert bootstrap_mean(const) == (2.5, 2.5, 2.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 400, generator=g, dtype=torch.float64)
    m, lo, hi = bootstrap_mean(x)
    assert lo < m < hi and abs((hi - lo) / 2 - 1.96 / 20) < 0.03  # about 1.96 sigma / sqrt(M)
    # seeds that disagree widen the interval: the seeds are resampled too
    seeds = torch.stack([x[0], x[0] + 1.0, x[0] - 1.0])
    _, lo3, hi3 = bootstrap_mean(seeds)
    assert hi3 - lo3 > 3 * (hi - lo)


@pytest.mark.parametrize("shape", [(1, 37), (3, 20)])
def test_bootstrap_mean_is_the_mean_of_each_resample(shape):
    """The chunked gather equals drawing the resamples one at a time: resample r takes seeds si[r]
    and images mi[r] from the generator's stream (seeds first), and its mean is that of x[si[r]][:, mi[r]]."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    S, M = shape
    g = torch.Generator().manual_seed(9)
    si = torch.randint(S, (500, S), generator=g) if S > 1 else torch.zeros(500, 1, dtype=torch.long)
    mi = torch.randint(M, (500, M), generator=g)
    means = torch.stack([x[si[r]][:, mi[r]].mean() for r in range(500)])
    lo, hi = torch.quantile(means, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    m, blo, bhi = bootstrap_mean(x, 500, 0.9, 9)
    assert m == pytest.approx(float(x.mean()), abs=1e-15)
    assert blo == pytest.approx(lo, abs=1e-12) and bhi == pytest.approx(hi, abs=1e-12)


def test_paired_delta_of_a_policy_with_itself_is_exactly_zero_and_pairing_removes_image_spread():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, generator=g, dtype=torch.float64) * 20  # large spread between images
    a, b = _scores("a", base + 0.5), _scores("b", base)
    assert paired_delta(b, b) == (0.0, 0.0, 0.0)
    m, lo, hi = paired_delta(a, b)
    assert m == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # unpaired intervals overlap although a wins on every image
    assert bootstrap_mean(a.returns)[1] < bootstrap_mean(b.returns)[2]
    with pytest.raises(ValueError, match="same images"):
        paired_delta(a, _scores("c", base[:10]))


def test_rows_and_table():
    rows = comparison_rows([_scores("random", [1.0, 2.0, 3.0]), _scores("oracle", [3.0, 4.0, 5.0]),
                            _scores("confident_first", [2.0, 2.5, 3.5]),
                            _scores("bc", [[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]], "bc")], resamples=200)
    by = {r["policy"]: r for r in rows}
    assert by["bc"]["gap_closed"] == pytest.approx(0.5) and by["oracle"]["gap_closed"] == pytest.approx(1.0)
    assert by["bc"]["best_free_baseline"] == "confident_first"
    assert "oracle" not in by["bc"]["delta_vs"]  # the ground-truth oracle is no paired reference
    assert by["bc"]["delta_vs"]["random"] == pytest.approx([1.0, 1.0, 1.0])
    assert by["bc"]["seeds"] == 2
    table = markdown_table(rows)
    assert "Δ vs confident_first" in table and len(table.splitlines()) == 2 + len(rows)


@pytest.mark.slow
def test_compare_orders_end_to_end(tmp_path):
    """Tiny settings: the command trains BC and PPO for two seeds and both observations, scores every
    row on the same images, and a rerun skips the trained runs and writes the same table."""
    from orderplan.train.compare_orders import CompareRun, compare_orders
    from orderplan.config.common import compose, to_typed

    overrides = [f"run_dir={tmp_path}", "seeds=[0,1]", "router_seeds=[0]", "R_values=[0]",
                 'bc_overrides=["bc.steps=20","oracle.num_images=8","eval.num_images=4","eval.baselines=[random]"]',
                 'ppo_overrides=["ppo.total_frames=32","ppo.frames_per_batch=16","ppo.minibatch_size=16",'
                 '"eval.num_images=4","eval.baselines=[random]","batch_size=8"]',
                 "eval.num_images=6", "eval.batch_size=3", "eval.agreement_images=3", "eval.ablation_agreement_images=0",
                 "eval.baselines=[raster,random,confident_first,expected_oracle,oracle]", "eval.bootstrap=100",
                 "env.belief_samples=2"]
    run = to_typed(compose("compare_orders", overrides), CompareRun)
    out = compare_orders(run)
    names = [r["policy"] for r in out["rows"]]
    assert names == ["raster", "random", "confident_first", "expected_oracle", "oracle", "bc_block", "bc_belief",
                     "ppo_block", "ppo_belief", "bc_belief_R0", "ppo_belief_R0", "router_belief"]
    rows = {r["policy"]: r for r in out["rows"]}
    assert rows["bc_belief"]["seeds"] == 2 and rows["router_belief"]["seeds"] == 1
    assert all(r["images"] == 6 for r in out["rows"])
    assert rows["oracle"]["oracle_agreement"] == 1.0
    assert rows["expected_oracle"]["forwards_per_decision"] > 1.0 == rows["bc_belief"]["forwards_per_decision"]
    assert (tmp_path / "results.md").is_file()
    first = json.loads((tmp_path / "results.json").read_text())
    out2 = compare_orders(run)  # everything trained: skipped, same numbers
    assert out2["trained_this_call_s"] == {}
    assert [r["return"] for r in out2["rows"]] == [r["return"] for r in first["rows"]]
