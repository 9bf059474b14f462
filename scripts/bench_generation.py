"""Benchmark: generation for evaluation against bare KV-cached decoding, in one run, same batch.

    raster_decode      orderplan.model.sampling.generate, raster order (the baseline: what decoding costs)
    evaluate_fixed     orderplan.eval.rollouts.generate_samples of a fixed-order policy (one KV pass
                       per batch, images decoded, snapshots taken): what scripts/evaluate.py pays
    evaluate_beliefs   the same policy stepping the env with the per-token query a belief planner reads

The last lines are the ratios (target for the first: >= 0.8):

    fixed_vs_decode=<evaluate_fixed samples/s / raster_decode samples/s>
    beliefs_vs_decode=<evaluate_beliefs samples/s / raster_decode samples/s>

--heap keep runs with freed memory kept in the heap (src/orderplan/infra/cpu_heap.py, what evaluate and power do
on CPU); --heap compare runs the whole benchmark once per setting, each in a fresh process (glibc's
thresholds cannot be put back for a fair second run), and prints heap_keep_speedup_<row>= (samples/s
with kept heap over default glibc) per row.

    python scripts/bench_generation.py [--samples 1000] [--batch 500] [--device cpu] [--heap default|keep|compare]
"""

import argparse
import re
import subprocess
import sys
import time


import torch  # noqa: E402

from orderplan.eval.rollouts import balanced_images, generate_samples  # noqa: E402
from orderplan.planner.policies import make_policy  # noqa: E402
from orderplan.config.common import BackboneConfig  # noqa: E402
from orderplan.infra.cpu_heap import keep_freed_heap_memory  # noqa: E402
from orderplan.model.loading import build_backbone  # noqa: E402
from orderplan.data.tokens import load_token_data
from orderplan.model.sampling import SamplingConfig, generate  # noqa: E402
from orderplan.env.core import EnvConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--heap", choices=("default", "keep", "compare"), default="default")
    args = ap.parse_args()
    if args.heap == "compare":
        compare_heap(["--samples", str(args.samples), "--batch", str(args.batch), "--device", args.device,
                      "--cfg-scale", str(args.cfg_scale)])
        return
    if args.heap == "keep" and not keep_freed_heap_memory():
        raise SystemExit("--heap keep: this C library has no glibc mallopt")
    cfg = BackboneConfig()
    bb = build_backbone(cfg, device=args.device)
    labels = load_token_data(cfg, "heldout")[1]
    labels = labels[balanced_images(labels)[torch.arange(args.samples) % len(labels)]]
    sc = SamplingConfig(cfg_scale=args.cfg_scale)
    L, S, B = bb.gpt.cfg.num_tokens, args.samples, args.batch
    print(f"tiny_mnist, {S} samples, batch {B}, cfg_scale {sc.cfg_scale}, device {args.device}, "
          f"threads {torch.get_num_threads()}")

    def decode() -> None:
        for j, i in enumerate(range(0, S, B)):
            cond = labels[i:i + B].to(bb.device)
            generate(bb.gpt, cond, torch.arange(L, device=bb.device).expand(len(cond), L), sc,
                     torch.Generator(device=bb.device).manual_seed(j))

    def evaluate(beliefs: bool):
        env = EnvConfig(sampling=sc, beliefs=beliefs)
        return lambda: generate_samples(lambda core: make_policy("raster", core), bb, labels, env, B, 0,
                                        num_snapshots=8, rewards=beliefs)

    rates = {}
    for name, fn in [("raster_decode", decode), ("evaluate_fixed", evaluate(False)),
                     ("evaluate_beliefs", evaluate(True))]:
        t = time.perf_counter()
        fn()
        rates[name] = S / (time.perf_counter() - t)
        print(f"{name:18s} {rates[name]:8.1f} samples/s", flush=True)
    print(f"fixed_vs_decode={rates['evaluate_fixed'] / rates['raster_decode']:.2f}")
    print(f"beliefs_vs_decode={rates['evaluate_beliefs'] / rates['raster_decode']:.2f}")


def compare_heap(argv: list[str]) -> None:
    """The benchmark with arguments `argv` once per --heap setting, each in its own process; ratios of
    samples/s per row."""
    rates: dict[str, dict[str, float]] = {}
    for heap in ("default", "keep"):
        out = subprocess.run([sys.executable, __file__, *argv, "--heap", heap], check=True, capture_output=True,
                             text=True).stdout
        print(f"--heap {heap}\n{out}", end="", flush=True)
        rates[heap] = {m[1]: float(m[2]) for m in re.finditer(r"^(\w+)\s+([\d.]+) samples/s", out, re.M)}
    for name, keep in rates["keep"].items():
        print(f"heap_keep_speedup_{name}={keep / rates['default'][name]:.2f}")


if __name__ == "__main__":
    main()
