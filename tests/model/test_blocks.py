"""Block geometry and heuristic block orders."""

from __future__ import annotations

import re

import pytest
import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.model.orders import ORDER_NAMES, block_order

# (grid_h, grid_w, block) covering square, non-square, 1-token blocks and degenerate strips.
GEOMETRIES = [(4, 4, 2), (4, 6, 2), (2, 8, 2), (8, 2, 2), (16, 16, 1), (16, 16, 4), (6, 6, 3), (1, 1, 1)]


def _reference_token_order(geom: BlockGeometry, order: list[int]) -> list[int]:
    """Token positions by explicit (row, col) loops: blocks in order, raster inside a block."""
    b = geom.block
    out = []
    for n in order:
        br, bc = divmod(n, geom.blocks_w)
        for i in range(b):
            for j in range(b):
                out.append((br * b + i) * geom.grid_w + bc * b + j)
    return out


# ---------------------------------------------------------------------------- geometry
def test_block_tokens_4x4_grid_2x2_blocks():
    g = BlockGeometry.for_grid(4, 2)
    assert (g.num_blocks, g.num_tokens, g.tokens_per_block, g.blocks_h, g.blocks_w) == (4, 16, 4, 2, 2)
    assert g.block_tokens.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert g.token_block.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert g.block_tokens.dtype == g.token_block.dtype == torch.long


def test_block_tokens_non_square():
    g = BlockGeometry(grid_h=2, grid_w=6, block=2)  # 1 x 3 blocks
    assert (g.blocks_h, g.blocks_w) == (1, 3)
    assert g.block_tokens.tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert g.token_rc[7].tolist() == [1, 1]
    assert g.block_rc[2].tolist() == [0, 2]


@pytest.mark.parametrize("h,w,b", [(4, 5, 2), (6, 4, 4), (0, 4, 2), (4, 4, 0), (4, 4, -2)])
def test_invalid_geometry_raises(h, w, b):
    with pytest.raises(ValueError, match="grid|block"):
        BlockGeometry(h, w, b)


def test_geometry_is_frozen_and_hashable():
    g = BlockGeometry.for_grid(8, 2)
    with pytest.raises(AttributeError):
        g.block = 4  # type: ignore[misc]
    assert g == BlockGeometry(8, 8, 2) and hash(g) == hash(BlockGeometry(8, 8, 2))
    assert g != BlockGeometry(8, 8, 4)


def test_raster_with_unit_blocks_is_arange():
    g = BlockGeometry(grid_h=5, grid_w=7, block=1)
    order = block_order("raster", g)
    assert torch.equal(g.token_order(order), torch.arange(35))


@pytest.mark.parametrize("h,w,b", GEOMETRIES)
def test_token_order_matches_reference_and_is_batched(h, w, b):
    g = BlockGeometry(h, w, b)
    orders = block_order("random", g, batch=3, generator=torch.Generator().manual_seed(1))
    tok = g.token_order(orders)
    assert tok.shape == (3, g.num_tokens)
    for row in range(3):
        assert tok[row].tolist() == _reference_token_order(g, orders[row].tolist())
        assert sorted(tok[row].tolist()) == list(range(g.num_tokens))
    # extra leading dims
    assert torch.equal(g.token_order(orders.view(3, 1, -1)).view(3, -1), tok)


def test_block_tokens_and_token_block_are_consistent():
    for h, w, b in GEOMETRIES:
        g = BlockGeometry(h, w, b)
        ids = torch.arange(g.num_blocks).unsqueeze(1).expand(-1, g.tokens_per_block)
        assert torch.equal(g.token_block[g.block_tokens], ids)
        assert torch.equal(g.token_rc[:, 0] * w + g.token_rc[:, 1], torch.arange(g.num_tokens))


def test_block_mask_to_token_mask():
    g = BlockGeometry.for_grid(4, 2)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    tok = g.block_mask_to_token_mask(mask)
    assert tok.shape == (2, 16) and tok.dtype == torch.bool
    assert tok[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 10, 11, 14, 15]
    assert tok[1].nonzero().flatten().tolist() == [2, 3, 6, 7]


def test_block_rank_map_is_inverse_permutation():
    g = BlockGeometry.for_grid(8, 2)
    orders = block_order("random", g, batch=4, generator=torch.Generator().manual_seed(0))
    rank = g.block_rank_map(orders)
    assert g.block_rank_map(torch.tensor([2, 0, 3, 1] + list(range(4, 16)))).tolist()[:4] == [1, 3, 0, 2]
    assert torch.equal(torch.gather(rank, 1, orders), torch.arange(16).expand(4, -1))
    assert torch.equal(torch.gather(orders, 1, rank), torch.arange(16).expand(4, -1))


