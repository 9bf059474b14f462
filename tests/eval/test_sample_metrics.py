"""Sample-set statistics: the fast FID against torchmetrics (fid.frechet_distance), the paired FID
bootstrap (exactly 0 on identical sets, narrower than an unpaired bootstrap on correlated sets),
FID curves over sample prefixes, improved precision/recall on hand-computed cases, the classifier
log-probability, and the three policy figures."""

import numpy as np
import pytest
import torch

from orderplan.eval.comparison import bootstrap_mean
from orderplan.eval.fid import bootstrap_interval, frechet_distance
from orderplan.eval.plots import (_mean_reveal_steps, class_rows, fid_vs_n, policy_columns, reveal_time_heatmaps,
                                   sample_grid)
from orderplan.eval.sample_metrics import (class_logprob, fid_curve, fid_with_interval, frechet_from_features,
                                              knn_radii, mean_interval, paired_fid_delta, precision_recall)
from orderplan.model.blocks import BlockGeometry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _features(n: int, seed: int, f: int = 8, shift: float = 0.0) -> torch.Tensor:
    """[n, f] float64 correlated Gaussian features (a fixed mixing matrix), offset by `shift`."""
    mix = torch.randn(f, f, generator=torch.Generator().manual_seed(123), dtype=torch.float64) / 3
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g, dtype=torch.float64) @ mix + 0.5 + shift


@pytest.fixture
def real() -> torch.Tensor:
    return _features(300, seed=0)


# -- fast FID -----------------------------------------------------------------------------------


def test_fast_fid_matches_torchmetrics(real):
    other = _features(250, seed=1) * 1.3
    for fake in (other, other + 0.7, _features(300, seed=2, shift=3.0), torch.relu(other) * 20 + 100):
        expected = frechet_distance(real, fake)
        assert expected > 1e-3  # not the trivial 0 == 0
        assert frechet_from_features(real, fake) == pytest.approx(expected, rel=1e-6)


def test_fast_fid_rejects_bad_features(real):
    with pytest.raises(ValueError, match="NaN"):
        frechet_from_features(real, torch.full_like(real, float("nan")))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_from_features(real, real[:, :4])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_from_features(real, real[:1])
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        frechet_from_features(real, real[0])


def test_fid_with_interval_is_fid_bootstrap_interval_with_the_fast_fid(real):
    fake = _features(200, seed=3, shift=0.3)
    fid, lo, hi = fid_with_interval(real, fake, num_resamples=40, seed=5)
    ref_lo, ref_hi = bootstrap_interval(frechet_distance, real, fake, num_resamples=40, seed=5)
    assert fid == pytest.approx(frechet_distance(real, fake), rel=1e-6)
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), rel=1e-6)  # same replicates, same re-centring
    assert lo < fid < hi


# -- paired FID difference ----------------------------------------------------------------------


def test_paired_delta_of_a_set_with_itself_is_exactly_zero(real):
    fake = _features(200, seed=4)
    result = paired_fid_delta(real, fake, fake.clone(), num_resamples=50)
    assert (result.delta, result.lo, result.hi) == (0.0, 0.0, 0.0)
    assert (result.num_resamples, result.n) == (50, 200)


def test_paired_delta_is_the_direct_difference_with_a_covering_interval(real):
    a = _features(200, seed=5, shift=0.1)
    b = _features(200, seed=6, shift=0.4)
    result = paired_fid_delta(real, a, b, num_resamples=100)
    direct = frechet_distance(real, a) - frechet_distance(real, b)
    assert direct < 0  # b is farther from real
    assert result.delta == pytest.approx(direct, rel=1e-6)
    assert result.lo < result.delta < result.hi

    far = paired_fid_delta(real, a, a + 1.0, num_resamples=100)  # +1 on 8 dims: FID grows by about 8
    assert far.delta == pytest.approx(frechet_distance(real, a) - frechet_distance(real, a + 1.0), rel=1e-6)
    assert far.lo < far.delta < far.hi < 0.0
    assert paired_fid_delta(real, a + 1.0, a, num_resamples=100).lo > 0.0  # swapping flips the sign


