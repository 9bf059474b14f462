"""PPO fine-tuning of the behaviour-cloned OrderHead (run scripts/bc.py first).

    python scripts/ppo.py                                     # embedded tiny default, CPU
    python scripts/ppo.py agent.router=true env.decision_cost=1.0   # + budget router (1, 2 or 4 blocks)
    torchrun --nproc_per_node 4 scripts/ppo.py device=cuda      # one env batch per process, one model

Writes run_dir/orderhead.safetensors and run_dir/summary.json (held-out returns of raster, random,
oracle and the learned policy, oracle agreement, regret; with the router its decisions per episode
and the mean and histogram of the budgets it chose). Rerunning resumes from the last checkpoint.

Imports agents.training.ppo_run and backbone.config only: the run lives there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from agents.training.ppo_run import PPORun, run_ppo
from backbone.config import to_typed


@hydra.main(config_path="../configs", config_name="ppo", version_base=None)
def main(cfg: DictConfig) -> None:
    run_ppo(to_typed(cfg, PPORun))


if __name__ == "__main__":
    main()
