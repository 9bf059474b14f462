"""Block geometry: how a token grid is cut into square blocks, and how a block order becomes a
token order.

Conventions (DESIGN.md section 4):
- token grid ``grid_h x grid_w``; token position ``p = r * grid_w + c`` (row-major), ``L = H * W``;
- square blocks of ``block x block`` tokens; block ``n = br * blocks_w + bc`` (row-major on the
  ``blocks_h x blocks_w`` block grid), ``N = blocks_h * blocks_w``;
- a block order is a permutation of ``0..N-1``; inside a block tokens go in raster order.

Positions are spatial: the GPT indexes its 2D RoPE by ``p`` (or its (row, col)), never by the
step at which a token is generated, so ``token_order`` is all the model needs from an order."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["BlockGeometry"]

# Bad rows listed in a validate_order error before the message is cut short.
_MAX_REPORTED_ROWS = 8


def _positive_int(name: str, value: object) -> int:
    # bool is an int subclass; BlockGeometry(True, ...) is always a bug.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _row_name(flat: int, lead: torch.Size) -> str:
    """Name of flat row ``flat`` of a [*lead, N] tensor: '3' for 1 leading dim, '(1, 2)' for more."""
    if len(lead) == 0:
        return "0 (the only row)"
    idx = []
    for size in reversed(lead):
        idx.append(flat % size)
        flat //= size
    idx.reverse()
    return str(idx[0]) if len(idx) == 1 else str(tuple(idx))


@dataclass(frozen=True)
class BlockGeometry:
    """Geometry of a ``grid_h x grid_w`` token grid cut into ``block x block`` blocks.

    All index tensors are precomputed CPU ``torch.long`` tensors (bool / float where stated).
    Methods taking a tensor return results on that tensor's device.

    Attributes:
        num_blocks: N = blocks_h * blocks_w.
        num_tokens: L = grid_h * grid_w.
        tokens_per_block: T = block * block.
        blocks_h, blocks_w: size of the block grid.
        block_tokens: [N, T] long, token positions of each block, in-block raster order.
        token_block: [L] long, block id of each token.
        block_rc: [N, 2] long, (row, col) of each block on the block grid.
        token_rc: [L, 2] long, (row, col) of each token on the token grid.
        block_adjacency: [N, N] bool, 8-neighbourhood on the block grid (no self loops).
        block_distance: [N, N] float32, Euclidean distance between block centres, in units of
            blocks (adjacent blocks: 1, diagonal neighbours: sqrt(2)). Multiply by ``block``
            for token units.
    """

    grid_h: int
    grid_w: int
    block: int

    num_blocks: int = field(init=False)
    num_tokens: int = field(init=False)
    tokens_per_block: int = field(init=False)
    blocks_h: int = field(init=False)
    blocks_w: int = field(init=False)
    # Tensors are excluded from eq/hash/repr: two geometries are equal iff (grid_h, grid_w, block) are.
    block_tokens: torch.Tensor = field(init=False, repr=False, compare=False)
    token_block: torch.Tensor = field(init=False, repr=False, compare=False)
    block_rc: torch.Tensor = field(init=False, repr=False, compare=False)
    token_rc: torch.Tensor = field(init=False, repr=False, compare=False)
    block_adjacency: torch.Tensor = field(init=False, repr=False, compare=False)
    block_distance: torch.Tensor = field(init=False, repr=False, compare=False)
    # Per-device copies of block_tokens / token_block, so GPU callers pay the transfer once.
    _device_cache: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        h = _positive_int("grid_h", self.grid_h)
        w = _positive_int("grid_w", self.grid_w)
        b = _positive_int("block", self.block)
        if h % b or w % b:
            raise ValueError(
                f"token grid {h}x{w} is not divisible into {b}x{b} blocks "
                f"(grid_h % block = {h % b}, grid_w % block = {w % b})"
            )
        bh, bw = h // b, w // b
        n, t = bh * bw, b * b

        block_rc = torch.stack(
            torch.meshgrid(torch.arange(bh), torch.arange(bw), indexing="ij"), dim=-1
        ).reshape(n, 2)  # [N, 2]
        # Token (row, col) of in-block offset (i, j) of block (br, bc) is (br*b + i, bc*b + j).
        off = torch.stack(
            torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij"), dim=-1
        ).reshape(t, 2)  # [T, 2], in-block raster order
        tok_rc = block_rc[:, None, :] * b + off[None, :, :]  # [N, T, 2]
        block_tokens = tok_rc[..., 0] * w + tok_rc[..., 1]  # [N, T]

        token_block = torch.empty(h * w, dtype=torch.long)
        token_block[block_tokens.reshape(-1)] = torch.arange(n).repeat_interleave(t)  # [L]

        token_rc = torch.stack(
            torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1
        ).reshape(h * w, 2)  # [L, 2]

        diff = block_rc[:, None, :] - block_rc[None, :, :]  # [N, N, 2]
        cheb = diff.abs().amax(dim=-1)  # [N, N] Chebyshev distance
        adjacency = cheb == 1  # 8-neighbourhood, excludes the block itself
        distance = diff.float().pow(2).sum(dim=-1).sqrt()  # [N, N]

        values = dict(
            num_blocks=n,
            num_tokens=h * w,
            tokens_per_block=t,
            blocks_h=bh,
            blocks_w=bw,
            block_tokens=block_tokens,
            token_block=token_block,
            block_rc=block_rc,
            token_rc=token_rc,
            block_adjacency=adjacency,
            block_distance=distance,
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen dataclass: set derived fields once

    @classmethod
    def for_grid(cls, grid: int, block: int) -> BlockGeometry:
        """Square ``grid x grid`` token grid with ``block x block`` blocks."""
        return cls(grid_h=grid, grid_w=grid, block=block)

    # ------------------------------------------------------------------ helpers
    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_tokens, token_block) on ``device``, cached."""
        if device.type == "cpu":
            return self.block_tokens, self.token_block
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (self.block_tokens.to(device), self.token_block.to(device))
        return self._device_cache[key]

    def _check_last_dim(self, x: torch.Tensor, what: str) -> None:
        if x.dim() < 1 or x.shape[-1] != self.num_blocks:
            raise ValueError(
                f"{what} must have shape [..., N={self.num_blocks}], got {tuple(x.shape)}"
            )

    # ------------------------------------------------------------------ orders
    def token_order(self, block_order: torch.Tensor) -> torch.Tensor:
        """Token positions in generation order.

        Args:
            block_order: [..., N] long, a permutation of 0..N-1 per row (not validated here, as
                this sits on the hot path; call ``validate_order`` at the boundary).
        Returns:
            [..., L] long: ``out[..., k]`` is the spatial position of the k-th generated token.
        """
        self._check_last_dim(block_order, "block_order")
        block_tokens, _ = self._on(block_order.device)
        # Gather whole blocks ([..., N, T]) and flatten: blocks in order, raster inside each.
        return block_tokens[block_order].flatten(-2)

    def block_mask_to_token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Expand a per-block mask to a per-token mask.

        Args:
            mask: [..., N] bool (any dtype works; values are copied per token).
        Returns:
            [..., L] same dtype, indexed by spatial token position.
        """
        self._check_last_dim(mask, "mask")
        _, token_block = self._on(mask.device)
        return mask[..., token_block]

    def pool_blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """Block means of per-token features: the one block pooling used by the env
        (`env.hidden=block`), the OrderHead and the BC features.

        Args:
            hidden: [B, L, D] indexed by spatial token position.
        Returns:
            [B, N, D]: ``out[:, n] = mean over t of hidden[:, block_tokens[n, t]]``.
        """
        if hidden.dim() != 3 or hidden.shape[1] != self.num_tokens:
            raise ValueError(f"hidden must have shape [B, L={self.num_tokens}, D], got {tuple(hidden.shape)}")
        block_tokens, _ = self._on(hidden.device)
        return hidden[:, block_tokens].mean(2)

    def block_rank_map(self, block_order: torch.Tensor) -> torch.Tensor:
        """Inverse permutation: the step at which each block is generated.

        Args:
            block_order: [..., N] integer permutation per row.
        Returns:
            [..., N] long: ``rank[..., block_order[..., k]] == k``.
        """
        self._check_last_dim(block_order, "block_order")
        index = block_order.long()  # scatter_ needs int64 indices
        steps = torch.arange(self.num_blocks, device=index.device).expand_as(index)
        return torch.empty_like(index).scatter_(-1, index, steps)

    def validate_order(self, block_order: torch.Tensor) -> None:
        """Raise ValueError unless every row of ``block_order`` ([..., N]) permutes 0..N-1.

        The message names the offending rows (index tuples into the leading dims) and shows the
        first few of them.
        """
        if not isinstance(block_order, torch.Tensor):
            raise ValueError(
                f"block_order must be a torch.Tensor, got {type(block_order).__name__}"
            )
        dt = block_order.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise ValueError(f"block_order must be an integer tensor, got dtype {block_order.dtype}")
        self._check_last_dim(block_order, "block_order")
        lead = block_order.shape[:-1]
        rows = block_order.reshape(-1, self.num_blocks)
        # Sorted row == arange  <=>  row is a permutation (catches repeats and out-of-range ids).
        expected = torch.arange(self.num_blocks, device=rows.device, dtype=rows.dtype)
        ok = (rows.sort(dim=-1).values == expected).all(dim=-1)  # [B]
        if bool(ok.all()):
            return
        bad = (~ok).nonzero().flatten().tolist()
        names = [_row_name(i, lead) for i in bad]
        cut = len(bad) > _MAX_REPORTED_ROWS
        shown = "\n".join(
            f"  row {name}: {rows[i].tolist()}"
            for name, i in zip(names[:_MAX_REPORTED_ROWS], bad[:_MAX_REPORTED_ROWS])
        )
        raise ValueError(
            f"{len(bad)} of {rows.shape[0]} block orders are not permutations of "
            f"0..{self.num_blocks - 1} (bad rows: {', '.join(names[:_MAX_REPORTED_ROWS])}"
            f"{', ...' if cut else ''}):\n{shown}"
            + (f"\n  ... and {len(bad) - _MAX_REPORTED_ROWS} more" if cut else "")
        )

    # ------------------------------------------------------------------ neighbourhoods
    def neighbours(self, block: int) -> torch.Tensor:
        """[k] long: ids of the (up to 8) blocks adjacent to ``block``, ascending."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in 0..{self.num_blocks - 1}, got {block}")
        return self.block_adjacency[block].nonzero().flatten()
