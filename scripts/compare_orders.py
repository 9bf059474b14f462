"""The order comparison: BC and PPO over seeds, with and without belief features, next to raster,
random, the heuristic orders, the model's own beliefs (confident_first, uncertain_first,
expected_oracle) and the oracle, all on the same held-out images.

    python scripts/compare_orders.py                     # embedded tiny default, CPU (about 2 hours on 2 cores)
    python scripts/compare_orders.py seeds=[0] router_seeds=[] R_values=[]    # one seed, no router, no ablation

Writes run_dir/results.json and run_dir/results.md (the table); every training run lives in its own
run_dir below and is resumed or skipped on a rerun.

Imports agents.training.compare_orders and backbone.config only: the run lives there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from agents.training.compare_orders import CompareRun, compare_orders
from backbone.config import to_typed


@hydra.main(config_path="../configs", config_name="compare_orders", version_base=None)
def main(cfg: DictConfig) -> None:
    compare_orders(to_typed(cfg, CompareRun))


if __name__ == "__main__":
    main()
