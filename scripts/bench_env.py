"""Benchmark of the order-planning env on the tiny default (logic in `orderplan.env/benchmark.py`):

* TorchRL env throughput (env steps/s, transitions/s, episodes/s = images/s) at batch 1, 4, 16, 64
  under a random valid policy, full episodes;
* env time per step over the bare backbone work of the same step (gpt.append + gpt.query);
* batched oracle utilities over the naive reference, summed over all states of an episode;
* with --gpt-b, every ratio at GPT-B geometry (random weights; `src/orderplan/train/bench_gpt_b.py`): env
  step over the bare backbone, batched over naive oracle, OrderHead decision over env step, PPO
  frames/s and the env's memory per row, in --dtype (float32 or bfloat16) on --device.

The last lines are the ratios, one per line (tiny at --batch, GPT-B at --gpt-b-batch):

    env_overhead=<env time per step / bare backbone time>   (target <= 1.2)
    oracle_speedup=<naive oracle time / batched oracle time> (target >= 5)
    env_overhead_gpt_b=...  oracle_speedup_gpt_b=... (target >= 20)  head_over_step=...
    ppo_frames_per_s=...  mib_per_env_row=...

    OMP_NUM_THREADS=1 python scripts/bench_env.py [--device cpu] [--batches 1,4,16,64] [--batch 16]
    python scripts/bench_env.py --gpt-b [--gpt-b-only] [--device cuda --dtype bfloat16] [--gpt-b-batch 2]
"""



from orderplan.train.bench_gpt_b import add_arguments, report  # noqa: E402
from orderplan.env.benchmark import build_parser, run  # noqa: E402

if __name__ == "__main__":
    ap = build_parser()
    add_arguments(ap)
    args = ap.parse_args()
    lines = {} if args.gpt_b_only else run(args)
    if args.gpt_b or args.gpt_b_only:
        lines.update(report(args))
    print()
    for name, value in lines.items():
        print(f"{name}={value:.3f}")
