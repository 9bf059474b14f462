"""Agents: the OrderHead latent planner (`agents.orderhead`) and the policy interface shared by the
TorchRL env, the Gymnasium API, evaluation and training (`agents.policies`)."""

from agents.orderhead import (
    OrderHead,
    OrderHeadConfig,
    OrderHeadOutput,
    load_orderhead,
    orderhead_config_for,
    save_orderhead,
)
from agents.policies import (
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
