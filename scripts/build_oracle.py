"""Stage 2: build the oracle data set (states + oracle utilities) for behaviour cloning.

    python scripts/build_oracle.py                                   # tiny default
    python scripts/build_oracle.py behaviour=oracle kind=extrapolative weight=neighbours out_dir=runs/oracle/x
    torchrun --nproc_per_node 2 scripts/build_oracle.py num_images=null   # rank r builds images[r::2]

Rerunning with the same out_dir resumes (a larger num_images extends the set); a set there built
differently (kind, behaviour, seed, states_per_image, backbone weights, data, ...) is refused.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra
from omegaconf import DictConfig

from agents.training.oracle_data import BuildOracleRun, build_oracle
from backbone.config import to_typed


@hydra.main(config_path="../configs", config_name="build_oracle", version_base=None)
def main(cfg: DictConfig) -> None:
    build_oracle(to_typed(cfg, BuildOracleRun))


if __name__ == "__main__":
    main()
