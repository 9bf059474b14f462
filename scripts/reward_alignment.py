"""Which episode reward ranks the orders as image quality does? (src/orderplan/eval/alignment.py)

    python scripts/evaluate.py --config-name evaluate_spaces     # the table it is compared with
    python scripts/reward_alignment.py                           # ~5 min on 2 CPU cores
    python scripts/reward_alignment.py num_samples=500 evaluate=evaluate_generation

Writes run_dir/results.json and results.md: each candidate reward's mean per policy, its rank
correlation with minus FD in every feature space, and its per-sample correlation with k-NN realism.
"""

from orderplan.cli import reward_alignment

if __name__ == "__main__":
    reward_alignment()
