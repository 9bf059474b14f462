"""Encode a data set with a VQ tokenizer and store the codes (as LlamaGen pre-extracts codes).

    python scripts/extract_codes.py                               # embedded MNIST, both splits
    python scripts/extract_codes.py vq_weights=runs/train_vq/vq.safetensors out_dir=runs/codes/mnist
    python scripts/extract_codes.py source=image_folder image_folder=/data/imagenet/train \\
        image_size=256 vq_weights=/ckpt/vq_ds16_c2i.pt flip=true device=cuda out_dir=/data/codes/in256
    python scripts/extract_codes.py backbone=llamagen_b_random source=synthetic   # seeded grids, no VQ

Writes out_dir/{split}_codes.npy, {split}_labels.npy, {split}_meta.json (orderplan.data.datasets.write_codes).
"""

from orderplan.cli import extract_codes

if __name__ == "__main__":
    extract_codes()
