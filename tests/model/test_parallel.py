"""Parallel decoding (src/orderplan/model/parallel.py, GPT.decode_step / append_query): one token per
decision is today's sampler bit for bit, a decision is one forward, and the tokens of a decision
are drawn from the query's conditionals, independently of each other."""

import pytest
import torch
from scipy.stats import chi2

from orderplan.model.blocks import BlockGeometry
from orderplan.model.orders import block_order
from orderplan.model.parallel import chebyshev_near, generate_parallel, spread_pick, step_sizes
from orderplan.model.sampling import SamplingConfig, generate, row_keys
from tests.conftest import randomized_gpt

GEOM = BlockGeometry(8, 8, 2)
SAMPLERS = [SamplingConfig(), SamplingConfig(cfg_scale=3.0, temperature=0.9, top_k=40, top_p=0.9),
            SamplingConfig(noise="position", cfg_scale=1.5)]


def _orders(batch: int, seed: int = 1) -> torch.Tensor:
    return GEOM.token_order(block_order("random", GEOM, batch=batch, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("sc", SAMPLERS)
def test_one_token_per_decision_is_todays_sampler_bit_for_bit(sc):
    model = randomized_gpt(seed=3)
    order, cond = _orders(3), torch.tensor([0, 4, 9])
    keys = row_keys(7, torch.arange(3))
    a = generate(model, cond, order, sc, torch.Generator().manual_seed(5), keys)
    b = generate_parallel(model, cond, [1] * 64, "order", order, sc, torch.Generator().manual_seed(5), keys)
    assert torch.equal(a, b.tokens)
    assert torch.equal(b.order, order) and b.forwards == 64


@pytest.mark.parametrize("rule", ["order", "confident", "spread_confident"])
@pytest.mark.parametrize("steps", [4, 16, 32])
def test_a_decision_is_one_forward_whatever_its_size(rule, steps):
    model = randomized_gpt(seed=2)
    calls = []
    model.layers[0].register_forward_hook(lambda *a: calls.append(1))  # one call per backbone forward
    sizes = step_sizes(64, steps, "cosine")
    out = generate_parallel(model, torch.tensor([1, 2]), sizes, rule, _orders(2), SamplingConfig(cfg_scale=2.0),
                            geometry=GEOM)
    assert len(calls) == steps == out.forwards
    # every token sampled exactly once, by the step the schedule says, whole blocks in raster order
    assert torch.equal(out.order.sort(-1).values, torch.arange(64).expand(2, -1))
    counts = torch.stack([torch.bincount(r, minlength=steps) for r in out.step_of])
    assert torch.equal(counts, torch.tensor(sizes).expand(2, -1))
    blocks = GEOM.token_block[out.order].view(2, 16, 4)
    assert bool((blocks == blocks[..., :1]).all())  # the order is blocks, each whole
    assert torch.equal(out.order, GEOM.token_order(blocks[..., 0]))


def test_decode_step_and_append_query_match_explicit_forwards():
    model = randomized_gpt(seed=4)
    B = 2
    cond, x, order = torch.tensor([3, 5]), torch.randint(0, 256, (B, 64), generator=torch.Generator().manual_seed(0)), _orders(B)
    seq = x.gather(1, order)
    state = model.init_state(cond)
    model.advance(state, order[:, 0])
    model.feed(state, seq[:, 0], order[:, 0])
    # commit tokens 0..3 (0 pending, 1..3 passed along) and predict 4..9 in one forward
    logits, _ = model.decode_step(state, order[:, 4:10], seq[:, 1:4], order[:, 1:4])
    for q in range(6):
        ref, _ = model.forward_sequence(cond, seq[:, :4], order[:, :4], torch.cat([order[:, :4], order[:, 4 + q:5 + q]], 1))
        torch.testing.assert_close(logits[:, q], ref[:, -1], atol=1e-5, rtol=1e-5)
    assert not bool(state.has_pending.any()) and torch.equal(state.length, torch.full((B,), 5))
    # append_query == append then query, outputs and state
    s1, s2 = model.init_state(cond), model.init_state(cond)
    a, _ = model.append(s1, seq[:, :6], order[:, :6])
    q1, _ = model.query(s1, torch.cat([order[:, 6:20], torch.full((B, 1), -1)], 1))
    b, _, q2, _ = model.append_query(s2, seq[:, :6], order[:, :6], torch.cat([order[:, 6:20], torch.full((B, 1), -1)], 1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q1, q2, atol=1e-5, rtol=1e-5)
    assert torch.equal(s1.length, s2.length) and torch.equal(s1.pending_tok, s2.pending_tok)
    for k1, k2 in zip(s1.k, s2.k):
        torch.testing.assert_close(k1[:, :, :6], k2[:, :, :6], atol=1e-5, rtol=1e-5)


def test_tokens_of_a_decision_follow_the_query_and_are_independent():
    """Chi-square goodness of fit on a vocabulary of 5 codes: two tokens sampled in one decision
    have the query's marginals, and their pair table is the product of them (fixed seed)."""
    model = randomized_gpt(seed=5, vocab_size=5, grid_h=2, grid_w=2).requires_grad_(False)
    n, L = 20000, 4
    cond = torch.full((n,), 2)
    order = torch.arange(L).expand(n, -1)
    out = generate_parallel(model, cond, [2, 2], "order", order, SamplingConfig(), torch.Generator().manual_seed(0))
    p = torch.softmax(model.query(model.init_state(cond[:1]), torch.tensor([[0, 1]]))[0][0].double(), -1)  # [2, 5]
    assert 0.3 < float(p.max()) < 0.9  # far from uniform, not degenerate
    a, b = out.tokens[:, 0], out.tokens[:, 1]
    for tok, prob in ((a, p[0]), (b, p[1])):
        obs = torch.bincount(tok, minlength=5).double()
        stat = float(((obs - n * prob) ** 2 / (n * prob)).sum())
        assert stat < chi2.ppf(0.999, df=4), (obs, n * prob)
    joint = torch.bincount(a * 5 + b, minlength=25).double()
    expect = n * (p[0][:, None] * p[1][None, :]).flatten()
    keep = expect > 5  # the usual validity rule of the test
    stat = float(((joint - expect)[keep] ** 2 / expect[keep]).sum())
    assert stat < chi2.ppf(0.999, df=int(keep.sum()) - 1)
    # the test has power: the same statistic against a wrong marginal fails
    wrong = torch.full((5,), 0.2, dtype=torch.float64)
    obs = torch.bincount(a, minlength=5).double()
    assert float(((obs - n * wrong) ** 2 / (n * wrong)).sum()) > chi2.ppf(0.999, df=4)


def test_confident_takes_the_blocks_of_lowest_mean_entropy_first():
    model = randomized_gpt(seed=6)
    cond = torch.tensor([1, 7])
    out = generate_parallel(model, cond, step_sizes(64, 8), "confident", geometry=GEOM)  # 2 blocks per step
    logits, _ = model.query(model.init_state(cond), torch.arange(64).expand(2, -1))
    logp = torch.log_softmax(logits, -1)
    ent = GEOM.pool_blocks((-(logp.exp() * logp).sum(-1))[..., None])[..., 0]  # [2, N]
    first = ent.argsort(dim=-1, stable=True)[:, :2]
    assert torch.equal(GEOM.token_block[out.order[:, :8]].view(2, 2, 4)[..., 0], first)
    # S = L: confident_first decoded token by token (a block chosen at each block boundary)
    spread = generate_parallel(model, cond, step_sizes(64, 4), "spread_confident", geometry=GEOM)
    for b in range(2):  # the 4 blocks of the first step are pairwise not 8-adjacent on the 4x4 block grid
        blk = GEOM.token_block[spread.order[b, :16]].view(4, 4)[:, 0]
        assert not bool((chebyshev_near(blk, 4) & ~torch.eye(4, dtype=torch.bool)).any())


def test_spread_pick_avoids_neighbours_and_falls_back_when_it_must():
    grid = 4
    cand = torch.arange(16)[None]
    ent = torch.arange(16, dtype=torch.float)[None]  # confidence order = raster
    pick = spread_pick(ent, cand, 4, grid)[0].tolist()
    assert pick == [0, 2, 8, 10]  # raster's first 4 would be the adjacent 0, 1, 2, 3
    assert not bool((chebyshev_near(torch.tensor(pick), grid) & ~torch.eye(4, dtype=torch.bool)).any())
    # only a 2x2 patch left: every pair is adjacent, so it falls back to confidence order
    cand = torch.tensor([[0, 1, 4, 5]])
    assert spread_pick(torch.tensor([[3.0, 0.0, 1.0, 2.0]]), cand, 3, grid)[0].tolist() == [1, 2, 3]


def test_step_sizes():
    for kind in ("equal", "cosine"):
        for S in (1, 4, 8, 16, 32, 64):
            sizes = step_sizes(64, S, kind)
            assert len(sizes) == S and sum(sizes) == 64 and min(sizes) >= 1
    assert step_sizes(64, 16) == [4] * 16 and step_sizes(10, 4) == [3, 3, 2, 2]
    cos = step_sizes(64, 8, "cosine")
    assert cos[0] < cos[-1]  # MaskGIT: few tokens first, many last
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            step_sizes(64, bad)
    with pytest.raises(ValueError, match="schedule"):
        step_sizes(64, 4, "linear")


def test_bad_orders_and_sizes_are_refused():
    model = randomized_gpt(seed=1)
    cond = torch.tensor([0])
    with pytest.raises(ValueError, match="sum to L"):
        generate_parallel(model, cond, [4] * 8, "order", torch.arange(64)[None])
    with pytest.raises(ValueError, match="permutation"):
        generate_parallel(model, cond, [4] * 16, "order", torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="rule"):
        generate_parallel(model, cond, [4] * 16, "zigzag")
    with pytest.raises(ValueError, match="geometry"):
        generate_parallel(model, cond, [4] * 16, "confident")


def test_teacher_forced_schedule_nll_is_the_factorisation_it_samples_from():
    """forced=x scores x under the schedule's factorisation: one token per step is the backbone's
    chain-rule NLL (forward_train); one step of all L tokens is the sum of the class-only marginals
    (one explicit query each); every step of a confidence rule predicts its tokens from the earlier
    steps only, so its NLL is the explicit per-step sum over the blocks it chose."""
    model = randomized_gpt(seed=8)
    B = 3
    cond, order = torch.tensor([2, 5, 9]), _orders(B, seed=4)
    x = torch.randint(0, 256, (B, 64), generator=torch.Generator().manual_seed(2))
    sc = SamplingConfig(cfg_scale=1.0)
    chain = generate_parallel(model, cond, [1] * 64, "order", order, sc, forced=x)
    assert torch.equal(chain.tokens, x)
    logp = torch.log_softmax(model.forward_train(x, cond, order).double(), -1)
    want = -logp.gather(-1, x.gather(1, order)[..., None])[..., 0].sum(1)
    torch.testing.assert_close(chain.nll, want, atol=1e-4, rtol=1e-6)

    one = generate_parallel(model, cond, [64], "order", order, sc, forced=x)
    marg = torch.stack([torch.log_softmax(model.query(model.init_state(cond), torch.full((B, 1), j))[0][:, 0].double(), -1)
                        .gather(1, x[:, j:j + 1])[:, 0] for j in range(64)], 1)
    torch.testing.assert_close(one.nll, -marg.sum(1), atol=1e-4, rtol=1e-6)
    assert bool((one.nll != chain.nll).all())  # the factorisations differ on these tokens

    conf = generate_parallel(model, cond, step_sizes(64, 8), "confident", sc=sc, geometry=GEOM, forced=x)
    total = torch.zeros(B, dtype=torch.float64)
    for b in range(B):  # replay the chosen order step by step: 8 tokens per step, each from the earlier steps
        for s in range(8):
            state = model.init_state(cond[b:b + 1])
            prev = conf.order[b:b + 1, :8 * s]
            if s:
                model.append(state, x[b:b + 1].gather(1, prev), prev)
            lg, _ = model.query(state, conf.order[b:b + 1, 8 * s:8 * s + 8])
            tgt = x[b:b + 1].gather(1, conf.order[b:b + 1, 8 * s:8 * s + 8])
            total[b] -= torch.log_softmax(lg.double(), -1).gather(-1, tgt[..., None]).sum()
    torch.testing.assert_close(conf.nll, total, atol=1e-4, rtol=1e-6)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate_parallel(model, cond, [64], "order", order, SamplingConfig(cfg_scale=2.0), forced=x)
    with pytest.raises(ValueError, match="forced"):
        generate_parallel(model, cond, [64], "order", order, sc, forced=x[:, :10])


def test_token_level_orders_are_the_documented_permutations():
    """token_raster is row-major; lattice visits the 16 stride-4 sub-lattices one after the other (a
    16-step schedule on 8x8 samples 4 tokens pairwise 4 apart per step), parity classes first."""
    from orderplan.model.parallel import ParallelSchedule, token_level_order

    assert torch.equal(token_level_order("token_raster", 8, 8), torch.arange(64))
    lat = token_level_order("lattice", 8, 8)
    assert torch.equal(lat.sort().values, torch.arange(64))
    steps = lat.view(16, 4)
    r, c = steps // 8, steps % 8
    assert bool(((r % 4) == (r[:, :1] % 4)).all() and ((c % 4) == (c[:, :1] % 4)).all())  # one sub-lattice per step
    assert steps[0].tolist() == [0, 4, 32, 36] and steps[1].tolist() == [2, 6, 34, 38]  # (0,0), then (0,2)
    orders = ParallelSchedule.parse("lattice@16").token_orders(3, GEOM, None)
    assert orders.shape == (3, 64) and torch.equal(orders[2], lat)
    with pytest.raises(ValueError, match="divisible by 4"):
        token_level_order("lattice", 6, 8)
