"""Per-sample statistics of generated image sets, strong enough to tell block-order policies apart.

Every policy generates S samples in a paired design: sample i of every policy has the same
conditioning label and the same sampler seed. Features come from `orderplan.eval.feature_net`
(float [S, F], F the classifier's `num_features`); the reference set is real [M, F].

* `frechet_from_features`: FID computed directly in float64, the same algorithm as torchmetrics
  (`fid.frechet_distance`, which stays the reference), fast enough for hundreds of bootstrap calls;
* `paired_fid_delta`: FID(real, a) - FID(real, b) with a paired bootstrap interval (one set of
  sample indices per replicate, applied to both policies, and one set of reference indices shared by
  both terms), the test of "policy a differs from policy b";
* `fid_with_interval`, `fid_curve`: FID with `fid.bootstrap_interval`'s re-centred interval, and the
  same against the number of samples N (FID is biased upward at small N, so it is only comparable at
  equal N);
* `precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019) with per-sample
  indicators, so callers can bootstrap them;
* `class_logprob`, `mean_interval`: log p(label | image) under the classifier, and a bootstrap
  interval of a per-sample mean (`comparison.bootstrap_mean`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orderplan.eval.comparison import bootstrap_mean
from orderplan.eval.fid import bootstrap_interval

__all__ = ["PairedFid", "PrecisionRecall", "frechet_from_features", "frechet_gaussians", "paired_fid_delta",
           "fid_with_interval", "fid_curve", "knn_radii", "precision_recall", "class_logprob", "mean_interval"]

_Stats = tuple[torch.Tensor, torch.Tensor]  # (mean [F], covariance [F, F]), float64


# -- validation ---------------------------------------------------------------------------------


def _check_features(name: str, x: torch.Tensor, min_rows: int = 2) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} features must be a tensor [N, F], got {shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} features: need at least {min_rows} rows, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} features have no columns (F = 0)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} features contain NaN or inf")


def _check_same_width(real: torch.Tensor, **fakes: torch.Tensor) -> None:
    for name, f in fakes.items():
        if f.shape[1] != real.shape[1]:
            raise ValueError(f"feature sizes differ: real {real.shape[1]}, {name} {f.shape[1]}")


def _check_bootstrap(num_resamples: int, level: float) -> None:
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


# -- Frechet distance ---------------------------------------------------------------------------


def _stats(x: torch.Tensor, rows: torch.Tensor | None = None) -> _Stats:
    """Mean [F] and unbiased covariance [F, F] (float64) of x [N, F], or of x[rows] for bootstrap
    indices rows [N'] (duplicates allowed). x should be centred near 0 (`_shift_to_reference`): the
    covariance comes from the second moment minus the outer product of the mean, as in torchmetrics,
    which avoids a centred copy per replicate but cancels digits when |mean| >> spread."""
    x = x if rows is None else x.index_select(0, rows)  # index_select: ~3x faster than x[rows] here
    n = x.shape[0]
    mu = x.sum(0) / n
    return mu, (x.T @ x - n * torch.outer(mu, mu)) / (n - 1)


def _shift_to_reference(real: torch.Tensor, *fakes: torch.Tensor) -> list[torch.Tensor]:
    """real and fakes as float64 CPU, all minus the mean of real [F]. One shift for every set leaves
    each Frechet distance unchanged, and keeps the second-moment covariance of `_stats` accurate."""
    real = real.double().cpu()
    shift = real.mean(0)
    return [real - shift] + [f.double().cpu() - shift for f in fakes]


def frechet_gaussians(mu: torch.Tensor, cov: torch.Tensor, mu_r: torch.Tensor, cov_r: torch.Tensor) -> torch.Tensor:
    """FD [...] of Gaussians (mu [..., F], cov [..., F, F]) to one (mu_r [F], cov_r [F, F]):
    |mu - mu_r|^2 + Tr(C + C_r - 2 (C C_r)^(1/2)) in squared feature units, clipped at 0. Leading
    dimensions batch: the leave-one-out reward (orderplan.eval.set_reward) takes n FDs in one call."""
    # torchmetrics' trace of the square root: C C_r is not symmetric, so its eigenvalues come out
    # complex; the principal square root of a numerically negative eigenvalue is imaginary and so
    # contributes 0 to the real part, as in torchmetrics
    root_trace = torch.linalg.eigvals(cov @ cov_r).sqrt().real.sum(-1)
    value = (mu - mu_r).square().sum(-1) + cov.diagonal(dim1=-2, dim2=-1).sum(-1) + cov_r.trace() - 2 * root_trace
    # like fid.frechet_distance: two near-identical sets can come out a tiny negative
    return value.clamp_min(0.0)


def _frechet(s1: _Stats, s2: _Stats) -> float:
    """FD of two (mean, covariance) pairs (`frechet_gaussians`), a float."""
    return float(frechet_gaussians(*s1, *s2))


def _fast_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of real [M, F] and fake [S, F], shifted by `_shift_to_reference`, without validation (the
    bootstrap's inner loop)."""
    return _frechet(_stats(real), _stats(fake))


def frechet_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between real [M, F] and fake [S, F] features, in squared feature units (float64).

    The algorithm of torchmetrics' FrechetInceptionDistance (means, unbiased covariances, the trace
    of sqrt(C_real C_fake) from the eigenvalues of the product) written directly in torch: the
    bootstraps below call it hundreds of times on [5000, F], where building a torchmetrics metric per
    call would dominate. `fid.frechet_distance` (torchmetrics) stays the reference; the two agree to
    ~1e-6 relative."""
    _check_features("real", real)
    _check_features("fake", fake)
    _check_same_width(real, fake=fake)
    return _fast_fid(*_shift_to_reference(real, fake))


# -- bootstrap intervals ------------------------------------------------------------------------


def _percentile_interval(values: torch.Tensor, level: float) -> tuple[float, float]:
    """Equal-tailed percentile interval (linear interpolation, as fid.bootstrap_interval) of values [R]."""
    a = (1.0 - level) / 2
    lo, hi = np.quantile(values.numpy(), [a, 1.0 - a])
    return float(lo), float(hi)


@dataclass
class PairedFid:
    """FID(real, a) - FID(real, b) (squared feature units) and its paired bootstrap interval [lo, hi].

    Negative delta: policy a is closer to the reference than policy b."""

    delta: float
    lo: float
    hi: float
    num_resamples: int
    n: int  # S, the samples per policy


def paired_fid_delta(real: torch.Tensor, fake_a: torch.Tensor, fake_b: torch.Tensor, num_resamples: int = 200,
                     level: float = 0.95, seed: int = 0, resample_reference: bool = True) -> PairedFid:
    """delta = FID(real, a) - FID(real, b) for real [M, F], fake_a and fake_b [S, F], with the
    percentile interval of its paired bootstrap.

    Row i of a and of b share the label and sampler seed, so each replicate draws ONE set of S
    sample indices and applies it to both policies, and one set of M reference indices shared by both
    terms. The two FIDs then move together over replicates (sample difficulty, reference noise and
    the upward bias of duplicated points largely cancel), so the interval of the difference is far
    narrower than two separate intervals suggest. No re-centring: the duplication bias cancels in the
    difference. With a == b every replicate's delta is exactly 0.

    resample_reference=False holds the reference set fixed (FID's reference statistics treated as
    constants, as with a published reference batch): the interval then covers only the generated
    samples' noise, which shrinks as 1/sqrt(S); with it, the finite reference adds a floor that no S
    removes once the two policies' means differ."""
    _check_features("real", real)
    _check_features("fake_a", fake_a)
    _check_features("fake_b", fake_b)
    _check_same_width(real, fake_a=fake_a, fake_b=fake_b)
    if fake_a.shape[0] != fake_b.shape[0]:
        raise ValueError(f"paired samples need the same S: fake_a has {fake_a.shape[0]}, fake_b {fake_b.shape[0]}")
    _check_bootstrap(num_resamples, level)
    real, fake_a, fake_b = _shift_to_reference(real, fake_a, fake_b)
    M, S = real.shape[0], fake_a.shape[0]
    ref = _stats(real)
    delta = _frechet(ref, _stats(fake_a)) - _frechet(ref, _stats(fake_b))
    g = torch.Generator().manual_seed(int(seed))
    deltas = torch.empty(num_resamples, dtype=torch.float64)
    for r in range(num_resamples):
        ref_r = _stats(real, torch.randint(M, (M,), generator=g)) if resample_reference else ref  # both terms
        idx = torch.randint(S, (S,), generator=g)
        deltas[r] = _frechet(ref_r, _stats(fake_a, idx)) - _frechet(ref_r, _stats(fake_b, idx))
    lo, hi = _percentile_interval(deltas, level)
    return PairedFid(float(delta), lo, hi, int(num_resamples), int(S))


