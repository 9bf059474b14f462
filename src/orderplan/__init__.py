"""orderplan: which part of an image should an autoregressive generator produce next, posed as a
reinforcement-learning problem and solved (behaviour cloning on oracle labels, then PPO).

Rooms, bottom to top (a room imports only rooms below it; `tests/test_layout.py` checks this):
    infra/   checkpoints, distributed, seeding, console logs, validation, artifact checksums
    config/  run schemas shared by every job, Hydra composition, path resolution
    model/   the frozen generator: any-order GPT, VQ tokenizer, sampling, block geometry, orders, loading
    data/    embedded MNIST, ImageNet folders, extracted and synthetic codes
    oracle/  query-row losses, oracle utilities and their naive reference, expected utilities
    env/     the MDP: one batched core, TorchRL env, Gymnasium API, rewards, episodes, actions
    planner/ OrderHead, action distributions, the policy interface and registry
    eval/    the scorer, rollouts, FID and sample metrics, evaluate, plots
    train/   oracle data, BC, joint tuning, PPO, backbone / VQ training
The jobs (`orderplan-bc`, `python -m orderplan bc`, ...) are listed in `orderplan.cli`."""

__version__ = "0.1.0"
