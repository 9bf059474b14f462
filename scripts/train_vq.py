"""Train the small VQ tokenizer on the embedded MNIST digits.

    python scripts/train_vq.py                                   # default: ~1-3 min on 2 CPU cores
    python scripts/train_vq.py train.max_steps=50 run_dir=runs/vq_smoke device=cpu

Writes run_dir/vq.safetensors (config in its metadata) and run_dir/summary.json (held-out MSE,
PSNR, codebook usage, data sha256, config). The training loop is backbone.vq_train.train_vq.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra
from omegaconf import DictConfig

from backbone.config import to_typed
from backbone.vq_train import TrainVQConfig, train_vq


@hydra.main(config_path="../configs", config_name="train_vq", version_base=None)
def main(cfg: DictConfig) -> None:
    train_vq(to_typed(cfg, TrainVQConfig))


if __name__ == "__main__":
    main()