def _unpaired_interval(real: torch.Tensor, a: torch.Tensor, b: torch.Tensor, num_resamples: int) -> float:
    """Width of the 95% percentile interval of FID(a) - FID(b) when a and b are resampled
    independently (the reference resampled once per replicate for both, as in the paired version)."""
    g = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(num_resamples):
        ri = torch.randint(real.shape[0], (real.shape[0],), generator=g)
        ai = torch.randint(a.shape[0], (a.shape[0],), generator=g)
        bi = torch.randint(b.shape[0], (b.shape[0],), generator=g)
        deltas.append(frechet_from_features(real[ri], a[ai]) - frechet_from_features(real[ri], b[bi]))
    lo, hi = torch.quantile(torch.tensor(deltas, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return hi - lo


def test_pairing_narrows_the_interval_on_correlated_sets(real):
    """b = a + small noise: the same draws, so the sample-to-sample variation cancels in the
    paired difference but not in the unpaired one."""
    a = _features(250, seed=7, shift=0.2)
    b = a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    paired = paired_fid_delta(real, a, b, num_resamples=100)
    assert paired.hi - paired.lo < 0.25 * _unpaired_interval(real, a, b, 100)


def test_paired_delta_rejects_unpaired_or_bad_sets(real):
    a = _features(200, seed=9)
    with pytest.raises(ValueError, match="same S"):
        paired_fid_delta(real, a, a[:150])
    with pytest.raises(ValueError, match="NaN"):
        paired_fid_delta(real, a, torch.where(a > 1.0, float("nan"), a))
    with pytest.raises(ValueError, match="feature sizes differ"):
        paired_fid_delta(real, a, a[:, :4])
    with pytest.raises(ValueError, match="num_resamples"):
        paired_fid_delta(real, a, a, num_resamples=1)


# -- FID against N ------------------------------------------------------------------------------


def test_fid_curve_uses_prefixes_and_drops_n_above_s(real):
    fake = _features(120, seed=10, shift=0.2)
    curve = fid_curve(real, fake, ns=[500, 40, 120, 10], num_resamples=20)
    assert [p["n"] for p in curve] == [10, 40, 120]  # ascending, 500 > S dropped
    for p in curve:
        assert p["fid"] == pytest.approx(frechet_distance(real, fake[:p["n"]]), rel=1e-6)
        assert p["lo"] <= p["fid"] <= p["hi"]
    assert curve[-1]["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-6)
    with pytest.raises(ValueError, match="n >= 2"):
        fid_curve(real, fake, ns=[1, 50])


# -- precision and recall -----------------------------------------------------------------------


def test_precision_recall_of_a_set_with_itself_is_one(real):
    pr = precision_recall(real, real.clone(), k=3, chunk=64)  # chunk < N: several chunks
    assert (pr.precision, pr.recall) == (1.0, 1.0)
    assert pr.in_real.shape == (300,) and pr.in_real.dtype == torch.bool and bool(pr.in_fake.all())


def test_precision_recall_of_far_apart_clusters_is_zero(real):
    pr = precision_recall(real, _features(200, seed=11, shift=50.0), k=3)
    assert (pr.precision, pr.recall) == (0.0, 0.0)
    assert pr.in_real.shape == (200,) and pr.in_fake.shape == (300,)


def test_precision_recall_on_a_hand_computed_1d_case():
    """k = 1. Real 0, 1, 2, 10, 11: every radius is 1 (the nearest OTHER real point), so the real
    manifold is [-1, 3] u [9, 12]. Fakes come in close pairs: radii 0.2, 0.2, 0.2, 0.2, 0.3, 0.3,
    so the fake manifold is [0.2, 0.8] u [4.8, 5.4] u [10.7, 11.6]."""
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    fake = torch.tensor([[0.4], [0.6], [5.0], [5.2], [11.0], [11.3]])
    pr = precision_recall(real, fake, k=1, chunk=2)
    assert pr.in_real.tolist() == [True, True, False, False, True, True]
    assert pr.in_fake.tolist() == [False, False, False, False, True]  # only real 11 is near a fake pair
    assert pr.precision == pytest.approx(4 / 6) and pr.recall == pytest.approx(1 / 5)
    assert pr.k == 1


def test_precision_recall_rejects_bad_inputs(real):
    with pytest.raises(ValueError, match="feature sizes differ"):
        precision_recall(real, real[:, :4])
    with pytest.raises(ValueError, match="at least 4 rows"):
        precision_recall(real, real[:3], k=3)
    with pytest.raises(ValueError, match="real_radii"):
        precision_recall(real, real.clone(), k=3, real_radii=knn_radii(real, 3)[:-1])
    with pytest.raises(ValueError, match="k \\+ 1 = 4 rows"):
        knn_radii(real[:3], 3)


def test_reused_reference_radii_give_the_same_precision_and_recall(real):
    """A table computes the reference's radii once (knn_radii) and passes them to every policy's
    precision_recall: the same indicators as computing them inside, and the radii are each real
    point's distance to its k-th nearest other real point (naive double loop)."""
    fake = _features(150, seed=5, shift=0.5)
    radii = knn_radii(real, 3, chunk=64)
    naive = torch.stack([torch.sort(torch.cat([(real[:i] - r).norm(dim=1), (real[i + 1:] - r).norm(dim=1)]))[0][2]
                         for i, r in enumerate(real.double())])
    torch.testing.assert_close(radii, naive, atol=1e-10, rtol=0)
    a, b = precision_recall(real, fake, k=3), precision_recall(real, fake, k=3, real_radii=radii)
    assert torch.equal(a.in_real, b.in_real) and torch.equal(a.in_fake, b.in_fake)
    assert 0.0 < a.precision < 1.0 and 0.0 < a.recall < 1.0  # not a vacuous comparison


# -- classifier log-probability and per-sample means --------------------------------------------


def test_class_logprob_is_log_softmax_at_the_label():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(50, 10, generator=g) * 5
    labels = torch.randint(10, (50,), generator=g)
    out = class_logprob(logits, labels)
    expected = torch.log_softmax(logits.double(), 1)[torch.arange(50), labels]
    assert out.dtype == torch.float64 and out.shape == (50,)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    assert bool((out < 0).all())
    with pytest.raises(ValueError, match="labels must lie in"):
        class_logprob(logits, torch.full((50,), 10))
    with pytest.raises(ValueError, match=r"\[S, C\]"):
        class_logprob(logits, labels[:49])


def test_mean_interval_is_bootstrap_mean_over_samples():
    values = torch.randn(200, generator=torch.Generator().manual_seed(13), dtype=torch.float64) + 2.0
    mean, lo, hi = mean_interval(values, num_resamples=300, seed=1)
    assert mean == pytest.approx(float(values.mean()))
    assert (mean, lo, hi) == bootstrap_mean(values[None], 300, 0.95, 1)
    assert lo < mean < hi and hi - lo < 0.5  # about 4 standard errors of 1 / sqrt(200)
    assert mean_interval(torch.full((20,), 3.0), num_resamples=50) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="NaN"):
        mean_interval(torch.tensor([1.0, float("nan")]))


# -- figures ------------------------------------------------------------------------------------


def _is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_sample_grid_puts_each_class_on_its_row(tmp_path):
    """Row r of the canvas holds the first samples of the r-th class in order; a short row stays white."""
    g = torch.Generator().manual_seed(15)
    images = torch.rand(7, 1, 6, 5, generator=g) * 2 - 1
    labels = torch.tensor([3, 1, 3, 1, 3, 3, 8])
    canvas, classes = class_rows(images, labels, per_class=3, max_classes=2, gap=2)
    assert classes == [1, 3] and canvas.shape == (2 * 8 - 2, 3 * 7 - 2, 1)
    for r, want in enumerate([[1, 3], [0, 2, 4]]):  # class 1: samples 1, 3; class 3: the first three of 0, 2, 4, 5
        for k in range(3):
            cell = canvas[r * 8:r * 8 + 6, k * 7:k * 7 + 5, 0]
            expected = ((images[want[k], 0] + 1) / 2).numpy() if k < len(want) else np.ones((6, 5))
            np.testing.assert_allclose(cell, expected, atol=1e-6)
    assert _is_png(sample_grid(tmp_path / "grid.png", images, labels, "grid", per_class=3))


def test_policy_columns_writes_a_png_and_rejects_unpaired_samples(tmp_path):
    g = torch.Generator().manual_seed(14)
    samples = {"raster": torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, "learned": torch.rand(5, 1, 8, 8, generator=g) * 2 - 1}
    labels = torch.tensor([0, 1, 2, 3, 4])
    out = policy_columns(tmp_path / "cols.png", samples, labels, rows=3, title="paired samples")
    assert out == tmp_path / "cols.png" and _is_png(out)
    with pytest.raises(ValueError, match="same number"):
        policy_columns(tmp_path / "bad.png", {**samples, "short": samples["raster"][:4]}, labels, 3, "x")
    with pytest.raises(ValueError, match="rows"):
        policy_columns(tmp_path / "bad.png", samples, labels, 0, "x")
    with pytest.raises(ValueError, match="labels"):
        policy_columns(tmp_path / "bad.png", samples, labels[:4], 3, "x")
    assert not (tmp_path / "bad.png").exists()


def test_fid_vs_n_writes_a_png_and_rejects_malformed_curves(tmp_path):
    curves = {"raster": [{"n": 10, "fid": 5.0, "lo": 4.0, "hi": 6.0}, {"n": 100, "fid": 2.0, "lo": 1.5, "hi": 2.5}],
              "learned": [{"n": 10, "fid": 4.0, "lo": 3.0, "hi": 5.0}, {"n": 100, "fid": 1.0, "lo": 0.8, "hi": 1.2}]}
    out = fid_vs_n(tmp_path / "fid.png", curves, title="FID vs N", floor=0.5)
    assert _is_png(out)
    assert _is_png(fid_vs_n(tmp_path / "nofloor.png", curves, title="FID vs N"))
    with pytest.raises(ValueError, match="n, fid, lo, hi"):
        fid_vs_n(tmp_path / "bad.png", {"raster": [{"n": 10, "fid": 5.0}]}, title="x")
    with pytest.raises(ValueError, match="at least one"):
        fid_vs_n(tmp_path / "bad.png", {}, title="x")


def test_reveal_time_heatmaps_average_the_reveal_steps(tmp_path):
    geometry = BlockGeometry.for_grid(4, 2)  # 2 x 2 blocks, N = 4
    raster = torch.tensor([[0, 1, 2, 3]]).repeat(3, 1)
    mixed = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3]])  # block 0: steps 3 and 0 -> mean 1.5
    assert _mean_reveal_steps(raster, geometry).tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert _mean_reveal_steps(mixed, geometry).tolist() == [[1.5, 1.5], [1.5, 1.5]]
    assert _mean_reveal_steps(torch.tensor([[2, 0, 3, 1]]), geometry).tolist() == [[1.0, 3.0], [0.0, 2.0]]
    out = reveal_time_heatmaps(tmp_path / "reveal.png", {"raster": raster, "mixed": mixed}, geometry, "reveal time")
    assert _is_png(out)
    with pytest.raises(ValueError, match="permutations"):
        reveal_time_heatmaps(tmp_path / "bad.png", {"dup": torch.tensor([[0, 0, 1, 2]])}, geometry, "x")
    with pytest.raises(ValueError, match="N=4"):
        reveal_time_heatmaps(tmp_path / "bad.png", {"wide": torch.arange(5)[None]}, geometry, "x")


