"""Train the digit autoencoder whose 32-d code is a second, independently trained feature space
for Fréchet distances on the embedded default (src/orderplan/eval/autoencoder.py).

    python scripts/train_autoencoder.py                          # ~2 min on one CPU thread
    python scripts/train_autoencoder.py update_manifest=true     # regenerate the committed artifact
    python scripts/train_autoencoder.py epochs=1 max_train_images=500 run_dir=runs/ae_smoke

Writes run_dir/autoencoder.safetensors and run_dir/summary.json (held-out reconstruction error per
pixel, per-epoch history). With update_manifest=true the weights also go to `out`
(artifacts/tiny_mnist/autoencoder.safetensors) and the "autoencoder" entry of its manifest.json is
replaced. Run with OMP_NUM_THREADS=1 to reproduce the committed weights bit for bit.
"""

from orderplan.cli import train_autoencoder

if __name__ == "__main__":
    train_autoencoder()
