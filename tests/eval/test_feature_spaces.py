"""The extra feature spaces (src/orderplan/eval/feature_spaces.py), the digit autoencoder behind one of
them (src/orderplan/eval/autoencoder.py), and the verdicts that read every space."""

from __future__ import annotations

import json

import pytest
import torch

from orderplan.eval.autoencoder import (AutoencoderConfig, AutoencoderRun, DigitAutoencoder, load_autoencoder,
                                        reconstruction_error, save_autoencoder, train_autoencoder)
from orderplan.eval.feature_spaces import (FeatureSpaces, PixelPCA, RandomReluFeatures, build_space, check_spaces,
                                           default_spaces)
from orderplan.infra.paths import PACKAGE_ROOT


def _images(n: int, seed: int = 0, channels: int = 1, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, side, side, generator=g) * 2 - 1


# -- pixel PCA ----------------------------------------------------------------------------------


def test_pixel_pca_is_an_orthonormal_projection_fitted_to_its_data():
    x = _images(200, side=8)  # 64 pixels
    pca = PixelPCA(10).fit(x)
    v = pca.components
    torch.testing.assert_close(v.T @ v, torch.eye(10, dtype=torch.float64))
    f = pca(x).double()
    # centred on the fitted data, and the components are ordered by the variance they hold
    torch.testing.assert_close(f.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-5, rtol=0)
    var = f.var(0)
    assert bool((var[:-1] >= var[1:] - 1e-6).all())
    total = x.flatten(1).double().var(0).sum()
    assert float(pca.explained.sum()) == pytest.approx(float(var.sum() / total), rel=1e-4)
    # all components: the projection keeps every pixel (reconstruction is exact)
    full = PixelPCA(64).fit(x)
    rec = full(x).double() @ full.components.T + full.mean
    torch.testing.assert_close(rec, x.flatten(1).double(), atol=1e-5, rtol=0)


def test_pixel_pca_is_the_same_space_for_the_same_images_in_any_row_order():
    x = _images(100, side=8)
    a, b = PixelPCA(5).fit(x), PixelPCA(5).fit(x[torch.randperm(100)])
    # the sign convention makes the components unique, so row order does not flip a feature
    torch.testing.assert_close(a(x), b(x), atol=1e-4, rtol=0)
    assert bool((a.components.gather(0, a.components.abs().argmax(0, keepdim=True)) > 0).all())
    c = PixelPCA.from_state(a.state())
    assert torch.equal(c(x), a(x))


def test_pixel_pca_refuses_use_before_fit_and_the_wrong_image_size():
    with pytest.raises(RuntimeError, match="fit"):
        PixelPCA(4)(_images(2))
    pca = PixelPCA(4).fit(_images(20, side=8))
    with pytest.raises(ValueError, match="64 pixel values"):
        pca(_images(2, channels=3, side=8))
    with pytest.raises(ValueError, match="more than 4 images"):
        PixelPCA(4).fit(_images(3, side=8))


def test_large_images_are_area_resized_before_pca():
    x = _images(50, side=64)
    pca = PixelPCA(3).fit(x)
    assert pca.mean.numel() == 32 * 32
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    torch.testing.assert_close(pca(x), PixelPCA.from_state(pca.state())(pooled))


# -- random ReLU features -----------------------------------------------------------------------


def test_random_relu_features_are_a_function_of_their_seed():
    x = _images(6)
    a, b, c = RandomReluFeatures(0), RandomReluFeatures(0), RandomReluFeatures(1)
    assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))
    # RGB of the same gray image is the same image
    torch.testing.assert_close(a(x.expand(-1, 3, -1, -1)), a(x))
    assert a(x).shape == (6, 64) and not any(p.requires_grad for p in a.parameters())


# -- the combined extractor -----------------------------------------------------------------------


