"""Invariants of the any-order GPT: cached decoding == full recompute, query rows == explicit
forwards, raster with a zero target-aware table == LlamaGen's plain causal forward, LlamaGen names."""

import argparse

import pytest
import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.model.gpt import GPT, GPTConfig, gpt_config, rope_table_2d
from orderplan.model.loading import load_gpt, save_gpt
from orderplan.model.orders import block_order
from tests.model.llamagen_reference import llamagen_forward, llamagen_freqs_cis_2d
from tests.conftest import randomized_gpt

ATOL = 1e-5


def _data(model: GPT, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randint(0, cfg.vocab_size, (B, cfg.num_tokens), generator=g)
    c = torch.randint(0, cfg.num_classes + 1, (B,), generator=g)  # null class included
    geom = BlockGeometry(cfg.grid_h, cfg.grid_w, 2)
    order = geom.token_order(block_order("random", geom, batch=B, generator=g))
    return x, c, geom, order


def test_cached_block_appends_equal_full_recompute(gpt):
    x, c, geom, order = _data(gpt, B=3)
    seq = x.gather(1, order)
    with torch.no_grad():
        full = gpt.forward_train(x, c, order)
        state = gpt.init_state(c)
        T = geom.tokens_per_block
        inc = torch.cat([gpt.append(state, seq[:, t:t + T], order[:, t:t + T])[0]
                         for t in range(0, seq.shape[1], T)], 1)
    torch.testing.assert_close(inc, full, atol=ATOL, rtol=0)


def test_token_by_token_advance_feed_equals_full_recompute(gpt):
    x, c, _, order = _data(gpt, B=2, seed=1)
    seq = x.gather(1, order)
    with torch.no_grad():
        full = gpt.forward_train(x, c, order)
        state = gpt.init_state(c)
        steps = []
        for t in range(seq.shape[1]):
            logits, _ = gpt.advance(state, order[:, t])
            steps.append(logits)
            gpt.feed(state, seq[:, t], order[:, t])
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=ATOL, rtol=0)