def test_validate_order_names_bad_rows():
    g = BlockGeometry.for_grid(4, 2)  # N = 4
    good = [0, 1, 2, 3]
    g.validate_order(torch.tensor(good))
    batch = torch.tensor([good, [0, 0, 1, 2], [3, 2, 1, 0], [0, 1, 2, 4], [1, 0, 3, 2]])
    with pytest.raises(ValueError) as exc:
        g.validate_order(batch)
    msg = str(exc.value)
    assert "bad rows: 1, 3)" in msg and "2 of 5" in msg
    assert "[0, 0, 1, 2]" in msg and "[0, 1, 2, 4]" in msg

    with pytest.raises(ValueError, match=re.escape("bad rows: (1, 0)")):
        g.validate_order(torch.tensor([[good, good], [[-1, 1, 2, 3], good]]))
    with pytest.raises(ValueError, match="shape"):
        g.validate_order(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        g.validate_order(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="not permutations"):
        g.validate_order(torch.tensor([0, 1, 1, 3]))


def test_adjacency_and_distance():
    g = BlockGeometry(grid_h=3, grid_w=3, block=1)
    adj = g.block_adjacency
    assert adj.dtype == torch.bool and torch.equal(adj, adj.T) and not adj.diagonal().any()
    assert g.neighbours(4).tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert g.neighbours(0).tolist() == [1, 3, 4]
    assert g.neighbours(5).tolist() == [1, 2, 4, 7, 8]
    d = g.block_distance
    assert d.shape == (9, 9) and torch.equal(d, d.T)
    assert d[0, 1].item() == 1.0 and d[0, 4].item() == pytest.approx(2**0.5)
    assert d[0, 8].item() == pytest.approx(8**0.5) and d[2, 6].item() == pytest.approx(8**0.5)
    assert d[1, 7].item() == 2.0 and d.diagonal().abs().max().item() == 0.0
    # non-square: 1x3 blocks; the ends are not neighbours
    g2 = BlockGeometry(grid_h=2, grid_w=6, block=2)
    assert g2.neighbours(1).tolist() == [0, 2] and g2.neighbours(0).tolist() == [1]
    with pytest.raises(ValueError):
        g2.neighbours(3)


# ---------------------------------------------------------------------------- orders
# On a 4x4 block grid (ids row-major: row r holds 4r..4r+3).
EXPECTED_4x4 = {
    "raster": list(range(16)),
    "reverse": list(range(15, -1, -1)),
    "column_major": [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15],
    "zigzag": [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
    "diagonal": [0, 1, 4, 2, 5, 8, 3, 6, 9, 12, 7, 10, 13, 11, 14, 15],
    "spiral": [0, 1, 2, 3, 7, 11, 15, 14, 13, 12, 8, 4, 5, 6, 10, 9],
    # outward from (1, 1), clockwise: the central 2x2 first, then the ring
    "center_spiral": [5, 6, 10, 9, 8, 4, 0, 1, 2, 3, 7, 11, 15, 14, 13, 12],
}
EXPECTED_3x3 = {
    "column_major": [0, 3, 6, 1, 4, 7, 2, 5, 8],
    "zigzag": [0, 1, 2, 5, 4, 3, 6, 7, 8],
    "diagonal": [0, 1, 3, 2, 4, 6, 5, 7, 8],
    "spiral": [0, 1, 2, 5, 8, 7, 6, 3, 4],
    "center_spiral": [4, 5, 8, 7, 6, 3, 0, 1, 2],
}
# Non-square grids: (blocks_h, blocks_w) -> order.
EXPECTED_RECT = {
    ("spiral", 2, 3): [0, 1, 2, 5, 4, 3],
    ("spiral", 3, 2): [0, 1, 3, 5, 4, 2],
    ("spiral", 1, 4): [0, 1, 2, 3],
    ("spiral", 4, 1): [0, 1, 2, 3],
    ("spiral", 3, 4): [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6],
    ("diagonal", 2, 3): [0, 1, 3, 2, 4, 5],
    ("column_major", 2, 3): [0, 3, 1, 4, 2, 5],
    ("zigzag", 2, 3): [0, 1, 2, 5, 4, 3],
    ("center_spiral", 2, 3): [1, 2, 5, 4, 3, 0],
    ("center_spiral", 1, 4): [1, 2, 0, 3],
    ("center_spiral", 3, 1): [1, 2, 0],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_4x4))
def test_orders_4x4(name):
    g = BlockGeometry(grid_h=8, grid_w=8, block=2)
    assert block_order(name, g).tolist() == EXPECTED_4x4[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_3x3))
