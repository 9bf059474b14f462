"""Behaviour cloning of the OrderHead planner on oracle labels (builds the oracle data if missing).

    python scripts/bc.py                                  # embedded tiny default, CPU
    python scripts/bc.py backbone=llamagen_b device=cuda backbone.gpt_weights=... backbone.data.codes_dir=...
    torchrun --nproc_per_node 4 scripts/bc.py device=cuda ...   # DDP over the OrderHead (gloo with device=cpu)

Writes run_dir/orderhead.safetensors and run_dir/summary.json (held-out returns of raster, random,
oracle and the learned policy, oracle agreement, regret). Rerunning resumes from the last checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from agents.training.bc import BCRun, train_bc
from backbone.config import to_typed


@hydra.main(config_path="../configs", config_name="bc", version_base=None)
def main(cfg: DictConfig) -> None:
    train_bc(to_typed(cfg, BCRun))


if __name__ == "__main__":
    main()