def test_rows_at_different_lengths_stay_exact(gpt):
    """Rows that skip an append (active=False) keep their state; their later appends stay exact."""
    x, c, geom, order = _data(gpt, B=3, seed=2)
    seq = x.gather(1, order)
    T = geom.tokens_per_block
    with torch.no_grad():
        full = gpt.forward_train(x, c, order)
        state = gpt.init_state(c)
        got = [[] for _ in range(3)]
        cursor = torch.zeros(3, dtype=torch.long)
        # row 1 is held back on even rounds, so rows drift apart in length
        for rnd in range(4 * geom.num_blocks):
            active = torch.tensor([True, rnd % 2 == 1, True]) & (cursor < seq.shape[1])
            if not active.any():
                continue
            idx = cursor[:, None] + torch.arange(T)
            idx = idx.clamp(max=seq.shape[1] - 1)
            logits, _ = gpt.append(state, seq.gather(1, idx), order.gather(1, idx), active=active)
            for b in range(3):
                if active[b]:
                    got[b].append(logits[b])
            cursor += active.long() * T
    for b in range(3):
        torch.testing.assert_close(torch.cat(got[b]), full[b], atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefix_tokens", [0, 1, 6, 40])
def test_query_rows_equal_explicit_forward(gpt, prefix_tokens):
    x, c, _, order = _data(gpt, B=2, seed=3)
    seq = x.gather(1, order)
    n = prefix_tokens
    with torch.no_grad():
        state = gpt.init_state(c)
        if n:
            gpt.append(state, seq[:, :n], order[:, :n])
        targets = order[:, n:]
        qlogits, qhidden = gpt.query(state, targets)
        for j in range(0, targets.shape[1], 7):
            tg = torch.cat([order[:, :n], targets[:, j:j + 1]], 1)
            ref, ref_h = gpt.forward_sequence(c, seq[:, :n], order[:, :n], tg)
            torch.testing.assert_close(qlogits[:, j], ref[:, -1], atol=ATOL, rtol=0)
            torch.testing.assert_close(qhidden[:, j], ref_h[:, -1], atol=ATOL, rtol=0)
        # the query did not change the state: appending afterwards is still exact
        if n < seq.shape[1]:
            logits, _ = gpt.append(state, seq[:, n:n + 1], order[:, n:n + 1])
            torch.testing.assert_close(logits[:, 0], qlogits[:, 0], atol=ATOL, rtol=0)


def test_zero_ta_raster_equals_llamagen_causal_forward(gpt):
    cfg = gpt.cfg
    with torch.no_grad():
        gpt.ta_pos_table.weight.zero_()
        x, c, _, _ = _data(gpt, B=2, seed=4)
        ours = gpt.forward_train(x, c, order=None, use_ta=True)
        ref = llamagen_forward(gpt.state_dict(), x, c, cfg.n_layer, cfg.n_head, cfg.grid_h, cfg.norm_eps)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_target_aware_embedding_is_used(gpt):
    """Same prefix, different next position: the ta table must change the prediction (RAR's fix of
    the ambiguous-target problem); with ta off, LlamaGen's raster forward ignores the table."""
    x, c, _, order = _data(gpt, B=1, seed=5)
    seq = x.gather(1, order)
    with torch.no_grad():
        a, _ = gpt.forward_sequence(c, seq[:, :5], order[:, :5], order[:, :6])
        alt = order[:, :6].clone()
        alt[:, 5] = order[:, 9]
        b, _ = gpt.forward_sequence(c, seq[:, :5], order[:, :5], alt)
        assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3
        on = gpt.forward_train(x, c, None, use_ta=True)
        off = gpt.forward_train(x, c, None, use_ta=False)
        assert (on - off).abs().max() > 1e-3
        ref = llamagen_forward(gpt.state_dict(), x, c, gpt.cfg.n_layer, gpt.cfg.n_head, gpt.cfg.grid_h)
        torch.testing.assert_close(off, ref, atol=ATOL, rtol=0)


def test_rope_table_matches_llamagen_and_is_spatial():
    table = rope_table_2d(16, 16, 64, 10000.0)
    torch.testing.assert_close(table, llamagen_freqs_cis_2d(16, 64))
    # position p = 3 * 16 + 5: first half of the pairs rotated by row 3, second half by column 5
    row = rope_table_2d(16, 16, 64, 10000.0)[1 + 3 * 16 + 5]
    assert torch.allclose(row[:16], table[1 + 3 * 16 + 0][:16])  # same row
    assert torch.allclose(row[16:], table[1 + 0 * 16 + 5][16:])  # same column
    assert torch.count_nonzero(table[0]) == 0  # class token: cos = sin = 0


# LlamaGen GPT-B, from its gpt.py: dim 768, 12 layers, 12 heads, FFN 2048, vocab 16384, 1000 classes + null.
def _llamagen_gpt_b_shapes() -> dict[str, tuple[int, ...]]:
    d, ffn, V = 768, 2048, 16384
    shapes = {"cls_embedding.embedding_table.weight": (1001, d), "tok_embeddings.weight": (V, d),
              "norm.weight": (d,), "output.weight": (V, d)}
    for i in range(12):
        p = f"layers.{i}."
        shapes.update({p + "attention.wqkv.weight": (3 * d, d), p + "attention.wo.weight": (d, d),
                       p + "feed_forward.w1.weight": (ffn, d), p + "feed_forward.w3.weight": (ffn, d),
                       p + "feed_forward.w2.weight": (d, ffn), p + "attention_norm.weight": (d,),
                       p + "ffn_norm.weight": (d,)})
    return shapes


def test_gpt_b_state_dict_matches_llamagen():
    with torch.device("meta"):
        model = GPT(gpt_config("GPT-B"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _llamagen_gpt_b_shapes()
    assert ours.pop("ta_pos_table.weight") == (256, 768)
    assert ours == expected
    assert sum(int(torch.tensor(s).prod()) for s in expected.values()) == 110_888_448  # LlamaGen: "111M"
    for preset, (layers, dim, ffn) in {"GPT-L": (24, 1024, 2816), "GPT-XL": (36, 1280, 3584)}.items():
        cfg = gpt_config(preset)
        assert (cfg.n_layer, cfg.dim, cfg.ffn_hidden) == (layers, dim, ffn)


def _llamagen_file(tmp_path, model: GPT, drop=(), reshape=None, extra=None):
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "ta_pos_table.weight" and k not in drop}
    if reshape:
        sd[reshape] = torch.zeros(3, 3)
    ckpt = {"model": sd, **(extra or {})}
    path = tmp_path / "c2i_tiny.pt"
    torch.save(ckpt, path)
    return path


def test_llamagen_checkpoint_round_trips(tmp_path):
    src = randomized_gpt(seed=7)
    path = _llamagen_file(tmp_path, src)
    loaded = load_gpt(path, src.cfg).eval()
    for k, v in src.state_dict().items():
        if k != "ta_pos_table.weight":
            assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.count_nonzero(loaded.ta_pos_table.weight) == 0  # missing -> zero-initialised no-op
    x, c, _, _ = _data(src, B=2)
    with torch.no_grad():
        ref = llamagen_forward(src.state_dict(), x, c, src.cfg.n_layer, src.cfg.n_head, src.cfg.grid_h)
        torch.testing.assert_close(loaded.forward_train(x, c, None, use_ta=False), ref, atol=ATOL, rtol=0)


def test_bad_llamagen_checkpoints_fail_clearly(tmp_path):
    src = randomized_gpt(seed=8)
    with pytest.raises(ValueError, match="layers.1.feed_forward.w2.weight"):
        load_gpt(_llamagen_file(tmp_path, src, drop=("layers.1.feed_forward.w2.weight",)), src.cfg)
    with pytest.raises(ValueError, match="norm.weight"):
        load_gpt(_llamagen_file(tmp_path, src, reshape="norm.weight"), src.cfg)
    with pytest.raises(ValueError, match="weights_only"):
        load_gpt(_llamagen_file(tmp_path, src, extra={"args": argparse.Namespace(lr=1)}), src.cfg)
    with pytest.raises(FileNotFoundError):
        load_gpt(tmp_path / "missing.pt", src.cfg)
    with pytest.raises(ValueError, match="carries no config"):
        load_gpt(_llamagen_file(tmp_path, src))


def test_safetensors_round_trip_and_config_mismatch(tmp_path):
    src = randomized_gpt(seed=9)
    save_gpt(src, tmp_path / "gpt.safetensors", {"steps": 3})
    loaded = load_gpt(tmp_path / "gpt.safetensors").eval()
    x, c, _, order = _data(src, B=2)
    with torch.no_grad():
        assert torch.equal(loaded.forward_train(x, c, order), src.forward_train(x, c, order))
    with pytest.raises(ValueError, match="n_layer"):
        load_gpt(tmp_path / "gpt.safetensors", gpt_config("tiny", n_layer=3))


def test_bad_inputs_raise_and_leave_state_unchanged(gpt):
    x, c, _, order = _data(gpt, B=2)
    state = gpt.init_state(c)
    with torch.no_grad():
        gpt.append(state, x[:, :4], order[:, :4])
        before = state.clone()
        bad = [
            (x[:, :2], torch.full((2, 2), gpt.cfg.num_tokens)),  # position out of range
            (torch.full((2, 2), gpt.cfg.vocab_size), order[:, 4:6]),  # token out of range
            (x[:1, :2], order[:1, 4:6]),  # wrong batch
            (x[:, :2], order[:, 4:7]),  # shape mismatch
        ]
        for tok, pos in bad:
            with pytest.raises(ValueError):
                gpt.append(state, tok, pos)
        with pytest.raises(ValueError, match="overflows"):
            gpt.append(state, x, order)  # 4 + 64 tokens > capacity
        assert torch.equal(state.length, before.length)
        for a, b in zip(state.k, before.k):
            assert torch.equal(a, b)
        gpt.advance(state, order[:, 4])
        with pytest.raises(ValueError, match="advance"):
            gpt.advance(state, order[:, 5])
        with pytest.raises(ValueError):
            gpt.query(state, order[:, 5:])


def test_config_validation():
    with pytest.raises(ValueError, match="preset"):
        gpt_config("GPT-Z")
    with pytest.raises(ValueError, match="multiple of 4"):
        GPT(GPTConfig(dim=30, n_head=5, grid_h=4, grid_w=4, vocab_size=8, num_classes=2))
