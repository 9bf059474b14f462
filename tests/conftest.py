"""Shared fixtures: small random GPTs with non-trivial weights (LlamaGen zero-initialises the output
layer and the target-aware table, which would make many invariants vacuous)."""

from pathlib import Path

import pytest
import torch

from orderplan.model.gpt import GPT, gpt_config


def randomized_gpt(seed: int = 0, **overrides) -> GPT:
    """A tiny-preset GPT in eval mode whose every parameter (output, ta table included) is random."""
    torch.manual_seed(seed)
    cfg = gpt_config("tiny", **{"n_layer": 2, **overrides})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "_norm." in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture
def gpt() -> GPT:
    return randomized_gpt()


def write_toy_codes(root: Path, grid: int = 8, vocab: int = 256, n_train: int = 96, n_heldout: int = 32,
                    num_classes: int = 10, seed: int = 0) -> Path:
    """Pre-extracted code files (the format of scripts/extract_codes.py) for a learnable toy: each
    class has a template grid and each image perturbs a few of its tokens."""
    import numpy as np

    from orderplan.data.datasets import write_codes

    rng = np.random.default_rng(seed)
    templates = rng.integers(0, vocab, size=(num_classes, grid, grid))
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        labels = np.arange(n) % num_classes
        codes = templates[labels].copy()
        noise = rng.random(codes.shape) < 0.1
        codes[noise] = rng.integers(0, vocab, size=int(noise.sum()))
        write_codes(root, split, codes, labels, {"vocab_size": vocab, "source": "toy"})
    return root


@pytest.fixture
def toy_codes(tmp_path) -> Path:
    return write_toy_codes(tmp_path / "codes")


def toy_core(batch_size: int = 3, seed: int = 0, n_images: int = 20, **env_fields):
    """An OrderPlanningCore over a random 2-layer tiny GPT and random codes (no artifacts needed)."""
    from orderplan.model.blocks import BlockGeometry
    from orderplan.config.common import BackboneConfig
    from orderplan.model.loading import Backbone
    from orderplan.env.core import EnvConfig, OrderPlanningCore

    gpt = randomized_gpt()
    bb = Backbone(cfg=BackboneConfig(), gpt=gpt, geometry=BlockGeometry(8, 8, 2), vq=None)
    g = torch.Generator().manual_seed(123)
    codes = torch.randint(0, gpt.cfg.vocab_size, (n_images, gpt.cfg.num_tokens), generator=g)
    labels = torch.arange(n_images) % gpt.cfg.num_classes
    return OrderPlanningCore(bb, codes, labels, EnvConfig(**env_fields), batch_size, seed=seed)


def revealed_prefix(core) -> tuple[torch.Tensor, torch.Tensor]:
    """Revealed tokens / raster positions [B, P] of a core's rows in reveal order (position -1 pads),
    from its history: the prefix the naive (uncached) references take."""
    P = max(int(core.steps.max()) * core.T, 1)
    tok, pos = torch.zeros(core.B, P, dtype=torch.long), torch.full((core.B, P), -1, dtype=torch.long)
    for b in range(core.B):
        p = core.block_tokens[core.history[b, : int(core.steps[b])]].reshape(-1)
        tok[b, : len(p)], pos[b, : len(p)] = core.x[b, p], p
    return tok, pos
