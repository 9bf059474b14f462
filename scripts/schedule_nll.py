"""How many nats does parallel decoding's independent sampling leave out? (src/orderplan/eval/schedule_nll.py)

    python scripts/schedule_nll.py                                   # every rule at S = 64, 32, 16, 8, 4
    python scripts/schedule_nll.py 'schedules=[raster@64,raster@16]' num_images=50

Writes run_dir/results.json and results.md: each schedule's held-out NLL (nats per token) under the
factorisation it samples from, and its paired excess over the same rule with one token per step.
"""

from orderplan.cli import schedule_nll

if __name__ == "__main__":
    schedule_nll()
