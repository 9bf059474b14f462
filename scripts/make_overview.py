"""The README's picture from an evaluate run's figures: samples of every policy side by side above
the mean reveal time of each block per policy.

    orderplan-evaluate policies=[raster,random,confident_first,bc,ppo] eval.num_samples=500 \
        eval.num_images=0 eval.seed_samples=250 plots.column_rows=4 run_dir=runs/overview
    python scripts/make_overview.py runs/overview docs/overview.png --max-width 640
"""

import argparse
from pathlib import Path

from orderplan.eval.plots import overview


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="an evaluate run_dir holding samples_side_by_side.png")
    ap.add_argument("out", type=Path, nargs="?", default=Path("docs/overview.png"))
    ap.add_argument("--max-width", type=int, default=900)
    args = ap.parse_args()
    panels = [args.run_dir / "samples_side_by_side.png", args.run_dir / "reveal_time_heatmaps.png"]
    missing = [str(p) for p in panels if not p.exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run orderplan-evaluate with generation (eval.num_samples > 0) first")
    print(overview(args.out, panels, args.max_width))


if __name__ == "__main__":
    main()
