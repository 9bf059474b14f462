"""Reproduce the committed embedded default (artifacts/tiny_mnist: VQ, tiny GPT, manifest.json).

    python scripts/build_tiny_default.py [--work-dir runs/tiny_default] [--vq key=value ...] [--gpt key=value ...]

Trains the VQ (scripts/train_vq.py defaults), then the GPT (scripts/train_backbone.py defaults) on its
codes; both are resumable, so an interrupted build continues when rerun. CPU, about half an hour.
"""

import argparse
from pathlib import Path


from orderplan.infra.run_utils import tee_console
from orderplan.train.tiny_default import ARTIFACT_DIR, build_tiny_default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/tiny_default")
    ap.add_argument("--out-dir", default=str(ARTIFACT_DIR))
    ap.add_argument("--vq", nargs="*", default=[], help="overrides for configs/train_vq.yaml")
    ap.add_argument("--gpt", nargs="*", default=[], help="overrides for configs/train_backbone.yaml")
    args = ap.parse_args()
    # the stages log into their own run dirs (vq/train_vq.log, gpt/train_backbone.log) too
    with tee_console(Path(args.work_dir) / "build_tiny_default.log", "build_tiny_default"):
        build_tiny_default(args.work_dir, args.out_dir, args.vq, args.gpt)


if __name__ == "__main__":
    main()
