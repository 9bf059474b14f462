"""Training the planner: the oracle data set, state features, behaviour cloning, limited joint
tuning and PPO.

Imports backbone/, orderplan.env/, orderplan.planner and orderplan.eval (for the held-out report written at
the end of a run); orderplan.planner and orderplan.eval never import this package."""
