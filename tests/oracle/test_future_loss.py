"""Future-loss quantities: the batched, cache-sharing candidate pass == naive explicit forwards;
query-row losses == explicit forwards; oracle utilities == their definitions; nothing mutates the
decode state."""

import pytest
import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.oracle.future_loss import (
    candidate_nll,
    extrapolative_weights,
    naive_candidate_nll,
    naive_oracle_utilities,
    oracle_utilities,
    unseen_token_entropy,
    unseen_token_nll,
)
from orderplan.model.gpt import GPT, DecodeState
from orderplan.model.orders import block_order
from tests.conftest import randomized_gpt

ATOL = 1e-4
GEOM = BlockGeometry(8, 8, 2)


class Prefix:
    """A batch of images with `n_blocks[b]` blocks revealed in a random order: the cached state,
    the same prefix as explicit token sequences (for the naive reference) and the masks."""

    def __init__(self, gpt: GPT, n_blocks: list[int], seed: int = 0, device: str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        cfg, B = gpt.cfg, len(n_blocks)
        self.x = torch.randint(0, cfg.vocab_size, (B, cfg.num_tokens), generator=g)
        self.cond = torch.randint(0, cfg.num_classes + 1, (B,), generator=g)
        self.order = block_order("random", GEOM, batch=B, generator=g)  # [B, N]
        k = torch.tensor(n_blocks)
        self.state = gpt.init_state(self.cond.to(device))
        with torch.no_grad():
            for step in range(int(k.max())):
                pos = GEOM.block_tokens[self.order[:, step]]  # [B, T]
                gpt.append(self.state, self.x.gather(1, pos).to(device), pos.to(device),
                           active=(step < k).to(device))
        self.revealed = torch.zeros(B, GEOM.num_blocks, dtype=torch.bool)
        P = int(k.max()) * GEOM.tokens_per_block
        self.prefix_pos = torch.full((B, P), -1, dtype=torch.long)
        for b in range(B):
            self.revealed[b, self.order[b, : n_blocks[b]]] = True
            pos = GEOM.token_order(self.order[b])[: n_blocks[b] * GEOM.tokens_per_block]
            self.prefix_pos[b, : pos.numel()] = pos
        self.prefix_tok = self.x.gather(1, self.prefix_pos.clamp(min=0))
        self.unseen = GEOM.block_mask_to_token_mask(~self.revealed)
        self.x, self.unseen, self.revealed = self.x.to(device), self.unseen.to(device), self.revealed.to(device)

    def unrevealed_candidates(self) -> torch.Tensor:
        """[B, max unrevealed] block ids, -1 padded, in a scrambled order."""
        rows = [torch.nonzero(~r).flatten().flip(0) for r in self.revealed]
        C = max(len(r) for r in rows)
        return torch.stack([torch.cat([r, torch.full((C - len(r),), -1)]) for r in rows])


def _assert_state_equal(a: DecodeState, b: DecodeState) -> None:
    for x, y in zip(a.k + a.v, b.k + b.v):
        assert torch.equal(x, y)
    for name in ("length", "pending_tok", "pending_pos", "has_pending", "cond"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# -- l_j(S + a): batched == naive ------------------------------------------------------------------


@pytest.mark.parametrize("n_blocks", [[0, 0], [3, 3], [0, 5, 2, 15]], ids=["empty", "prefix", "ragged"])
def test_candidate_nll_equals_naive(gpt, n_blocks):
    p = Prefix(gpt, n_blocks, seed=len(n_blocks) + sum(n_blocks))
    cand = p.unrevealed_candidates()
    before = p.state.clone()
    got = candidate_nll(gpt, p.state, p.x, p.unseen, GEOM, cand)
    ref = naive_candidate_nll(gpt, p.cond, p.prefix_tok, p.prefix_pos, p.x, p.unseen, GEOM, cand)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # non-trivial: each valid candidate has a loss on every unseen token outside it
    n_rest = (p.unseen.sum(1, keepdim=True) - GEOM.tokens_per_block).expand_as(cand)
    assert torch.equal(got.count_nonzero(-1)[cand >= 0], n_rest[cand >= 0])
    _assert_state_equal(p.state, before)
    # chunked == unchunked
    torch.testing.assert_close(candidate_nll(gpt, p.state, p.x, p.unseen, GEOM, cand, chunk=3), got,
                               atol=1e-6, rtol=0)


def test_candidate_subset_with_padding_and_gqa():
    gqa = randomized_gpt(seed=3, n_kv_head=2)  # 4 query heads share 2 key/value heads
    assert gqa.layers[0].attention.n_kv_head == 2
    p = Prefix(gqa, [2, 6, 0], seed=11)
    cand = torch.full((3, 3), -1)
    for b in range(3):
        free = torch.nonzero(~p.revealed[b]).flatten()
        cand[b, : b + 1] = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(b))[: b + 1]]
    got = candidate_nll(gqa, p.state, p.x, p.unseen, GEOM, cand)
    ref = naive_candidate_nll(gqa, p.cond, p.prefix_tok, p.prefix_pos, p.x, p.unseen, GEOM, cand)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert got[cand < 0].abs().max() == 0  # padded candidates are zero
    assert got[0, 0].abs().max() > 0


