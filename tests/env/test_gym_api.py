"""The Gymnasium API (orderplan.env/gym_api.py) over the one batched core: Gymnasium's own env checker,
registration, same dynamics as the TorchRL env / core, invalid actions, seeding, and the natively
batched vector env with NEXT_STEP autoreset. Random toy cores only (no trained artifacts) except one
test that skips when the embedded tiny_mnist checkpoint is absent."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import orderplan.env
from orderplan.env.gym_api import (
    OrderPlanningGymEnv,
    OrderPlanningVectorEnv,
    action_to_tensor,
    obs_to_numpy,
)
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import toy_core
from orderplan.infra.paths import PACKAGE_ROOT

ROOT = Path(__file__).resolve().parents[2]
ROUTER = {"budget": [1, 2, 4]}
# check_env notes that the hidden-state Box is unbounded (it is); test_check_env_passes asserts it is the only note
pytestmark = pytest.mark.filterwarnings("ignore:.*Box observation space m..imum value is .*infinity")


def gym_env(seed: int = 0, **fields) -> OrderPlanningGymEnv:
    return OrderPlanningGymEnv(core=toy_core(batch_size=1, seed=seed, **fields))


def assert_obs_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def episode(env: OrderPlanningGymEnv, actions, seed=None, options=None):
    obs, info = env.reset(seed=seed, options=options)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        observations.append(obs)
        rewards.append(r)
        assert trunc is False
        if term:
            break
    return observations, rewards, term


def router_actions(rng: np.random.Generator, N: int, K: int = 4, n_budgets: int = 3):
    """A full-episode list of valid router actions (budget index, then K blocks) for a fresh episode."""
    order, out, pos = rng.permutation(N), [], 0
    while pos < N:
        b = int(rng.integers(n_budgets))
        k = min([1, 2, 4][b], N - pos)
        blocks = list(order[pos:pos + k]) + [0] * (K - k)  # entries past k are ignored by the core
        out.append(np.array([b, *blocks], dtype=np.int64))
        pos += k
    return out


# -- Gymnasium's checker --------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{}, ROUTER, {"mode": "generate", "reward": "entropy"},
                                    {"hidden": "block", "reward": "anytime"}],
                         ids=["plain", "router", "generate", "hidden_block"])
def test_check_env_passes(fields):
    env = gym_env(**fields)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    # the only warnings allowed: the hidden states are an unbounded Box (they are)
    other = [str(w.message) for w in caught if "infinity" not in str(w.message)]
    assert other == []
    hidden_shape = (env.core.L, env.core.D) if fields.get("hidden", "token") == "token" else (env.core.N, env.core.D)
    assert env.observation_space["hidden"].shape == hidden_shape
    if fields.get("mode") == "generate":
        assert env.observation_space["tokens"].shape == (env.core.L,)
        assert env.observation_space["image"].shape == env.core.image_shape()


def test_spaces_and_observation_dtypes():
    env = gym_env()
    N, L, D = env.core.N, env.core.L, env.core.D
    assert isinstance(env.action_space, gymnasium.spaces.Discrete) and env.action_space.n == N
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert obs["hidden"].dtype == np.float32 and obs["hidden"].shape == (L, D)
    assert obs["action_mask"].dtype == np.int8 and obs["block_mask"].dtype == np.int8
    assert obs["action_mask"].sum() == N and obs["step"] == 0 and not obs["hidden"].any()
    assert info == {"image_index": int(obs["image_index"])}
    r_env = gym_env(**ROUTER)
    assert isinstance(r_env.action_space, gymnasium.spaces.MultiDiscrete)
    assert r_env.action_space.nvec.tolist() == [3] + [N] * 4


def test_action_space_sample_is_valid_and_seedable():
    for fields in ({}, ROUTER):
        env = gym_env(**fields)
        env.reset(seed=1)
        env.action_space.seed(0)
        done = False
        while not done:  # random valid actions always finish the episode
            a = env.action_space.sample()
            assert a in env.action_space
            _, _, done, _, _ = env.step(a)
        env.reset(seed=1)
        # Gymnasium's masked sampling is untouched
        if not fields:
            mask = np.zeros(env.core.N, np.int8)
            mask[3] = 1
            assert env.action_space.sample(mask=mask) == 3
    a = gym_env()
    b = gym_env()
    for e in (a, b):
        e.reset(seed=2)
        e.action_space.seed(5)
    assert [a.action_space.sample() for _ in range(5)] == [b.action_space.sample() for _ in range(5)]


# -- registration ---------------------------------------------------------------------------------


def test_registered_make_and_make_vec():
    assert "OrderPlanning-v0" in gymnasium.registry
    importlib.reload(orderplan.env)  # registering twice is guarded
    env = gymnasium.make("OrderPlanning-v0", core=toy_core(batch_size=1, reward="extrapolative"))
    assert isinstance(env.unwrapped, OrderPlanningGymEnv) and env.spec.id == "OrderPlanning-v0"
    obs, info = env.reset(seed=0)
    obs, r, term, trunc, info = env.step(int(np.argmax(obs["action_mask"])))
    assert isinstance(r, float) and not term and not trunc
    env.close()
    env.close()  # closing twice is fine
    venv = gymnasium.make_vec("OrderPlanning-v0", num_envs=2, core=toy_core(batch_size=2))
    assert isinstance(venv.unwrapped, OrderPlanningVectorEnv) and venv.num_envs == 2
    obs, _ = venv.reset(seed=0)
    assert obs["action_mask"].shape == (2, venv.unwrapped.core.N)


@pytest.mark.skipif(not (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists(),
                    reason="artifacts/tiny_mnist/gpt.safetensors not built")
def test_make_default_backbone():
    env = gymnasium.make("OrderPlanning-v0", backbone="tiny_mnist", reward="extrapolative")
    obs, info = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        obs, r, done, _, info = env.step(env.action_space.sample())
        total += r
    assert np.isfinite(total) and obs["step"] == env.unwrapped.core.N


# -- same dynamics as the TorchRL env and the core -------------------------------------------------


@pytest.mark.parametrize("fields", [{"reward": "future_loss"}, {"reward": "extrapolative", "weight": "neighbours"},
                                    {"reward": "likelihood"}, {"reward": "anytime", **ROUTER, "decision_cost": 0.5},
                                    {"mode": "generate", "reward": "entropy"}],
                         ids=["future_loss", "extrapolative", "likelihood", "router_anytime", "generate"])
def test_same_episode_as_torchrl_env_and_core(fields):
    gym = gym_env(seed=0, **fields)
    trl = OrderPlanningEnv(toy_core(batch_size=1, seed=0, **fields))
    core = toy_core(batch_size=1, seed=0, **fields)
    N = gym.core.N
    rng = np.random.default_rng(0)
    actions = router_actions(rng, N) if "budget" in fields else [np.int64(b) for b in rng.permutation(N)]

    observations, rewards, term = episode(gym, actions, seed=11)
    assert term and len(rewards) == len(actions)

    trl.set_seed(11)
    td = trl.reset()
    core.seed(11)
    core.reset()
    assert int(td["image_index"][0]) == int(core.image_index[0]) == int(observations[0]["image_index"])
    for t, a in enumerate(actions):
        ta = torch.as_tensor(a)[None]
        td = trl.step(td.set("action", ta))["next"]
        r_core, done = core.step(ta)
        assert rewards[t] == float(td["reward"][0, 0]) == float(r_core[0])
        np.testing.assert_array_equal(observations[t + 1]["hidden"], td["hidden"][0].float().numpy())
        assert_obs_equal(observations[t + 1], {k: v[0] for k, v in obs_to_numpy(core.observation()).items()})
    assert bool(td["terminated"][0, 0]) and bool(done[0])


def test_future_loss_telescopes_through_gym_api():
    env = gym_env(reward="future_loss")
    env.reset(seed=3)
    l_rest_empty = float(env.core.token_loss.sum())
    total, done, order = 0.0, False, iter(np.random.default_rng(1).permutation(env.core.N))
    while not done:
        _, r, done, _, _ = env.step(next(order))
        total += r
    assert total == pytest.approx(l_rest_empty, rel=1e-4)


# -- invalid actions and finished episodes --------------------------------------------------------


def test_invalid_actions_raise_and_leave_state_unchanged():
    env = gym_env(reward="extrapolative")
    twin = gym_env(reward="extrapolative")
    obs, _ = env.reset(seed=4)
    twin.reset(seed=4)
    obs, r, *_ = env.step(5)
    assert twin.step(5)[1] == r
    N = env.core.N
    bad = [5, -1, N, 2.0, np.float32(1), True, "3", None, [1], np.array([1, 2]), np.array(1.5), [[1]]]
    for a in bad:
        with pytest.raises(ValueError):
            env.step(a)
        now = {k: v[0] for k, v in obs_to_numpy(env.core.observation()).items()}
        assert_obs_equal(now, obs)
    # the env goes on exactly as the twin that never saw the invalid actions
    for a in (np.int64(7), np.array(0), torch.tensor(3)):
        o1, r1, *_ = env.step(a)
        o2, r2, *_ = twin.step(int(a))
        assert r1 == r2
        assert_obs_equal(o1, o2)


def test_invalid_router_actions_raise():
    env = gym_env(**ROUTER)
    obs, _ = env.reset(seed=0)
    bad = [np.array([3, 0, 1, 2, 3]), np.array([2, 0, 0, 1, 2]), np.array([1, 0, 16, 2, 3]),
           np.array([0, 1, 2, 3]), 4, np.array([0, 1, 2, 3, 4.0])]
    for a in bad:
        with pytest.raises(ValueError):
            env.step(a)
        assert_obs_equal({k: v[0] for k, v in obs_to_numpy(env.core.observation()).items()}, obs)
    obs, _, _, _, _ = env.step(np.array([1, 4, 9, 0, 0]))  # budget 2: the trailing entries are ignored
    assert obs["step"] == 2 and obs["block_mask"][[4, 9]].all() and obs["block_mask"].sum() == 2


def test_step_after_termination_raises_until_reset():
    env = gym_env()
    with pytest.raises(ValueError):  # never reset
        env.step(0)
    env.reset(seed=0)
    for b in range(env.core.N):
        _, _, term, _, _ = env.step(b)
    assert term
    for a in (0, env.action_space.sample()):
        with pytest.raises(ValueError, match="finished"):
            env.step(a)
    obs, _ = env.reset()
    assert obs["step"] == 0
    env.step(0)


# -- seeding and reset options --------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{"reward": "extrapolative"}, {"mode": "generate", "reward": "entropy"}],
                         ids=["teacher_forced", "generate"])
def test_same_seed_same_episode(fields):
    a = gym_env(seed=0, **fields)
    b = gym_env(seed=99, **fields)  # the construction seed is overridden by reset(seed=)
    actions = list(np.random.default_rng(2).permutation(a.core.N))
    obs_a, rew_a, _ = episode(a, actions, seed=21)
    obs_b, rew_b, _ = episode(b, actions, seed=21)
    assert rew_a == rew_b
    for x, y in zip(obs_a, obs_b):
        assert_obs_equal(x, y)
    # an unseeded reset continues the seeded stream identically
    assert_obs_equal(a.reset()[0], b.reset()[0])


def test_different_seeds_different_images():
    env = gym_env()
    images = {int(env.reset(seed=s)[0]["image_index"]) for s in range(6)}
    assert len(images) > 1
    gen = gym_env(mode="generate", reward="entropy")
    tokens = []
    for s in (1, 2):
        obs, _, _ = episode(gen, list(range(gen.core.N)), seed=s)
        tokens.append(obs[-1]["tokens"])
    assert (tokens[0] >= 0).all() and not np.array_equal(tokens[0], tokens[1])


def test_reset_image_index_option():
    env = gym_env()
    obs, info = env.reset(options={"image_index": 7})
    assert info["image_index"] == 7 == obs["image_index"]
    assert obs["label"] == int(env.core.labels[7])
    for bad in ({"image_index": env.core.num_images}, {"image_index": 1.5}, {"imageindex": 1}):
        with pytest.raises(ValueError):
            env.reset(options=bad)


def test_conversion_helpers():
    obs = {"hidden": torch.randn(2, 3, 4, dtype=torch.bfloat16), "block_mask": torch.tensor([[True, False]] * 2),
           "action_mask": torch.tensor([[False, True]] * 2), "label": torch.tensor([1, 2]),
           "step": torch.tensor([0, 1]), "image_index": torch.tensor([3, 4], dtype=torch.int32)}
    out = obs_to_numpy(obs)
    assert out["hidden"].dtype == np.float32
    np.testing.assert_array_equal(out["hidden"], obs["hidden"].float().numpy())
    assert out["block_mask"].dtype == np.int8 and out["image_index"].dtype == np.int64
    obs["hidden"].zero_()
    assert out["hidden"].any()  # never shares memory with the torch tensors
    assert action_to_tensor(np.uint8(3), "cpu").dtype == torch.long
    for bad in (1.0, True, "a", None, np.array([1.0]), torch.tensor([0.5])):
        with pytest.raises(ValueError):
            action_to_tensor(bad, "cpu")


# -- vector env -----------------------------------------------------------------------------------


def test_vector_env_shapes_and_core_rewards():
    B = 3
    venv = OrderPlanningVectorEnv(core=toy_core(batch_size=B, seed=0, reward="extrapolative"))
    ref = toy_core(batch_size=B, seed=0, reward="extrapolative")
    N, L, D = ref.N, ref.L, ref.D
    assert venv.num_envs == B and venv.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
    assert venv.single_action_space == gymnasium.spaces.Discrete(N)
    assert venv.action_space == gymnasium.vector.utils.batch_space(venv.single_action_space, B)
    assert venv.observation_space == gymnasium.vector.utils.batch_space(venv.single_observation_space, B)

    obs, info = venv.reset(seed=5)
    ref.seed(5)
    ref.reset()
    assert obs in venv.observation_space and obs["hidden"].shape == (B, L, D)
    np.testing.assert_array_equal(info["image_index"], ref.image_index.numpy())
    orders = np.stack([np.random.default_rng(i).permutation(N) for i in range(B)], 1)  # [N, B]
    for t in range(N):
        obs, rew, term, trunc, info = venv.step(orders[t])
        r_ref, d_ref = ref.step(torch.as_tensor(orders[t]))
        assert obs in venv.observation_space
        assert rew.shape == (B,) and term.dtype == bool and not trunc.any()
        np.testing.assert_array_equal(rew, r_ref.double().numpy())
        np.testing.assert_array_equal(term, d_ref.numpy())
        assert_obs_equal(obs, obs_to_numpy(ref.observation()))
    assert term.all()

    # NEXT_STEP: the following step resets every finished sub-env; its actions are ignored
    obs, rew, term, trunc, info = venv.step(np.full(B, -1))
    assert (rew == 0).all() and not term.any() and not trunc.any()
    assert (obs["step"] == 0).all() and (obs["action_mask"] == 1).all() and not obs["hidden"].any()
    ref.reset()  # the same random draw of new images
    np.testing.assert_array_equal(info["image_index"], ref.image_index.numpy())
    a = venv.action_space.sample()
    rew, _ = venv.step(a)[1], ref.step(torch.as_tensor(a))
    np.testing.assert_array_equal(rew, _[0].double().numpy())


def run_router_vector(block0_first: bool, steps: int = 40):
    """Random valid router actions in a 3-env vector env; per sub-env, its episodes (image, actions,
    rewards), checking the NEXT_STEP reset steps on the way. With `block0_first` every episode
    reveals block 0 in its first decision."""
    B, fields = 3, {"reward": "extrapolative", **ROUTER}
    venv = OrderPlanningVectorEnv(core=toy_core(batch_size=B, seed=1, **fields))
    N, K = venv.core.N, venv.core.K
    obs, info = venv.reset(seed=8)
    venv.action_space.seed(3)
    rng = np.random.default_rng(0)
    episodes = [[{"image": int(info["image_index"][i]), "actions": [], "rewards": []}] for i in range(B)]
    pending, saw_mixed = np.zeros(B, bool), False
    for _ in range(steps):
        a = venv.action_space.sample()
        assert a in venv.action_space
        if block0_first:
            for i in np.flatnonzero(obs["step"] == 0):
                a[i, 1:] = [0, *rng.choice(np.arange(1, N), K - 1, replace=False)]
        obs, rew, term, trunc, info = venv.step(a)
        saw_mixed |= bool(pending.any() and not pending.all())
        for i in range(B):
            if pending[i]:  # NEXT_STEP reset of sub-env i: action ignored, reward 0
                assert rew[i] == 0 and not term[i] and obs["step"][i] == 0 and obs["block_mask"][i].sum() == 0
                episodes[i].append({"image": int(info["image_index"][i]), "actions": [], "rewards": []})
            else:
                episodes[i][-1]["actions"].append(a[i].copy())
                episodes[i][-1]["rewards"].append(rew[i])
        pending = term.copy()
    assert saw_mixed
    return episodes, fields


def replay_matches(episodes, fields) -> None:
    single = gym_env(seed=0, **fields)
    n_done = 0
    for per_env in episodes:
        for ep in per_env:
            _, rewards, _ = episode(single, ep["actions"], options={"image_index": ep["image"]})
            np.testing.assert_allclose(rewards, ep["rewards"], rtol=1e-5, atol=1e-4)
            n_done += 1
    assert n_done > len(episodes)


def test_vector_router_mixed_autoreset_matches_single_env_replays():
    """Router episodes have different lengths, so sub-envs finish at different steps. Every
    sub-env's trajectory (with NEXT_STEP resets in between) equals a replay of the same episodes
    in a single env on the same images, with block 0 revealed first in every episode."""
    replay_matches(*run_router_vector(block0_first=True))


def test_vector_router_rewards_independent_of_batch_composition():
    """Rows with fewer unseen tokens than the batch maximum (padded query rows) get the same
    rewards as in a single env (a padding row once overwrote token 0's loss)."""
    replay_matches(*run_router_vector(block0_first=False))


def test_vector_invalid_action_in_mixed_step_changes_nothing():
    B, fields = 2, ROUTER
    envs_ = [OrderPlanningVectorEnv(core=toy_core(batch_size=B, seed=0, **fields)) for _ in range(2)]
    N = envs_[0].core.N
    for e in envs_:
        e.reset(seed=0)
    # row 0 finishes after 4 decisions of 4 blocks; row 1 reveals one block per decision
    for t in range(4):
        act = np.array([[2, 4 * t, 4 * t + 1, 4 * t + 2, 4 * t + 3], [0, t, 0, 0, 0]])
        outs = [e.step(act) for e in envs_]
    assert outs[0][2].tolist() == [True, False]
    revealed_1 = outs[0][0]["block_mask"][1].astype(bool)
    bad = np.array([[0, 0, 0, 0, 0], [0, int(np.flatnonzero(revealed_1)[0]), 0, 0, 0]])  # row 1: revealed block
    with pytest.raises(ValueError):
        envs_[0].step(bad)
    good = np.array([[0, 0, 0, 0, 0], [1, 8, 9, 0, 0]])
    o0, r0, t0, _, i0 = envs_[0].step(good)
    o1, r1, t1, _, i1 = envs_[1].step(good)
    np.testing.assert_array_equal(r0, r1)
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(i0["image_index"], i1["image_index"])
    assert_obs_equal(o0, o1)
    assert o0["step"].tolist() == [0, 6] and r0[0] == 0


def test_vector_reset_mask_and_options():
    B = 3
    venv = OrderPlanningVectorEnv(core=toy_core(batch_size=B, seed=0))
    obs, info = venv.reset(seed=0, options={"image_index": np.array([1, 2, 3])})
    np.testing.assert_array_equal(info["image_index"], [1, 2, 3])
    venv.step(np.array([0, 1, 2]))
    obs, info = venv.reset(options={"reset_mask": np.array([False, True, False]), "image_index": np.array([0, 9, 0])})
    assert obs["step"].tolist() == [1, 0, 1] and info["image_index"].tolist() == [1, 9, 3]
    with pytest.raises(ValueError):
        venv.step(np.array([0, 0, 0]))  # block 0 is revealed in row 0
    with pytest.raises(ValueError):
        venv.step(np.array([[1, 2, 3]]))  # wrong shape
    with pytest.raises(TypeError):
        venv.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError):
        venv.reset(options={"reset_mask": np.array([1, 0, 0])})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_bf16_backbone_gives_float32_numpy(device):
    """A bf16 backbone (what make_core builds on GPU): observations are float32 numpy on the host."""
    from orderplan.model.blocks import BlockGeometry
    from orderplan.config.common import BackboneConfig
    from orderplan.model.loading import Backbone
    from orderplan.env.core import EnvConfig, OrderPlanningCore
    from tests.conftest import randomized_gpt

    gpt = randomized_gpt().to(device, torch.bfloat16)
    bb = Backbone(cfg=BackboneConfig(), gpt=gpt, geometry=BlockGeometry(8, 8, 2), vq=None)
    codes = torch.randint(0, gpt.cfg.vocab_size, (4, gpt.cfg.num_tokens), generator=torch.Generator().manual_seed(0))
    core = OrderPlanningCore(bb, codes, torch.arange(4), EnvConfig(reward="extrapolative"), 1, seed=0)
    assert core.hidden_tok.dtype == torch.bfloat16
    env = OrderPlanningGymEnv(core=core)
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    obs, r, *_ = env.step(env.action_space.sample())
    assert obs["hidden"].dtype == np.float32 and obs["hidden"].any() and np.isfinite(r)
    np.testing.assert_array_equal(obs["hidden"], core.hidden_tok[0].float().cpu().numpy())


@pytest.mark.parametrize("bad", [0.9, np.array([1.7]), torch.tensor([2.0]), True, np.array([True])])
def test_reset_image_index_floats_and_bools_are_refused(bad):
    env = gym_env()
    env.reset(options={"image_index": 4})
    with pytest.raises(ValueError, match=r"options\['image_index'\] must be an integer"):
        env.reset(options={"image_index": bad})
    assert int(env.core.image_index[0]) == 4  # nothing changed


def test_vector_reset_image_index_floats_are_refused():
    venv = OrderPlanningVectorEnv(core=toy_core(batch_size=2, seed=0))
    venv.reset(options={"image_index": np.array([3, 4])})
    for bad in (np.array([0.9, 1.7]), torch.tensor([0.0, 1.0]), [0.5, 1]):
        with pytest.raises(ValueError, match=r"options\['image_index'\] must be an integer"):
            venv.reset(options={"image_index": bad})
    assert venv.core.image_index.tolist() == [3, 4]
    _, info = venv.reset(options={"image_index": torch.tensor([1, 2], dtype=torch.int16)})
    assert info["image_index"].tolist() == [1, 2]
