"""Evaluate policies on one backbone: teacher-forced metrics, generation-mode FID / KID, pictures and
one results table.

    python scripts/evaluate.py policies=[raster,random,oracle] eval.num_samples=500     # embedded default, CPU
    python scripts/evaluate.py policies=[raster,random,oracle,bc,ppo]                   # after bc.py / ppo.py
    python scripts/evaluate.py backbone=llamagen_b device=cuda features.kind=inception \
        features.inception_weights=/path/pt_inception-2015-12-05-6726825d.pth \
        features.reference=/path/VIRTUAL_imagenet256_labeled.npz eval.npz=true

Writes run_dir/results.json, results.md and PNGs (see src/orderplan/eval/evaluate.py).
"""

from orderplan.cli import evaluate

if __name__ == "__main__":
    evaluate()
