"""Agents, in three rooms: `agents.planner` (the OrderHead and the policy interface shared by the
TorchRL env, the Gymnasium API, training and evaluation), `agents.training` (oracle data, behaviour
cloning, joint tuning, PPO) and `agents.evaluation` (held-out report, rollouts, FID, plots).

This top level re-exports the planner's public names only, so `import agents` stays light."""

from agents.planner.orderhead import (
    OrderHead,
    OrderHeadConfig,
    OrderHeadOutput,
    load_orderhead,
    orderhead_config_for,
    save_orderhead,
)
from agents.planner.policies import (
    POLICY_NAMES,
    BlockPolicy,
    FixedOrderPolicy,
    GymPolicy,
    OraclePolicy,
    OrderHeadPolicy,
    RandomPolicy,
    make_policy,
    run_episodes,
)

__all__ = [
    "OrderHead",
    "OrderHeadConfig",
    "OrderHeadOutput",
    "load_orderhead",
    "orderhead_config_for",
    "save_orderhead",
    "POLICY_NAMES",
    "BlockPolicy",
    "FixedOrderPolicy",
    "GymPolicy",
    "OraclePolicy",
    "OrderHeadPolicy",
    "RandomPolicy",
    "make_policy",
    "run_episodes",
]
