"""Rank function of tests/agents/test_eval_distributed.py (spawned processes import it by module name):
one `run_evaluation` per rank, with a record of every file the rank opened for writing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(root: Path, written: set[str]) -> None:
    """Audit hook (it stays for the life of the process, a spawned rank): every path under `root` this
    process opens for writing, creates, renames onto or removes, relative to root. Python's `open`
    event covers builtins.open and os.open, so torch.save, np.savez, savefig and the atomic writers
    all pass through it."""
    top = str(root.resolve())

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if full.startswith(top + os.sep):
                written.add(os.path.relpath(full, top))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
                note(path)
        elif event in ("os.rename", "os.replace"):
            note(args[1])
        elif event in ("os.mkdir", "os.remove", "os.unlink"):
            note(args[0])

    sys.addaudithook(hook)


def evaluate_rank(overrides: list[str]) -> dict:
    """Run scripts/evaluate.py's job with `overrides` on this rank. Returns the paths (relative to
    run_dir) it wrote and whether the returned results equal rank 0's results.json (kept small: the
    launcher's queue is read only after every rank has exited)."""
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation
    from orderplan.config.common import compose, to_typed

    run = to_typed(compose("evaluate", overrides), EvaluateRun)
    written: set[str] = set()
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    _record_writes(Path(run.run_dir), written)
    res = run_evaluation(run)
    on_disk = json.loads((Path(run.run_dir) / "results.json").read_text())
    return {"written": sorted(written), "returned_is_file": json.loads(json.dumps(res)) == on_disk}
