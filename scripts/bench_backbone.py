"""Benchmark: any-order KV-cached generation vs raster KV-cached generation vs the O(L^2)
full-recompute sampler of the seed experiments, for the tiny preset and for GPT-B geometry (random
weights). The last two lines are the ratios at GPT-B geometry (L = 256):

    any_order_vs_raster=<random-order KV tokens/s / raster KV tokens/s>      (target >= 0.9)
    any_order_vs_recompute=<random-order KV tokens/s / recompute tokens/s>   (target >= 10)

With --overhead-batch B (default 16) each preset also prints `decode_overhead=<ratio>`: seconds per
KV decode step of `generate` at batch B over the seconds its FLOPs take at the matmul throughput
measured in the same run (large = bound by launches, Python and host-device syncs, not by FLOPs).
--overhead-only prints just those lines.

    python scripts/bench_backbone.py [--batch 2] [--device cpu] [--recompute-steps N] [--skip-gpt-b]
                                     [--overhead-batch 16] [--overhead-only]
"""

import argparse


import torch

from orderplan.model.benchmark import decode_overhead, time_samplers
from orderplan.model.blocks import BlockGeometry
from orderplan.model.gpt import GPT, gpt_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--recompute-steps", type=int, default=None,
                    help="stop the O(L^2) sampler after N steps (its speed is then overstated)")
    ap.add_argument("--skip-gpt-b", action="store_true", help="tiny preset only (no final ratio lines)")
    ap.add_argument("--overhead-batch", type=int, default=16, help="batch of the decode-overhead line (0: skip it)")
    ap.add_argument("--overhead-only", action="store_true", help="only the decode-overhead lines (no sampler timings)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    setups = [("tiny", gpt_config("tiny"), 2)]
    if not args.skip_gpt_b:
        setups.append(("GPT-B", gpt_config("GPT-B"), 4))
    print(f"device={args.device} dtype={args.dtype} batch={args.batch} threads={torch.get_num_threads()}")
    times = None
    for name, cfg, block in setups:
        model = GPT(cfg).eval().requires_grad_(False).to(args.device, dtype)
        geom = BlockGeometry(cfg.grid_h, cfg.grid_w, block)
        if args.overhead_batch > 0:
            ov = decode_overhead(model, geom, args.overhead_batch)
            print(f"[{name}] batch={args.overhead_batch} decode step {ov.step_s * 1e3:.2f} ms, FLOP bound "
                  f"{ov.flops / ov.matmul_flops_s * 1e3:.3f} ms ({ov.flops / 1e6:.1f} MFLOP at "
                  f"{ov.matmul_flops_s / 1e9:.1f} GFLOP/s)  decode_overhead={ov.ratio:.1f}")
        if args.overhead_only:
            continue
        times = time_samplers(model, geom, args.batch, recompute_steps=args.recompute_steps)
        print(f"[{name}] L={geom.num_tokens} params={model.num_params() / 1e6:.1f}M  tokens/s: "
              f"raster_kv={times.raster_kv:.1f} random_block_kv={times.random_kv:.1f} "
              f"recompute={times.recompute:.1f} (over {times.recompute_steps} steps)  "
              f"ratios: any_order/raster={times.any_order_vs_raster:.3f} "
              f"any_order/recompute={times.any_order_vs_recompute:.1f}")
    if not args.skip_gpt_b and not args.overhead_only:
        print(f"any_order_vs_raster={times.any_order_vs_raster:.3f}")
        print(f"any_order_vs_recompute={times.any_order_vs_recompute:.1f}")


if __name__ == "__main__":
    main()
