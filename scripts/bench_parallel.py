"""Benchmark: parallel decoding (S forwards per image, `orderplan.model.parallel`) against
token-by-token KV decoding (L forwards), same model, batch, raster order and sampler (CFG 2.0), one run.
The last line is the ratio at the tiny preset (L = 64, the embedded default's geometry):

    parallel_vs_token_by_token=<images/s of raster in S decisions / images/s token by token>   (target >= 3 at S = 16)

Each line also gives `confident@S`, whose forwards query every unseen token. --gpt-b adds the GPT-B
geometry (random weights, L = 256).

    python scripts/bench_parallel.py [--batch 16 64] [--steps 16] [--device cpu] [--gpt-b]
"""

import argparse

import torch

from orderplan.model.benchmark import time_parallel
from orderplan.model.gpt import GPT, gpt_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 500])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gpt-b", action="store_true", help="also GPT-B geometry (random weights)")
    args = ap.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} steps={args.steps}")
    torch.manual_seed(0)
    presets = [("tiny", gpt_config("tiny"))] + ([("GPT-B", gpt_config("GPT-B"))] if args.gpt_b else [])
    ratio = None
    for name, cfg in presets:
        model = GPT(cfg).eval().requires_grad_(False).to(args.device)
        for p in model.parameters():  # random weights everywhere (the output layer starts at zero)
            torch.nn.init.normal_(p, std=0.02)
        for batch in args.batch:
            t = time_parallel(model, batch, args.steps)
            print(f"[{name}] L={cfg.num_tokens} batch={batch} images/s: token_by_token={t.token_by_token:.1f} "
                  f"raster@{t.steps}={t.parallel:.1f} confident@{t.steps}={t.confident:.1f}  "
                  f"ratio={t.ratio:.2f} confident_ratio={t.confident / t.token_by_token:.2f}")
            if name == "tiny" and ratio is None:
                ratio = t.ratio
    print(f"parallel_vs_token_by_token={ratio:.2f}")


if __name__ == "__main__":
    main()