def test_candidate_nll_rejects_revealed_blocks(gpt):
    p = Prefix(gpt, [2], seed=1)
    with pytest.raises(ValueError, match="revealed"):
        candidate_nll(gpt, p.state, p.x, p.unseen, GEOM, p.order[:, :1])
    with pytest.raises(ValueError, match="revealed"):
        oracle_utilities(gpt, p.state, p.x, p.revealed, GEOM, candidates=p.order[:, :1])


# -- l_j(S) and H_j(S) -----------------------------------------------------------------------------


def test_unseen_token_nll_and_entropy_equal_explicit_forward(gpt):
    p = Prefix(gpt, [0, 4, 9], seed=5)
    before = p.state.clone()
    nll = unseen_token_nll(gpt, p.state, p.x, p.unseen)
    ent = unseen_token_entropy(gpt, p.state, p.unseen, temperature=0.7)
    _assert_state_equal(p.state, before)
    assert torch.equal(nll != 0, p.unseen) and torch.equal(ent != 0, p.unseen)
    with torch.no_grad():
        for b in range(3):
            n = int((p.prefix_pos[b] >= 0).sum())
            tok, pos = p.prefix_tok[b : b + 1, :n], p.prefix_pos[b : b + 1, :n]
            for j in torch.nonzero(p.unseen[b]).flatten()[::5].tolist():
                logits, _ = gpt.forward_sequence(p.cond[b : b + 1], tok, pos,
                                                 torch.cat([pos, torch.tensor([[j]])], 1))
                logp = logits[0, -1].log_softmax(-1)
                torch.testing.assert_close(nll[b, j], -logp[p.x[b, j]], atol=ATOL, rtol=0)
                lq = (logits[0, -1] / 0.7).log_softmax(-1)
                torch.testing.assert_close(ent[b, j], -(lq.exp() * lq).sum(), atol=ATOL, rtol=0)


# -- oracle utilities ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,weight", [("future_loss", "uniform"), ("extrapolative", "uniform"),
                                         ("extrapolative", "neighbours"), ("extrapolative", "distance")])
def test_oracle_utilities_equal_naive(gpt, kind, weight):
    p = Prefix(gpt, [0, 3, 10], seed=7)
    before = p.state.clone()
    got = oracle_utilities(gpt, p.state, p.x, p.revealed, GEOM, kind=kind, weight=weight)
    _assert_state_equal(p.state, before)
    ref = naive_oracle_utilities(gpt, p.cond, p.prefix_tok, p.prefix_pos, p.x, GEOM, kind=kind, weight=weight)
    assert got.dtype == torch.float32 and got.shape == (3, GEOM.num_blocks)
    assert torch.equal(torch.isinf(got), p.revealed) and bool((got[p.revealed] < 0).all())
    torch.testing.assert_close(got, ref, atol=ATOL * 10, rtol=0)  # sums of ~60 losses
    assert got[~p.revealed].std() > 1e-3  # the blocks are actually told apart
    chunked = oracle_utilities(gpt, p.state, p.x, p.revealed, GEOM, kind=kind, weight=weight, chunk=2)
    torch.testing.assert_close(chunked, got, atol=1e-5, rtol=0)


