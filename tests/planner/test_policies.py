"""Policies (src/orderplan/planner/policies.py): every policy reproduces what it claims (block orders, oracle argmax,
seeded randomness, OrderHead argmax / top-K) and runs through the core, the TorchRL env and the
Gymnasium env, in plain and router modes. Random toy cores only."""

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from orderplan.planner.orderhead import OrderHead, orderhead_config_for, save_orderhead
from orderplan.planner.policies import (
    FIXED_ORDERS,
    POLICY_NAMES,
    FixedOrderPolicy,
    GymPolicy,
    OrderHeadPolicy,
    RandomPolicy,
    make_policy,
    run_episodes,
)
from orderplan.oracle.future_loss import naive_oracle_utilities
from orderplan.model.orders import block_order
from orderplan.env.gym_api import OrderPlanningGymEnv, OrderPlanningVectorEnv
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import revealed_prefix, toy_core
from tests.support.keyblock_toy import make_toy_core

ROUTER = {"budget": [1, 2, 4]}
IMAGES = torch.tensor([0, 5, 7])


def orderhead(core, router: bool = False, seed: int = 0) -> OrderHead:
    torch.manual_seed(seed)
    budgets = core.cfg.budget if router else None
    return OrderHead(orderhead_config_for(core.D, core.geom, d_model=32, n_heads=4, budgets=budgets)).eval()


def policy_for(name: str, core, **kw):
    if name == "orderhead":
        kw.setdefault("model", orderhead(core, router=core.router))
    return make_policy(name, core, **kw)


