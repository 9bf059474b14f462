"""The committed embedded default: files match the manifest, load through the normal path, and the
held-out NLL the manifest reports is what the weights give."""

import json

import pytest
import torch

from backbone.checkpoint import sha256_file
from backbone.config import REPO_ROOT, BackboneConfig
from backbone.data import embedded_mnist_sha256
from backbone.loading import build_backbone, load_token_data
from backbone.train import heldout_nll

ART = REPO_ROOT / "artifacts" / "tiny_mnist"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((ART / "manifest.json").read_text())


def test_files_match_manifest(manifest):
    assert manifest["data"]["sha256"] == embedded_mnist_sha256()
    for part in ("vq", "gpt"):
        assert sha256_file(ART / manifest[part]["file"]) == manifest[part]["sha256"]
    total = sum((ART / manifest[p]["file"]).stat().st_size for p in ("vq", "gpt"))
    assert total < 20 * 2**20


def test_reported_heldout_nll_is_reproduced(manifest):
    bb = build_backbone(BackboneConfig(), device="cpu")
    codes, labels = load_token_data(BackboneConfig(), "heldout")
    ev = heldout_nll(bb.gpt, codes, labels, bb.geometry, seed=1234, device=torch.device("cpu"))
    bits = manifest["gpt"]["heldout_bits_per_token"]
    assert ev["raster"] == pytest.approx(bits["raster"], abs=1e-3)
    assert ev["random"] == pytest.approx(bits["random_block_order"], abs=1e-3)
    # an order-robust backbone: random block orders within 10% of raster
    assert abs(bits["random_minus_raster"]) < 0.1 * bits["raster"]
    assert manifest["vq"]["heldout_reconstruction"]["mse"] < 0.01


def test_classifier_matches_manifest_and_reported_accuracy(manifest):
    """The FID/KID feature network: file hash, size, and the held-out numbers its entry reports."""
    from agents.evaluation.feature_net import evaluate_classifier, load_classifier
    from backbone.data import images_to_model, load_embedded_mnist

    entry = manifest["classifier"]
    path = ART / entry["file"]
    assert sha256_file(path) == entry["sha256"]
    assert path.stat().st_size < 2**20
    assert entry["data"]["sha256"] == embedded_mnist_sha256()
    model = load_classifier(path)
    assert model.num_features == entry["num_features"]
    assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"]
    images, labels = load_embedded_mnist("heldout")
    ev = evaluate_classifier(model, images_to_model(images), torch.as_tensor(labels))
    # a different thread count may flip at most a borderline image
    assert ev["accuracy"] == pytest.approx(entry["heldout"]["accuracy"], abs=1.5 / len(labels))
    assert ev["cross_entropy"] == pytest.approx(entry["heldout"]["cross_entropy"], abs=1e-3)
    assert entry["heldout"]["accuracy"] >= 0.97
