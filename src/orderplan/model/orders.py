"""Heuristic block orders (the inference-only baselines of seed note 002, section 2).

Every order is defined on the ``blocks_h x blocks_w`` block grid of a ``BlockGeometry`` and is a
permutation of block ids (row-major on that grid); ``BlockGeometry.token_order`` turns it into
token positions. With ``block=1`` the orders are the token-level orders of the seed experiments.

- raster: row-major.                      - reverse: raster reversed (last block first).
- column_major: column by column, top to bottom inside a column.
- zigzag: boustrophedon rows: row 0 left->right, row 1 right->left, ...
- diagonal: anti-diagonals r + c = 0, 1, 2, ..., each in increasing row.
- spiral: clockwise from the top-left corner inward (right, down, left, up, peeling rings).
- center_spiral: a true outward spiral (NOT the inward spiral reversed, which for non-square
  grids does not start at the centre): starts at the centre block
  ``((blocks_h - 1) // 2, (blocks_w - 1) // 2)`` (upper-left of the central 2x2 for even sizes)
  and walks clockwise with legs 1, 1, 2, 2, 3, 3, ... (right, down, left, up, ...), skipping
  cells outside the grid. On a square grid every ring around the centre is completed before
  the next one starts.
- halton: the 2D Halton sequence (bases 2 and 3) mapped onto the grid, point i to cell
  (floor(h_2(i) * blocks_h), floor(h_3(i) * blocks_w)) for i = 1, 2, ..., each cell kept the first
  time it is hit: a low-discrepancy order, every prefix spread over the image (Besnier et al.,
  "Halton Scheduler for Masked Generative Image Transformer", ICLR 2025).
- random: an independent uniform permutation per row, drawn from ``generator``."""

from __future__ import annotations

import torch

from orderplan.model.blocks import BlockGeometry

__all__ = ["ORDER_NAMES", "block_order"]

ORDER_NAMES: tuple[str, ...] = (
    "raster",
    "random",
    "zigzag",
    "diagonal",
    "spiral",
    "center_spiral",
    "column_major",
    "reverse",
    "halton",
)

# Clockwise in image coordinates (row grows downward): right, down, left, up.
_CLOCKWISE = ((0, 1), (1, 0), (0, -1), (-1, 0))


def _raster(bh: int, bw: int) -> list[int]:
    return list(range(bh * bw))


def _reverse(bh: int, bw: int) -> list[int]:
    return list(range(bh * bw - 1, -1, -1))


def _column_major(bh: int, bw: int) -> list[int]:
    return [r * bw + c for c in range(bw) for r in range(bh)]


def _zigzag(bh: int, bw: int) -> list[int]:
    return [r * bw + (c if r % 2 == 0 else bw - 1 - c) for r in range(bh) for c in range(bw)]


def _diagonal(bh: int, bw: int) -> list[int]:
    return [
        r * bw + (s - r)
        for s in range(bh + bw - 1)
        for r in range(max(0, s - bw + 1), min(bh, s + 1))
    ]


def _spiral(bh: int, bw: int) -> list[int]:
    """Clockwise from (0, 0) inward, by peeling the outer ring of the remaining rectangle."""
    out: list[int] = []
    top, bottom, left, right = 0, bh - 1, 0, bw - 1
    while top <= bottom and left <= right:
        out += [top * bw + c for c in range(left, right + 1)]
        out += [r * bw + right for r in range(top + 1, bottom + 1)]
        if top < bottom:  # a single remaining row must not be walked back
            out += [bottom * bw + c for c in range(right - 1, left - 1, -1)]
        if left < right:  # a single remaining column likewise
            out += [r * bw + left for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out


def _center_spiral(bh: int, bw: int) -> list[int]:
    """Outward clockwise square spiral from the centre block, clipped to the grid."""
    n = bh * bw
    r, c = (bh - 1) // 2, (bw - 1) // 2
    out = [r * bw + c]
    leg, d = 1, 0
    # The unclipped spiral covers every cell within Chebyshev radius k after (2k+1)^2 cells, so
    # this terminates after at most (2 * max(bh, bw) + 1)^2 steps.
    while len(out) < n:
        for _ in range(2):  # two legs per length: (right, down), (left, up), ...
            dr, dc = _CLOCKWISE[d]
            for _ in range(leg):
                r, c = r + dr, c + dc
                if 0 <= r < bh and 0 <= c < bw:
                    out.append(r * bw + c)
            d = (d + 1) % 4
        leg += 1
    return out


def _radical_inverse(i: int, base: int) -> float:
    """The van der Corput radical inverse of i in `base`: digits of i mirrored after the point."""
    out, f = 0.0, 1.0 / base
    while i > 0:
        i, d = divmod(i, base)
        out += d * f
        f /= base
    return out


def _halton(bh: int, bw: int) -> list[int]:
    """Cells in order of first visit by the 2D Halton sequence (bases 2, 3), starting at i = 1.
    The sequence is dense in [0, 1)^2, so every cell is reached; the loop bound only guards it."""
    out: list[int] = []
    seen: set[int] = set()
    i = 1
    while len(out) < bh * bw:
        cell = int(_radical_inverse(i, 2) * bh) * bw + int(_radical_inverse(i, 3) * bw)
        if cell not in seen:
            seen.add(cell)
            out.append(cell)
        i += 1
        if i > 1000 * bh * bw + 1000:
            raise RuntimeError("the Halton sequence failed to cover the grid")  # cannot happen
    return out


_DETERMINISTIC = {
    "raster": _raster,
    "reverse": _reverse,
    "column_major": _column_major,
    "zigzag": _zigzag,
    "diagonal": _diagonal,
    "spiral": _spiral,
    "center_spiral": _center_spiral,
    "halton": _halton,
}
assert set(_DETERMINISTIC) | {"random"} == set(ORDER_NAMES)


def block_order(
    name: str,
    geom: BlockGeometry,
    batch: int | None = None,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A named block order.

    Args:
        name: one of ``ORDER_NAMES``.
        geom: the block geometry (orders live on its ``blocks_h x blocks_w`` grid).
        batch: None for a single order, else the number of rows.
        generator: RNG for ``random`` (ignored by the others); the result is deterministic given
            its state. None uses torch's global RNG.
        device: where the result lives (default: the generator's device for ``random``, else CPU).
    Returns:
        [N] long if ``batch`` is None, else [batch, N] long (a fresh, writable tensor; every row
        of a deterministic order is the same, every row of ``random`` is drawn independently).
    """
    if name not in ORDER_NAMES:
        raise ValueError(f"unknown block order {name!r}; valid names: {', '.join(ORDER_NAMES)}")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 0):
        raise ValueError(f"batch must be None or a non-negative int, got {batch!r}")
    n = geom.num_blocks
    rows = 1 if batch is None else batch

    if name == "random":
        rand_device = generator.device if generator is not None else (device or "cpu")
        # argsort of i.i.d. uniforms is a uniform permutation; float64 makes ties (which would
        # bias it) negligible even for N in the thousands, and it is batched (no per-row loop).
        keys = torch.rand(rows, n, generator=generator, dtype=torch.float64, device=rand_device)
        order = keys.argsort(dim=-1)
    else:
        base = torch.tensor(_DETERMINISTIC[name](geom.blocks_h, geom.blocks_w), dtype=torch.long)
        order = base.unsqueeze(0).repeat(rows, 1)  # repeat (not expand): callers may write in place

    if device is not None:
        order = order.to(device)
    return order[0] if batch is None else order