# -- what each policy does ------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXED_ORDERS)
def test_fixed_orders_reproduce_block_order(name):
    core = toy_core(3)
    out = run_episodes(make_policy(name, core), core, IMAGES)
    expect = block_order(name, core.geom, batch=3)
    assert torch.equal(out["blocks"], expect)
    # router mode with a fixed budget of 2: the same order, two blocks per decision
    core = toy_core(3, **ROUTER)
    out = run_episodes(make_policy(name, core, budget=2), core, IMAGES)
    assert torch.equal(out["blocks"], expect)
    assert out["decisions"].tolist() == [core.N // 2] * 3


def test_fixed_order_policy_plays_given_orders():
    core = toy_core(3)
    g = torch.Generator().manual_seed(0)
    shared = torch.randperm(core.N, generator=g)  # one order [N] for every image
    assert torch.equal(run_episodes(FixedOrderPolicy(shared), core, IMAGES)["blocks"], shared.expand(3, -1))
    orders = torch.stack([torch.randperm(core.N, generator=g) for _ in range(4)])  # per image [M, N]
    policy = FixedOrderPolicy(orders, core.geom)
    assert "image_index" in policy.in_keys
    # IMAGES = 0, 5, 7 follow orders[i % 4] = rows 0, 1, 3
    assert torch.equal(run_episodes(policy, core, IMAGES)["blocks"], orders[[0, 1, 3]])
    router = toy_core(3, **ROUTER)
    out = run_episodes(FixedOrderPolicy(orders, router.geom, ROUTER["budget"], budget=4), router, IMAGES)
    assert torch.equal(out["blocks"], orders[[0, 1, 3]]) and out["decisions"].tolist() == [core.N // 4] * 3
    with pytest.raises(ValueError, match="permutation"):
        FixedOrderPolicy(torch.zeros(core.N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        FixedOrderPolicy(orders[None])
    with pytest.raises(ValueError, match="geometry"):
        FixedOrderPolicy("raster")
    with pytest.raises(ValueError, match="blocks"):
        FixedOrderPolicy(torch.arange(4), core.geom)


def test_random_policy_reproducible_and_valid():
    core = toy_core(3)
    a = run_episodes(RandomPolicy(seed=5), core, IMAGES)["blocks"]
    b = run_episodes(RandomPolicy(seed=5), core, IMAGES)["blocks"]
    c = run_episodes(RandomPolicy(seed=6), core, IMAGES)["blocks"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort(-1).values, torch.arange(core.N).expand(3, -1))
    core = toy_core(3, **ROUTER)
    out = run_episodes(make_policy("random", core, seed=1), core, IMAGES)  # the core rejects invalid actions
    assert torch.equal(out["blocks"].sort(-1).values, torch.arange(core.N).expand(3, -1))
    assert bool((out["decisions"] < core.N).all())


@pytest.mark.parametrize("name,kind,weight", [("oracle", "future_loss", "uniform"),
                                              ("oracle_extrapolative", "extrapolative", "neighbours")])
def test_oracle_policy_picks_the_best_block_of_a_naive_reference(name, kind, weight):
    """The oracle's choice has the largest utility under `naive_oracle_utilities` (explicit forwards,
    no KV cache, weights written out longhand), not merely under the batched code it calls. The
    naive reference costs one forward per (candidate, unseen token), so it runs on a late state
    (12 random blocks revealed, 4 candidates); the empty state is covered by the key-block test."""
    core = toy_core(2, weight=weight)
    policy = make_policy(name, core)
    core.reset(None, IMAGES[:2])
    walk = RandomPolicy(seed=1)
    for _ in range(12):
        core.step(walk.act(core.observation()))
    tok, pos = revealed_prefix(core)
    naive = naive_oracle_utilities(core.gpt, core.label, tok, pos, core.x, core.geom, kind=kind, weight=weight)
    action = policy.act(core.observation())
    chosen, best = naive.gather(1, action[:, None])[:, 0], naive.max(-1).values
    assert bool(torch.isfinite(chosen).all())  # an unrevealed block
    assert bool((chosen >= best - 1e-3).all()), (chosen, best)
    worst = naive.masked_fill(torch.isinf(naive), float("inf")).min(-1).values
    assert bool((best - worst > 0.05).all())  # the candidates differ: a wrong pick would show
    with pytest.raises(ValueError, match="not the current state"):
        policy.act(toy_core(2).observation() | {"action_mask": torch.ones(2, core.N, dtype=torch.bool)})


def test_oracle_policy_finds_the_key_block():
    """Known answer (tests/support/keyblock_toy.py): revealing the key block k(label) determines the
    whole image, so the oracle reveals it first."""
    core = make_toy_core(batch_size=4, num_images=8)
    core.reset(None, torch.arange(4))
    action = make_policy("oracle", core).act(core.observation())
    assert torch.equal(action, core.gpt.key_block[core.label])


def test_orderhead_policy_greedy_sampled_and_router():
    core = toy_core(3, **ROUTER)
    core.reset(None, IMAGES)
    core.step(torch.tensor([[2, 0, 1, 2, 3]] * 3))  # reveal blocks 0..3
    obs = core.observation()
    model = orderhead(core, router=True)
    with torch.no_grad():
        out = model(obs)
    act = OrderHeadPolicy(model).act(obs)  # router mode: the model has a router head
    assert torch.equal(act[:, 0], out.budget_logits.argmax(-1))
    assert torch.equal(act[:, 1:], out.logits.topk(4, -1).indices)
    plain = OrderHeadPolicy(model, router=False).act(obs)
    assert torch.equal(plain, out.logits.argmax(-1))
    s1 = OrderHeadPolicy(model, greedy=False, seed=3).act(obs)
    s2 = OrderHeadPolicy(model, greedy=False, seed=3).act(obs)
    assert torch.equal(s1, s2)
    core.step(s1)  # sampled actions are valid (the core raises otherwise)


def test_act_and_tensordict_forward_agree():
    core = toy_core(3)
    core.reset(None, IMAGES)
    policy = make_policy("orderhead", core, model=orderhead(core))
    obs = core.observation()
    td = policy(TensorDict(obs, batch_size=[3]))
    assert torch.equal(td["action"], policy.act(obs)) and td["action"].shape == (3,)
    assert set(policy.in_keys) == {"hidden", "block_mask", "action_mask"} and policy.out_keys == ["action"]


def test_run_episodes_returns():
    core = toy_core(3)
    outs = {n: run_episodes(policy_for(n, core), core, IMAGES, gamma=0.9) for n in ("raster", "random", "orderhead")}
    for out in outs.values():
        assert out["rewards"].shape == (3, core.N) and out["blocks"].shape == (3, core.N)
        disc = (out["rewards"].double() * 0.9 ** torch.arange(core.N)).sum(1).float()
        torch.testing.assert_close(out["discounted_return"], disc)
        torch.testing.assert_close(out["return"], out["rewards"].sum(1))
    # the future-loss reward telescopes: every order has the same return L_rest(empty)
    torch.testing.assert_close(outs["raster"]["return"], outs["random"]["return"], atol=2e-3, rtol=0)
    torch.testing.assert_close(outs["raster"]["return"], outs["orderhead"]["return"], atol=2e-3, rtol=0)


# -- registry -------------------------------------------------------------------------------------


def test_make_policy_errors(tmp_path):
    core = toy_core(2)
    with pytest.raises(ValueError, match="raster.*orderhead"):
        make_policy("nope", core)
    with pytest.raises(ValueError, match="exactly one"):
        make_policy("orderhead", core)
    wrong_d = OrderHead(orderhead_config_for(2 * core.D, core.geom))
    path = save_orderhead(wrong_d, tmp_path / "wrong_d.safetensors")
    with pytest.raises(ValueError, match=r"\(D, grid_h, grid_w, block\)"):
        make_policy("orderhead", core, checkpoint=path)
    router_core = toy_core(2, **ROUTER)
    with pytest.raises(ValueError, match="router"):
        make_policy("orderhead", router_core, model=orderhead(core))  # no router head
    other_budgets = orderhead(core)
    other_budgets.enable_router([1, 2])
    with pytest.raises(ValueError, match="budgets"):
        make_policy("orderhead", router_core, model=other_budgets)
    with pytest.raises(ValueError, match="not one of"):
        make_policy("raster", router_core, budget=3)
    with pytest.raises(ValueError, match="ground truth"):
        make_policy("oracle", toy_core(2, mode="generate", reward="entropy"))


def test_make_policy_from_checkpoint(tmp_path):
    core = toy_core(3, **ROUTER)
    model = orderhead(core, router=True)
    path = save_orderhead(model, tmp_path / "oh.safetensors")
    a = run_episodes(make_policy("orderhead", core, checkpoint=path, R=4), core, IMAGES)["blocks"]
    b = run_episodes(make_policy("orderhead", core, model=model, R=4), core, IMAGES)["blocks"]
    assert torch.equal(a, b)


# -- through the orderplan.env -----------------------------------------------------------------------------


@pytest.mark.parametrize("router", [False, True], ids=["plain", "router"])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_torchrl_rollout(name, router):
    env = OrderPlanningEnv(toy_core(2, **(ROUTER if router else {})))
    steps = 3 if name.startswith("oracle") else env.core.N + 2  # across an episode boundary
    td = env.rollout(steps, policy=policy_for(name, env.core), break_when_any_done=False)
    assert td.batch_size == (2, steps)
    assert td["action"].shape == ((2, steps, 5) if router else (2, steps))
    if name in FIXED_ORDERS and not router:
        assert torch.equal(td["action"][:, : env.core.N], block_order(name, env.core.geom, batch=2))


@pytest.mark.parametrize("router", [False, True], ids=["plain", "router"])
@pytest.mark.parametrize("name", ["raster", "spiral", "random", "oracle", "orderhead"])
def test_gym_single_env(name, router):
    env = OrderPlanningGymEnv(core=toy_core(1, **(ROUTER if router else {})))
    policy = GymPolicy(policy_for(name, env.core), env.core)
    obs, _ = env.reset(seed=0, options={"image_index": 4})
    chosen, done = [], False
    while not done:
        action = policy(obs)
        assert env.action_space.contains(action)
        obs, _, done, _, _ = env.step(action)
        chosen.append(action)
    if router:
        assert all(a.shape == (5,) for a in chosen)
    else:
        assert len(chosen) == env.core.N and all(isinstance(a, np.int64) for a in chosen)
        if name in ("raster", "spiral"):
            assert [int(a) for a in chosen] == block_order(name, env.core.geom).tolist()


@pytest.mark.parametrize("router", [False, True], ids=["plain", "router"])
@pytest.mark.parametrize("name", ["zigzag", "random", "oracle", "orderhead"])
def test_gym_vector_env(name, router):
    env = OrderPlanningVectorEnv(core=toy_core(3, **(ROUTER if router else {})))
    policy = GymPolicy(policy_for(name, env.core), env.core)
    obs, _ = env.reset(seed=0)
    for _ in range(4 if name == "oracle" else env.core.N + 2):  # past the NEXT_STEP autoreset
        action = policy(obs)
        assert isinstance(action, np.ndarray) and action.shape == ((3, 5) if router else (3,))
        obs, *_ = env.step(action)
