"""Several feature spaces for one Fréchet-distance table, so that a ranking of orders does not
hang on one network (compare Stein et al., NeurIPS 2023, on FD-DINOv2).

Spaces (every one fitted or trained on the train split only, or on nothing):
- the primary extractor (`features.kind`: the digit classifier or InceptionV3), as before;
- `autoencoder`: the 32-d code of `orderplan.eval.autoencoder.DigitAutoencoder`, trained on pixel
  reconstruction with its own architecture and seed (no labels); the held-out space by default;
- `pixel_pca`: the top-k principal components of the pixels (`PixelPCA`), fitted on the reference
  set (the train split on the embedded default), images area-resized to at most 32x32 first;
- `random_relu`: a conv net with fixed random weights drawn from a seed (`RandomReluFeatures`), a
  space nobody tuned, on grayscale images resized to 32x32.

`FeatureSpaces` runs them all in one pass and concatenates their features [B, F_1 + ... + F_k],
so the sharded generation code gathers one tensor per sample set, as with one extractor; `split`
cuts it back into {space: [B, F_i]}. The primary space comes first, and `logits_from_features`
reads the primary classifier's head from its slice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SPACE_NAMES", "PixelPCA", "RandomReluFeatures", "AutoencoderFeatures", "FeatureSpaces",
           "default_spaces", "build_space"]

SPACE_NAMES = ("autoencoder", "pixel_pca", "random_relu")
PCA_SIDE = 32  # images are area-resized to at most this side before PCA / random features


def _area_resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """images [B, C, H, W] -> [B, C, s, s], s = min(side, H): average pooling, so no pixel is skipped."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images [B, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1], got {images.dtype}")
    s = min(side, images.shape[-1])
    return images if s == images.shape[-1] else F.adaptive_avg_pool2d(images, s)


