"""What checksums cost a job: run one job in this process (`python -m orderplan JOB` semantics) and
print its wall time, the seconds spent on integrity work (hashing bytes as they are written, hashing
files before they are read, writing checksum records; `orderplan.infra.integrity.integrity_seconds`)
and their ratio, measured in the same run.

    OMP_NUM_THREADS=1 python scripts/bench_integrity.py bc            # the default BC run
    python scripts/bench_integrity.py ppo ppo.total_frames=4096       # any job, any overrides

The last line is the ratio:

    integrity_overhead=<integrity seconds / job wall seconds>   (target <= 0.02)
"""

import sys
import time

from orderplan.cli import dispatch
from orderplan.infra.integrity import integrity_seconds

if __name__ == "__main__":
    t0 = time.perf_counter()
    dispatch(sys.argv[1:])
    wall = time.perf_counter() - t0
    spent = integrity_seconds()
    seconds = spent["hash_on_write"] + spent["hash_on_read"] + spent["records"]
    print(f"\njob wall {wall:.1f} s; integrity {seconds:.2f} s (hashing on write {spent['hash_on_write']:.2f} s, "
          f"on read {spent['hash_on_read']:.2f} s, records {spent['records']:.2f} s; "
          f"{spent['bytes_hashed'] / 2**20:.1f} MiB hashed)")
    print(f"integrity_overhead={seconds / wall:.4f}")
