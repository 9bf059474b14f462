"""Semi-MDP discounting of the budget router (env.gamma set, orderplan.env/core.py): time is counted in
blocks, so a decision's reward discounts its own blocks by gamma^i and the next decision is
gamma^k away. The invariant: the SMDP return of any router episode equals the per-block discounted
return of its block order replayed one block per step, minus the discounted decision costs, for
every teacher-forced reward. Also: the `decision_blocks` entry of the TorchRL env (specs, values)
and of the Gymnasium info, and that plain actions are unaffected by env.gamma."""

import numpy as np
import pytest
import torch
from torchrl.envs.utils import check_env_specs

from orderplan.env.actions import random_valid_action
from orderplan.env.core import EnvConfig, check_env_config
from orderplan.env.gym_api import OrderPlanningGymEnv, OrderPlanningVectorEnv
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import toy_core

BUDGETS = [1, 2, 4]
GAMMA = 0.9


def random_action(core, gen: torch.Generator) -> torch.Tensor:
    """`orderplan.env.actions.random_valid_action` for the core's current state (plain or router)."""
    return random_valid_action(~core.revealed, gen, core.cfg.budget if core.router else None)


def smdp_episode(core, image_index: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Play random router actions on every row until all are done (finished rows sit out).
    Returns the SMDP return sum_t gamma^tau_t R_t [B] (float64, tau_t = blocks revealed before
    decision t) and the discounted decision costs sum_t gamma^tau_t [B] (per unit cost)."""
    core.reset(None, image_index)
    ret = torch.zeros(core.B, dtype=torch.float64)
    costs = torch.zeros(core.B, dtype=torch.float64)
    while not bool(core.done.all()):
        active = ~core.done
        tau = core.steps.clone().double()
        before = core.steps.clone()
        r, _ = core.step(random_action(core, gen), active=active)
        assert torch.equal(core.decision_blocks[active], (core.steps - before)[active])
        w = torch.where(active, GAMMA**tau, 0.0)
        ret += w * r.double()
        costs += w
    return ret, costs


def per_block_return(core, image_index: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """sum_t gamma^t r_t [B] (float64) of `blocks` [B, N] replayed one block per step on a plain
    core (same backbone, images and reward, no router, no decision cost)."""
    plain = toy_core(core.B, seed=0, **{**core.cfg.__dict__, "budget": None, "decision_cost": 0.0, "gamma": None})
    plain.reset(None, image_index)
    total = torch.zeros(core.B, dtype=torch.float64)
    for t in range(core.N):
        r, _ = plain.step(blocks[:, t])
        total += GAMMA**t * r.double()
    return total


@pytest.mark.parametrize("fields", [dict(reward="future_loss"), dict(reward="extrapolative", weight="uniform"),
                                    dict(reward="extrapolative", weight="neighbours"),
                                    dict(reward="extrapolative", weight="distance"),
                                    dict(reward="anytime"), dict(reward="likelihood")],
                         ids=["future_loss", "extrapolative_uniform", "extrapolative_neighbours",
                              "extrapolative_distance", "anytime", "likelihood"])
def test_smdp_return_equals_per_block_return(fields):
    lam = 0.3
    core = toy_core(3, seed=4, budget=BUDGETS, decision_cost=lam, gamma=GAMMA, **fields)
    assert core.smdp
    images = torch.tensor([0, 5, 11])
    ret, costs = smdp_episode(core, images, torch.Generator().manual_seed(3))
    assert bool((core.steps == core.N).all())
    ref = per_block_return(core, images, core.history.clone())
    torch.testing.assert_close(ret + lam * costs, ref, atol=1e-4, rtol=1e-5)
    assert ref.abs().min() > 1.0  # not vacuous


def test_smdp_router_without_smdp_differs():
    """Per-decision discounting (gamma=None) does not give the per-block return: the SMDP fix matters."""
    images = torch.tensor([0, 5, 11])
    old = toy_core(3, seed=4, budget=BUDGETS)
    new = toy_core(3, seed=4, budget=BUDGETS, gamma=GAMMA)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ret_new, _ = smdp_episode(new, images, gen_b)
    old.reset(None, images)
    ret_old, t = torch.zeros(3, dtype=torch.float64), 0
    while not bool(old.done.all()):
        active = ~old.done
        r, _ = old.step(random_action(old, gen_a), active=active)
        ret_old += GAMMA**t * r.double()
        t += 1
    assert torch.equal(old.history, new.history)  # the same block orders
    assert (ret_old - ret_new).abs().max() > 1.0


@pytest.mark.parametrize("fields", [dict(reward="future_loss"), dict(mode="generate", reward="entropy")],
                         ids=["future_loss", "entropy"])
def test_smdp_gamma_one_equals_decision_reward(fields):
    """gamma = 1: the undiscounted sum of per-block drops telescopes inside a decision to the
    one-query decision reward (entropy: the generation mode's reward, same sampled tokens)."""
    a = toy_core(3, seed=6, budget=BUDGETS, decision_cost=0.2, **fields)
    b = toy_core(3, seed=6, budget=BUDGETS, decision_cost=0.2, gamma=1.0, **fields)
    a.reset(), b.reset()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    while not bool(a.done.any()):
        ra, _ = a.step(random_action(a, g1))
        rb, _ = b.step(random_action(b, g2))
        assert torch.equal(a.x, b.x)
        torch.testing.assert_close(rb, ra, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(b.token_loss, a.token_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.hidden_tok, a.hidden_tok, atol=1e-5, rtol=1e-5)


def test_plain_actions_ignore_gamma():
    """k = 1 always: env.gamma changes nothing without the router (bit for bit)."""
    a, b = toy_core(2, seed=7, reward="anytime"), toy_core(2, seed=7, reward="anytime", gamma=GAMMA)
    assert not b.smdp
    a.reset(), b.reset()
    order = torch.stack([torch.randperm(a.N, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    for t in range(a.N):
        ra, _ = a.step(order[:, t])
        rb, _ = b.step(order[:, t])
        assert torch.equal(ra, rb)


def test_gamma_validation():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="env.gamma"):
            check_env_config(EnvConfig(budget=BUDGETS, gamma=bad))
    check_env_config(EnvConfig(budget=BUDGETS, gamma=1.0))


# -- TorchRL env ------------------------------------------------------------------------------------


def test_torchrl_env_specs_and_decision_blocks():
    env = OrderPlanningEnv(toy_core(3, seed=0, budget=BUDGETS, decision_cost=0.1, gamma=GAMMA))
    check_env_specs(env, seed=0)
    assert "decision_blocks" in env.observation_spec.keys()
    td0 = env.reset()
    assert td0["decision_blocks"].shape == (3, 1) and not bool(td0["decision_blocks"].any())
    N = env.core.N
    torch.manual_seed(0)
    td = env.rollout(N + 3, break_when_any_done=False)
    k = td["next", "decision_blocks"][..., 0]  # [B, T]
    assert bool((k >= 1).all()) and bool((k <= 4).all())
    # k = blocks revealed by the transition: the step observation counts blocks
    torch.testing.assert_close(k, td["next", "step"] - td["step"])
    assert bool(td["next", "done"].any())
    for t in range(N + 3):
        assert env.observation_spec.is_in(td[:, t]["next"].select(*env.observation_spec.keys())), t
    # no entry without the semi-MDP mode
    assert "decision_blocks" not in OrderPlanningEnv(toy_core(3, budget=BUDGETS)).observation_spec.keys()


# -- Gymnasium API --------------------------------------------------------------------------------


def test_gym_info_has_discount():
    env = OrderPlanningGymEnv(core=toy_core(1, seed=0, budget=BUDGETS, gamma=GAMMA))
    _, info = env.reset(seed=0)
    assert info["decision_blocks"] == 0 and info["discount"] == 1.0
    _, _, _, _, info = env.step(np.array([2, 0, 1, 2, 3]))  # budget 4
    assert info["decision_blocks"] == 4 and info["discount"] == pytest.approx(GAMMA**4)
    _, _, _, _, info = env.step(np.array([0, 4, 5, 6, 7]))  # budget 1
    assert info["decision_blocks"] == 1 and info["discount"] == pytest.approx(GAMMA)
    plain = OrderPlanningGymEnv(core=toy_core(1, seed=0, budget=BUDGETS))
    assert "discount" not in plain.reset(seed=0)[1]


def test_vector_info_has_discount():
    env = OrderPlanningVectorEnv(core=toy_core(2, seed=0, budget=BUDGETS, gamma=GAMMA))
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([[1, 0, 1, 2, 3], [2, 0, 1, 2, 3]]))
    assert info["decision_blocks"].tolist() == [2, 4]
    np.testing.assert_allclose(info["discount"], [GAMMA**2, GAMMA**4])
    assert info["_discount"].all()