def fid_with_interval(real: torch.Tensor, fake: torch.Tensor, num_resamples: int = 200, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """(fid, lo, hi) for real [M, F] and fake [S, F], squared feature units: `fid.bootstrap_interval`
    (both sets resampled, the percentile interval re-centred on the estimate, lo clipped at 0) with
    the fast FID; the same seed draws the same replicates as `bootstrap_interval(frechet_distance, ...)`."""
    _check_features("real", real)
    _check_features("fake", fake)
    _check_same_width(real, fake=fake)
    _check_bootstrap(num_resamples, level)
    real, fake = _shift_to_reference(real, fake)
    lo, hi = bootstrap_interval(_fast_fid, real, fake, num_resamples, level, seed)
    return _fast_fid(real, fake), lo, hi


def fid_curve(real: torch.Tensor, fake: torch.Tensor, ns: Sequence[int], num_resamples: int = 200,
              level: float = 0.95, seed: int = 0) -> list[dict]:
    """FID of the first n samples fake[:n] against real [M, F], for each n in ns (ascending,
    duplicates dropped, n > S dropped), as [{"n", "fid", "lo", "hi"}] (squared feature units; the
    interval of `fid_with_interval`). Prefixes, not random subsets: the caller orders the samples so
    that every prefix is class-balanced (and paired across policies)."""
    _check_features("real", real)
    _check_features("fake", fake)
    _check_same_width(real, fake=fake)
    small = [int(n) for n in ns if int(n) < 2]
    if small:
        raise ValueError(f"FID needs n >= 2 samples, got {small}")
    kept = sorted({int(n) for n in ns if int(n) <= fake.shape[0]})
    points = []
    for n in kept:
        fid, lo, hi = fid_with_interval(real, fake[:n], num_resamples, level, seed)
        points.append({"n": n, "fid": fid, "lo": lo, "hi": hi})
    return points


def mean_interval(values: torch.Tensor, num_resamples: int = 2000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) of per-sample values [S] (any units; bool indicators count as 0/1): the
    percentile bootstrap of `comparison.bootstrap_mean` over the samples."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty tensor [S], got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    values = values.double().cpu()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values contain NaN or inf")
    _check_bootstrap(num_resamples, level)
    return bootstrap_mean(values[None], num_resamples, level, seed)  # one "seed" row, S images


