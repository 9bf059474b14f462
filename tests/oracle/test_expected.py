"""The expected oracle (orderplan.oracle.expected): the cached, batched û(a|S) == the no-cache naive
reference for the same samples; samples come from p(x_a | x_S) (log-probabilities and frequencies);
chunking, seeds and given samples reproduce results; the cost count and validation; and û(a|S)
reduces to sum_{j in a} H_j(S) for a model whose predictions ignore the context."""

import pytest
import torch

from orderplan.oracle.expected import (
    expected_utilities,
    naive_expected_utilities,
    sample_candidate_blocks,
)
from orderplan.model.blocks import BlockGeometry
from orderplan.oracle.future_loss import unseen_token_entropy
from orderplan.model.gpt import GPT, DecodeState
from tests.conftest import randomized_gpt

ATOL = 1e-4
GEOM = BlockGeometry(8, 8, 2)  # the tiny preset's 8 x 8 grid: N = 16 blocks of T = 4 tokens
K = 2


class Prefix:
    """Rows with `n_blocks[b]` blocks revealed in a random order: the cached state, the same prefix
    as explicit token sequences in reveal order (for the naive reference) and the revealed mask."""

    def __init__(self, gpt: GPT, n_blocks: list[int], seed: int = 0, geom: BlockGeometry = GEOM):
        g = torch.Generator().manual_seed(seed)
        cfg, B, T = gpt.cfg, len(n_blocks), geom.tokens_per_block
        x = torch.randint(0, cfg.vocab_size, (B, cfg.num_tokens), generator=g)
        self.cond = torch.randint(0, cfg.num_classes, (B,), generator=g)
        order = torch.stack([torch.randperm(geom.num_blocks, generator=g) for _ in range(B)])  # [B, N]
        k = torch.tensor(n_blocks)
        self.state = gpt.init_state(self.cond)
        with torch.no_grad():
            for step in range(int(k.max()) if B else 0):
                pos = geom.block_tokens[order[:, step]]
                gpt.append(self.state, x.gather(1, pos), pos, active=step < k)
        self.revealed = torch.zeros(B, geom.num_blocks, dtype=torch.bool)
        self.prefix_pos = torch.full((B, int(k.max()) * T), -1, dtype=torch.long)
        for b in range(B):
            self.revealed[b, order[b, : n_blocks[b]]] = True
            pos = geom.block_tokens[order[b, : n_blocks[b]]].flatten()
            self.prefix_pos[b, : pos.numel()] = pos
        self.prefix_tok = x.gather(1, self.prefix_pos.clamp(min=0))


