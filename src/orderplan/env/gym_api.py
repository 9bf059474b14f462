"""The Gymnasium API over the order-planning MDP. Both classes drive the one batched implementation
of the dynamics, `orderplan.env.core.OrderPlanningCore`; nothing here recomputes a transition or a reward.

* `OrderPlanningGymEnv` (`gymnasium.Env`, id `OrderPlanning-v0`): one episode at a time over a core
  with batch_size 1.
* `OrderPlanningVectorEnv` (`gymnasium.vector.VectorEnv`): `num_envs` episodes natively batched in
  one core (no per-env Python loop, no subprocesses), `AutoresetMode.NEXT_STEP`.

Observations are dicts of numpy arrays (`obs_to_numpy`): hidden float32 [L, D] (or [N, D] with
env.hidden=block; bf16 on GPU is converted), block_mask / action_mask int8 [N] (Gymnasium's mask
convention: 1 = unrevealed block, a legal choice), label, step, image_index (integers); generation
mode adds tokens int64 [L] (-1 where not generated yet) and image float32 [C, H, W] in [-1, 1]
(zeros until the episode is done); env.beliefs adds entropy float32 [L] (H_j(S), nats) and
query_hidden float32 [N, D]. The vector env batches each entry along a leading axis.

Actions: a block index, Discrete(N); with the budget router MultiDiscrete([len(budgets)] + [N] * K)
(budget index, then K ordered blocks; entries past the clipped budget are ignored). An invalid action
(revealed block, out of range, duplicate, wrong shape or dtype) raises ValueError from the core and
leaves the state unchanged; stepping a finished episode raises until reset.

`action_space.sample()` without a mask returns a uniformly random *valid* action of the current
state (the spaces carry the env's current action mask in `valid`; the draw is
`orderplan.env.actions.random_valid_action`, seeded from the space's numpy generator); `sample(mask=...)`
and `contains` are Gymnasium's. A detached copy of a space keeps the mask it had when copied."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from orderplan.env.actions import random_valid_action
from orderplan.env.core import OrderPlanningCore
from orderplan.env.rewards import discount_factors

ENV_ID = "OrderPlanning-v0"

# -- torch <-> numpy ------------------------------------------------------------------------------

_INT8_KEYS = ("block_mask", "action_mask")
_INT64_KEYS = ("label", "step", "image_index", "tokens")


def obs_to_numpy(obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Core observation (batched torch tensors, any device/dtype) -> fresh numpy arrays with the
    dtypes of the Gymnasium spaces: floats -> float32 (bf16 included), masks -> int8, indices -> int64."""
    out = {}
    for key, t in obs.items():
        t = t.detach()
        if key in _INT8_KEYS:
            t = t.to("cpu", torch.int8)
        elif key in _INT64_KEYS:
            t = t.to("cpu", torch.int64)
        elif t.is_floating_point():
            t = t.to("cpu", torch.float32)
        else:
            t = t.cpu()
        out[key] = t.numpy().copy()  # a copy: never shares memory with the core's tensors
    return out


def action_to_tensor(action: Any, device: torch.device | str) -> torch.Tensor:
    """An action (int, numpy scalar/array, sequence or torch tensor) -> a LongTensor on `device`.
    Raises ValueError for anything that is not integer-valued (floats, bools, strings, ragged lists)."""
    if isinstance(action, torch.Tensor):
        t = action.detach()
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"action must be integer-valued, got a tensor of dtype {t.dtype}")
        return t.to(device=device, dtype=torch.long)
    if isinstance(action, (bool, np.bool_)):
        raise ValueError("action must be integer-valued, got a bool")
    try:
        arr = np.asarray(action)
    except (TypeError, ValueError) as e:
        raise ValueError(f"action must be an integer or an integer array, got {action!r}") from e
    if arr.dtype.kind not in "iu":
        raise ValueError(f"action must be an integer or an integer array, got dtype {arr.dtype} ({action!r})")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("action index out of range")
    return torch.from_numpy(arr.astype(np.int64)).to(device)


def action_shape(core: OrderPlanningCore, batched: bool) -> tuple[int, ...]:
    one = (1 + core.K,) if core.router else ()
    return (core.B, *one) if batched else one


# -- spaces ---------------------------------------------------------------------------------------