def test_oracle_candidate_subset(gpt):
    p = Prefix(gpt, [4, 1], seed=8)
    cand = torch.stack([torch.nonzero(~r).flatten()[[2, 0]] for r in p.revealed])
    cand[1, 1] = -1
    full = oracle_utilities(gpt, p.state, p.x, p.revealed, GEOM, kind="extrapolative", weight="neighbours")
    sub = oracle_utilities(gpt, p.state, p.x, p.revealed, GEOM, kind="extrapolative", weight="neighbours",
                           candidates=cand)
    computed = torch.zeros_like(p.revealed)
    for b in range(2):
        computed[b, cand[b][cand[b] >= 0]] = True
    assert torch.equal(torch.isfinite(sub), computed)
    torch.testing.assert_close(sub[computed], full[computed], atol=1e-5, rtol=0)


def test_future_loss_utility_equals_real_append(gpt):
    """u(a|S) = L_rest(S) - L_rest(S + a) with S + a built by a real `append` on a cloned state."""
    p = Prefix(gpt, [5, 2], seed=9)
    u = oracle_utilities(gpt, p.state, p.x, p.revealed, GEOM, kind="future_loss")
    l_rest = unseen_token_nll(gpt, p.state, p.x, p.unseen).sum(1)
    for a in [int(torch.nonzero(~p.revealed[0])[0]), int(torch.nonzero(~p.revealed[0])[-1])]:
        if p.revealed[1, a]:
            continue
        nxt = p.state.clone()
        pos = GEOM.block_tokens[a].expand(2, -1)
        with torch.no_grad():
            gpt.append(nxt, p.x.gather(1, pos), pos)
        unseen_next = p.unseen.clone()
        unseen_next[:, pos[0]] = False
        expected = l_rest - unseen_token_nll(gpt, nxt, p.x, unseen_next).sum(1)
        torch.testing.assert_close(u[:, a], expected, atol=ATOL * 10, rtol=0)


def test_future_loss_telescopes_along_an_order(gpt):
    """The undiscounted return of `future_loss` is L_rest(empty) for every order (DESIGN.md 5)."""
    p = Prefix(gpt, [0, 0], seed=10)
    l_empty = unseen_token_nll(gpt, p.state, p.x, p.unseen).sum(1)
    state, revealed, ret = p.state.clone(), p.revealed.clone(), torch.zeros(2)
    for step in range(GEOM.num_blocks):
        a = p.order[:, step]
        u = oracle_utilities(gpt, state, p.x, revealed, GEOM, candidates=a[:, None])
        ret += u.gather(1, a[:, None])[:, 0]
        pos = GEOM.block_tokens[a]
        with torch.no_grad():
            gpt.append(state, p.x.gather(1, pos), pos)
        revealed[torch.arange(2), a] = True
    torch.testing.assert_close(ret, l_empty, atol=1e-3, rtol=0)


def test_extrapolative_weights():
    w = extrapolative_weights(GEOM, "neighbours", neighbour_weight=0.25)
    assert w.shape == (GEOM.num_blocks, GEOM.num_tokens)
    a = 5  # block (1, 1): 8 neighbours of 4 tokens each
    assert (w[a] == 0).sum() == 4 and (w[a] == 0.25).sum() == 32 and (w[a] == 1).sum() == 28
    d = extrapolative_weights(GEOM, "distance")
    assert d[0, GEOM.block_tokens[15]].eq(1).all()  # opposite corner: the largest weight
    assert d[0].max() == 1 and d[0, GEOM.block_tokens[0]].eq(0).all()
    assert extrapolative_weights(GEOM, "uniform")[a].sum() == GEOM.num_tokens - 4
    with pytest.raises(ValueError, match="weight"):
        extrapolative_weights(GEOM, "gaussian")


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
def test_bf16_close_to_float32(device):
    """bf16 weights and cache (softmax in float32) stay close to the float32 computation."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = randomized_gpt(seed=4).to(device=device, dtype=dtype)
        p = Prefix(model, [3, 0, 7], seed=12, device=device)
        out[dtype] = candidate_nll(model, p.state, p.x, p.unseen, GEOM, p.unrevealed_candidates())
    assert out[torch.bfloat16].dtype == torch.float32
    err = (out[torch.bfloat16] - out[torch.float32]).abs()
    assert err.max() < 0.25 and err.mean() < 0.03, (err.max(), err.mean())
