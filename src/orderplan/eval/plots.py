"""PNG figures of `scripts/evaluate.py` (matplotlib, Agg backend: no display needed).

Images come in model space, float [*, C, H, W] in [-1, 1]; block orders as reveal sequences [*, N]
or masks [*, N] over the geometry's block grid (blocks_h x blocks_w, row-major)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from orderplan.model.blocks import BlockGeometry  # noqa: E402
from orderplan.infra.checkpoint import atomic_write  # noqa: E402


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


GRID_GAP = 2  # pixels of white between the cells of a sample grid


def class_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int, max_classes: int,
               gap: int = GRID_GAP) -> tuple[np.ndarray, list[int]]:
    """Tile images [S, C, H, W] in [-1, 1] into one canvas [R * (H + gap) - gap, per_class * (W + gap) - gap, C]
    in [0, 1]: row r holds the first `per_class` samples of the r-th class present (the first
    `max_classes` classes), white gutters, a white cell where a class has fewer samples. Returns the
    canvas and its row classes."""
    classes = labels.unique().tolist()[:max_classes]
    C, H, W = images.shape[1:]
    canvas = np.ones((len(classes) * (H + gap) - gap, per_class * (W + gap) - gap, C), dtype=np.float32)
    for r, c in enumerate(classes):
        for k, i in enumerate(torch.nonzero(labels == c).flatten()[:per_class].tolist()):
            arr, _ = _to_display(images[i])
            y, x = r * (H + gap), k * (W + gap)
            canvas[y:y + H, x:x + W] = arr[..., None] if arr.ndim == 2 else arr
    return canvas, classes


def sample_grid(path: str | Path, images: torch.Tensor, labels: torch.Tensor, title: str, per_class: int = 8,
                max_classes: int = 10) -> Path:
    """One row per class (the first `max_classes` classes present), its first `per_class` samples,
    drawn as one canvas (class_rows) by a single imshow: one axes per cell took most of a small
    table's time."""
    canvas, classes = class_rows(images, labels, per_class, max_classes)
    H, C = images.shape[2], images.shape[1]
    fig, ax = plt.subplots(figsize=(per_class * 0.9, len(classes) * 0.9 + 0.4))
    ax.imshow(canvas[..., 0] if C == 1 else canvas, cmap="gray" if C == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (H + GRID_GAP) + H / 2 - 0.5 for r in range(len(classes))], [f"class {c}" for c in classes],
                  fontsize=6)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
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


def policy_columns(path: str | Path, samples: Mapping[str, torch.Tensor], labels: torch.Tensor, rows: int,
                   title: str) -> Path:
    """One column per policy, one row per sample index: samples[name] [S, C, H, W] in [-1, 1], where
    row i of every policy shares the conditioning label labels[i] ([S]) and the sampler seed, so a row
    compares the orders on one draw. Shows the first min(rows, S) rows, each labelled by its class."""
    names = list(samples)
    if not names:
        raise ValueError("policy_columns needs at least one policy")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    counts = {name: int(samples[name].shape[0]) for name in names}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every policy needs the same number of paired samples, got {counts}")
    S = counts[names[0]]
    if labels.dim() != 1 or labels.shape[0] != S:
        raise ValueError(f"labels must be [S={S}], got {tuple(labels.shape)}")
    R = min(int(rows), S)
    fig, axes = plt.subplots(R, len(names), figsize=(len(names) * 1.2 + 0.6, R * 1.2 + 0.4), squeeze=False)
    for r in range(R):
        for j, name in enumerate(names):
            ax = axes[r, j]
            arr, cmap = _to_display(samples[name][r])
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])  # not axis("off"): the row label lives on the y axis
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"class {int(labels[r])}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def fid_vs_n(path: str | Path, curves: Mapping[str, Sequence[dict]], title: str, floor: float | None = None) -> Path:
    """FID (squared feature units) against the number of samples N, log x axis: per policy a line
    through curves[name] (points {"n", "fid", "lo", "hi"}, as `sample_metrics.fid_curve` returns)
    and a shaded [lo, hi] band; `floor`, the real-vs-real FID, as a dashed horizontal line."""
    if not curves:
        raise ValueError("fid_vs_n needs at least one curve")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, points in curves.items():
        if not points or any(not {"n", "fid", "lo", "hi"} <= set(p) for p in points):
            raise ValueError(f"curve {name!r} must be a non-empty list of dicts with n, fid, lo, hi")
        points = sorted(points, key=lambda p: p["n"])
        n = np.array([p["n"] for p in points], dtype=float)
        line, = ax.plot(n, [p["fid"] for p in points], marker=".", label=name)
        ax.fill_between(n, [p["lo"] for p in points], [p["hi"] for p in points], color=line.get_color(), alpha=0.2)
    if floor is not None:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="real vs real")
    ax.set_xscale("log")
    ax.set_xlabel("samples N")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def fid_vs_steps(path: str | Path, rows: Mapping[str, Mapping], title: str) -> Path:
    """FID with its interval against sequential backbone forwards per image (log x axis). Rows named
    `<schedule>@<S>[c]` (parallel-decoding schedules) join one line per schedule; every other row
    (token-by-token orders, planners) is one labelled point. rows[name] needs `fid`, `fid_ci` and
    `forward_passes_per_image`."""
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    points: dict[str, tuple[float, float, float, float]] = {}
    for name, r in rows.items():
        pt = (float(r["forward_passes_per_image"]), float(r["fid"]), float(r["fid_ci"][0]), float(r["fid_ci"][1]))
        if "@" in name:
            base, _, steps = name.partition("@")
            lines.setdefault(base + (" (cosine)" if steps.endswith("c") else ""), []).append(pt)
        else:
            points[name] = pt
    if not lines and not points:
        raise ValueError("fid_vs_steps needs at least one row")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(lines.items()):
        pts.sort()
        x, y, lo, hi = (np.array(v) for v in zip(*pts))
        ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", markersize=3, capsize=2, label=name)
    for name, (x, y, lo, hi) in points.items():
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], marker="s", markersize=4, capsize=2, linestyle="none", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("backbone forwards per image")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, Path(path))