def observation_space(core: OrderPlanningCore) -> spaces.Dict:
    """The single-env observation space of a core's observations."""
    N, L, D = core.N, core.L, core.D
    hidden_shape = (L, D) if core.cfg.hidden == "token" else (N, D)
    d: dict[str, spaces.Space] = {
        "hidden": spaces.Box(-np.inf, np.inf, hidden_shape, np.float32),
        "block_mask": spaces.MultiBinary(N),
        "action_mask": spaces.MultiBinary(N),
        "label": spaces.Discrete(core.gpt.cfg.num_classes),
        "step": spaces.Discrete(N + 1),
        "image_index": spaces.Discrete(core.num_images),
    }
    if core.cfg.beliefs:
        d["entropy"] = spaces.Box(0.0, np.inf, (L,), np.float32)
        d["query_hidden"] = spaces.Box(-np.inf, np.inf, (N, D), np.float32)
    if core.cfg.mode == "generate":
        d["tokens"] = spaces.Box(-1, core.gpt.cfg.vocab_size - 1, (L,), np.int64)
        d["image"] = spaces.Box(-1.0, 1.0, core.image_shape(), np.float32)
    return spaces.Dict(d)


class _ValidSampling:
    """Mixin for action spaces: `sample()` with neither mask nor probability draws a valid action of
    the owning env's current state, read from `self.valid` ([N] or [B, N] int8, kept up to date by the
    env). Everything else (contains, sample with a mask, seeding) is the base space's."""

    def _init_valid(self, core: OrderPlanningCore, rows: int | None) -> None:
        self.valid = np.ones((core.N,) if rows is None else (rows, core.N), dtype=np.int8)
        self._budgets = list(core.cfg.budget) if core.router else None

    def sample(self, mask: Any = None, probability: Any = None) -> Any:
        if mask is not None or probability is not None:
            return super().sample(mask=mask, probability=probability)  # type: ignore[misc]
        # the space's numpy generator seeds a torch generator for the one random valid action, so
        # Gymnasium's seeding holds: the same space seed gives the same sequence of samples
        g = torch.Generator().manual_seed(int(self.np_random.integers(2**63 - 1)))
        valid = torch.from_numpy(self.valid.reshape(-1, self.valid.shape[-1]) != 0)
        return self._format(random_valid_action(valid, g, self._budgets).numpy().astype(np.int64))


class BlockSpace(_ValidSampling, spaces.Discrete):
    """Discrete(N): the next block."""

    def __init__(self, core: OrderPlanningCore, seed: int | None = None):
        super().__init__(core.N, seed=seed)
        self._init_valid(core, None)

    def _format(self, act: np.ndarray) -> np.int64:
        return np.int64(act[0])


class RouterSpace(_ValidSampling, spaces.MultiDiscrete):
    """MultiDiscrete([len(budgets)] + [N] * K): budget index, then K ordered blocks."""

    def __init__(self, core: OrderPlanningCore, seed: int | None = None):
        super().__init__([len(core.budgets)] + [core.N] * core.K, dtype=np.int64, seed=seed)
        self._init_valid(core, None)

    def _format(self, act: np.ndarray) -> np.ndarray:
        return act[0].astype(self.dtype)


class BatchedBlockSpace(_ValidSampling, spaces.MultiDiscrete):
    """batch_space(Discrete(N), B) = MultiDiscrete([N] * B)."""

    def __init__(self, core: OrderPlanningCore, seed: int | None = None):
        super().__init__([core.N] * core.B, dtype=np.int64, seed=seed)
        self._init_valid(core, core.B)

    def _format(self, act: np.ndarray) -> np.ndarray:
        return act.astype(self.dtype)


class BatchedRouterSpace(_ValidSampling, spaces.Box):
    """batch_space(router MultiDiscrete, B): an int64 Box [B, 1 + K] (what Gymnasium batches a
    MultiDiscrete into)."""

    def __init__(self, core: OrderPlanningCore, seed: int | None = None):
        high = np.array([len(core.budgets) - 1] + [core.N - 1] * core.K, dtype=np.int64)
        super().__init__(low=np.zeros((core.B, 1 + core.K), np.int64), high=np.tile(high, (core.B, 1)),
                         dtype=np.int64, seed=seed)
        self._init_valid(core, core.B)

    def _format(self, act: np.ndarray) -> np.ndarray:
        return act.astype(self.dtype)


def _image_index_option(core: OrderPlanningCore, options: dict[str, Any]) -> torch.Tensor | None:
    if "image_index" not in options or options["image_index"] is None:
        return None
    try:
        idx = action_to_tensor(options["image_index"], core.device)
    except ValueError as e:  # the core would refuse these too; name the option rather than "action"
        raise ValueError(f"options['image_index'] must be an integer, or an integer array / tensor of image ids "
                         f"(no floats or bools), got {options['image_index']!r}") from e
    return idx.reshape(core.B) if idx.numel() == core.B else idx  # the core validates shape and range


