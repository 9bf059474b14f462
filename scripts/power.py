"""How many samples separate two orders by FID? Paired dFID(a - b) with its bootstrap interval at
growing N, until the half-width is under target_ratio x |dFID| (src/orderplan/eval/power.py).

    python scripts/power.py                                   # raster vs random, embedded default
    python scripts/power.py power.max_minutes=60 power.a=bc power.b=raster
    python scripts/power.py power.chunk=500 power.checkpoints=[500,1000] power.max_samples=1000   # quick

Writes run_dir/power.json, power.md, power.png; finished chunks are kept, so a rerun resumes.
"""

from orderplan.cli import power

if __name__ == "__main__":
    power()
