"""Behaviour cloning of the OrderHead planner on oracle labels (builds the oracle data if missing).

    python scripts/bc.py                                  # embedded tiny default, CPU
    python scripts/bc.py backbone=llamagen_b device=cuda backbone.gpt_weights=... backbone.data.codes_dir=...
    torchrun --nproc_per_node 4 scripts/bc.py device=cuda ...   # DDP over the OrderHead (gloo with device=cpu)

Writes run_dir/orderhead.safetensors and run_dir/summary.json (held-out returns of raster, random,
oracle and the learned policy, oracle agreement, regret). Rerunning resumes from the last checkpoint.
"""

from orderplan.cli import bc

if __name__ == "__main__":
    bc()