def test_orders_3x3(name):
    g = BlockGeometry(grid_h=3, grid_w=3, block=1)
    assert block_order(name, g).tolist() == EXPECTED_3x3[name]


@pytest.mark.parametrize("key", sorted(EXPECTED_RECT))
def test_orders_non_square(key):
    name, bh, bw = key
    g = BlockGeometry(grid_h=bh, grid_w=bw, block=1)
    assert block_order(name, g).tolist() == EXPECTED_RECT[key]


@pytest.mark.parametrize("name", ORDER_NAMES)
@pytest.mark.parametrize("h,w,b", GEOMETRIES + [(2, 3, 1), (1, 4, 1), (7, 5, 1), (5, 9, 1)])
def test_every_order_is_a_permutation(name, h, w, b):
    g = BlockGeometry(h, w, b)
    single = block_order(name, g, generator=torch.Generator().manual_seed(0))
    assert single.shape == (g.num_blocks,) and single.dtype == torch.long
    g.validate_order(single)
    batch = block_order(name, g, batch=4, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (4, g.num_blocks)
    g.validate_order(batch)


def test_center_spiral_starts_at_a_centre_block():
    for bh, bw in [(4, 4), (5, 5), (2, 3), (3, 6), (16, 16), (1, 7)]:
        g = BlockGeometry(bh, bw, 1)
        r, c = g.block_rc[block_order("center_spiral", g)[0]].tolist()
        assert abs(r - (bh - 1) / 2) <= 0.5 and abs(c - (bw - 1) / 2) <= 0.5


def test_deterministic_orders_batch_rows_equal_and_writable():
    g = BlockGeometry.for_grid(8, 2)
    batch = block_order("zigzag", g, batch=3)
    assert torch.equal(batch, block_order("zigzag", g).expand(3, -1))
    batch[0, 0] = 99  # rows must not alias each other
    assert batch[1, 0].item() == 0


def test_random_order_reproducible_and_rows_differ():
    g = BlockGeometry.for_grid(16, 1)  # N = 256
    a = block_order("random", g, batch=8, generator=torch.Generator().manual_seed(123))
    b = block_order("random", g, batch=8, generator=torch.Generator().manual_seed(123))
    c = block_order("random", g, batch=8, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8
    g.validate_order(a)
    # consecutive draws from one generator differ
    gen = torch.Generator().manual_seed(0)
    first, second = (block_order("random", g, generator=gen) for _ in range(2))
    assert not torch.equal(first, second)


def test_random_order_is_roughly_uniform():
    # Each block should land at each step with probability 1/N; catches e.g. a fixed shuffle.
    g = BlockGeometry(grid_h=2, grid_w=2, block=1)
    orders = block_order("random", g, batch=4000, generator=torch.Generator().manual_seed(0))
    first = torch.bincount(orders[:, 0], minlength=4).float() / 4000
    assert torch.allclose(first, torch.full((4,), 0.25), atol=0.03)


def test_unknown_order_name_lists_valid_names():
    g = BlockGeometry.for_grid(4, 2)
    with pytest.raises(ValueError) as exc:
        block_order("hilbert", g)
    for name in ORDER_NAMES:
        assert name in str(exc.value)


def test_order_names_constant():
    assert ORDER_NAMES == (
        "raster", "random", "zigzag", "diagonal", "spiral", "center_spiral", "column_major", "reverse", "halton"
    )


def test_halton_is_a_fixed_spread_permutation():
    for bh, bw in ((4, 4), (8, 8), (16, 16)):
        geom = BlockGeometry(bh, bw, 1)
        a, b = block_order("halton", geom), block_order("halton", geom, batch=3)
        assert torch.equal(a.sort().values, torch.arange(bh * bw))  # every block exactly once
        assert torch.equal(b, a.expand(3, -1))  # the same order for every row and call
    # its first half on a 4x4 grid puts two blocks in every quadrant (raster's is the top half)
    first = block_order("halton", BlockGeometry(4, 4, 1))[:8]
    quadrants = [(int(i) // 4 // 2, int(i) % 4 // 2) for i in first]
    assert sorted(quadrants) == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)]
