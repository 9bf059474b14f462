"""The quality planner's reward (orderplan.train.quality): each sample's leave-one-out share of its batch's
Fréchet distance to the real images, in feature spaces that training may read.

For a batch X of n generated samples (features [n, F] in one space) and the reference statistics
(mu_r, C_r) of the train split, sample i is paid

    r_i = sum over spaces s of (FD_s(X without i) - FD_s(X)) / FD_s(X)        (unitless)

so a sample that pulls the batch's mean and covariance towards the real ones (realism AND spread:
a batch of near-copies has too small a covariance) earns a positive reward, one that pushes them
away a negative one. It is a set-level reward, FD itself, made per sample, so it needs no learned
reward model that could drift; unlike the per-sample rewards of the alignment study
(orderplan.eval.alignment) it sees diversity.

Which spaces. Only `TRAINING_SPACES` (pixel_pca by default, random_relu allowed): the classifier FID
space and the held-out autoencoder space are evaluation-only (orderplan.infra.roles refuses them in
a training job), so the final table measures the planner in spaces its reward never read.

The leave-one-out statistics come from rank-one downdates of the batch's first and second moments,
and every FD_s(X without i) in one batched eigenvalue call ([n, F, F]); `tests/eval/test_set_reward.py`
checks them against `frechet_from_features` on the batch with row i removed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from orderplan.eval.feature_spaces import PixelPCA, build_space
from orderplan.eval.sample_metrics import frechet_gaussians

__all__ = ["TRAINING_SPACES", "SetReward", "SetFrechetReward", "leave_one_out_frechet", "check_reward_spaces"]

TRAINING_SPACES = ("pixel_pca", "random_relu")  # the feature spaces a reward may read (module doc)


def check_reward_spaces(spaces: Sequence[str], key: str = "reward.spaces") -> None:
    """ValueError for an empty list, repeats, or a space training may not read."""
    spaces = list(spaces)
    if not spaces:
        raise ValueError(f"{key}: name at least one of {list(TRAINING_SPACES)}")
    bad = [s for s in spaces if s not in TRAINING_SPACES]
    if bad:
        raise ValueError(f"{key}: {bad} may not be read by training (the classifier and the autoencoder are "
                         f"evaluation-only, orderplan.infra.roles); choose from {list(TRAINING_SPACES)}")
    if len(set(spaces)) != len(spaces):
        raise ValueError(f"{key}: spaces must be distinct, got {spaces}")


def leave_one_out_frechet(fake: torch.Tensor, mu_r: torch.Tensor, cov_r: torch.Tensor) -> tuple[torch.Tensor, float]:
    """FD of fake [n, F] without each row, and of the whole batch, against (mu_r [F], cov_r [F, F]).

    Returns (loo [n] float64: FD(fake without row i), full: FD(fake)). Means and unbiased covariances
    as `frechet_from_features`; needs n >= 3 (a covariance of the n - 1 others)."""
    if fake.dim() != 2 or fake.shape[0] < 3:
        raise ValueError(f"leave-one-out FD needs features [n >= 3, F], got {tuple(fake.shape)}")
    x = fake.double().cpu() - mu_r  # centred on the reference: keeps the second-moment covariance exact
    mu_c = torch.zeros_like(mu_r)
    n = x.shape[0]
    mu = x.mean(0)
    second = x.T @ x  # [F, F]
    full = frechet_gaussians(mu[None], ((second - n * torch.outer(mu, mu)) / (n - 1))[None], mu_c, cov_r)[0]
    mu_i = (n * mu - x) / (n - 1)  # [n, F]
    second_i = second - x[:, :, None] * x[:, None, :]  # [n, F, F]
    cov_i = (second_i - (n - 1) * mu_i[:, :, None] * mu_i[:, None, :]) / (n - 2)
    return frechet_gaussians(mu_i, cov_i, mu_c, cov_r), float(full)


class SetReward(NamedTuple):
    """What `SetFrechetReward` returns for one batch."""

    reward: torch.Tensor  # [n] float32 per-sample reward (module doc; unitless)
    fd: dict[str, float]  # batch FD per space (squared feature units)


class SetFrechetReward:
    """The leave-one-out FD reward (module doc) in `spaces`, against the statistics of `reference`
    images [M, C, H, W] in [-1, 1] (the train split). pixel_pca is fitted on the same reference;
    random_relu uses `random_seed`, as evaluation's features.random_seed."""

    def __init__(self, reference: torch.Tensor, spaces: Sequence[str] = ("pixel_pca",),
                 pca_components: int = 32, random_seed: int = 0):
        check_reward_spaces(spaces)
        self.extractors: dict[str, nn.Module] = {}
        for name in spaces:
            pca = PixelPCA(pca_components).fit(reference).state() if name == "pixel_pca" else None
            self.extractors[name] = build_space(name, pca_state=pca, seed=random_seed).eval()
        self.reference_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reference_features = self.features(reference)  # {space: [M, F]}
        for name, feats in self.reference_features.items():
            x = feats.double()
            self.reference_stats[name] = (x.mean(0), torch.cov(x.T))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """{space: [n, F] float32} of images [n, C, H, W] in [-1, 1] (CPU)."""
        images = images.float().cpu()
        return {name: torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
                for name, net in self.extractors.items()}

    def __call__(self, images: torch.Tensor) -> SetReward:
        return self.from_features(self.features(images))

    def from_features(self, feats: Mapping[str, torch.Tensor]) -> SetReward:
        reward, fd = None, {}
        for name, x in feats.items():
            mu_r, cov_r = self.reference_stats[name]
            loo, full = leave_one_out_frechet(x, mu_r, cov_r)
            share = (loo - full) / max(full, 1e-12)
            reward = share if reward is None else reward + share
            fd[name] = full
        return SetReward(reward.float(), fd)
