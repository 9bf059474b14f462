"""Train a block-order planner for image quality: GRPO in generation mode on a set-level Fréchet
reward in a training-only feature space, KL-anchored to confident_sampled
(src/orderplan/train/quality.py).

    python scripts/quality.py                                  # configs/quality.yaml, seed 0
    python scripts/quality.py seed=1 run_dir=runs/quality/tiny_mnist/s1
"""

from orderplan.cli import quality

if __name__ == "__main__":
    quality()
