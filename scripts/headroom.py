"""Best of G orders: how much image quality a per-sample choice of order could buy (src/orderplan/eval/headroom.py)

    python scripts/headroom.py                                  # 13 min on 2 CPU cores
    python scripts/headroom.py draws=8 num_samples=2000 critics=[discriminator_vq]

Writes run_dir/results.json and results.md: FD in every feature space of the kept samples (the
critic's best, its worst, best of the first g draws) against a plain draw and the baselines, paired.
"""

from orderplan.cli import headroom

if __name__ == "__main__":
    headroom()
