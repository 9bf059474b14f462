"""Evaluating policies: the held-out report, teacher-forced and generation rollouts, the evaluate
run (`scripts/evaluate.py`), plots, FID/KID and the feature networks behind them.

Imports backbone/, envs/ and agents.planner; never agents.training."""
