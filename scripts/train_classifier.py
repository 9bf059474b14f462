"""Train the MNIST digit classifier whose features give FID / KID and class accuracy on the
embedded default (agents/evaluation/classifier_training.py; the network is in
agents/evaluation/feature_net.py).

    python scripts/train_classifier.py                          # ~1-2 min on one CPU thread
    python scripts/train_classifier.py update_manifest=true     # regenerate the committed artifact
    python scripts/train_classifier.py epochs=1 max_train_images=500 run_dir=runs/clf_smoke

Writes run_dir/classifier.safetensors (config in its metadata) and run_dir/summary.json (held-out
accuracy and cross-entropy, per-epoch history, data sha256, config). With update_manifest=true the
weights are also written to `out` (artifacts/tiny_mnist/classifier.safetensors) and the
"classifier" entry of artifacts/tiny_mnist/manifest.json is replaced. Run with OMP_NUM_THREADS=1
to reproduce the committed weights bit for bit.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra
from omegaconf import DictConfig

from agents.evaluation.classifier_training import ClassifierRun, train_classifier
from backbone.config import to_typed


@hydra.main(config_path="../configs", config_name="train_classifier", version_base=None)
def main(cfg: DictConfig) -> None:
    train_classifier(to_typed(cfg, ClassifierRun))


if __name__ == "__main__":
    main()