# -- precision and recall -----------------------------------------------------------------------


@dataclass
class PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with the per-sample indicators.

    in_real [S] bool: fake i lies in the real manifold; in_fake [M] bool: real j lies in the fake one."""

    precision: float  # mean(in_real): share of samples that look real
    recall: float  # mean(in_fake): share of the real distribution the samples cover
    in_real: torch.Tensor
    in_fake: torch.Tensor
    k: int


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """[N] float64 distance of each row of x [N, F] to its k-th nearest neighbour among the other
    rows: the ball radii of precision_recall's manifold. A table that scores many sample sets against
    one reference computes the reference's radii once and passes them as `real_radii`."""
    if k < 1 or len(x) < k + 1:
        raise ValueError(f"k-NN radii need k >= 1 and at least k + 1 = {k + 1} rows, got k={k}, {len(x)} rows")
    x = x.double()
    # the (k + 1)-th smallest distance of a row counts the row itself (distance 0) first
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def _in_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """[P] bool: points [P, F] within radii [C] of some centre [C, F] (boundary included)."""
    return torch.cat([(torch.cdist(c, centres) <= radii[None]).any(1) for c in points.split(chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024,
                     real_radii: torch.Tensor | None = None) -> PrecisionRecall:
    """Improved precision and recall of fake [S, F] against real [M, F] (Kynkaanniemi et al. 2019).

    Each real point's ball has the Euclidean distance to its k-th nearest OTHER real point as
    radius; the real manifold is the union of the balls. in_real[i]: fake i lies in a real ball
    (distance <= radius); precision = mean(in_real). Recall swaps the roles (fake balls with radii
    among the fakes). Distances are computed in float64 with torch.cdist over `chunk` rows at a time
    ([chunk, M] floats per step). real_radii [M]: knn_radii(real, k), when the caller has them."""
    _check_features("real", real, min_rows=k + 1)
    _check_features("fake", fake, min_rows=k + 1)
    _check_same_width(real, fake=fake)
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    real, fake = real.double(), fake.double()
    if real_radii is None:
        real_radii = knn_radii(real, k, chunk)
    elif tuple(real_radii.shape) != (len(real),):
        raise ValueError(f"real_radii must be [{len(real)}] (one per real row), got {tuple(real_radii.shape)}")
    in_real = _in_manifold(fake, real, real_radii.to(real), chunk).cpu()
    in_fake = _in_manifold(real, fake, knn_radii(fake, k, chunk), chunk).cpu()
    return PrecisionRecall(float(in_real.double().mean()), float(in_fake.double().mean()), in_real, in_fake, int(k))


# -- classifier confidence ----------------------------------------------------------------------


def class_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label | image) [S] float64, in nats, from classifier logits [S, C] and the conditioning
    labels [S] (integers in [0, C)). log_softmax in float64: float32 log-probabilities of confident
    predictions lose the digits that separate policies."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits [S, C] and labels [S], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf")
    logp = torch.log_softmax(logits.double(), dim=1)
    return logp.gather(1, labels.long().to(logp.device)[:, None])[:, 0]