def test_feature_spaces_concatenate_and_split_back():
    from orderplan.eval.feature_net import make_feature_extractor

    x = _images(5)
    clf = make_feature_extractor("classifier")
    pca = PixelPCA(8).fit(_images(40, seed=1))
    rr = RandomReluFeatures(3, 16)
    fs = FeatureSpaces({"classifier": clf, "pixel_pca": pca, "random_relu": rr}).eval()
    out = fs(x)
    assert out.shape == (5, 64 + 8 + 16) and fs.widths == [64, 8, 16] and fs.primary == "classifier"
    parts = fs.split(out)
    assert torch.equal(parts["classifier"], clf(x)) and torch.equal(parts["pixel_pca"], pca(x))
    assert torch.equal(parts["random_relu"], rr(x))
    torch.testing.assert_close(fs.logits_from_features(out), clf.classify(x))
    with pytest.raises(ValueError, match="expected 88 features"):
        fs.split(out[:, :10])
    fs.train()
    assert not fs.training and not clf.classifier.training  # BatchNorm never sees generated batches


def test_space_names_are_checked():
    assert default_spaces("classifier") == ["autoencoder", "pixel_pca", "random_relu"]
    assert "autoencoder" not in default_spaces("inception")
    with pytest.raises(ValueError, match="unknown spaces"):
        check_spaces(["pixel_pca", "dino"], "classifier")
    with pytest.raises(ValueError, match="distinct"):
        check_spaces(["pixel_pca", "pixel_pca"], "classifier")
    with pytest.raises(ValueError, match="trained on the embedded digits"):
        check_spaces(["autoencoder"], "inception")
    with pytest.raises(ValueError, match="pca_state"):
        build_space("pixel_pca")


def test_evaluate_refuses_bad_feature_space_settings():
    from orderplan.config.common import compose, to_typed
    from orderplan.eval.evaluate import EvaluateRun, check_evaluate_run

    def check(*overrides):
        check_evaluate_run(to_typed(compose("evaluate", list(overrides)), EvaluateRun))

    with pytest.raises(ValueError, match="features.spaces"):
        check("features.spaces=[pixels]")
    with pytest.raises(ValueError, match="features.held_out"):
        check("features.spaces=[pixel_pca]")  # the default held-out space, the autoencoder, is not there
    check("features.spaces=[pixel_pca]", "features.held_out=pixel_pca")
    with pytest.raises(FileNotFoundError, match="features.autoencoder_path"):
        check("features.autoencoder_path=/nonexistent/ae.safetensors")


# -- the autoencoder ------------------------------------------------------------------------------


def test_autoencoder_file_round_trip_and_wrong_files(tmp_path):
    torch.manual_seed(0)
    model = DigitAutoencoder(AutoencoderConfig(channels=[8, 8], latent_dim=4)).eval()
    path = save_autoencoder(model, tmp_path / "ae.safetensors", {"note": "x"})
    again = load_autoencoder(path)
    x = _images(3)
    assert torch.equal(again.encode(x), model.encode(x)) and again(x).shape == x.shape
    with pytest.raises(ValueError, match="not a DigitAutoencoder file"):
        load_autoencoder(PACKAGE_ROOT / "artifacts/tiny_mnist/classifier.safetensors")
    with pytest.raises(ValueError, match=r"images \[B, 1, 32, 32\]"):
        model.encode(_images(2, side=16))


def test_the_committed_autoencoder_matches_its_manifest():
    """The artifact loads (its sha256 is the manifest's), and the held-out reconstruction error the
    manifest records is what the weights give."""
    from orderplan.data.datasets import images_to_model, load_embedded_mnist

    manifest = json.loads((PACKAGE_ROOT / "artifacts/tiny_mnist/manifest.json").read_text())["autoencoder"]
    model = build_space("autoencoder").model
    held = images_to_model(load_embedded_mnist("heldout")[0])
    assert reconstruction_error(model, held) == pytest.approx(manifest["heldout"]["mse_per_pixel"], rel=1e-4)
    # it reconstructs digits far better than predicting the mean image would
    baseline = float(((held - held.mean(0)) ** 2).mean())
    assert manifest["heldout"]["mse_per_pixel"] < 0.5 * baseline
    assert manifest["produced_by"] == "python scripts/train_autoencoder.py update_manifest=true"