def _check_options(options: dict[str, Any] | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    options = dict(options or {})
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; supported: {list(allowed)}")
    return options


def _build_core(core: OrderPlanningCore | None, batch_size: int, backbone: Any, device: Any, seed: int | None,
                dtype: torch.dtype | None, overrides: dict[str, Any]) -> OrderPlanningCore:
    if core is None:
        from orderplan.env.factory import make_core

        return make_core(backbone, batch_size=batch_size, device=device, seed=seed, dtype=dtype, **overrides)
    if overrides:
        raise ValueError(f"pass env config fields to make_core, not together with core=: {sorted(overrides)}")
    if not isinstance(core, OrderPlanningCore):
        raise TypeError(f"core must be an OrderPlanningCore, got {type(core).__name__}")
    if core.B != batch_size:
        raise ValueError(f"the core has batch_size {core.B}, expected {batch_size}")
    return core


# -- single env -----------------------------------------------------------------------------------


class OrderPlanningGymEnv(gymnasium.Env):
    """One order-planning episode at a time (Gymnasium API) over an `OrderPlanningCore` with batch_size 1.

    OrderPlanningGymEnv(core=None, *, backbone="tiny_mnist", device="cpu", seed=0, dtype=None,
                        **env_fields)
    builds the core with `make_core` (env_fields: reward=, mode=, budget=, hidden=, ... or dotted
    config keys), or wraps `core` (batch_size 1). `reset(seed=, options={"image_index": i})`:
    a seed reseeds the core (image draws, generation-mode sampling). `step(action)` ->
    (obs, reward [nats, float], terminated, False, {"image_index": i}); with the router in semi-MDP
    mode (env.gamma set) the info also has "decision_blocks" (k, blocks revealed by this step) and
    "discount" (gamma^k, the discount from this decision to the next).
    """

    metadata = {"render_modes": []}

    def __init__(self, core: OrderPlanningCore | None = None, *, backbone: Any = "tiny_mnist",
                 device: str | torch.device = "cpu", seed: int | None = 0, dtype: torch.dtype | None = None,
                 render_mode: str | None = None, **env_fields: Any):
        if render_mode is not None:
            raise ValueError(f"OrderPlanning-v0 does not render (render_mode={render_mode!r})")
        self.render_mode = None
        self.core = _build_core(core, 1, backbone, device, seed, dtype, env_fields)
        self.observation_space = observation_space(self.core)
        self.action_space = RouterSpace(self.core) if self.core.router else BlockSpace(self.core)

    def _observe(self) -> dict[str, Any]:
        obs = obs_to_numpy(self.core.observation())
        self.action_space.valid[:] = obs["action_mask"][0]
        out: dict[str, Any] = {}
        for key, v in obs.items():
            out[key] = v[0] if v.ndim > 1 else v.dtype.type(v[0])
        return out

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"image_index": int(self.core.image_index[0])}
        if self.core.smdp:
            k = self.core.decision_blocks[0]
            info.update(decision_blocks=int(k), discount=float(discount_factors(k, self.core.cfg.gamma)))
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = _check_options(options, ("image_index",))
        if seed is not None:
            self.core.seed(int(seed))
        self.core.reset(None, _image_index_option(self.core, options))
        return self._observe(), self._info()

    def step(self, action: Any):
        a = action_to_tensor(action, self.core.device)
        want = action_shape(self.core, batched=False)
        if tuple(a.shape) != want:
            what = f"budget index, then {self.core.K} blocks" if self.core.router else "a block index"
            raise ValueError(f"action must have shape {want} ({what}), got {tuple(a.shape)}")
        reward, done = self.core.step(a[None])
        return self._observe(), float(reward[0]), bool(done[0]), False, self._info()

    def action_masks(self) -> np.ndarray:
        """bool [N]: the unrevealed blocks (sb3-contrib's MaskablePPO convention)."""
        return (~self.core.revealed[0]).cpu().numpy()

    def close(self) -> None:
        pass


# -- vector env -----------------------------------------------------------------------------------


