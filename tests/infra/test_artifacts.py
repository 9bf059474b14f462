"""The committed embedded default: files match the manifest, load through the normal path, and the
held-out NLL the manifest reports is what the weights give."""

import json

import pytest
import torch

from orderplan.infra.checkpoint import sha256_file
from orderplan.config.common import BackboneConfig
from orderplan.infra.paths import PACKAGE_ROOT
from orderplan.data.datasets import embedded_mnist_sha256
from orderplan.model.loading import build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.train.backbone import heldout_nll

ART = PACKAGE_ROOT / "artifacts" / "tiny_mnist"


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
    from orderplan.eval.feature_net import evaluate_classifier, load_classifier
    from orderplan.data.datasets import images_to_model, load_embedded_mnist

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


# -- verified at load: the manifest's sha256, finite weights ---------------------------------------


def _copy_with_flipped_byte(tmp_path, name: str, manifest_too: bool = True):
    """A copy of artifact `name` (and the manifest) in tmp_path with one byte of the tensor data
    flipped (past the safetensors header, so the file still parses)."""
    import shutil

    data = bytearray((ART / name).read_bytes())
    header = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, then the tensors
    pos = 8 + header + (len(data) - 8 - header) // 2
    data[pos] ^= 0x01  # lowest mantissa bit: the weights still load and look plausible
    (tmp_path / name).write_bytes(bytes(data))
    if manifest_too:
        shutil.copy(ART / "manifest.json", tmp_path / "manifest.json")
    return tmp_path / name


def test_committed_artifacts_verify(manifest):
    from orderplan.infra.artifacts import verify_artifact

    for part in ("gpt", "vq", "classifier"):
        assert verify_artifact(ART / manifest[part]["file"]) is True


def test_flipped_gpt_byte_is_refused_with_file_and_rebuild_command(tmp_path):
    from orderplan.infra.artifacts import ArtifactMismatchError, verify_artifact
    from orderplan.model.loading import load_gpt

    bad = _copy_with_flipped_byte(tmp_path, "gpt.safetensors")
    rebuild = r"gpt\.safetensors.*'gpt' entry.*python scripts/build_tiny_default\.py"
    with pytest.raises(ArtifactMismatchError, match=rebuild):
        load_gpt(bad)
    # the same check against an explicitly given manifest, and through the normal config path
    with pytest.raises(ValueError, match="gpt.safetensors"):
        verify_artifact(bad, ART / "manifest.json")
    with pytest.raises(ValueError, match="does not match"):
        build_backbone(BackboneConfig(gpt_weights=str(bad)), device="cpu")
    # without a manifest next to it the file is not checked (what a run directory looks like)
    run_dir = tmp_path / "run_dir"
    run_dir.mkdir()
    unlisted = _copy_with_flipped_byte(run_dir, "gpt.safetensors", manifest_too=False)
    assert verify_artifact(unlisted) is False
    assert load_gpt(unlisted).cfg.dim == 128


def test_flipped_vq_and_classifier_bytes_are_refused(tmp_path):
    from orderplan.eval.feature_net import load_classifier
    from orderplan.model.vq import load_vq_safetensors

    with pytest.raises(ValueError, match=r"vq\.safetensors.*build_tiny_default"):
        load_vq_safetensors(_copy_with_flipped_byte(tmp_path, "vq.safetensors"))
    with pytest.raises(ValueError, match=r"classifier\.safetensors.*scripts/train_classifier\.py update_manifest=true"):
        load_classifier(_copy_with_flipped_byte(tmp_path, "classifier.safetensors"))


def test_files_are_hashed_once_per_process(tmp_path, monkeypatch):
    import hashlib

    import orderplan.infra.integrity as integrity

    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(integrity.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    first = integrity.sha256_file(f)
    assert integrity.sha256_file(f) == first and len(calls) == 1  # cached
    f.write_bytes(b"abcd")  # a rewritten file (new size) is hashed again
    assert integrity.sha256_file(f) == real(b"abcd").hexdigest() and len(calls) == 2