def _assert_state_equal(a: DecodeState, b: DecodeState) -> None:
    for x, y in zip(a.k + a.v, b.k + b.v):
        assert torch.equal(x, y)
    for name in ("length", "pending_tok", "pending_pos", "has_pending", "cond"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _finite_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    """Equal -inf patterns and close finite values."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=atol, rtol=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- cached == naive -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_blocks", [[0, 0], [3, 3], [0, 5, 2, 15]], ids=["empty", "prefix", "ragged"])
def test_expected_utilities_equal_naive(gpt, n_blocks):
    p = Prefix(gpt, n_blocks, seed=len(n_blocks) + sum(n_blocks))
    before = p.state.clone()
    res = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, generator=_gen(0))
    _assert_state_equal(p.state, before)
    B, N, T = len(n_blocks), GEOM.num_blocks, GEOM.tokens_per_block
    C = max(N - n for n in n_blocks)
    assert res.util.shape == (B, N) and res.util.dtype == torch.float32
    assert res.samples.shape == (B, C, K, T) and res.sample_logp.shape == (B, C, K)
    assert torch.equal(torch.isinf(res.util), p.revealed)  # -inf exactly on the revealed blocks
    assert bool((res.util[p.revealed] < 0).all())
    # entropy: H_j(S) on the unseen tokens, 0 on revealed ones
    unseen = GEOM.block_mask_to_token_mask(~p.revealed)
    assert torch.equal(res.entropy != 0, unseen)
    ref_util, ref_logp = naive_expected_utilities(gpt, p.cond, p.prefix_tok, p.prefix_pos, GEOM,
                                                  res.candidates, res.samples)
    _finite_close(res.util, ref_util, ATOL * 10)  # sums of ~60 entropies
    torch.testing.assert_close(res.sample_logp, ref_logp, atol=ATOL, rtol=0)
    assert res.util[~p.revealed].std() > 1e-2  # the blocks are actually told apart


def test_sampler_logp_and_branches(gpt):
    """sample_candidate_blocks: log p(sample | x_S) == the naive explicit forward of the same
    samples (so each token was drawn from, and scored by, the right conditional); the branched
    state sits after the sampled block; padding is left alone."""
    p = Prefix(gpt, [2, 7], seed=21)
    cand = torch.stack([torch.nonzero(~r).flatten()[[4, 1, 0]] for r in p.revealed])
    cand[1, 2] = -1
    before = p.state.clone()
    samples, logp, branch = sample_candidate_blocks(gpt, p.state, cand, GEOM, K=3, generator=_gen(1))
    _assert_state_equal(p.state, before)
    assert samples.shape == (2, 3, 3, GEOM.tokens_per_block) and logp.shape == (2, 3, 3)
    _, ref_logp = naive_expected_utilities(gpt, p.cond, p.prefix_tok, p.prefix_pos, GEOM, cand, samples)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    assert bool((logp[cand >= 0] < 0).all()) and logp[1, 2].abs().max() == 0
    # branch rows b-major, then c, then k; real branches hold the block, the last token pending
    assert branch.batch_size == 2 * 3 * 3
    rows = torch.arange(2).repeat_interleave(9)
    flat_c, flat_s = cand.repeat_interleave(3, 1).flatten(), samples.flatten(0, 2)
    real = flat_c >= 0
    T = GEOM.tokens_per_block
    assert torch.equal(branch.length[real], p.state.length[rows[real]] + T)
    assert torch.equal(branch.pending_pos[real], GEOM.block_tokens[flat_c[real], -1])
    assert torch.equal(branch.pending_tok[real], flat_s[real, -1])
    assert torch.equal(branch.length[~real], p.state.length[rows[~real]])
    assert torch.equal(branch.pending_tok[~real], p.state.pending_tok[rows[~real]])


# -- reproducibility: chunks, seeds, given samples -----------------------------------------------


def test_chunks_given_samples_and_state_unchanged(gpt):
    p = Prefix(gpt, [1, 6, 3], seed=31)
    before = p.state.clone()
    sampled = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, generator=_gen(2))
    full = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, samples=sampled.samples)
    for chunk in (1, 2):
        res = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, samples=sampled.samples, chunk=chunk)
        _finite_close(res.util, full.util, 1e-4)
        torch.testing.assert_close(res.sample_logp, full.sample_logp, atol=1e-5, rtol=0)
        assert torch.equal(res.samples, full.samples) and torch.equal(res.forwards, full.forwards)
        torch.testing.assert_close(res.entropy, full.entropy, atol=0, rtol=0)
    # a sampled (not given) chunked run draws its own samples but scores them the same way
    res = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, generator=_gen(2), chunk=2)
    again = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, samples=res.samples)
    _finite_close(res.util, again.util, 1e-4)
    _assert_state_equal(p.state, before)


def test_seeds(gpt):
    p = Prefix(gpt, [0, 4], seed=41)
    a = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, generator=_gen(7))
    b = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, generator=_gen(7))
    c = expected_utilities(gpt, p.state, p.revealed, GEOM, K=K, generator=_gen(8))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.util, b.util)
    assert torch.equal(a.sample_logp, b.sample_logp)
    real = a.candidates >= 0
    assert not torch.equal(a.samples[real], c.samples[real])
    assert not torch.equal(a.util, c.util)  # the Monte-Carlo term depends on the draw


def test_given_samples_reproduce_sampled_run(gpt):
    """Feeding the sampled run's samples back (teacher-forced with one `append` per block instead of
    token-by-token `advance`/`feed`) gives its util and log-probabilities: same numbers up to float
    rounding (the two paths batch the same arithmetic differently), far below any sample-to-sample
    difference."""
    p = Prefix(gpt, [2, 9], seed=51)
    run = expected_utilities(gpt, p.state, p.revealed, GEOM, K=3, generator=_gen(3))
    again = expected_utilities(gpt, p.state, p.revealed, GEOM, K=3, samples=run.samples)
    assert torch.equal(again.samples, run.samples) and torch.equal(again.candidates, run.candidates)
    _finite_close(again.util, run.util, 1e-4)
    torch.testing.assert_close(again.sample_logp, run.sample_logp, atol=1e-5, rtol=0)
    # the tolerance is meaningful: a fresh draw moves the utilities by far more than it
    other = expected_utilities(gpt, p.state, p.revealed, GEOM, K=3, generator=_gen(4))
    fin = torch.isfinite(run.util)
    assert (other.util[fin] - run.util[fin]).abs().max() > 1e-2
    # and another set of samples given is not silently ignored
    shuffled = expected_utilities(gpt, p.state, p.revealed, GEOM, K=3, samples=other.samples)
    _finite_close(shuffled.util, other.util, 1e-4)


# -- the samples follow p(x_a | x_S) ----------------------------------------------------------------


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_samples_follow_the_model():
    """Empirical frequencies of K = 4000 sampled blocks at the empty state == the model's
    probabilities, for the block's first token and for the joint of its first two tokens.

    Bound: with n draws the expected TV of an empirical distribution over m cells is at most
    0.5 * sqrt(2 / pi) * sum_v sqrt(p_v / n) <= 0.4 * sqrt(m / n): 0.018 for the first token (m = 8),
    0.05 for the pair (m = 64). We allow 0.05 and 0.1 (about 2.5x and 2x the mean, with a fixed
    seed); sampling from a wrong conditional (e.g. the block's tokens independently) moves the pair
    by more (asserted below)."""
    gpt = randomized_gpt(seed=5, vocab_size=8, grid_h=4, grid_w=4)
    geom = BlockGeometry(4, 4, 2)
    V, n, a = gpt.cfg.vocab_size, 4000, 3
    state = gpt.init_state(torch.tensor([2]))
    with torch.no_grad():
        samples, _, _ = sample_candidate_blocks(gpt, state, torch.tensor([[a]]), geom, K=n, generator=_gen(9))
        blk = geom.block_tokens[a]
        p1 = gpt.query(state, blk[None, :1])[0][0, 0].softmax(-1)  # p(x_blk0 | x_S): [V]
        # p(x_blk1 | x_S, x_blk0 = v) for every v: V branches of the state
        br = state.select(torch.zeros(V, dtype=torch.long))
        gpt.advance(br, blk[:1].expand(V))
        gpt.feed(br, torch.arange(V), blk[:1].expand(V))
        p2 = gpt.query(br, blk[1:2].expand(V, 1))[0][:, 0].softmax(-1)  # [V, V]
        q2 = gpt.query(state, blk[None, 1:2])[0][0, 0].softmax(-1)  # p(x_blk1 | x_S), ignoring x_blk0
    first = torch.bincount(samples[0, 0, :, 0], minlength=V).float() / n
    pair = torch.bincount(samples[0, 0, :, 0] * V + samples[0, 0, :, 1], minlength=V * V).float() / n
    joint = (p1[:, None] * p2).flatten()
    assert _tv(p1, torch.full((V,), 1.0 / V)) > 0.1  # the model is not near-uniform: the check has teeth
    assert _tv(first, p1) < 0.05
    assert _tv(pair, joint) < 0.1
    assert _tv(joint, (p1[:, None] * q2[None, :]).flatten()) > 0.1  # independent tokens would fail


# -- cost count and validation ---------------------------------------------------------------------


def test_forwards_and_finished_rows(gpt):
    p = Prefix(gpt, [0, 16, 5, 15], seed=61)
    res = expected_utilities(gpt, p.state, p.revealed, GEOM, K=3, generator=_gen(5))
    n_free = (~p.revealed).sum(1)
    assert torch.equal(res.forwards, 1 + 3 * n_free)  # 0 extra for the finished row
    assert res.forwards.tolist() == [49, 1, 34, 4]
    assert bool(torch.isinf(res.util[1]).all()) and bool((res.util[1] < 0).all())
    assert torch.equal(torch.isinf(res.util), p.revealed)
    assert res.entropy[1].abs().max() == 0 and res.sample_logp[1].abs().max() == 0
    # a last block: û = its own entropy sum (nothing is left unseen after it)
    last = int(torch.nonzero(~p.revealed[3]))
    torch.testing.assert_close(res.util[3, last], res.entropy[3].sum(), atol=1e-5, rtol=0)
    # explicit candidates with padding: only real ones cost
    cand = torch.tensor([[0, 1], [-1, -1], [-1, -1], [last, -1]])
    cand[2, 0] = int(torch.nonzero(~p.revealed[2])[0])
    sub = expected_utilities(gpt, p.state, p.revealed, GEOM, K=3, candidates=cand, generator=_gen(5))
    assert sub.forwards.tolist() == [7, 1, 4, 4]
    assert torch.equal(torch.isfinite(sub.util).sum(1), (cand >= 0).sum(1))
    # every row finished: nothing to score
    done = Prefix(gpt, [16], seed=62)
    res = expected_utilities(gpt, done.state, done.revealed, GEOM, K=2)
    assert res.samples.shape == (1, 0, 2, 4) and bool(torch.isinf(res.util).all()) and res.forwards.tolist() == [1]


def test_validation(gpt):
    p = Prefix(gpt, [3, 1], seed=71)
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="K"):
            expected_utilities(gpt, p.state, p.revealed, GEOM, K=bad_k)
    with pytest.raises(ValueError, match="K"):
        sample_candidate_blocks(gpt, p.state, torch.zeros(2, 1, dtype=torch.long), GEOM, K=0)
    done = torch.nonzero(p.revealed[1]).flatten()[:1]  # revealed in row 1 only
    cand = torch.stack([torch.nonzero(~p.revealed[0]).flatten()[:1], done])
    with pytest.raises(ValueError, match=r"already revealed in rows \[1\]"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, candidates=cand)
    with pytest.raises(ValueError, match="candidate block ids"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, candidates=torch.tensor([[16], [0]]))
    with pytest.raises(ValueError, match="candidates must be a long tensor"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, candidates=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="revealed must be a bool tensor"):
        expected_utilities(gpt, p.state, p.revealed.long(), GEOM, K=2)
    with pytest.raises(ValueError, match="revealed must be a bool tensor"):
        expected_utilities(gpt, p.state, p.revealed[:, :8], GEOM, K=2)
    with pytest.raises(ValueError, match="chunk"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, chunk=0)
    C = int((~p.revealed).sum(1).max())
    good = torch.zeros(2, C, 2, 4, dtype=torch.long)
    expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, samples=good)  # the right shape passes
    with pytest.raises(ValueError, match=r"samples must be a long tensor \[B, C, K, T\]"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=3, samples=good)  # K disagrees
    with pytest.raises(ValueError, match=r"samples must be a long tensor \[B, C, K, T\]"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, samples=good[..., :3])
    with pytest.raises(ValueError, match=r"samples must be a long tensor \[B, C, K, T\]"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, samples=good.float())
    bad = good.clone()
    bad[1, 0, 1, 2] = gpt.cfg.vocab_size
    with pytest.raises(ValueError, match=r"token ids in \[0, 256\); \(row, slot\) \[\[1, 0\]\]"):
        expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, samples=bad)


# -- invariants ------------------------------------------------------------------------------------


def test_context_free_model_gives_own_entropy():
    """If every prediction ignores the context, H_j(S + a) = H_j(S), so
    û(a|S) = sum_{j in R} H_j(S) - sum_{j in R \\ a} H_j(S) = sum_{j in a} H_j(S) for every draw.
    Such a GPT: zero `wo` in every layer (no position reads another) and zero token and class
    embeddings (the input of a row is then ta(target) alone, so only the target position matters)."""
    gpt = randomized_gpt(seed=6)
    with torch.no_grad():
        for layer in gpt.layers:
            layer.attention.wo.weight.zero_()
        gpt.tok_embeddings.weight.zero_()
        gpt.cls_embedding.embedding_table.weight.zero_()
    p = Prefix(gpt, [0, 4, 11], seed=81)
    res = expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, generator=_gen(6))
    own = res.entropy[:, GEOM.block_tokens].sum(-1)  # [B, N]: sum_{j in a} H_j(S)
    fin = ~p.revealed
    torch.testing.assert_close(res.util[fin], own[fin], atol=1e-4, rtol=0)
    assert own[fin].std() > 1e-3  # blocks differ, so a wrong block's entropy would be caught
    # H_j itself is context-free here: the same at every state
    both = (res.entropy[0] != 0) & (res.entropy[1] != 0) & (res.entropy[2] != 0)
    assert int(both.sum()) >= 4
    torch.testing.assert_close(res.entropy[0, both], res.entropy[1, both], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.entropy[0, both], res.entropy[2, both], atol=1e-5, rtol=0)


def test_token_blind_model_is_exact_with_any_samples():
    """A GPT that sees positions but not token values (zero token / class embeddings, attention
    kept): H_j(S ∪ {x_a = anything}) does not depend on the sample, so û(a|S) is the same for any
    draw and equals sum_R H_j(S) - sum_{R \\ a} H_j(S + a) with S + a built by a real `append`."""
    gpt = randomized_gpt(seed=7)
    with torch.no_grad():
        gpt.tok_embeddings.weight.zero_()
        gpt.cls_embedding.embedding_table.weight.zero_()
    p = Prefix(gpt, [2, 6], seed=91)
    a = expected_utilities(gpt, p.state, p.revealed, GEOM, K=2, generator=_gen(10))
    b = expected_utilities(gpt, p.state, p.revealed, GEOM, K=1, generator=_gen(11))
    _finite_close(a.util, b.util, 1e-4)
    assert not torch.equal(a.samples[:, :, :1], b.samples)
    unseen = GEOM.block_mask_to_token_mask(~p.revealed)
    for blk in [int(torch.nonzero(~p.revealed[0])[0]), int(torch.nonzero(~p.revealed[0])[-1])]:
        if p.revealed[1, blk]:
            continue
        nxt = p.state.clone()
        pos = GEOM.block_tokens[blk].expand(2, -1)
        with torch.no_grad():
            gpt.append(nxt, torch.zeros_like(pos), pos)
        rest = unseen.clone()
        rest[:, pos[0]] = False
        expected = unseen_token_entropy(gpt, p.state, unseen).sum(1) - unseen_token_entropy(gpt, nxt, rest).sum(1)
        torch.testing.assert_close(a.util[:, blk], expected, atol=1e-4, rtol=0)
    assert a.util[torch.isfinite(a.util)].std() > 1e-3
