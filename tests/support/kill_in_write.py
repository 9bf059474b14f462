"""Run a script with a SIGKILL halfway through the write of one output file (tests/test_crash_resume.py).

    python tests/support/kill_in_write.py PATTERN NEEDLE scripts/X.py key=value ...

Every write of the project goes through `orderplan.infra.integrity.atomic_write` (JSON, torch files,
safetensors, PNGs; re-exported by `orderplan.infra.checkpoint`). It is wrapped here, before the script imports anything else, so that the first
write whose path matches PATTERN (fnmatch against the path's trailing components, e.g.
"bc/summary.json" or "step_00000024.pt") and whose bytes contain NEEDLE ("-" = any write) writes
half of its bytes into the real writer's temp file, fsyncs them and kills the process with SIGKILL:
what a crash mid-write leaves behind, produced by the real writer's own code path. Other writes are
untouched. The script then runs as `python scripts/X.py ...` would (runpy, as __main__).
"""

from __future__ import annotations

import fnmatch
import io
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import orderplan.infra.checkpoint as checkpoint  # noqa: E402
import orderplan.infra.integrity as integrity  # noqa: E402


def main() -> None:
    pattern, needle, script, *args = sys.argv[1:]
    real = integrity.atomic_write

    def atomic_write(path, write, **kwargs):  # kwargs: checksum, produced_by
        path = Path(path)
        if not fnmatch.fnmatch(path.as_posix(), f"*/{pattern}"):
            return real(path, write, **kwargs)
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()
        if needle != "-" and needle.encode() not in data:
            return real(path, lambda f: f.write(data), **kwargs)

        def half_then_die(f) -> None:
            f.write(data[: len(data) // 2])
            f.flush()  # to the OS: what a SIGKILL leaves (a checksummed write streams through a hasher: no fileno)
            if hasattr(f, "fileno"):
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        return real(path, half_then_die, **kwargs)

    # the writers of both modules look the name up at call time; modules that import it by name
    # (`from orderplan.infra.checkpoint import atomic_write`) are imported after this line, so they get
    # the wrapper too
    integrity.atomic_write = atomic_write
    checkpoint.atomic_write = atomic_write
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
