"""The order-planning MDP: a batched TorchRL env (the core), a Gymnasium API over the same dynamics,
rewards, teacher-forced and generation modes. `import envs` registers `OrderPlanning-v0`.

Where things are: the dynamics in `envs.core`; every reward formula and the one discounting rule in
`envs.rewards`; the one random valid action in `envs.actions`; the one full-episode loop in
`envs.episodes`; the TorchRL / Gymnasium views in `envs.torchrl_env` / `envs.gym_api`; building
from configs in `envs.factory`; benchmarks in `envs.benchmark`. The KV-shared loss machinery and the
oracle utilities live in `backbone.future_loss`.

Imports backbone/ and envs/ only (and torchrl, gymnasium); never agents.
"""

import gymnasium as _gymnasium

from envs.core import EnvConfig, OrderPlanningCore
from envs.factory import make_core, make_env
from envs.torchrl_env import OrderPlanningEnv

if "OrderPlanning-v0" not in _gymnasium.registry:  # guard: importing twice must not re-register
    _gymnasium.register(id="OrderPlanning-v0", entry_point="envs.gym_api:OrderPlanningGymEnv",
                        vector_entry_point="envs.gym_api:OrderPlanningVectorEnv")

__all__ = ["EnvConfig", "OrderPlanningCore", "OrderPlanningEnv", "make_core", "make_env"]
