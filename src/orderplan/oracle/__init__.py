"""The oracle's mathematics, in nats: query-row future losses, oracle and extrapolative utilities
with their naive per-candidate reference (`future_loss`), and the ground-truth-free expected
utilities of generation mode (`expected`)."""
