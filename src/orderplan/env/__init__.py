"""The order-planning MDP: a batched TorchRL env (the core), a Gymnasium API over the same dynamics,
rewards, teacher-forced and generation modes. `import orderplan.env` registers `OrderPlanning-v0`.

Where things are: the dynamics in `orderplan.env.core`; every reward formula and the one discounting rule in
`orderplan.env.rewards`; the one random valid action in `orderplan.env.actions`; the one full-episode loop in
`orderplan.env.episodes`; the TorchRL / Gymnasium views in `orderplan.env.torchrl_env` / `orderplan.env.gym_api`; building
from configs in `orderplan.env.factory`; benchmarks in `orderplan.env.benchmark`. The KV-shared loss machinery and the
oracle utilities live in `orderplan.oracle.future_loss`."""

import gymnasium as _gymnasium

from orderplan.env.core import EnvConfig, OrderPlanningCore
from orderplan.env.factory import make_core, make_env
from orderplan.env.torchrl_env import OrderPlanningEnv

if "OrderPlanning-v0" not in _gymnasium.registry:  # guard: importing twice must not re-register
    _gymnasium.register(id="OrderPlanning-v0", entry_point="orderplan.env.gym_api:OrderPlanningGymEnv",
                        vector_entry_point="orderplan.env.gym_api:OrderPlanningVectorEnv")

__all__ = ["EnvConfig", "OrderPlanningCore", "OrderPlanningEnv", "make_core", "make_env"]
