"""The planner: the OrderHead (latent core, value head, budget router), its action distributions,
and the policy interface and registry (fixed orders, random, oracles, learned).

Imports backbone/ and envs/ only; never agents.training or agents.evaluation (they build on this)."""