class PixelPCA(nn.Module):
    """Top-k principal components of pixel vectors: features(x) = (flatten(x) - mean) @ V [B, k].

    `fit(images [M, C, H, W])` computes them in float64 with an SVD of the centred data; each
    component's sign is fixed so that its largest-magnitude entry is positive, so the same images
    give the same space. Images are area-resized to at most `side` pixels per side first (ImageNet's
    256x256x3 pixels would give a 196,608-d SVD)."""

    def __init__(self, num_components: int = 32, side: int = PCA_SIDE):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.k, self.side = int(num_components), int(side)
        self.register_buffer("mean", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("components", torch.zeros(0, self.k, dtype=torch.float64))
        self.explained = torch.zeros(0)  # fraction of the pixel variance each component holds [k]

    @property
    def num_features(self) -> int:
        return self.k

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> PixelPCA:
        x = _area_resize(images, self.side).flatten(1).double().cpu()
        if x.shape[0] <= self.k or x.shape[1] < self.k:
            raise ValueError(f"PCA with {self.k} components needs more than {self.k} images of at least {self.k} "
                             f"pixels, got {tuple(x.shape)}")
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        v = vh[:self.k].T.contiguous()  # [D, k]
        sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
        self.mean, self.components = mean, v * sign
        self.explained = (s[:self.k] ** 2 / (s ** 2).sum()).float()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] float in [-1, 1] -> [B, k] float32."""
        if not self.fitted:
            raise RuntimeError("PixelPCA.fit(reference images) must run before features are extracted")
        x = _area_resize(images, self.side).flatten(1)
        if x.shape[1] != self.mean.numel():
            raise ValueError(f"PixelPCA was fitted on {self.mean.numel()} pixel values per image, got {x.shape[1]}")
        return ((x.double() - self.mean.to(x.device)) @ self.components.to(x.device)).float()

    def state(self) -> dict[str, torch.Tensor]:
        """What another process needs to rebuild the fitted space (`from_state`)."""
        return {"mean": self.mean.cpu(), "components": self.components.cpu(), "explained": self.explained}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], side: int = PCA_SIDE) -> PixelPCA:
        pca = cls(state["components"].shape[1], side)
        pca.mean, pca.components, pca.explained = state["mean"], state["components"], state["explained"]
        return pca


class RandomReluFeatures(nn.Module):
    """A conv net whose weights are drawn once from `seed` and never trained: images are averaged
    to grayscale and area-resized to 32x32, then conv 5x5/2 (16) + ReLU, conv 3x3/2 (32) + ReLU
    and a fixed random projection of the 32x8x8 map to `num_features` (He-normal draws). Nothing
    about it was chosen by looking at samples, so it is a space no order was tuned for."""

    def __init__(self, seed: int = 0, num_features: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.conv1 = nn.Conv2d(1, 16, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.proj = nn.Linear(32 * 8 * 8, num_features, bias=False)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.proj):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        self.requires_grad_(False)
        self.num_features = int(num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] float in [-1, 1] -> [B, num_features] float32."""
        x = _area_resize(images, PCA_SIDE).float().mean(1, keepdim=True)
        if x.shape[-1] != PCA_SIDE:
            raise ValueError(f"random_relu features need images of at least {PCA_SIDE}x{PCA_SIDE}, got {tuple(images.shape)}")
        return self.proj(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


class AutoencoderFeatures(nn.Module):
    """The code z [B, 32] of a DigitAutoencoder (RGB input averaged to grayscale)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.num_features = model.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4 and images.shape[1] == 3 and self.model.cfg.in_channels == 1:
            images = images.mean(1, keepdim=True)
        return self.model.encode(images.float()).float()


class FeatureSpaces(nn.Module):
    """Named extractors run together: forward(images [B, C, H, W]) -> [B, sum F_i] float32, the
    spaces' features side by side in `names` order (the primary first); `split` undoes it."""

    def __init__(self, spaces: Mapping[str, nn.Module]):
        super().__init__()
        if not spaces:
            raise ValueError("FeatureSpaces needs at least one space")
        self.names = list(spaces)
        self.spaces = nn.ModuleDict(dict(spaces))
        self.widths = [int(m.num_features) for m in spaces.values()]
        self.num_features = sum(self.widths)
        self.primary = self.names[0]

    def train(self, mode: bool = True) -> FeatureSpaces:
        return super().train(False)  # feature networks stay in eval mode (BatchNorm statistics)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.spaces[n](images).float() for n in self.names], dim=1)

    def split(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features [N, sum F_i] -> {space: [N, F_i]} (views)."""
        if features.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features ({dict(zip(self.names, self.widths))}), "
                             f"got {features.shape[-1]}")
        return dict(zip(self.names, features.split(self.widths, dim=-1)))

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor | None:
        """The primary classifier's logits [N, classes] from the concatenated features, or None when
        the primary network has no class head (InceptionV3)."""
        head = getattr(self.spaces[self.primary], "logits_from_features", None)
        return None if head is None else head(self.split(features)[self.primary])


def default_spaces(primary_kind: str) -> list[str]:
    """The extra spaces `features.spaces: null` means: every one that fits the data (the autoencoder
    is trained on the embedded digits, so only with the digit classifier)."""
    return list(SPACE_NAMES) if primary_kind == "classifier" else ["pixel_pca", "random_relu"]


def build_space(name: str, *, autoencoder_path: str | None = None, pca_state: Mapping[str, torch.Tensor] | None = None,
                seed: int = 0, random_features: int = 64) -> nn.Module:
    """One extra space by name (SPACE_NAMES); pixel_pca needs its fitted `pca_state`."""
    if name == "autoencoder":
        from orderplan.eval.autoencoder import DEFAULT_AUTOENCODER, load_autoencoder
        from orderplan.infra.paths import resolve_path

        path = resolve_path(autoencoder_path or DEFAULT_AUTOENCODER, what="autoencoder weights")
        return AutoencoderFeatures(load_autoencoder(path))
    if name == "pixel_pca":
        if pca_state is None:
            raise ValueError("pixel_pca needs the PCA fitted on the reference set (pca_state)")
        return PixelPCA.from_state(pca_state)
    if name == "random_relu":
        return RandomReluFeatures(seed, random_features)
    raise ValueError(f"unknown feature space {name!r}; choose from {list(SPACE_NAMES)}")


def check_spaces(spaces: Sequence[str], primary_kind: str, key: str = "features.spaces") -> None:
    """ValueError for unknown or repeated names, or the digit autoencoder on non-digit data."""
    bad = [s for s in spaces if s not in SPACE_NAMES]
    if bad:
        raise ValueError(f"{key}: unknown spaces {bad}; choose from {list(SPACE_NAMES)} (null = all that fit)")
    if len(set(spaces)) != len(spaces):
        raise ValueError(f"{key}: spaces must be distinct, got {list(spaces)}")
    if "autoencoder" in spaces and primary_kind != "classifier":
        raise ValueError(f"{key}: the autoencoder space is trained on the embedded digits; with features.kind="
                         f"{primary_kind} use {default_spaces(primary_kind)}")
