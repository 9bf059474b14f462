"""The order-planning MDP: a batched TorchRL env (the core), a Gymnasium API over the same dynamics,
rewards, teacher-forced and generation modes. `import envs` registers `OrderPlanning-v0`."""

import gymnasium as _gymnasium

from envs.core import EnvConfig, OrderPlanningCore
from envs.factory import make_core, make_env
from envs.torchrl_env import OrderPlanningEnv

if "OrderPlanning-v0" not in _gymnasium.registry:  # guard: importing twice must not re-register
    _gymnasium.register(id="OrderPlanning-v0", entry_point="envs.gym_api:OrderPlanningGymEnv",
                        vector_entry_point="envs.gym_api:OrderPlanningVectorEnv")

__all__ = ["EnvConfig", "OrderPlanningCore", "OrderPlanningEnv", "make_core", "make_env"]
