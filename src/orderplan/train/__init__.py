"""Training the planner: the oracle data set, state features, behaviour cloning, limited joint
tuning and PPO."""
