"""Encode a data set with a VQ tokenizer and store the codes (as LlamaGen pre-extracts codes).

    python scripts/extract_codes.py                               # embedded MNIST, both splits
    python scripts/extract_codes.py vq_weights=runs/train_vq/vq.safetensors out_dir=runs/codes/mnist
    python scripts/extract_codes.py source=image_folder image_folder=/data/imagenet/train \\
        image_size=256 vq_weights=/ckpt/vq_ds16_c2i.pt flip=true device=cuda out_dir=/data/codes/in256
    python scripts/extract_codes.py backbone=llamagen_b_random source=synthetic   # seeded grids, no VQ

Writes out_dir/{split}_codes.npy, {split}_labels.npy, {split}_meta.json (backbone.data.write_codes).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra
from omegaconf import DictConfig

from backbone.config import to_typed
from backbone.extract import ExtractCodesConfig, extract_codes


@hydra.main(config_path="../configs", config_name="extract_codes", version_base=None)
def main(cfg: DictConfig) -> None:
    extract_codes(to_typed(cfg, ExtractCodesConfig))


if __name__ == "__main__":
    main()
