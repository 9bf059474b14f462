"""The order comparison: BC and PPO over seeds, with and without belief features, next to raster,
random, the heuristic orders, the model's own beliefs (confident_first, uncertain_first,
spread_confident, confident_sampled, expected_oracle) and the oracle, all on the same held-out images.

    python scripts/compare_orders.py                     # embedded tiny default, CPU (about 2 hours on 2 cores)
    python scripts/compare_orders.py seeds=[0] router_seeds=[] R_values=[]    # one seed, no router, no ablation

Writes run_dir/results.json and run_dir/results.md (the table); every training run lives in its own
run_dir below and is resumed or skipped on a rerun.

Imports orderplan.train.compare_orders and orderplan.config.common only: the run lives there.
"""

from orderplan.cli import compare_orders

if __name__ == "__main__":
    compare_orders()
