"""Feature networks for FID/KID: the digit classifier (shapes, checkpoint I/O), its training
(`orderplan.eval.classifier_training`: seeded, manifest update), the InceptionV3 wrapper's error
paths (torch-fidelity is optional and nothing downloads), and the YAML config of
scripts/train_classifier.py."""

import json

import pytest
import torch
from safetensors.torch import save_file

from orderplan.eval import feature_net
from orderplan.eval.classifier_training import ClassifierRun, shift_augment, train_classifier
from orderplan.eval.feature_net import (
    ClassifierConfig,
    ClassifierFeatures,
    DigitClassifier,
    InceptionFeatures,
    load_classifier,
    make_feature_extractor,
    save_classifier,
)
from orderplan.infra.checkpoint import CheckpointCorruptError, load_safetensors, sha256_file


def _images(n: int = 6, seed: int = 0, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 32, 32, generator=g) * 2 - 1  # float in [-1, 1]


def _model(seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    model = DigitClassifier(ClassifierConfig())
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a round trip that drops them fails
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model.eval()


def test_shapes_and_dtypes():
    model = _model()
    x = _images(5)
    assert model.num_features == 64 and model.num_classes == 10
    logits, feats = model(x), model.features(x)
    assert logits.shape == (5, 10) and logits.dtype == torch.float32
    assert feats.shape == (5, 64) and bool((feats >= 0).all())
    assert 20_000 < sum(p.numel() for p in model.parameters()) < 250_000
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\]"):
        model(torch.zeros(2, 1, 28, 28))


