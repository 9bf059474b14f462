"""PNG figures of `scripts/evaluate.py` (matplotlib, Agg backend: no display needed).

Images come in model space, float [*, C, H, W] in [-1, 1]; block orders as reveal sequences [*, N]
or masks [*, N] over the geometry's block grid (blocks_h x blocks_w, row-major).

Imports backbone/ only (block geometry, atomic writes); never envs, agents.planner or agents.training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbone.blocks import BlockGeometry  # noqa: E402
from backbone.checkpoint import atomic_write  # noqa: E402


def _to_display(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """[C, H, W] in [-1, 1] -> (array for imshow in [0, 1], cmap)."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    return (x[0], "gray") if x.shape[0] == 1 else (x.transpose(1, 2, 0), None)


def _save(fig: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path


def _block_pixels(geometry: BlockGeometry, height: int, width: int) -> tuple[int, int]:
    return height // geometry.blocks_h, width // geometry.blocks_w


def sample_grid(path: str | Path, images: torch.Tensor, labels: torch.Tensor, title: str, per_class: int = 8,
                max_classes: int = 10) -> Path:
    """One row per class (the first `max_classes` classes present), its first `per_class` samples."""
    classes = labels.unique().tolist()[:max_classes]
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.9 + 0.4),
                             squeeze=False)
    for r, c in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()[:per_class].tolist()
        for k in range(per_class):
            ax = axes[r, k]
            ax.axis("off")
            if k < len(idx):
                arr, cmap = _to_display(images[idx[k]])
                ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
            if k == 0:
                ax.set_title(f"class {c}", fontsize=6, loc="left")
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def order_heatmaps(path: str | Path, orders: Mapping[str, torch.Tensor], images: torch.Tensor,
                   geometry: BlockGeometry) -> Path:
    """Rank of each block (0 = revealed first) for every policy (rows) on the same images (columns):
    the image underneath, the ranks as colour and numbers on top. orders[name]: [R, N] reveal
    sequences on `images` [R, C, H, W]."""
    names, R = list(orders), images.shape[0]
    fig, axes = plt.subplots(len(names), R, figsize=(R * 1.6, len(names) * 1.6 + 0.3), squeeze=False)
    H, W = images.shape[-2:]
    ph, pw = _block_pixels(geometry, H, W)
    for i, name in enumerate(names):
        for j in range(R):
            ax = axes[i, j]
            arr, cmap = _to_display(images[j])
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
            rank = geometry.block_rank_map(orders[name][j].cpu()).view(geometry.blocks_h, geometry.blocks_w)
            ax.imshow(rank.numpy(), cmap="viridis_r", alpha=0.55, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
                      vmin=0, vmax=geometry.num_blocks - 1)
            if geometry.num_blocks <= 64:
                for b in range(geometry.num_blocks):
                    r, c = divmod(b, geometry.blocks_w)
                    ax.text(c * pw + pw / 2 - 0.5, r * ph + ph / 2 - 0.5, str(int(rank[r, c])), ha="center",
                            va="center", fontsize=6, color="white")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("block order (rank: 0 = first revealed)", fontsize=9)
    return _save(fig, Path(path))


def progressive_snapshots(path: str | Path, snapshots: torch.Tensor, masks: torch.Tensor, geometry: BlockGeometry,
                          fractions: Sequence[float], title: str) -> Path:
    """snapshots [R, Q, C, H, W] and masks [R, Q, N] (revealed blocks) -> rows = samples, columns =
    fraction of blocks generated; blocks not generated yet are greyed out."""
    R, Q = snapshots.shape[:2]
    H, W = snapshots.shape[-2:]
    ph, pw = _block_pixels(geometry, H, W)
    fig, axes = plt.subplots(R, Q, figsize=(Q * 1.1, R * 1.1 + 0.4), squeeze=False)
    for r in range(R):
        for q in range(Q):
            arr, cmap = _to_display(snapshots[r, q])
            shown = np.array(arr, copy=True)
            for b in torch.nonzero(~masks[r, q]).flatten().tolist():
                br, bc = divmod(b, geometry.blocks_w)
                shown[br * ph:(br + 1) * ph, bc * pw:(bc + 1) * pw] = 0.5
            ax = axes[r, q]
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=1)
            ax.axis("off")
            if r == 0:
                ax.set_title(f"{round(100 * fractions[q])}%", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def remaining_loss_curves(path: str | Path, curves: Mapping[str, Sequence[float]], ylabel: str) -> Path:
    """One line per policy: curves[name] is [N + 1] (value after t = 0..N blocks)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        n = len(curve) - 1
        ax.plot(np.arange(n + 1) / n, curve, marker=".", label=name)
    ax.set_xlabel("fraction of blocks revealed")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))
