"""Stage 1: train an order-robust (block-RAR) backbone.

    python scripts/train_backbone.py backbone=tiny_mnist train.max_steps=20 run_dir=runs/demo
    torchrun --nproc_per_node 2 scripts/train_backbone.py ...      # DDP (gloo on CPU, NCCL on GPU)

Rerunning with the same run_dir resumes from its latest checkpoint.
"""

from orderplan.cli import train_backbone

if __name__ == "__main__":
    train_backbone()