def test_classifier_features_wrapper():
    model = _model()
    ext = ClassifierFeatures(model)
    assert ext.num_features == 64
    x = _images(4)
    with torch.no_grad():
        f = ext(x)
        assert f.shape == (4, 64) and f.dtype == torch.float32
        assert torch.equal(f, model.features(x))
        assert torch.equal(ext.classify(x), model(x))
        # per-image features: eval-mode BatchNorm, no batch coupling
        assert torch.allclose(ext(x[:1]), f[:1], atol=1e-6)
        # RGB copies of grayscale digits give the grayscale features
        assert torch.allclose(ext(x.expand(-1, 3, -1, -1)), f, atol=1e-6)
    ext.train()
    assert not ext.training and not ext.classifier.training
    with pytest.raises(TypeError, match="float"):
        ext(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_features_work_inside_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = ClassifierFeatures(_model())
    fid = FrechetInceptionDistance(feature=ext, reset_real_features=False)
    fid.update(_images(20, seed=1), real=True)
    fid.update(_images(20, seed=2), real=False)
    assert torch.isfinite(fid.compute())


def test_save_load_round_trip(tmp_path):
    model = _model()
    path = save_classifier(model, tmp_path / "clf.safetensors", {"note": "test"})
    assert feature_net.read_classifier_metadata(path) == {"note": "test"}
    # one metadata key: the same weights always give the same bytes (safetensors orders a map by hash)
    assert sha256_file(save_classifier(model, tmp_path / "again.safetensors", {"note": "test"})) == sha256_file(path)
    loaded = load_classifier(path)
    assert not loaded.training and loaded.cfg == model.cfg
    x = _images(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.safetensors")
    model = _model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {feature_net.META_KEY: json.dumps({"format": feature_net.FORMAT, "config": model.cfg.to_dict(), "info": {}})}

    missing = dict(state)
    missing.pop("fc.weight")
    save_file(missing, str(tmp_path / "missing_key.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="missing keys.*\n.*fc.weight"):
        load_classifier(tmp_path / "missing_key.safetensors")

    wrong = {**state, "head.weight": torch.zeros(7, 64)}
    save_file(wrong, str(tmp_path / "wrong_shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"head.weight: expected \(10, 64\), got \(7, 64\)"):
        load_classifier(tmp_path / "wrong_shape.safetensors")

    save_file(state, str(tmp_path / "no_meta.safetensors"))
    with pytest.raises(ValueError, match="not a DigitClassifier file"):
        load_classifier(tmp_path / "no_meta.safetensors")

    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointCorruptError):
        load_classifier(tmp_path / "garbage.safetensors")


def test_shift_augment_is_a_seeded_translation():
    x = _images(8)
    a = shift_augment(x, 2, torch.Generator().manual_seed(0))
    b = shift_augment(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(shift_augment(x, 0, torch.Generator()), x)
    # each output is its input moved by an integer offset, background -1 shifted in
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], w) for w in windows)


def _tiny_run(run_dir, **overrides) -> ClassifierRun:
    """2 epochs on 1000 class-balanced train images with a narrow network: seconds on CPU."""
    cfg = dict(run_dir=str(run_dir), epochs=2, max_train_images=1000, progress=False,
               model=ClassifierConfig(channels=[8, 16, 16], num_features=32))
    return ClassifierRun(**{**cfg, **overrides})


def test_tiny_training_is_seeded_and_learns(tmp_path):
    s1 = train_classifier(_tiny_run(tmp_path / "a"))
    s2 = train_classifier(_tiny_run(tmp_path / "b"))
    w1, _ = load_safetensors(tmp_path / "a" / "classifier.safetensors")
    w2, _ = load_safetensors(tmp_path / "b" / "classifier.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert s1["sha256"] == s2["sha256"]
    assert s1["heldout"]["accuracy"] > 0.3  # chance is 0.1
    assert s1["data"]["train"] == 1000 and s1["heldout"]["num_images"] == 500
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["heldout"] == s1["heldout"] and len(summary["history"]) == 2
    assert "manifest" not in summary

    s3 = train_classifier(_tiny_run(tmp_path / "c", seed=1))
    assert s3["sha256"] != s1["sha256"]


def test_update_manifest_keeps_other_entries(tmp_path):
    out = tmp_path / "art" / "classifier.safetensors"
    out.parent.mkdir()
    other = {"vq": {"file": "vq.safetensors", "sha256": "abc"}, "data": {"train": 4500}}
    (out.parent / "manifest.json").write_text(json.dumps(other))
    summary = train_classifier(_tiny_run(tmp_path / "run", out=str(out), update_manifest=True))
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert {k: manifest[k] for k in other} == other
    entry = manifest["classifier"]
    assert entry["file"] == "classifier.safetensors" and entry["sha256"] == sha256_file(out)
    assert entry["sha256"] == sha256_file(tmp_path / "run" / "classifier.safetensors")
    assert entry["heldout"] == summary["heldout"] and entry["num_features"] == 32
    assert entry["train"]["epochs"] == 2 and entry["train"]["max_train_images"] == 1000
    assert load_classifier(out).cfg == ClassifierConfig(channels=[8, 16, 16], num_features=32)


def test_make_feature_extractor_classifier(tmp_path):
    path = save_classifier(_model(), tmp_path / "clf.safetensors")
    ext = make_feature_extractor("classifier", str(path), None)
    assert isinstance(ext, ClassifierFeatures) and ext.num_features == 64 and not ext.training
    with pytest.raises(FileNotFoundError, match="classifier weights not found"):
        make_feature_extractor("classifier", str(tmp_path / "nope.safetensors"), None)


def test_make_feature_extractor_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown feature extractor kind 'vgg'.*classifier.*inception"):
        make_feature_extractor("vgg", None, None)
    with pytest.raises(ValueError, match=r"features\.inception_weights=.*pt_inception-2015-12-05"):
        make_feature_extractor("inception", None, None)
    with pytest.raises(FileNotFoundError, match=r"features\.inception_weights="):
        make_feature_extractor("inception", None, str(tmp_path / "absent.pth"))
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")  # exists: the next check is the missing package
    monkeypatch.setattr(feature_net, "_torch_fidelity_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[inception\]'"):
        InceptionFeatures(str(weights))
    with pytest.raises(ImportError, match=r"\.\[inception\]"):
        make_feature_extractor("inception", None, str(weights))


def test_yaml_matches_schema():
    """Every YAML key exists in ClassifierRun (to_typed rejects unknown keys) and the YAML defaults
    equal the dataclass defaults, so library and CLI runs agree."""
    from omegaconf.errors import ConfigKeyError

    from orderplan.config.common import compose, to_typed

    assert to_typed(compose("train_classifier"), ClassifierRun) == ClassifierRun()
    run = to_typed(compose("train_classifier", ["epochs=1", "model.num_features=32"]), ClassifierRun)
    assert run.epochs == 1 and run.model.num_features == 32
    with pytest.raises(ConfigKeyError):
        to_typed(compose("train_classifier", ["+epoch=3"]), ClassifierRun)
