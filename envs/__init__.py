"""The order-planning MDP: a batched TorchRL env (the core), a Gymnasium API over the same dynamics,
rewards, teacher-forced and generation modes. `import envs` registers `OrderPlanning-v0`."""

from envs.core import EnvConfig, OrderPlanningCore
from envs.factory import make_core, make_env
from envs.torchrl_env import OrderPlanningEnv

__all__ = ["EnvConfig", "OrderPlanningCore", "OrderPlanningEnv", "make_core", "make_env"]
