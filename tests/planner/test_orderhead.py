"""OrderHead (src/orderplan/planner/orderhead.py): masking invariants, the shared-weight R curriculum, the router head,
checkpoint round trips and sizes. Random weights and random observations only."""

import pytest
import torch

from orderplan.planner.orderhead import (
    OrderHead,
    OrderHeadConfig,
    load_orderhead,
    num_parameters,
    orderhead_config_for,
    save_orderhead,
)
from orderplan.model.blocks import BlockGeometry
from orderplan.infra.checkpoint import save_safetensors

GEOM = BlockGeometry(8, 8, 2)  # N = 16 blocks of T = 4 tokens, L = 64
D = 32


def small(**kw) -> OrderHead:
    torch.manual_seed(0)
    cfg = OrderHeadConfig(hidden_dim=D, d_model=32, n_heads=4, n_latents=3, **kw)
    return OrderHead(cfg).eval()


def random_obs(B: int = 6, seed: int = 0, token: bool = True) -> dict[str, torch.Tensor]:
    """Env-like observations: hidden states zero on unrevealed blocks; the last row has every block
    revealed but one, the first row none."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, GEOM.num_blocks, generator=g) < 0.5
    mask[0] = False
    mask[-1] = True
    mask[-1, 3] = False
    hidden = torch.randn(B, GEOM.num_tokens, D, generator=g) * GEOM.block_mask_to_token_mask(mask)[..., None]
    if not token:
        hidden = GEOM.pool_blocks(hidden)  # what env.hidden=block observes
    return {"hidden": hidden, "block_mask": mask}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("token", [True, False])
def test_logits_masked_exactly_on_revealed_blocks(seed, token):
    model, obs = small(), random_obs(seed=seed, token=token)
    with torch.no_grad():
        out = model(obs, R=2)
    mask = obs["block_mask"]
    assert out.logits.shape == mask.shape and out.value.shape == (mask.shape[0],)
    assert torch.equal(out.logits == float("-inf"), mask)
    assert bool(torch.isfinite(out.logits[~mask]).all())
    choice = out.logits.argmax(-1)
    assert not bool(mask.gather(1, choice[:, None]).any())
    assert int(choice[-1]) == 3  # the only unrevealed block of the last row


def test_never_selects_revealed_block_with_planted_weights():
    model, obs = small(), random_obs(seed=1)
    with torch.no_grad():
        # make revealed blocks look enormously attractive: a huge score for the "revealed" embedding
        # direction and huge hidden states on exactly the revealed blocks
        model.score[1].weight.fill_(1e4)
        model.state_emb.weight[1].fill_(1e4)
        obs["hidden"] = obs["hidden"] * 1e6
        out = model(obs)
    mask = obs["block_mask"]
    assert torch.equal(out.logits == float("-inf"), mask)
    assert not bool(mask.gather(1, out.logits.argmax(-1)[:, None]).any())


def test_token_hidden_is_pooled_to_its_block_means():
    """Token hidden states whose block means are known by construction (a value per block plus
    per-token offsets that cancel inside each block) plan exactly like those block means."""
    B, T = 4, GEOM.tokens_per_block
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(B, GEOM.num_blocks, generator=g) < 0.5
    block_value = torch.randn(B, GEOM.num_blocks, D, generator=g) * mask[..., None]  # [B, N, D]
    half = torch.randn(B, GEOM.num_blocks, T // 2, D, generator=g)
    offsets = torch.cat([half, -half], 2) * mask[..., None, None]  # [B, N, T, D], zero sum over T
    # block n = 4r + c of the 4x4 block grid holds tokens (2r + i) * 8 + 2c + j, t = 2i + j
    tiles = (block_value[:, :, None] + offsets).view(B, 4, 4, 2, 2, D)  # [B, r, c, i, j, D]
    hidden = tiles.permute(0, 1, 3, 2, 4, 5).reshape(B, GEOM.num_tokens, D)  # raster [B, L, D]
    model = small()
    with torch.no_grad():
        a = model({"hidden": hidden, "block_mask": mask})
        b = model({"hidden": block_value, "block_mask": mask})
        # a wrong pooling (4 consecutive raster tokens per block) must give another plan
        wrong = model({"hidden": hidden.view(B, GEOM.num_blocks, T, D).mean(2), "block_mask": mask})
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.value, b.value)
    assert not torch.allclose(wrong.logits[~mask], b.logits[~mask], atol=1e-3)


def test_R_runs_on_the_same_parameters_and_is_used():
    model, obs = small(R=1), random_obs(seed=3)
    keys = set(model.state_dict())
    n = num_parameters(model)
    with torch.no_grad():
        outs = {R: model(obs, R=R) for R in (0, 1, 2, 4)}
        default = model(obs)
        z0 = model.pool(model.latent_queries.expand(obs["hidden"].shape[0], -1, -1),
                        model.block_features(obs["hidden"], obs["block_mask"]))
    assert set(model.state_dict()) == keys and num_parameters(model) == n
    torch.testing.assert_close(default.logits, outs[1].logits)
    torch.testing.assert_close(outs[0].latents, z0)  # R=0: z_R = z0
    live = ~obs["block_mask"]
    for r1, r2 in ((0, 1), (1, 2), (2, 4)):
        assert not torch.allclose(outs[r1].logits[live], outs[r2].logits[live]), (r1, r2)
        assert not torch.allclose(outs[r1].latents, outs[r2].latents), (r1, r2)
    with pytest.raises(ValueError, match="R must be >= 0"):
        model(obs, R=-1)


def test_router_head_and_enable_router_keep_weights():
    obs = random_obs(seed=4)
    plain = small()
    assert plain(obs).budget_logits is None and not plain.has_router
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with torch.no_grad():
        ref = plain(obs)
    plain.enable_router([1, 2, 4])
    after = plain.state_dict()
    assert plain.cfg.budgets == [1, 2, 4] and plain.has_router
    assert set(after) - set(before) and all(k.startswith("router.") for k in set(after) - set(before))
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        out = plain(obs)
    assert out.budget_logits.shape == (obs["hidden"].shape[0], 3)
    torch.testing.assert_close(out.logits, ref.logits)  # the router changes no other output
    router = plain.router
    plain.enable_router([1, 2, 4])  # same budgets: keeps the trained head
    assert plain.router is router
    assert small(budgets=[1, 2]).router is not None
    with pytest.raises(ValueError, match="budgets"):
        plain.enable_router([0, 2])


def test_save_load_round_trip(tmp_path):
    model, obs = small(budgets=[1, 2, 4]), random_obs(seed=5)
    path = save_orderhead(model, tmp_path / "oh.safetensors", {"stage": "bc", "step": 7})
    loaded = load_orderhead(path, hidden_dim=D, geometry=GEOM)
    assert loaded.cfg == model.cfg and not loaded.training
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    with torch.no_grad():
        a, b = model(obs, R=2), loaded(obs, R=2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_checkpoint_saved_with_R1_runs_with_R4(tmp_path):
    model, obs = small(R=1), random_obs(seed=6)
    path = save_orderhead(model, tmp_path / "r1.safetensors")
    loaded = load_orderhead(path)
    assert loaded.cfg.R == 1 and set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(obs, R=4).logits, model(obs, R=4).logits)


def test_mismatched_config_fails_clearly(tmp_path):
    model = small()
    path = save_orderhead(model, tmp_path / "oh.safetensors")
    with pytest.raises(ValueError, match=r"\(D, grid_h, grid_w, block\)"):
        load_orderhead(path, hidden_dim=2 * D)
    with pytest.raises(ValueError, match=r"\(D, grid_h, grid_w, block\)"):
        load_orderhead(path, geometry=BlockGeometry(8, 8, 4))
    with pytest.raises(ValueError, match="hidden must be"):
        model(random_obs() | {"hidden": torch.zeros(6, 64, 2 * D)})
    # weights that do not fit the config in the metadata (a hand-edited or foreign file)
    bad = dict(model.cfg.to_dict(), hidden_dim=2 * D)
    meta = {"format": "orderhead/v1", "orderhead_config": bad}
    save_safetensors(model.state_dict(), tmp_path / "bad.safetensors", meta)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_orderhead(tmp_path / "bad.safetensors")
    save_safetensors(model.state_dict(), tmp_path / "foreign.safetensors", {})
    with pytest.raises(ValueError, match="not an OrderHead checkpoint"):
        load_orderhead(tmp_path / "foreign.safetensors")


def test_parameter_counts_in_documented_range():
    # documented in orderhead_config_for: tiny 0.43 M, GPT-B 4.0 M
    tiny = OrderHead(orderhead_config_for(128, GEOM))
    assert OrderHeadConfig() == tiny.cfg  # the dataclass defaults are the tiny backbone's
    assert 300_000 <= num_parameters(tiny) <= 600_000
    gpt_b = OrderHead(orderhead_config_for(768, BlockGeometry(16, 16, 4)))
    assert gpt_b.cfg.d_model == 384
    assert 2_000_000 <= num_parameters(gpt_b) <= 8_000_000


def test_class_conditioning_changes_the_empty_state_plan():
    """At the empty state the hidden states are all zero: only the label can tell the planner where
    to start, so a class-conditioned planner must use it (and insist on getting it)."""
    from orderplan.model.blocks import BlockGeometry

    cfg = orderhead_config_for(32, BlockGeometry(8, 8, 2), d_model=64, n_heads=4, num_classes=10)
    model = OrderHead(cfg).eval()
    hidden, mask = torch.zeros(2, 64, 32), torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="label"):
        model.plan(hidden, mask)
    out = model.plan(hidden, mask, label=torch.tensor([1, 7]))
    assert not torch.allclose(out.logits[0], out.logits[1])
