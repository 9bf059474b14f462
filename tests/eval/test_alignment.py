"""The reward-alignment study (src/orderplan/eval/alignment.py): its statistics against naive
computations, and the job end to end on a tiny evaluation (the same samples as the table)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orderplan.eval.alignment import AlignmentRun, DiscriminatorSpec, JudgeSpec, realism_scores, spearman


def _naive_spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        out = []
        for v in x:  # average rank of ties, 0-based
            below = sum(1 for w in x if w < v)
            equal = sum(1 for w in x if w == v)
            out.append(below + (equal - 1) / 2)
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_spearman_is_pearson_of_average_ranks():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (30,), generator=g).double()  # many ties
    b = a + torch.randn(30, generator=g)
    assert spearman(a, b) == pytest.approx(_naive_spearman(a.tolist(), b.tolist()), abs=1e-12)
    assert spearman(b, b * 3 + 1) == pytest.approx(1.0) and spearman(b, -b.exp()) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(5), b[:5]))


def test_realism_scores_match_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(20, 3, generator=g), torch.randn(7, 3, generator=g) * 2
    k = 2
    radii = []
    for r in real:
        d = sorted(float((r - q).norm()) for q in real)
        radii.append(d[k])  # d[0] is the point itself
    naive = [max(radii[j] / float((f - real[j]).norm()) for j in range(len(real))) for f in fake]
    torch.testing.assert_close(realism_scores(real, fake, k, chunk=3), torch.tensor(naive, dtype=torch.float64))
    # a real point itself is at distance 0 of itself: clamped, not inf or nan
    assert bool(torch.isfinite(realism_scores(real, real[:2], k)).all())


def test_likelihood_reward_averages_its_orders():
    from orderplan.config.common import BackboneConfig
    from orderplan.eval.alignment import likelihood_reward
    from orderplan.model.loading import build_backbone

    bb = build_backbone(BackboneConfig())
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, bb.gpt.cfg.vocab_size, (6, bb.gpt.cfg.num_tokens), generator=g)
    labels = torch.arange(6) % 10
    two = likelihood_reward(bb.gpt, tokens, labels, bb.geometry, 2, seed=5, batch=4)
    # the same two orders one at a time (the generator's draws in sequence)
    from orderplan.model.orders import block_order
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(5)
    each = []
    for _ in range(2):
        o = bb.geometry.token_order(block_order("random", bb.geometry, batch=6, generator=gen))
        with torch.no_grad():
            logits = bb.gpt.forward_train(tokens, labels, o, use_ta=True).float()
        each.append(logits.log_softmax(-1).gather(2, tokens.gather(1, o)[..., None]).squeeze(-1).double().mean(1))
    torch.testing.assert_close(two, (each[0] + each[1]) / 2, atol=1e-5, rtol=0)
    assert bool((two < 0).all())  # log-probabilities


@pytest.mark.slow  # a tiny evaluation, then the job (~2 min on 2 cores)
def test_alignment_scores_the_tables_own_samples(tmp_path):
    from orderplan.config.common import compose, to_typed
    from orderplan.eval.alignment import REWARDS, reward_alignment
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation

    over = [f"run_dir={tmp_path / 'eval'}", "eval.num_samples=16", "eval.gen_batch_size=8", "eval.seed_samples=8",
            "eval.sampler_seeds=[0,1]", "eval.fid_curve=[16]", "stats.bootstrap=3", "stats.kid_subsets=2",
            "plots.snapshot_samples=2", "plots.heatmap_images=2", "plots.column_rows=2",
            "policies=[raster,random,confident_first,confident_sampled]",
            "eval.dfid_baselines=[raster,random]"]
    run_evaluation(to_typed(compose("evaluate_spaces", over), EvaluateRun))
    res = reward_alignment(AlignmentRun(run_dir=str(tmp_path / "align"), evaluate_overrides=over, num_samples=16,
                                        likelihood_orders=2, judge=JudgeSpec(epochs=1),
                                        discriminator=DiscriminatorSpec(steps=3), bootstrap=20))
    assert set(res["policies"]) == {"raster", "random", "confident_first", "confident_sampled"}
    for name, row in res["policies"].items():
        assert row["same_samples_as_table"], name  # sample i here is sample i of the table
        for r in REWARDS:
            assert math.isfinite(row[r]) and row[f"{r}_ci"][0] <= row[r] <= row[f"{r}_ci"][1], (name, r)
        assert row["likelihood"] < 0 and row["judge"] <= 0
        # the set-level reward of the quality planner is minus the table's own pixel-PCA FD (same samples)
        assert row["set_fd"] == pytest.approx(-row["fd"]["pixel_pca"], rel=1e-4)
    for r in REWARDS:
        for sp, c in res["correlation"][r]["policies"].items():
            assert math.isnan(c["rho"]) or -1.0 <= c["rho"] <= 1.0
        assert res["correlation"][r]["samples"]["pooled"] == (4 * 8 if r.startswith("discriminator") else 4 * 16)
    # the undiscounted entropy drop telescopes to the entropy of the empty canvas, which depends on
    # the label alone: every policy has the same mean, and no rank correlation is read into rounding
    means = [row["entropy_drop"] for row in res["policies"].values()]
    assert max(means) - min(means) <= 1e-6 * abs(means[0]) and res["correlation"]["entropy_drop"]["constant"]
    assert all(math.isnan(c["rho"]) for c in res["correlation"]["entropy_drop"]["policies"].values())
    # the codec check pairs the 4,500 train digits with their reconstructions: trained on half, scored on half
    assert res["codec_signature"]["num_heldout"] == 2250
    assert "codec's signature" in (tmp_path / "align" / "results.md").read_text()
    on_disk = json.loads((tmp_path / "align" / "results.json").read_text())
    assert on_disk["spaces"] == ["classifier", "autoencoder", "pixel_pca", "random_relu"]
    assert "Spearman" in (tmp_path / "align" / "results.md").read_text()
