"""`scripts/extract_codes.py source=synthetic` (src/orderplan/data/extract.py): seeded grids in exactly the on-disk
format of extracted codes, read back by `load_token_data`, with class structure (not i.i.d. codes)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from orderplan.config.common import BackboneConfig, DataSpec, GPTSpec, compose, to_typed
from orderplan.data.datasets import CodeDataset
from orderplan.data.extract import ExtractCodesConfig, SyntheticSpec, check_extract_codes, extract_codes, synthetic_codes
from orderplan.data.tokens import data_fingerprint, load_token_data


def _cfg(out_dir, **spec) -> ExtractCodesConfig:
    backbone = BackboneConfig(gpt=GPTSpec("tiny", {}), gpt_weights=None, vq_weights=None, random_weights=0,
                              data=DataSpec("codes", str(out_dir)))
    return ExtractCodesConfig(backbone=backbone, source="synthetic", vq_weights=None, out_dir=str(out_dir),
                              progress=False, synthetic=SyntheticSpec(**{"train_images": 12, "heldout_images": 6,
                                                                         **spec}))


def test_synthetic_splits_in_extract_codes_format(tmp_path):
    cfg = _cfg(tmp_path / "codes")
    written = extract_codes(cfg)
    assert set(written) == {"train", "heldout"}
    for split, n in (("train", 12), ("heldout", 6)):
        ds = CodeDataset(tmp_path / "codes", split)  # checksums in the meta match the files
        assert len(ds) == n and ds.grid == (8, 8) and ds.vocab_size == 256 and ds.meta["source"] == "synthetic"
        assert int(ds.codes.max()) < 256 and ds.labels.tolist() == [i % 4 for i in range(n)]
        codes, labels = load_token_data(cfg.backbone, split)  # what the env reads: [N, L] raster, [N]
        assert codes.shape == (n, 64) and torch.equal(labels, ds.labels)
    assert "codes:" in data_fingerprint(cfg.backbone)


def test_synthetic_grids_are_seeded_and_structured():
    spec = SyntheticSpec(num_classes=3, palette=5, cell=2, noise=0.1, seed=7)
    a, la = synthetic_codes(spec, 30, 8, 8, 1000, stream=1)
    b, _ = synthetic_codes(spec, 30, 8, 8, 1000, stream=1)
    c, _ = synthetic_codes(spec, 30, 8, 8, 1000, stream=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # each class uses only its palette, and the palettes differ
    used = [set(np.unique(a[la == k]).tolist()) for k in range(3)]
    assert all(len(u) <= 5 for u in used) and used[0] != used[1]
    # neighbours agree far more often than i.i.d. draws from the palette would (1/5)
    same = (a[:, :, 1:] == a[:, :, :-1]).mean()
    assert same > 0.5, same


def test_synthetic_checks_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="synthetic.cell"):
        check_extract_codes(_cfg(tmp_path, cell=3))  # does not divide the 8x8 grid
    with pytest.raises(ValueError, match="synthetic.num_classes"):
        check_extract_codes(_cfg(tmp_path, num_classes=10_000))
    with pytest.raises(ValueError, match="synthetic.noise"):
        check_extract_codes(_cfg(tmp_path, noise=1.5))


def test_extract_codes_yaml_composes_with_the_random_backbone():
    cfg = to_typed(compose("extract_codes", ["backbone=llamagen_b_random", "source=synthetic"]), ExtractCodesConfig)
    check_extract_codes(cfg)  # no VQ weights needed for synthetic codes
    assert cfg.vq_weights is None and cfg.synthetic.train_images >= 24
    with pytest.raises(FileNotFoundError):
        check_extract_codes(replace(cfg, source="mnist_embedded", vq_weights="missing.safetensors"))
