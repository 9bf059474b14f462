"""Stage 1: train an order-robust (block-RAR) backbone.

    python scripts/train_backbone.py backbone=tiny_mnist train.max_steps=20 run_dir=runs/demo
    torchrun --nproc_per_node 2 scripts/train_backbone.py ...      # DDP (gloo on CPU, NCCL on GPU)

Rerunning with the same run_dir resumes from its latest checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra
from omegaconf import DictConfig

from backbone.config import TrainBackboneRun, to_typed
from backbone.train import train_backbone


@hydra.main(config_path="../configs", config_name="train_backbone", version_base=None)
def main(cfg: DictConfig) -> None:
    train_backbone(to_typed(cfg, TrainBackboneRun))


if __name__ == "__main__":
    main()