def test_autoencoder_training_is_reproducible_and_learns(tmp_path):
    def run(name: str, seed: int = 1) -> dict:
        return train_autoencoder(AutoencoderRun(run_dir=str(tmp_path / name), seed=seed, epochs=2, max_train_images=300,
                                                progress=False, model=AutoencoderConfig(channels=[8, 16], latent_dim=8)))

    a, b = run("a"), run("b")
    assert a["sha256"] == b["sha256"]
    assert run("c", seed=2)["sha256"] != a["sha256"]
    h = a["history"]
    assert h[-1]["heldout_mse"] < h[0]["heldout_mse"] or h[-1]["train_mse"] < h[0]["train_mse"]
    assert a["heldout"]["mse_per_pixel"] == pytest.approx(h[-1]["heldout_mse"])


# -- verdicts across spaces -----------------------------------------------------------------------


def _row(fids: dict, cis: dict) -> dict:
    """A policy row with per-space FD and paired intervals {baseline: {space: (lo, hi)}}."""
    spaces = {s: {"fid": f} for s, f in fids.items()}
    for b, per in cis.items():
        for s, (lo, hi) in per.items():
            spaces[s].update({f"dfid_vs_{b}": (lo + hi) / 2, f"dfid_vs_{b}_ci": [lo, hi]})
    return {"spaces": spaces}


def test_across_spaces_counts_an_order_better_only_where_every_space_says_so():
    from orderplan.eval.evaluate import across_spaces

    sp = _row({"a": 1, "b": 1}, {"raster": {"a": (-2, -1), "b": (-3, -0.5)}})["spaces"]
    assert across_spaces(sp, "raster") == {"per_space": {"a": "below", "b": "below"}, "robust": "below"}
    sp["b"]["dfid_vs_raster_ci"] = [-1, 1]
    assert across_spaces(sp, "raster")["robust"] == "not separated"
    sp["b"]["dfid_vs_raster_ci"] = [0.5, 1]
    assert across_spaces(sp, "raster")["robust"] == "disagree"
    sp["a"]["dfid_vs_raster_ci"] = [0.1, 1]
    assert across_spaces(sp, "raster")["robust"] == "above"


def test_spaces_verdict_names_the_best_per_space_and_the_robust_best():
    from orderplan.eval.evaluate import spaces_verdict

    below, above = (-2.0, -1.0), (1.0, 2.0)
    pol = {"raster": _row({"c": 9, "p": 3}, {"raster": {"c": (0, 0), "p": (0, 0)}, "random": {"c": above, "p": above}}),
           "random": _row({"c": 8, "p": 2}, {"raster": {"c": below, "p": below}, "random": {"c": (0, 0), "p": (0, 0)}})}
    res = {"policies": pol, "feature_spaces": {"names": ["c", "p"], "held_out": "p"}}
    v = spaces_verdict(res)
    assert v["best"] == {"c": "random", "p": "random"} and v["agree"] and v["robust_best"] == "random"
    assert v["pairs"]["raster"]["random"]["robust"] == "above" and v["held_out"] == "p"
    # the spaces disagree on the best order: no robust best
    pol["raster"]["spaces"]["p"]["fid"] = 1.0
    pol["random"]["spaces"]["p"]["dfid_vs_raster_ci"] = [0.5, 1.0]
    v = spaces_verdict(res)
    assert v["best"] == {"c": "random", "p": "raster"} and not v["agree"] and v["robust_best"] is None
    assert v["pairs"]["random"]["raster"]["robust"] == "disagree"
    assert spaces_verdict({"policies": {"raster": pol["raster"]}, "feature_spaces": res["feature_spaces"]}) is None
