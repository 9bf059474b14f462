"""`backbone.random_weights`: seeded random GPT weights instead of a file (configs/backbone/llamagen_b_random.yaml),
validated like every backbone field, the same on every build, non-degenerate, and recorded by a tag
that keeps planners on their own backbone."""

from dataclasses import replace

import pytest
import torch

from orderplan.config.common import BackboneConfig, GPTSpec, compose, to_typed
from orderplan.model.loading import check_backbone_config
from orderplan.model.gpt import GPT, gpt_config
from orderplan.model.loading import build_backbone, check_random_weights_tag, random_weights_tag, randomize_gpt
from orderplan.env.factory import EnvRun


def _random_tiny(seed: int = 3, **over) -> BackboneConfig:
    return BackboneConfig(gpt=GPTSpec("tiny", {"n_layer": 1, **over}), gpt_weights=None, random_weights=seed)


def test_llamagen_b_random_config_is_gpt_b_geometry_and_validates():
    run = to_typed(compose("make_env", ["backbone=llamagen_b_random"]), EnvRun)
    b = run.backbone
    assert b.gpt.preset == "GPT-B" and b.gpt_weights is None and b.random_weights == 0 and b.data.kind == "codes"
    assert check_backbone_config(b, check_paths=False) == 16  # 4x4 blocks of the 16x16 grid
    cfg = gpt_config(b.gpt.preset, **b.gpt.overrides)
    assert (cfg.grid_h, cfg.grid_w, cfg.vocab_size, cfg.dim) == (16, 16, 16384, 768)


def test_random_weights_validation_names_the_key(tmp_path):
    b = _random_tiny()
    assert check_backbone_config(replace(b, data=replace(b.data, kind="codes", codes_dir=str(tmp_path)),
                                         vq_weights=None)) == 16  # no gpt_weights file needed
    with pytest.raises(ValueError, match="backbone.random_weights"):
        check_backbone_config(replace(b, random_weights=-1), check_paths=False)
    with pytest.raises(ValueError, match="both"):
        check_backbone_config(replace(b, gpt_weights="artifacts/tiny_mnist/gpt.safetensors"), check_paths=False)
    with pytest.raises(FileNotFoundError):  # without random weights the file is required again
        check_backbone_config(replace(b, random_weights=None, gpt_weights="missing.safetensors"))


def test_random_weights_are_seeded_and_not_degenerate():
    a = build_backbone(_random_tiny(3), with_vq=False).gpt
    b = build_backbone(_random_tiny(3), with_vq=False).gpt
    c = build_backbone(_random_tiny(4), with_vq=False).gpt
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.output.weight, c.output.weight)
    # LlamaGen's init zeroes the output layer (every logit equal); the seeded weights do not
    assert bool((GPT(a.cfg).output.weight == 0).all()) and float(a.output.weight.std()) > 0.01
    assert not a.training and not any(p.requires_grad for p in a.parameters())  # frozen like a loaded backbone


def test_randomize_gpt_keeps_norm_gains():
    model = randomize_gpt(GPT(gpt_config("tiny", n_layer=1)), 0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name


def test_tag_records_seed_preset_and_overrides_and_refuses_others():
    b = _random_tiny(3)
    tag = random_weights_tag(b)
    assert tag is not None and tag.startswith("random:3:tiny:")
    assert random_weights_tag(BackboneConfig()) is None  # weights from a file
    others = [replace(b, random_weights=4), _random_tiny(3, n_layer=2), BackboneConfig()]
    assert len({random_weights_tag(o) for o in others} | {tag}) == 4
    check_random_weights_tag(tag, b, "head.safetensors")
    for other in others:
        with pytest.raises(ValueError, match="head.safetensors"):
            check_random_weights_tag(tag, other, "head.safetensors")
    with pytest.raises(ValueError, match="weights from a file"):  # a file-trained head on a random backbone
        check_random_weights_tag(None, b, "head.safetensors")
