"""Train the small VQ tokenizer on the embedded MNIST digits.

    python scripts/train_vq.py                                   # default: ~1-3 min on 2 CPU cores
    python scripts/train_vq.py train.max_steps=50 run_dir=runs/vq_smoke device=cpu

Writes run_dir/vq.safetensors (config in its metadata) and run_dir/summary.json (held-out MSE,
PSNR, codebook usage, data sha256, config). The training loop is orderplan.train.vq.train_vq.
"""

from orderplan.cli import train_vq

if __name__ == "__main__":
    train_vq()
