"""How many samples separate two orders by FID? Paired dFID(a - b) with its bootstrap interval at
growing N, until the half-width is under target_ratio x |dFID| (agents/evaluation/power.py).

    python scripts/power.py                                   # raster vs random, embedded default
    python scripts/power.py power.max_minutes=60 power.a=bc power.b=raster
    python scripts/power.py power.chunk=500 power.checkpoints=[500,1000] power.max_samples=1000   # quick

Writes run_dir/power.json, power.md, power.png; finished chunks are kept, so a rerun resumes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from agents.evaluation.power import PowerRun, run_power
from backbone.config import to_typed


@hydra.main(config_path="../configs", config_name="power", version_base=None)
def main(cfg: DictConfig) -> None:
    run_power(to_typed(cfg, PowerRun))


if __name__ == "__main__":
    main()
