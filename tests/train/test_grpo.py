"""GRPO for the quality planner: the KL to the anchor, group-relative advantages, and groups that
share their label and noise."""

import pytest
import torch
import torch.nn.functional as F

from orderplan.planner.orderhead import OrderHead, orderhead_config_for
from orderplan.planner.policies import SampledConfidencePolicy, make_policy
from orderplan.train.grpo import categorical_kl, group_advantages, grpo_loss, masked_log_softmax
from orderplan.train.quality import play, seed_groups
from tests.conftest import toy_core


def _anchored_head(core, tau=0.1):
    cfg = orderhead_config_for(core.D, core.geom, beliefs=True, num_classes=core.gpt.cfg.num_classes, anchor_tau=tau)
    torch.manual_seed(0)
    return OrderHead(cfg).eval()


def _generate_core(B, **kw):
    from orderplan.model.sampling import SamplingConfig

    return toy_core(B, mode="generate", reward="entropy", hidden="block",
                    sampling=SamplingConfig(cfg_scale=2.0, noise="position"), **kw)


def test_a_fresh_anchored_head_is_its_anchor_and_its_kl_is_zero():
    core = _generate_core(3)
    core.reset()
    head = _anchored_head(core)
    anchor = SampledConfidencePolicy(core, tau=0.1)
    for _ in range(4):
        obs = core.observation()
        legal = obs["action_mask"]
        logits = head(obs).logits
        logp = masked_log_softmax(logits, legal)
        torch.testing.assert_close(logp, anchor.log_probs(obs), rtol=0, atol=1e-5)
        logq = masked_log_softmax(head.anchor_logits(obs["entropy"]), legal)
        assert torch.equal(categorical_kl(logp, logq, legal), torch.zeros(3))
        adv = torch.tensor([1.0, -1.0, 0.5])
        a = logits.argmax(-1)
        loss, stats = grpo_loss(logits, head.anchor_logits(obs["entropy"]), legal, a,
                                logp.gather(1, a[:, None])[:, 0], adv, 0.2, 10.0)
        assert stats.kl == 0.0 and stats.clip_fraction == 0.0
        assert float(loss.detach()) == pytest.approx(-float(adv.mean()), abs=1e-6)  # ratio 1: the surrogate alone
        # greedy, the fresh head plays confident_first
        assert torch.equal(a, make_policy("confident_first", core).act(obs))
        core.step(a)


def test_kl_matches_torch_distributions_and_is_positive_off_the_anchor():
    g = torch.Generator().manual_seed(0)
    legal = torch.rand(5, 16, generator=g) > 0.4
    legal[:, 0] = True
    p, q = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    logp, logq = masked_log_softmax(p, legal), masked_log_softmax(q, legal)
    want = torch.stack([torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p[i][legal[i]]), torch.distributions.Categorical(logits=q[i][legal[i]]))
        for i in range(5)])
    torch.testing.assert_close(categorical_kl(logp, logq, legal), want)
    assert bool((categorical_kl(logp, logq, legal) > 0).all())


def test_group_advantages_are_centred_per_group_and_zero_for_a_flat_group():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 3)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(adv[3:], torch.zeros(3))
    with pytest.raises(ValueError, match="G = 4"):
        group_advantages(r, 4)


def test_the_clipped_surrogate_stops_the_gradient_past_the_clip():
    logits = torch.zeros(1, 4, requires_grad=True)
    legal = torch.ones(1, 4, dtype=torch.bool)
    old = torch.tensor([F.log_softmax(torch.zeros(4), -1)[0] - 1.0])  # ratio e > 1 + clip
    loss, stats = grpo_loss(logits, torch.zeros(1, 4), legal, torch.tensor([0]), old, torch.tensor([1.0]), 0.2, 0.0)
    loss.backward()
    assert stats.clip_fraction == 1.0 and torch.equal(logits.grad, torch.zeros(1, 4))


def test_a_group_shares_its_label_and_noise_so_one_order_gives_one_sample():
    P, G = 2, 3
    core = _generate_core(P * G, n_images=20)
    seed_groups(core, 7, P, G)
    assert torch.equal(core.row_key.view(P, G), core.row_key.view(P, G)[:, :1].expand(P, G))
    assert core.row_key[0] != core.row_key[G]
    head = _anchored_head(core)
    image_index = torch.tensor([3, 8]).repeat_interleave(G)
    # greedy: every member plays the same order, so a group makes one sample
    play(core, head, image_index, None)
    x = core.x.view(P, G, -1)
    assert torch.equal(core.label.view(P, G), torch.tensor([[3, 3, 3], [8, 8, 8]]))
    assert torch.equal(x, x[:, :1].expand_as(x))
    assert not torch.equal(x[0, 0], x[1, 0])
    # sampled orders: the members differ only by their order (same label and noise), and do differ
    seed_groups(core, 7, P, G)
    ro = play(core, head, image_index, torch.Generator().manual_seed(0))
    orders = core.history.view(P, G, -1)
    assert any(not torch.equal(orders[p, 0], orders[p, i]) for p in range(P) for i in range(1, G))
    assert ro.action.shape == (core.N * P * G,) and torch.equal(ro.row[:P * G], torch.arange(P * G))
    assert torch.equal(ro.obs["label"][:P * G], core.label)


def test_the_anchor_needs_beliefs_and_a_positive_tau_and_survives_a_round_trip(tmp_path):
    from orderplan.planner.orderhead import OrderHeadConfig, load_orderhead, save_orderhead

    with pytest.raises(ValueError, match="needs beliefs"):
        OrderHeadConfig(anchor_tau=0.1, beliefs=False)
    with pytest.raises(ValueError, match="anchor_tau"):
        OrderHeadConfig(anchor_tau=0.0, beliefs=True)
    core = _generate_core(2)
    core.reset()
    head = _anchored_head(core, tau=0.3)
    with torch.no_grad():  # move off the anchor, so the file must carry the residual's weights too
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = load_orderhead(save_orderhead(head, tmp_path / "q.safetensors"))
    obs = core.observation()
    assert again.cfg.anchor_tau == 0.3
    torch.testing.assert_close(again(obs).logits, head(obs).logits)
