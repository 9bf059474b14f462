"""Behaviour cloning learns a problem with a known answer: on the key-block toy (one block, fixed per
class, determines every other token) the cloned OrderHead reveals the key block first."""

import torch

from agents.training.bc import bc_loss, r_at, targets_from_utilities
from agents.training.features import episode_features
from agents.training.oracle_data import collect_states
from agents.planner.orderhead import OrderHead, orderhead_config_for
from agents.planner.policies import OrderHeadPolicy
from tests.support.keyblock_toy import make_toy_core


def test_bc_learns_the_key_block_first():
    torch.manual_seed(0)
    core = make_toy_core(batch_size=8, num_images=48, seed=0)
    rec = collect_states(core, "random", torch.arange(32), "future_loss", generator=torch.Generator().manual_seed(0))
    hidden, mask = episode_features(core, rec["image_index"], rec["prefix"], rec["length"])
    labels = core.labels.cpu()[rec["image_index"]]
    cfg = orderhead_config_for(core.D, core.geom, d_model=64, n_heads=4, num_classes=core.gpt.cfg.num_classes)
    model = OrderHead(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(150):
        idx = torch.randint(len(labels), (64,), generator=g)
        loss, _ = bc_loss(model, hidden[idx], mask[idx], rec["utilities"][idx], R=r_at(step, 150, [0, 1]),
                          label=labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    # held-out toy images: the first decision must be the key block of the image's class
    core.reset(image_index=torch.arange(32, 40))
    first = OrderHeadPolicy(model.eval(), greedy=True).act(core.observation())
    key = core.gpt.key_block[core.label]
    assert torch.equal(first.cpu(), key.cpu())


def test_episode_features_match_direct_observations():
    core = make_toy_core(batch_size=4, num_images=8, seed=1)
    rec = collect_states(core, "random", torch.arange(6), "future_loss", generator=torch.Generator().manual_seed(2))
    hidden, mask = episode_features(core, rec["image_index"], rec["prefix"], rec["length"])
    from agents.training.features import replay_states

    for s in (0, 5, 17, len(rec["length"]) - 1):
        obs = replay_states(core, rec["image_index"][s:s + 1], rec["prefix"][s:s + 1], rec["length"][s:s + 1])
        h = obs["hidden"]
        if h.shape[1] != core.N:
            h = h[:, core.block_tokens].mean(2)
        torch.testing.assert_close(hidden[s], h[0].float())
        assert torch.equal(mask[s], obs["block_mask"][0].cpu())


def test_soft_targets_put_no_mass_on_revealed_blocks():
    util = torch.tensor([[1.0, float("-inf"), 3.0], [0.0, 0.0, float("-inf")]])
    soft = targets_from_utilities(util, "soft", 1.0)
    assert soft[0, 1] == 0 and soft[1, 2] == 0
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))
    assert targets_from_utilities(util, "argmax", 1.0).argmax(-1).tolist() == [2, 0]
