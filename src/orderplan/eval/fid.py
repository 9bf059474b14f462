"""FID / KID statistics over cached features, with the noise floor and bootstrap intervals, and the
ADM evaluator's npz sample layout.

Features are extracted once per image set (`orderplan.eval.feature_net`: the project's MNIST classifier or
InceptionV3 from local weights) and cached as float64 [N, F]. Every number below is computed by
torchmetrics (`FrechetInceptionDistance`, `KernelInceptionDistance`) over those cached features, by
handing the metrics an identity "feature extractor": one implementation of the Frechet distance for
the headline FID, the noise floor and every bootstrap replicate.

FID at different N is not comparable (the estimator is biased upward at small N), so every function
here reports the N it used."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from orderplan.infra.checkpoint import atomic_write


class CachedFeatures(nn.Module):
    """Identity feature extractor: the metrics' `update(x)` receives features [N, F] directly."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected cached features [N, {self.num_features}], got {tuple(x.shape)}")
        return x.double()


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    for name, f in (("real", real), ("fake", fake)):
        if f.dim() != 2:
            raise ValueError(f"{name} features must be [N, F], got shape {tuple(f.shape)}")
        if f.shape[0] < 2:
            raise ValueError(f"{name} features: FID needs at least 2 samples, got {f.shape[0]}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{name} features contain NaN or inf")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between feature sets real [N, F] and fake [M, F] (squared feature units)."""
    _check_pair(real, fake)
    # sync_on_compute=False: the sets are whole here; under torchrun torchmetrics would otherwise
    # merge every rank's states (and wait forever for ranks that compute no FID)
    metric = FrechetInceptionDistance(feature=CachedFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    # the Frechet distance of two near-identical sets can come out a tiny negative from eigvals
    return max(float(metric.compute()), 0.0)


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """KID (cubic polynomial kernel MMD^2) mean and std over `subsets` random subsets; returns
    (mean, std, subset size used = min(subset_size, N, M)). Seeded: the subsets come from a fork of
    torch's global RNG, which is left untouched."""
    _check_pair(real, fake)
    size = int(min(subset_size, real.shape[0], fake.shape[0]))
    with warnings.catch_warnings():  # "will save all extracted features": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=CachedFeatures(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)  # the whole sets, on this rank (frechet_distance)
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def bootstrap_interval(stat: Callable[[torch.Tensor, torch.Tensor], float], real: torch.Tensor, fake: torch.Tensor,
                       num_resamples: int = 100, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of `stat(real, fake)`: both sets resampled with replacement (the reference
    set is a sample too). Resampling duplicates points, which shifts FID up by a roughly constant
    amount, so the percentile interval of the replicates is re-centred on the estimate: it reports
    the spread, [stat + q_lo - mean, stat + q_hi - mean], the lower end clipped at 0."""
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_resamples):
        ri = torch.randint(real.shape[0], (real.shape[0],), generator=g)
        fi = torch.randint(fake.shape[0], (fake.shape[0],), generator=g)
        values.append(stat(real[ri], fake[fi]))
    values = np.asarray(values)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) - values.mean() + stat(real, fake)
    return max(float(lo), 0.0), float(hi)  # re-centring can cross 0 at small N; FID cannot


NOISE_FLOOR_METHODS = {
    "second_real_set": "FID between the reference set and a second, disjoint real set of N images: "
                       "measured at the policies' N",
    "reference_halves": "estimate: FID between two random halves of the reference set (N/2 each); FID is "
                        "biased upward at smaller N, so this overstates the floor at the policies' N",
}


@dataclass
class NoiseFloor:
    """What "indistinguishable from real" reads as: the FID of real images against real images."""

    fid: float  # squared feature units
    n: int  # images in each compared real set (method "second_real_set": the second set's N)
    method: str  # a key of NOISE_FLOOR_METHODS

    @property
    def description(self) -> str:
        return NOISE_FLOOR_METHODS[self.method]


def noise_floor(reference: torch.Tensor, second: torch.Tensor | None = None, seed: int = 0) -> NoiseFloor:
    """The FID noise floor of reference features [M, F].

    With `second` [N, F] (real images disjoint from the reference, as many as the policies'
    samples): FID(reference, second), the same comparison as a policy's FID(reference, samples [N, F]),
    so it is measured at the policies' N. Without it (e.g. an ADM .npz reference, no other real
    images at hand): the FID of two random halves of the reference (seeded), labelled as an estimate
    at N = M // 2, which FID's small-sample bias pushes above the floor at the policies' N."""
    if second is not None:
        return NoiseFloor(frechet_distance(reference, second), int(second.shape[0]), "second_real_set")
    perm = torch.randperm(reference.shape[0], generator=torch.Generator().manual_seed(seed))
    half = reference.shape[0] // 2
    return NoiseFloor(frechet_distance(reference[perm[:half]], reference[perm[half:2 * half]]), half,
                      "reference_halves")


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Features float64 [N, F] (CPU) of images float [N, C, H, W] in [-1, 1]."""
    extractor = extractor.eval().to(device)
    out = [extractor(b.to(device)).double().cpu() for b in images.split(batch_size)]
    feats = torch.cat(out)
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("the feature extractor returned NaN or inf")
    return feats


# -- sample export ------------------------------------------------------------------------------


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (grayscale repeated to RGB), the layout of
    the ADM evaluator's sample batches (and of LlamaGen's `sample_ddp.py` npz)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got shape {tuple(images.shape)}")
    u8 = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


def export_npz(path: str | Path, images: torch.Tensor | np.ndarray) -> Path:
    """Write samples for the ADM evaluator (`evaluator.py ref_batch.npz sample_batch.npz`): a single
    uint8 array [N, H, W, 3] under `arr_0`. Atomic. `images`: float [N, C, H, W] in [-1, 1], or
    already `to_uint8_nhwc`'s array (what evaluate's ranks gather: 4x smaller than the floats)."""
    arr = images if isinstance(images, np.ndarray) else to_uint8_nhwc(images)
    path = Path(path)

    atomic_write(path, lambda f: np.savez(f, arr_0=arr))
    return path


def load_npz_images(path: str | Path) -> torch.Tensor:
    """Reference images from an ADM-style npz (uint8 [N, H, W, 3] under `arr_0`, e.g. the
    VIRTUAL_imagenet256_labeled.npz reference batch) as float [N, 3, H, W] in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference npz not found: {path}")
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path}: no arr_0 (the ADM layout stores uint8 [N, H, W, 3] under arr_0)")
        arr = data["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 1|3], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