def _mean_reveal_steps(orders: torch.Tensor, geometry: BlockGeometry) -> torch.Tensor:
    """Mean reveal step (0 = first) of each block over reveal sequences orders [S, N], as the block
    grid [blocks_h, blocks_w] float64 (row-major block ids)."""
    if orders.dim() != 2 or orders.shape[0] < 1:
        raise ValueError(f"orders must be [S, N] with S >= 1, got {tuple(orders.shape)}")
    geometry.validate_order(orders)
    rank = geometry.block_rank_map(orders.cpu())  # [S, N]: the step at which each block is revealed
    return rank.double().mean(0).view(geometry.blocks_h, geometry.blocks_w)


def reveal_time_heatmaps(path: str | Path, orders: Mapping[str, torch.Tensor], geometry: BlockGeometry,
                         title: str) -> Path:
    """One panel per policy: the mean reveal step (0 = first) of every block over the policy's S
    generated samples (orders[name] [S, N], reveal sequences of block ids), on the block grid, on one
    colour scale (0 .. N - 1, so panels and figures compare) with a colourbar."""
    if not orders:
        raise ValueError("reveal_time_heatmaps needs at least one policy")
    means = {name: _mean_reveal_steps(o, geometry) for name, o in orders.items()}
    N = geometry.num_blocks
    fig, axes = plt.subplots(1, len(means), figsize=(len(means) * 2.2 + 0.8, 2.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], means.items()):
        im = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=N - 1)
        if N <= 64:  # numbers stay legible up to an 8 x 8 grid
            for b in range(N):
                r, c = divmod(b, geometry.blocks_w)
                value = float(grid[r, c])
                # viridis is bright at the top of the scale: dark digits there, light ones below
                ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=6,
                        color="black" if value > (N - 1) / 2 else "white")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean reveal step")
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def overview(path: str | Path, panels: Sequence[str | Path], max_width: int = 900) -> Path:
    """The README's picture: evaluate's PNG panels (e.g. samples_side_by_side.png above
    reveal_time_heatmaps.png) stacked top to bottom on white, each scaled to one width of at most
    `max_width` pixels, written as one PNG (atomically)."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in panels]
    width = min(max_width, max(im.width for im in images))
    scaled = [im.resize((width, max(1, round(im.height * width / im.width))), Image.LANCZOS) for im in images]
    canvas = Image.new("RGB", (width, sum(im.height for im in scaled)), "white")
    y = 0
    for im in scaled:
        canvas.paste(im, (0, y))
        y += im.height
    path = Path(path)
    atomic_write(path, lambda f: canvas.save(f, format="PNG", optimize=True))
    return path