class OrderPlanningVectorEnv(gymnasium.vector.VectorEnv):
    """`num_envs` episodes batched in one core (batch_size = num_envs), Gymnasium's NEXT_STEP autoreset:
    the step after a sub-env terminated resets it (its action is ignored; reward 0, terminated False).

    OrderPlanningVectorEnv(num_envs=None, core=None, *, backbone="tiny_mnist", device="cpu", seed=0,
                           dtype=None, **env_fields)
    `reset(seed=int, options={"image_index": [B], "reset_mask": bool [B]})`: one core, one generator,
    so the seed is a single int. `step(actions)` with actions [B] (router: [B, 1 + K]) ->
    (obs, rewards float64 [B], terminated [B], truncated [B] (always False), {"image_index": [B], ...});
    with the router in semi-MDP mode (env.gamma set) the info also has "decision_blocks" int64 [B]
    (k per sub-env, 0 on autoreset steps) and "discount" float64 [B] (gamma^k).
    Invalid actions on rows that are not being reset raise ValueError and nothing observable changes.
    """

    def __init__(self, num_envs: int | None = None, core: OrderPlanningCore | None = None, *,
                 backbone: Any = "tiny_mnist", device: str | torch.device = "cpu", seed: int | None = 0,
                 dtype: torch.dtype | None = None, render_mode: str | None = None, **env_fields: Any):
        if render_mode is not None:
            raise ValueError(f"OrderPlanning-v0 does not render (render_mode={render_mode!r})")
        if num_envs is None:
            if core is None:
                raise ValueError("give num_envs (or a core)")
            num_envs = core.B
        self.core = _build_core(core, int(num_envs), backbone, device, seed, dtype, env_fields)
        self.num_envs = self.core.B
        self.metadata = {"render_modes": [], "autoreset_mode": gymnasium.vector.AutoresetMode.NEXT_STEP}
        self.render_mode = None
        self.single_observation_space = observation_space(self.core)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.single_action_space = RouterSpace(self.core) if self.core.router else BlockSpace(self.core)
        self.action_space = BatchedRouterSpace(self.core) if self.core.router else BatchedBlockSpace(self.core)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)

    def _observe(self) -> dict[str, np.ndarray]:
        obs = obs_to_numpy(self.core.observation())
        self.action_space.valid[:] = obs["action_mask"]
        return obs

    def _info(self) -> dict[str, Any]:
        info = {"image_index": self.core.image_index.cpu().numpy().copy(),
                "_image_index": np.ones(self.num_envs, dtype=bool)}
        if self.core.smdp:
            k = self.core.decision_blocks.cpu().numpy().astype(np.int64)
            info.update(decision_blocks=k, _decision_blocks=np.ones(self.num_envs, dtype=bool),
                        discount=discount_factors(self.core.decision_blocks, self.core.cfg.gamma).cpu().numpy(),
                        _discount=np.ones(self.num_envs, dtype=bool))
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
                raise TypeError("the batched env has one core and one generator: seed must be an int (or None), "
                                f"got {seed!r}")
            super().reset(seed=int(seed))
        options = _check_options(options, ("image_index", "reset_mask"))
        rows = None
        if options.get("reset_mask") is not None:
            mask = np.asarray(options["reset_mask"])
            if mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},), "
                                 f"got {mask.dtype} {mask.shape}")
            rows = torch.from_numpy(mask.copy()).to(self.core.device)
        image_index = _image_index_option(self.core, options)
        if seed is not None:
            self.core.seed(int(seed))
        self.core.reset(rows, image_index)
        if rows is None:
            self._autoreset[:] = False
        else:
            self._autoreset[mask] = False
        return self._observe(), self._info()

    def step(self, actions: Any):
        core, B = self.core, self.num_envs
        a = action_to_tensor(actions, core.device)
        want = action_shape(core, batched=True)
        if tuple(a.shape) != want:
            raise ValueError(f"actions must have shape {want}, got {tuple(a.shape)}")
        ar = self._autoreset
        if not ar.any():
            reward, done = core.step(a)
        elif ar.all():
            core.reset()
            reward = torch.zeros(B, device=core.device)
            done = torch.zeros(B, dtype=torch.bool, device=core.device)
        else:
            # Step the live rows only (an invalid live action raises before anything changes),
            # then restart the finished ones.
            rows = torch.from_numpy(ar.copy()).to(core.device)
            reward, done = core.step(a, active=~rows)
            core.reset(rows)
            done = done & ~rows
        terminated = done.cpu().numpy().copy()
        self._autoreset = terminated.copy()
        return (self._observe(), reward.double().cpu().numpy().copy(), terminated,
                np.zeros(B, dtype=bool), self._info())

    def action_masks(self) -> np.ndarray:
        """bool [B, N]: the unrevealed blocks of every sub-env."""
        return (~self.core.revealed).cpu().numpy()

    def close_extras(self, **kwargs: Any) -> None:
        pass
