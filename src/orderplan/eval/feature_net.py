"""Feature networks for FID / KID and class accuracy of generated images: the networks, their
checkpoint I/O and the feature extractors. Training the digit classifier lives in
`orderplan.eval.classifier_training` (`scripts/train_classifier.py`).

- `DigitClassifier`: a small CNN trained on the embedded MNIST train split. Its penultimate
  activations are the FID/KID features for the embedded default: InceptionV3 features of 32x32
  grayscale digits upsampled to 299x299 say little about digits, and a classifier trained on the
  same digits also gives class accuracy of samples.
- `save_classifier` / `load_classifier` / `read_classifier_metadata`: its safetensors file. All
  metadata sits under one safetensors metadata key, so the same weights give the same file bytes
  and the manifest's sha256 of the committed artifact is reproducible.
- `ClassifierFeatures`: the classifier as a torchmetrics-style feature extractor.
- `InceptionFeatures`: torchmetrics' InceptionV3 (torch-fidelity's FID network, 2048-d pool
  features) for ImageNet runs, loaded from a local weights file only: nothing downloads.
- `make_feature_extractor`: picks one from config values.

Pixel convention: every network here takes float images [B, C, H, W] in [-1, 1], the output of
`orderplan.data.datasets.images_to_model` and of the VQ decoder."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orderplan.infra.artifacts import verify_artifact
from orderplan.infra.checkpoint import load_safetensors, load_state_dict_checked, save_safetensors
from orderplan.infra.paths import resolve_path
from orderplan.infra.roles import refuse_in_training
from orderplan.data.datasets import MNIST_IMAGE_SIZE, MNIST_NUM_CLASSES

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
    "FORMAT",
]

FORMAT = "digit_classifier/v1"  # metadata[META_KEY]["format"] of a DigitClassifier file
META_KEY = "digit_classifier"  # the one safetensors metadata key of a DigitClassifier file
DEFAULT_CLASSIFIER = "artifacts/tiny_mnist/classifier.safetensors"
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID InceptionV3
FEATURE_KINDS = ("classifier", "inception")


# -- the classifier -------------------------------------------------------------------------------


def check_stages(channels: list[int], image_size: int) -> list[int]:
    """`channels` as ints, each stage halving the image side: ValueError unless they are positive and
    image_size is divisible by 2 ** len(channels)."""
    channels = [int(c) for c in channels]
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
    side = image_size // 2 ** len(channels)
    if side < 1 or side * 2 ** len(channels) != image_size:
        raise ValueError(f"image_size={image_size} is not divisible by 2 ** {len(channels)} "
                         f"(each stage of channels={channels} halves the side)")
    return channels


@dataclass
class ClassifierConfig:
    """DigitClassifier sizes. Each entry of `channels` is one stage: 3x3 conv + BatchNorm + ReLU +
    2x2 max-pool, so the last stage leaves image_size / 2 ** len(channels) pixels per side."""

    in_channels: int = 1
    image_size: int = MNIST_IMAGE_SIZE
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # one stage each: 32 -> 4 px at the defaults
    num_features: int = 64  # F: width of the penultimate layer (the FID/KID features)
    num_classes: int = MNIST_NUM_CLASSES
    dropout: float = 0.2  # on the features, training only

    def __post_init__(self) -> None:
        self.channels = check_stages(self.channels, self.image_size)
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
    ValueError (not a classifier file; missing, unexpected, mis-shaped or non-finite tensors, each
    named; a sha256 other than the one a manifest.json next to the file records)."""
    refuse_in_training(path)  # the FID network: evaluation only (orderplan.infra.roles)
    if Path(path).is_file():
        verify_artifact(path)  # the committed classifier must match artifacts/tiny_mnist/manifest.json
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
                            "(convert uint8 with orderplan.data.datasets.images_to_model)")
        if images.shape[1] == 3 and self.classifier.cfg.in_channels == 1:
            images = images.mean(dim=1, keepdim=True)
        return images.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] float in [-1, 1] -> features [B, num_features] float32."""
        return self.classifier.features(self._prepare(images)).float()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] float in [-1, 1] -> logits [B, num_classes] float32."""
        return self.classifier(self._prepare(images)).float()

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, num_features] (this extractor's output) -> logits [B, num_classes] float32: the
        classifier's last layer (dropout is off in eval mode), so per-sample class log-probabilities of
        a stored feature set need no second pass over its images."""
        head = self.classifier.head
        return head(features.to(device=head.weight.device, dtype=head.weight.dtype)).float()


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
