"""PPO fine-tuning of the behaviour-cloned OrderHead (run scripts/bc.py first).

    python scripts/ppo.py                                     # embedded tiny default, CPU
    python scripts/ppo.py agent.router=true env.decision_cost=1.0   # + budget router (1, 2 or 4 blocks)
    torchrun --nproc_per_node 4 scripts/ppo.py device=cuda      # one env batch per process, one model

Writes run_dir/orderhead.safetensors and run_dir/summary.json (held-out returns of raster, random,
oracle and the learned policy, oracle agreement, regret; with the router its decisions per episode
and the mean and histogram of the budgets it chose). Rerunning resumes from the last checkpoint.

Imports orderplan.train.ppo_run and orderplan.config.common only: the run lives there.
"""

from orderplan.cli import ppo

if __name__ == "__main__":
    ppo()
