"""Train the MNIST digit classifier whose features give FID / KID and class accuracy on the
embedded default (src/orderplan/eval/classifier_training.py; the network is in
src/orderplan/eval/feature_net.py).

    python scripts/train_classifier.py                          # ~1-2 min on one CPU thread
    python scripts/train_classifier.py update_manifest=true     # regenerate the committed artifact
    python scripts/train_classifier.py epochs=1 max_train_images=500 run_dir=runs/clf_smoke

Writes run_dir/classifier.safetensors (config in its metadata) and run_dir/summary.json (held-out
accuracy and cross-entropy, per-epoch history, data sha256, config). With update_manifest=true the
weights are also written to `out` (artifacts/tiny_mnist/classifier.safetensors) and the
"classifier" entry of artifacts/tiny_mnist/manifest.json is replaced. Run with OMP_NUM_THREADS=1
to reproduce the committed weights bit for bit.
"""

from orderplan.cli import train_classifier

if __name__ == "__main__":
    train_classifier()
