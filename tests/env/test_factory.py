"""`orderplan.env.make_core` builds the core its arguments describe: keyword overrides apply on top of typed
configs too (regression: with a BackboneConfig and an EnvConfig they were silently dropped), unknown
keys fail naming the key, and the passed configs are left as they were. The backbone and its data
are swapped for a random tiny GPT here (no artifacts needed): only the config plumbing is tested."""

import pytest
import torch

import orderplan.env
import orderplan.env.factory
from orderplan.model.blocks import BlockGeometry
from orderplan.config.common import BackboneConfig
from orderplan.model.loading import Backbone
from orderplan.model.sampling import SamplingConfig
from orderplan.env.core import EnvConfig
from tests.conftest import randomized_gpt


@pytest.fixture
def built(monkeypatch):
    """Replace the backbone build and the token data by a random tiny GPT and random codes; records
    the BackboneConfig the factory asked for."""
    seen = {}

    def build_backbone(cfg, device="cpu", dtype=None):
        seen["backbone"] = cfg
        return Backbone(cfg=cfg, gpt=randomized_gpt(), geometry=BlockGeometry(8, 8, 2), vq=None)

    def load_token_data(cfg, split):
        seen["split"] = split
        codes = torch.randint(0, 64, (6, 64), generator=torch.Generator().manual_seed(0))
        return codes, torch.arange(6) % 4

    monkeypatch.setattr(orderplan.env.factory, "build_backbone", build_backbone)
    monkeypatch.setattr(orderplan.env.factory, "load_token_data", load_token_data)
    return seen


def test_overrides_apply_onto_typed_configs(built):
    bcfg, ecfg = BackboneConfig(), EnvConfig()
    core = orderplan.env.make_core(backbone=bcfg, env=ecfg, batch_size=2, reward="anytime", budget=[1, 2])
    assert core.cfg.reward == "anytime" and core.cfg.budget == [1, 2]
    assert core.router and core.K == 2
    assert ecfg.reward == "future_loss" and ecfg.budget is None  # the caller's config is not modified
    # dotted keys reach nested configs, on the env and on the backbone
    core = orderplan.env.make_core(backbone=bcfg, env=ecfg, batch_size=2, mode="generate", reward="entropy",
                          **{"env.sampling.cfg_scale": 2.0, "env.split": "heldout", "backbone.block_size": 2})
    assert core.cfg.sampling == SamplingConfig(cfg_scale=2.0) and core.use_cfg
    assert built["split"] == "heldout" and built["backbone"].block_size == 2 and built["backbone"] is not bcfg
    # a typed env with a backbone name: the env overrides are kept too
    core = orderplan.env.make_core("tiny_mnist", env=ecfg, batch_size=2, hidden="block")
    assert core.cfg.hidden == "block"


def test_unknown_override_keys_fail_clearly(built):
    with pytest.raises(ValueError, match="rewrad"):
        orderplan.env.make_core(backbone=BackboneConfig(), env=EnvConfig(), batch_size=2, rewrad="anytime")
    with pytest.raises(ValueError, match="sampling.cfg_scal"):
        orderplan.env.make_core(backbone=BackboneConfig(), env=EnvConfig(), batch_size=2, **{"sampling.cfg_scal": 2.0})
    with pytest.raises(ValueError, match="other.key"):
        orderplan.env.make_core(backbone=BackboneConfig(), env=EnvConfig(), batch_size=2, **{"other.key": 1})


def test_composed_path_unchanged(built):
    core = orderplan.env.make_core("tiny_mnist", batch_size=2, reward="extrapolative", weight="neighbours", budget=[1, 2, 4])
    assert (core.cfg.reward, core.cfg.weight, core.cfg.budget) == ("extrapolative", "neighbours", [1, 2, 4])
    core = orderplan.env.make_core("tiny_mnist", batch_size=2, mode="generate", reward="entropy")
    assert core.cfg.sampling.cfg_scale == 2.0  # the env=generate preset (configs/env/generate.yaml)


@pytest.mark.parametrize("bad", [0, -2, 2.5])
def test_bad_batch_size_fails_naming_it_before_anything_loads(built, bad):
    """Regression: batch_size=0 gave `IndexError: index 0 is out of bounds`, -2 a bare RuntimeError
    from torch.zeros."""
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        orderplan.env.make_env("tiny_mnist", batch_size=bad)
    assert "backbone" not in built  # refused before the backbone was built


def test_budget_beyond_the_block_count_fails_naming_env_budget(built):
    """Regression: budget=[1, 999] on a 16-block image was accepted."""
    with pytest.raises(ValueError, match=r"env\.budget\[1\] must be an integer in \[1, 16\].*got 999"):
        orderplan.env.make_env("tiny_mnist", batch_size=2, budget=[1, 999])
    assert "backbone" not in built
    assert orderplan.env.make_env("tiny_mnist", batch_size=2, budget=[1, 16]).core.K == 16  # N itself is allowed
