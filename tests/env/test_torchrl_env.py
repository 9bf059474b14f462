"""`OrderPlanningEnv`: TorchRL spec checks for every mode and reward, rollouts across episode
boundaries (auto partial resets), `_reset` partial resets, seeding, invalid actions through
`env.step`, and the action mask kept on the action spec."""

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs, step_mdp

from orderplan.model.sampling import SamplingConfig
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import toy_core

ATOL = 1e-4
RET_ATOL = 2e-3

CONFIGS = {
    "future_loss": dict(reward="future_loss"),
    "extrapolative_uniform": dict(reward="extrapolative", weight="uniform"),
    "extrapolative_neighbours": dict(reward="extrapolative", weight="neighbours"),
    "extrapolative_distance": dict(reward="extrapolative", weight="distance"),
    "anytime": dict(reward="anytime"),
    "likelihood": dict(reward="likelihood"),
    "hidden_block": dict(hidden="block"),
    "router": dict(budget=[1, 2, 4], decision_cost=0.1),
    "generate": dict(mode="generate", reward="entropy"),
    "generate_cfg": dict(mode="generate", reward="entropy", sampling=SamplingConfig(cfg_scale=2.0)),
}


def make(batch_size: int = 3, seed: int = 0, **fields) -> OrderPlanningEnv:
    return OrderPlanningEnv(toy_core(batch_size, seed=seed, **fields))


@torch.no_grad()
def naive_rest_empty(gpt, cond: int, x_row: torch.Tensor) -> float:
    """L_rest(empty) = -sum_j log p(x_j | class token only), one explicit forward per token."""
    L = x_row.numel()
    empty = torch.zeros(L, 0, dtype=torch.long)
    logits, _ = gpt.forward_sequence(torch.full((L,), int(cond)), empty, empty, torch.arange(L)[:, None])
    return float(-logits[:, 0].log_softmax(-1)[torch.arange(L), x_row].sum())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_check_env_specs(name):
    env = make(**CONFIGS[name])
    check_env_specs(env, seed=0)
    # and across episode boundaries (auto partial resets), every step inside the specs
    N = env.core.N
    td = env.rollout(N + 3, break_when_any_done=False)
    assert td.batch_size == (env.core.B, N + 3)
    for t in range(N + 3):
        step = td[:, t]
        assert env.observation_spec.is_in(step.select(*env.observation_spec.keys())), t
        assert env.observation_spec.is_in(step["next"].select(*env.observation_spec.keys())), t
        assert env.reward_spec.is_in(step["next", "reward"]) and step["next", "reward"].shape == (env.core.B, 1)
        assert env.full_done_spec.is_in(step["next"].select(*env.full_done_spec.keys()))
    assert bool(td["next", "done"].any())
    hidden = td["hidden"]
    expect = (env.core.L if CONFIGS[name].get("hidden", "token") == "token" else env.core.N, env.core.D)
    assert hidden.shape[2:] == expect


def test_rollout_auto_reset_episodes_telescope():
    """Two episodes per row through `env.rollout` (TorchRL resets done rows itself): each episode's
    undiscounted future_loss return is L_rest(empty) of the image it was played on, and the second
    episode is a fresh image with an empty canvas."""
    env = make(2, seed=1)
    N = env.core.N
    td = env.rollout(2 * N, break_when_any_done=False)
    done = td["next", "done"][..., 0]
    assert done[:, N - 1].all() and done[:, 2 * N - 1].all() and done.sum() == 4
    assert (td["step"][:, N] == 0).all() and not td["block_mask"][:, N].any()
    rewards = td["next", "reward"][..., 0]
    for ep in range(2):
        sl = slice(ep * N, (ep + 1) * N)
        for b in range(2):
            idx = int(td["image_index"][b, ep * N])
            assert (td["image_index"][b, sl] == idx).all()
            ref = naive_rest_empty(env.core.gpt, env.core.labels[idx], env.core.codes[idx])
            assert abs(float(rewards[b, sl].sum()) - ref) < RET_ATOL
    assert not torch.equal(td["image_index"][:, 0], td["image_index"][:, N])  # new images drawn


def test_router_rollout_partial_auto_resets():
    """Router rows finish at different decisions; TorchRL resets only those rows. Each episode's
    return plus lambda per decision is L_rest(empty)."""
    lam = 0.1
    env = make(3, seed=2, budget=[1, 2, 4], decision_cost=lam)
    td = env.rollout(20, break_when_any_done=False)
    done = td["next", "done"][..., 0]
    assert done.any() and not (torch.equal(done[0], done[1]) and torch.equal(done[1], done[2]))  # ragged
    rewards = td["next", "reward"][..., 0]
    checked = 0
    for b in range(3):
        start = 0
        for t in torch.nonzero(done[b]).flatten().tolist():
            idx = int(td["image_index"][b, start])
            ref = naive_rest_empty(env.core.gpt, env.core.labels[idx], env.core.codes[idx])
            ret = float(rewards[b, start:t + 1].sum()) + lam * (t + 1 - start)
            assert abs(ret - ref) < RET_ATOL, (b, start, t)
            assert int(td["next", "step"][b, t]) == env.core.N
            checked += 1
            start = t + 1
    assert checked >= 3