def test_paired_delta_with_a_fixed_reference_resamples_only_the_samples():
    """resample_reference=False: each replicate is FID(real, a[idx]) - FID(real, b[idx]) with one
    shared draw of sample indices and the whole reference, the interval the power study judges on."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 4, generator=g, dtype=torch.float64)
    a = torch.randn(40, 4, generator=g, dtype=torch.float64) + 0.3
    b = a + 0.1 * torch.randn(40, 4, generator=g, dtype=torch.float64)
    got = paired_fid_delta(real, a, b, num_resamples=30, level=0.9, seed=5, resample_reference=False)
    draw = torch.Generator().manual_seed(5)
    reps = []
    for _ in range(30):
        idx = torch.randint(40, (40,), generator=draw)
        reps.append(frechet_from_features(real, a[idx]) - frechet_from_features(real, b[idx]))
    lo, hi = np.quantile(np.array(reps), [0.05, 0.95])
    assert got.lo == pytest.approx(lo, abs=1e-9) and got.hi == pytest.approx(hi, abs=1e-9)
    assert got.delta == pytest.approx(frechet_from_features(real, a) - frechet_from_features(real, b), abs=1e-9)
    resampled = paired_fid_delta(real, a, b, num_resamples=30, level=0.9, seed=5)
    assert (resampled.lo, resampled.hi) != (got.lo, got.hi)  # the flag changes what is resampled


def test_overview_stacks_the_panels_at_one_width(tmp_path):
    from PIL import Image

    from orderplan.eval.plots import overview

    Image.new("RGB", (400, 100), "red").save(tmp_path / "a.png")
    Image.new("RGB", (200, 100), "blue").save(tmp_path / "b.png")
    out = Image.open(overview(tmp_path / "o.png", [tmp_path / "a.png", tmp_path / "b.png"], max_width=300))
    assert out.size == (300, 75 + 150)
    assert out.getpixel((150, 10)) == (255, 0, 0) and out.getpixel((150, 200)) == (0, 0, 255)
