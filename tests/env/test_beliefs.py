"""Belief features (env.beliefs): the per-token predictive entropies and block-pooled query hidden
states the env exposes equal an explicit, uncached computation; they pass TorchRL's and Gymnasium's
checkers; without env.beliefs the observation is the old one."""

import warnings

import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torchrl.envs.utils import check_env_specs

from orderplan.planner.policies import RandomPolicy
from orderplan.env.gym_api import OrderPlanningGymEnv
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import toy_core


@torch.no_grad()
def naive_beliefs(core) -> tuple[torch.Tensor, torch.Tensor]:
    """H_j(S) [B, L] and the block means of the query rows' hidden states [B, N, D], one explicit
    `forward_sequence` of [class, revealed tokens in reveal order, then the query input carrying
    ta(j)] per (row, unseen token j): no KV cache."""
    B, L, N, D = core.B, core.L, core.N, core.D
    ent, qh = torch.zeros(B, L), torch.zeros(B, L, D)
    for b in range(B):
        blocks = core.history[b, : int(core.steps[b])]
        pos = core.block_tokens[blocks].reshape(-1) if len(blocks) else torch.zeros(0, dtype=torch.long)
        tok = core.x[b, pos]
        unseen = torch.nonzero(core.unseen[b]).flatten()
        for j in unseen.tolist():
            # the last input (the pending token, or the class token) carries ta(j)
            targets = torch.cat([pos, torch.tensor([j])])
            logits, hid = core.gpt.forward_sequence(core.label[b:b + 1], tok[None], pos[None], targets[None])
            logp = logits[0, -1].float().log_softmax(-1)
            ent[b, j] = -(logp.exp() * logp).sum()
            qh[b, j] = hid[0, -1].float()
    return ent, core.geom.pool_blocks(qh)


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_belief_features_equal_an_uncached_computation(mode):
    fields = {"beliefs": True} if mode == "teacher_forced" else {"beliefs": True, "mode": mode, "reward": "entropy"}
    core = toy_core(2, **fields)
    core.reset(None, torch.tensor([0, 3]))
    walk = RandomPolicy(seed=1)
    for n_steps in (0, 3, 9):
        while int(core.steps[0]) < n_steps:
            core.step(walk.act(core.observation()))
        obs = core.observation()
        ent, qh = naive_beliefs(core)
        torch.testing.assert_close(obs["entropy"], ent, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(obs["query_hidden"].float(), qh, atol=1e-4, rtol=1e-4)
        assert bool((obs["entropy"][~core.unseen] == 0).all())
        assert bool((obs["query_hidden"][core.revealed] == 0).all())
        assert bool((obs["entropy"][core.unseen] > 0).all())
        # block_entropy: the mean over each unrevealed block's tokens, nan on revealed blocks
        be = core.block_entropy()
        torch.testing.assert_close(be[~core.revealed], core.geom.pool_blocks(ent[..., None])[..., 0][~core.revealed],
                                   atol=1e-4, rtol=1e-4)
        assert bool(be[core.revealed].isnan().all())
        if mode == "generate":  # generation mode's per-token loss is that entropy
            torch.testing.assert_close(core.token_loss, core.token_entropy)


def test_without_beliefs_the_observation_is_the_old_one():
    core = toy_core(2, beliefs=False)
    core.reset(None, torch.tensor([0, 1]))
    assert set(core.observation()) == {"hidden", "block_mask", "action_mask", "label", "step", "image_index"}
    assert "entropy" not in OrderPlanningEnv(core).observation_spec.keys()
    # the entropies are kept either way (confident_first reads them from the core)
    assert bool((core.token_entropy > 0).all())


def test_beliefs_change_no_reward_and_no_hidden_state():
    plain, belief = toy_core(2, beliefs=False), toy_core(2, beliefs=True)
    for c in (plain, belief):
        c.reset(None, torch.tensor([2, 4]))
    for a in ([3, 1], [0, 2], [15, 9]):
        r0, _ = plain.step(torch.tensor(a))
        r1, _ = belief.step(torch.tensor(a))
        assert torch.equal(r0, r1)
    assert torch.equal(plain.observation()["hidden"], belief.observation()["hidden"])


@pytest.mark.parametrize("fields", [{}, {"budget": [1, 2, 4]}, {"mode": "generate", "reward": "entropy"}],
                         ids=["plain", "router", "generate"])
def test_torchrl_specs_with_beliefs(fields):
    env = OrderPlanningEnv(toy_core(3, beliefs=True, **fields))
    check_env_specs(env, seed=0)
    td = env.rollout(env.core.N + 2, break_when_any_done=False)
    assert td["entropy"].shape == (3, env.core.N + 2, env.core.L)
    assert td["query_hidden"].shape == (3, env.core.N + 2, env.core.N, env.core.D)
    assert env.observation_spec.is_in(td[:, -1].select(*env.observation_spec.keys()))


def test_gymnasium_check_env_with_beliefs():
    env = OrderPlanningGymEnv(core=toy_core(1, beliefs=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    assert [str(w.message) for w in caught if "infinity" not in str(w.message)] == []
    obs, _ = env.reset(seed=0)
    assert obs["entropy"].shape == (env.core.L,) and obs["query_hidden"].shape == (env.core.N, env.core.D)
    assert obs in env.observation_space
