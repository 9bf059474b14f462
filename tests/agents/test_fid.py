"""FID / KID over cached features against an independent float64 NumPy/SciPy computation, the
bootstrap and noise floor, and the ADM npz layout."""

import numpy as np
import pytest
import scipy.linalg
import torch

from agents.evaluation.fid import (bootstrap_interval, export_npz, frechet_distance, kernel_distance, load_npz_images,
                        noise_floor, to_uint8_nhwc)


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


@pytest.fixture
def feats() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4
    return torch.randn(400, 16, generator=g, dtype=torch.float64) @ mix + 0.3


def test_fid_of_a_set_with_itself_is_zero(feats):
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_fid_matches_scipy_and_grows_with_a_known_shift(feats):
    g = torch.Generator().manual_seed(1)
    other = torch.randn(300, 16, generator=g, dtype=torch.float64) * 0.8
    assert frechet_distance(feats, other) == pytest.approx(scipy_frechet(feats.numpy(), other.numpy()), rel=1e-6)
    # a pure translation leaves the covariance alone: FID is exactly |shift|^2
    previous = 0.0
    for scale in (0.1, 0.5, 1.0, 2.0):
        shift = torch.full((16,), scale, dtype=torch.float64)
        fid = frechet_distance(feats, feats + shift)
        assert fid == pytest.approx(float(shift.square().sum()), rel=1e-6)
        assert fid == pytest.approx(scipy_frechet(feats.numpy(), (feats + shift).numpy()), rel=1e-6)
        assert fid > previous
        previous = fid


def test_fid_rejects_bad_features(feats):
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(feats, torch.full_like(feats, float("nan")))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(feats, feats[:, :8])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(feats, feats[:1])


def test_kid_is_seeded_near_zero_on_itself_and_positive_on_a_shift(feats):
    state = torch.get_rng_state()
    same = kernel_distance(feats, feats, subsets=10, subset_size=100, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert same == kernel_distance(feats, feats, subsets=10, subset_size=100, seed=3)
    shifted, _, size = kernel_distance(feats, feats + 1.0, subsets=10, subset_size=10_000, seed=3)
    assert size == 400  # clipped to the smaller set
    # the unbiased MMD^2 of two subsets of one set scatters around 0 (by about its std)
    assert abs(same[0]) < 3 * same[1] + 1e-9
    assert shifted > 20 * abs(same[0])


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded(feats):
    other = feats + 0.5
    lo, hi = bootstrap_interval(frechet_distance, feats, other, num_resamples=30, seed=0)
    assert (lo, hi) == bootstrap_interval(frechet_distance, feats, other, num_resamples=30, seed=0)
    assert lo <= frechet_distance(feats, other) <= hi
    assert lo < hi


def test_noise_floor_is_small_against_a_real_shift(feats):
    floor, half = noise_floor(feats, seed=0)
    assert half == 200
    assert 0.0 < floor < frechet_distance(feats, feats + 1.0)


def test_npz_export_has_the_adm_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(5, 1, 8, 6, generator=g) * 2 - 1
    path = export_npz(tmp_path / "samples.npz", gray)
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"]
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 6, 3)  # NHWC, grayscale repeated to RGB
    expected = ((gray[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], expected)
    back = load_npz_images(path)
    assert back.shape == (5, 3, 8, 6)
    np.testing.assert_array_equal(to_uint8_nhwc(back), arr)  # lossless round trip through model space


def test_npz_reference_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_npz_images(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        load_npz_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_npz_images(tmp_path / "float.npz")
