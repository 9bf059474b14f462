"""The planner: the OrderHead (latent core, value head, budget router), its action distributions,
and the policy interface and registry (fixed orders, random, oracles, learned)."""
