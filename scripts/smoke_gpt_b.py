"""GPT-B smoke chain on CPU: extract_codes (synthetic) -> build_oracle -> bc -> ppo -> evaluate, the real
scripts with tiny budgets at GPT-B geometry (random weights, no files; src/orderplan/train/smoke.py).

    python scripts/smoke_gpt_b.py                                  # -> runs/smoke_gpt_b/, a few minutes
    python scripts/smoke_gpt_b.py --root /tmp/smoke --n-layer 12   # the full 12-layer GPT-B stack (slower)

Prints each stage's wall time and writes root/smoke_summary.json.
"""

import argparse


from orderplan.train.smoke import SmokeConfig, run_smoke


def main() -> None:
    d = SmokeConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=d.root, help="run root (every stage's output dir lies under it)")
    ap.add_argument("--n-layer", type=int, default=d.n_layer, help="GPT-B depth (12 = full); width and geometry stay")
    ap.add_argument("--seed", type=int, default=d.seed)
    args = ap.parse_args()
    run_smoke(SmokeConfig(root=args.root, n_layer=args.n_layer, seed=args.seed))


if __name__ == "__main__":
    main()