def test_partial_reset_key():
    env = make(3, seed=3)
    td = env.reset()
    for _ in range(3):
        td = step_mdp(env.step(env.rand_action(td)))
    c = env.core
    keep = {name: getattr(c, name)[1].clone() for name in ("x", "revealed", "history", "steps", "hidden_tok",
                                                           "token_loss", "image_index")}
    kv = [t[1].clone() for t in c.state.k + c.state.v]
    # TorchRL convention: the current tensordict plus a `_reset` entry; rows not reset keep their data
    td_in = td.clone().set("_reset", torch.tensor([[True], [False], [True]]))
    out = env.reset(td_in)
    assert c.steps.tolist() == [0, 3, 0] and out["step"].tolist() == [0, 3, 0]
    assert torch.equal(out["hidden"][1], td["hidden"][1]) and torch.equal(out["block_mask"][1], td["block_mask"][1])
    assert not out["block_mask"][[0, 2]].any() and not out["hidden"][[0, 2]].any()
    assert not out["done"].any()
    for name, value in keep.items():
        assert torch.equal(getattr(c, name)[1], value), name
    assert all(torch.equal(t[1], v) for t, v in zip(c.state.k + c.state.v, kv))
    assert c.state.length.tolist()[0] == 0 and c.state.length.tolist()[2] == 0 and c.state.length[1] > 0
    # the action mask on the spec follows the partial reset
    assert torch.equal(env.action_spec.mask, ~c.revealed)
    # the rows go on: row 1 finishes 3 steps before the others
    td = out
    for t in range(c.N - 3):
        td = env.step(env.rand_action(td))
        td = step_mdp(td) if t < c.N - 4 else td
    assert td["next", "done"][..., 0].tolist() == [False, True, False]


def test_reset_with_image_index():
    env = make(2, seed=4)
    td = env.reset(TensorDict({"reset_image_index": torch.tensor([5, 11])}, batch_size=[2]))
    assert td["image_index"].tolist() == [5, 11]
    assert torch.equal(env.core.x, env.core.codes[[5, 11]])
    assert td["label"].tolist() == env.core.labels[[5, 11]].tolist()


def test_manual_reset_loop_draws_new_images():
    """Feeding the last observation (which holds `image_index`) back into reset must not pin the
    images: only `reset_image_index` chooses them."""
    env = make(3, seed=0)
    td = env.reset()
    first = td["image_index"].clone()
    while not bool(td["done"].all()):
        td = step_mdp(env.step(env.rand_action(td)))
    td["_reset"] = td["done"].clone()
    td = env.reset(td)
    assert not torch.equal(td["image_index"], first)


def test_action_mask_on_spec():
    env = make(3, seed=5)
    td = env.reset()
    assert env.action_spec.mask.all()
    for _ in range(5):
        td = env.step(env.rand_action(td))
        assert torch.equal(env.action_spec.mask, td["next", "action_mask"])
        assert torch.equal(td["next", "action_mask"], ~td["next", "block_mask"])
        a = env.action_spec.rand()  # a masked-categorical sample: always a valid block
        assert not env.core.revealed.gather(1, a[:, None]).any()
        td = step_mdp(td)


@pytest.mark.parametrize("fields", [{}, CONFIGS["router"], CONFIGS["generate_cfg"]],
                         ids=["plain", "router", "generate"])
def test_same_seed_same_rollout(fields):
    tds = []
    for seed in (7, 7, 8):
        env = make(3, seed=0, **fields)
        env.set_seed(seed)
        tds.append(env.rollout(12, break_when_any_done=False))
    a, b, c = tds
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["next", "reward"], c["next", "reward"])


def test_invalid_action_through_env_step():
    env = make(3, seed=6)
    td = env.reset()
    td = step_mdp(env.step(env.rand_action(td)))
    bad = env.rand_action(td.clone())
    bad["action"][2] = env.core.history[2, 0]
    before = {k: v.clone() for k, v in vars(env.core).items() if isinstance(v, torch.Tensor)}
    kv = [t.clone() for t in env.core.state.k + env.core.state.v]
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        env.step(bad)
    for k, v in before.items():
        assert torch.equal(getattr(env.core, k), v), k
    assert all(torch.equal(t, v) for t, v in zip(env.core.state.k + env.core.state.v, kv))
    bad["action"] = bad["action"].float()
    with pytest.raises(ValueError, match="dtype"):
        env.step(bad)


def test_step_after_done_raises_until_reset():
    env = make(2, seed=7)
    td = env.reset()
    for _ in range(env.core.N):
        td = env.step(env.rand_action(td))
        assert td["next", "reward"].shape == (2, 1)
        td = step_mdp(td)
    assert td["done"].all()
    with pytest.raises(ValueError, match="finished"):
        env.step(TensorDict({"action": torch.tensor([0, 1])}, batch_size=[2]))
    td = env.reset()
    td = env.step(env.rand_action(td))
    assert not td["next", "done"].any()


@pytest.mark.parametrize("bad", [torch.tensor([0.9, 1.7]), torch.tensor([1.0, 2.0]), torch.tensor([True, False])])
def test_reset_image_index_must_be_integer(bad):
    """Regression: float image indices were silently truncated ([0.9, 1.7] -> images [0, 1])."""
    env = make(2, seed=4)
    env.reset(TensorDict({"reset_image_index": torch.tensor([5, 11])}, batch_size=[2]))
    with pytest.raises(ValueError, match=r"image_index must be an integer tensor.*dtype torch\.(float32|bool)"):
        env.reset(TensorDict({"reset_image_index": bad}, batch_size=[2]))
    assert env.core.image_index.tolist() == [5, 11]  # the state is left as it was
    td = env.reset(TensorDict({"reset_image_index": torch.tensor([3, 1], dtype=torch.int32)}, batch_size=[2]))
    assert td["image_index"].tolist() == [3, 1]  # any integer dtype works


def test_core_refuses_bad_batch_size_and_budget():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
            toy_core(bad)
    with pytest.raises(ValueError, match=r"env\.budget\[1\] must be an integer in \[1, 16\]"):
        toy_core(2, budget=[1, 999])
