"""Generation sample sets split across torchrun ranks by whole sampler batches (`scripts/evaluate.py`).

Rank r of W generates the contiguous batches [r nb / W, (r + 1) nb / W) of a set of n samples
(nb = ceil(n / batch_size)) through `generate_samples(first_index=...)`, so every sample keeps the
label, sampler stream, position-noise keys and policy draws it has in one process. Its features are
extracted one generation batch at a time: a feature net's output depends on its batch's composition
at float rounding (about 1e-5 on the MNIST classifier), and generation batches are the only batches
that are the same for every W. Rank 0 gathers the per-sample parts in rank order, which is the global
sample order, so everything computed from the gathered set (FID, intervals, precision / recall, class
log-probs, dFID) is bit-identical to one process: world-size independence with no tolerance.

What travels to rank 0: features [S, F], orders, decisions, entropy-drop returns, the few images the
figures show (`figure_indices`), the progressive snapshots and, for eval.npz only, uint8 images.
One process runs the same code with one shard (the whole set)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from orderplan.eval.fid import extract_features, to_uint8_nhwc
from orderplan.eval.rollouts import PolicyFactory, generate_samples, order_of
from orderplan.infra.distributed import DistContext, all_gather_objects, gather_objects
from orderplan.model.loading import Backbone
from orderplan.env.core import EnvConfig, OrderPlanningCore


def batch_range(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Samples [lo, hi) of rank `rank`: whole batches of `batch_size`, contiguous, the batch counts of
    two ranks differing by at most 1 (a rank may get none when batches < world)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    nb = -(-n // batch_size)
    return min(rank * nb // world * batch_size, n), min((rank + 1) * nb // world * batch_size, n)


def orders_sharded(make: PolicyFactory, core: Callable[[], OrderPlanningCore], image_index: torch.Tensor,
                   batch_size: int, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """`rollouts.order_of` on images image_index [M], each rank playing its whole batches of
    `batch_size` on a core from `core()` (built only where there is work), gathered on every rank in
    image order: blocks [M, N] and decisions [M]. Equal to one process's for a policy whose order of an
    image does not depend on the batches played before it (the oracles: deterministic, row by row)."""
    lo, hi = batch_range(len(image_index), batch_size, ctx.rank, ctx.world)
    part = order_of(make, core(), image_index[lo:hi]) if hi > lo else None
    parts = [p for p in all_gather_objects(part, ctx) if p is not None]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def batch_features(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int, feature_batch: int,
                   device: torch.device | str) -> torch.Tensor:
    """Features float64 [S, F] (CPU) of images [S, C, H, W] that start at a generation-batch boundary,
    one generation batch of `batch_size` at a time (in sub-batches of `feature_batch`): the same
    feature batches whichever rank holds the samples."""
    return torch.cat([extract_features(extractor, chunk, feature_batch, device) for chunk in images.split(batch_size)])


def figure_indices(labels: torch.Tensor, per_class: int, rows: int) -> torch.Tensor:
    """Sample indices [K] (sorted) the figures draw from labels [n]: the first `rows` (side-by-side
    columns) and the first `per_class` of each class (`plots.sample_grid`, which picks the same
    samples from this subset as from the whole set)."""
    keep = torch.zeros(len(labels), dtype=torch.bool)
    keep[:rows] = True
    for c in labels.unique():
        keep[torch.nonzero(labels == c).flatten()[:per_class]] = True
    return torch.nonzero(keep).flatten()


@dataclass
class SampleSet:
    """One policy's gathered sample set of n samples, on rank 0 (global sample order)."""

    features: torch.Tensor  # [n, F] float64
    labels: torch.Tensor  # [n] conditioning classes
    blocks: torch.Tensor  # [n, N] reveal orders
    decisions: torch.Tensor  # [n]
    entropy_return: torch.Tensor | None  # [n] nats (None: not measured)
    path: str  # env | decode (rollouts.Samples.path)
    shown: torch.Tensor  # [K] sample indices of `images` (figure_indices)
    images: torch.Tensor  # [K, C, H, W] in [-1, 1]
    snapshots: torch.Tensor  # [R, Q, C, H, W] of samples 0..R-1
    snapshot_masks: torch.Tensor  # [R, Q, N] bool
    fractions: tuple[float, ...]
    uint8: np.ndarray | None  # [n, H, W, 3] (only when asked for: eval.npz)
    forwards: torch.Tensor | None = None  # [n] sequential backbone forwards per sample
    seconds: float = 0.0  # generation wall seconds of the slowest rank (features excluded)

    def image_rows(self, rows: int) -> torch.Tensor:
        """Images [min(rows, n), C, H, W] of samples 0..rows-1 (always among `shown`)."""
        return self.images[:int((self.shown < rows).sum())]


def generate_sharded(make_at: Callable[[int], PolicyFactory], backbone: Backbone, labels: torch.Tensor,
                     env: EnvConfig, batch_size: int, seed: int, ctx: DistContext, extractor: torch.nn.Module,
                     feature_batch: int, shown: torch.Tensor | None = None, num_snapshots: int = 0,
                     npz: bool = False, progress_bar: Callable | None = None) -> SampleSet | None:
    """This rank's batches of the set labels [n] (`batch_range`), gathered on rank 0 (None on the
    others; every rank must call it, in the same order). `make_at(lo)` is the policy factory of a
    shard that starts at sample lo (a per-image order indexed by sample must be rotated by lo: the
    shard's core numbers its rows from 0). `shown`: sample indices whose images rank 0 keeps (default
    none); `num_snapshots`: the first samples whose progressive snapshots it keeps."""
    n = len(labels)
    lo, hi = batch_range(n, batch_size, ctx.rank, ctx.world)
    shown = torch.zeros(0, dtype=torch.long) if shown is None else shown
    part = None
    if hi > lo:
        s = generate_samples(make_at(lo), backbone, labels[lo:hi], env, batch_size, seed,
                             num_snapshots=max(0, min(num_snapshots, hi) - lo), first_index=lo,
                             progress_bar=progress_bar if ctx.main else None)
        mine = shown[(shown >= lo) & (shown < hi)] - lo
        part = {"features": batch_features(extractor, s.images, batch_size, feature_batch, ctx.device),
                "blocks": s.blocks, "decisions": s.decisions, "entropy_return": s.entropy_return, "path": s.path,
                "images": s.images[mine], "snapshots": s.snapshots, "snapshot_masks": s.snapshot_masks,
                "fractions": s.fractions, "uint8": to_uint8_nhwc(s.images) if npz else None,
                "forwards": s.forwards, "seconds": s.seconds}
    parts = gather_objects(part, ctx)
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]  # rank order = sample order

    def cat(key: str):
        return torch.cat([p[key] for p in parts])

    first = parts[0]
    return SampleSet(features=cat("features"), labels=labels.long().cpu(), blocks=cat("blocks"),
                     decisions=cat("decisions"),
                     entropy_return=None if first["entropy_return"] is None else cat("entropy_return"),
                     path=first["path"], shown=shown, images=cat("images"), snapshots=cat("snapshots"),
                     snapshot_masks=cat("snapshot_masks"), fractions=first["fractions"],
                     uint8=np.concatenate([p["uint8"] for p in parts]) if npz else None,
                     forwards=cat("forwards"), seconds=max(p["seconds"] for p in parts))
