"""Training the planner: the oracle data set, state features, behaviour cloning, limited joint
tuning and PPO.

Imports backbone/, envs/, agents.planner and agents.evaluation (for the held-out report written at
the end of a run); agents.planner and agents.evaluation never import this package."""
