"""Benchmark of the order-planning env on the tiny default (logic in `envs/benchmark.py`):

* TorchRL env throughput (env steps/s, transitions/s, episodes/s = images/s) at batch 1, 4, 16, 64
  under a random valid policy, full episodes;
* env time per step over the bare backbone work of the same step (gpt.append + gpt.query);
* batched oracle utilities over the naive reference, summed over all states of an episode;
* with --gpt-b, the oracle speedup at GPT-B geometry (random weights) on one state.

The last two lines are the ratios at batch 16:

    env_overhead=<env time per step / bare backbone time>   (target <= 1.2)
    oracle_speedup=<naive oracle time / batched oracle time> (target >= 5)

    OMP_NUM_THREADS=1 python scripts/bench_env.py [--device cpu] [--batches 1,4,16,64] [--batch 16] [--gpt-b]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
