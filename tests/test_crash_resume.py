"""Crash harness: every script that promises exact resume is killed with SIGKILL and rerun,
and must end with the final weights and summary numbers of an uninterrupted run, bit for bit.

For each script (tiny settings, the same CLI a user types), one run goes uninterrupted ("ref") while
a second run dir goes through a chain of kills, each followed by a rerun in the same dir:

0. (BC) during the write of the oracle set it builds in-process (its manifest);
1. at a checkpoint boundary: SIGKILL as soon as the checkpoint pointer (or the progress file, or
   the cache of a finished policy) shows boundary b, b drawn by random.Random(0) from the early
   boundaries;
2. during the next write of each checkpoint-like file (step file, pointer, shard, progress file,
   policy cache): `tests/support/kill_in_write.py` makes the real atomic writer write half the
   bytes into its temp file and SIGKILLs the process; the rerun resumes from what is left;
3. twice at a random point between checkpoints: once the rerun has written its first new
   checkpoint, wait U * dt (U from random.Random(k), k = 0 then 1; dt the shortest interval
   between two checkpoints seen in step 1) and kill;
4. during the final write of each output file (weights, summary), as in 2;

then a last rerun finishes. After every mid-write kill the target is absent or its previous version
and exactly one temp file is left; after every kill, every JSON, safetensors and torch file in the
run dir loads (never truncated); the reruns take over the lock a killed run left (and say so) and no
lock is left at the end; at the end no temp file is left (the writers remove those of killed processes),
every output matches its checksum record, every tensor of the outputs is bit-identical to the ref's and so is every number
of the summaries (wall-clock times and `resumed_from` aside). The kill points are printed
(`pytest -s`) and, when CRASH_RESUME_LOG names a file, appended to it as JSON lines.

Slow: each case launches 6-9 processes (the ref runs next to the chain: 2 processes at a time).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from orderplan.infra.integrity import verify_file
from orderplan.infra.paths import PACKAGE_ROOT
from tests.support.volatile import is_volatile

REPO = Path(__file__).resolve().parents[1]
KILL_IN_WRITE = REPO / "tests" / "support" / "kill_in_write.py"
POLL_S = 0.02
TEMP_NAME = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # orderplan.infra.checkpoint.atomic_write's temp files
LAUNCH_TIMEOUT_S = 900
HAVE_DEFAULT = (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists()



# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Shared:
    """Inputs some cases read: toy codes (train_backbone), the plain BC ref's oracle set and head."""

    codes: Path | None = None
    oracle: Path | None = None
    head: Path | None = None


@dataclass
class Case:
    name: str
    script: str
    args: Callable[[Path, Shared], list[str]]  # overrides of a run rooted at dir d
    probe: Callable[[Path], int]  # the last checkpoint boundary on disk (0 = none yet)
    boundaries: list[int]  # probe values of a full run's checkpoints, in order (the last is the final one)
    outputs: list[str]  # globs under d compared tensor by tensor
    summaries: list[str]  # JSON files under d compared number by number
    writes: list[tuple[str, str]]  # (path pattern, needle) of the final outputs, killed mid-write last
    # checkpoint-like files (step files, pointers, shards, progress, policy caches), killed mid-write
    # in their next write right after the boundary kill: the rerun resumes where the kill found it
    ckpt_writes: list[tuple[str, str]] = field(default_factory=list)
    first_writes: list[tuple[str, str]] = field(default_factory=list)  # killed before all others (data builds)
    needs: tuple[str, ...] = ()  # Shared fields it reads


def _pointer(ckpt_dir: Path) -> int:
    try:
        return int(json.loads((ckpt_dir / "last.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _chunks(out_dir: Path) -> int:
    try:
        return len(json.loads((out_dir / "progress_000.json").read_text())["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


def _policies(run_dir: Path) -> int:
    return len(list((run_dir / "policies").glob("*.pt")))


def _train_backbone_args(d: Path, s: Shared) -> list[str]:
    return [f"run_dir={d}", "train.max_steps=48", "train.batch_size=8", "train.log_every=2", "train.eval_every=1000",
            "train.ckpt_every=8", "train.warmup_steps=2", "backbone.data.kind=codes",
            f"backbone.data.codes_dir={s.codes}", "backbone.vq_weights=null", "+backbone.gpt.overrides.n_layer=2"]


def _oracle_args(d: Path, s: Shared) -> list[str]:
    return [f"out_dir={d}", "num_images=12", "batch_size=2", "chunk_images=2"]


SMALL_REPORT = ["eval.num_images=4", "eval.batch_size=4", "eval.baselines=[raster,random]"]


def _bc_args(d: Path, s: Shared, *extra: str, oracle: Path | None = None) -> list[str]:
    return [f"run_dir={d / 'bc'}", f"oracle.out_dir={oracle or d / 'oracle'}", "oracle.num_images=8",
            "oracle.batch_size=4", "oracle.chunk_images=4", "bc.steps=24", "bc.ckpt_every=4", "bc.batch_size=16",
            "bc.log_every=2", "bc.replay_batch=8", *SMALL_REPORT, *extra]


def _ppo_args(d: Path, s: Shared, *extra: str) -> list[str]:
    return [f"run_dir={d}", f"agent.init_from={s.head}", "batch_size=8", "ppo.frames_per_batch=128",
            "ppo.total_frames=768", "ppo.minibatch_size=64", "ppo.epochs=1", "ppo.ckpt_every=1", *SMALL_REPORT, *extra]


def _evaluate_args(d: Path, s: Shared) -> list[str]:
    return [f"run_dir={d}", "policies=[raster,random,zigzag,oracle,bc]", f"checkpoints.bc={s.head}",
            "eval.num_samples=12",
            "eval.num_images=4", "eval.batch_size=6", "eval.gen_batch_size=6", "eval.seed_samples=6",
            "eval.sampler_seeds=[0,1]", "eval.fid_curve=[6,12]", "eval.agreement_images=4", "stats.bootstrap=3",
            "stats.kid_subsets=2", "plots.snapshot_samples=2", "plots.heatmap_images=2", "plots.column_rows=3"]


BC_WEIGHTS = [("bc/orderhead.safetensors", "-"), ("bc/summary.json", "-")]

CASES = [
    Case("train_backbone", "train_backbone.py", _train_backbone_args, lambda d: _pointer(d / "checkpoints"),
         list(range(8, 49, 8)), ["gpt.safetensors"], ["summary.json"],
         [("gpt.safetensors", "-"), ("summary.json", "-")],
         ckpt_writes=[("checkpoints/step_*.pt", "-"), ("checkpoints/last.json", "-")], needs=("codes",)),
    Case("build_oracle", "build_oracle.py", _oracle_args, _chunks, list(range(1, 7)), ["shard_*.pt"],
         ["summary.json", "manifest.json"], [("summary.json", "-"), ("manifest.json", "-")],
         ckpt_writes=[("shard_*.pt", "-"), ("progress_000.json", "-")]),
    # builds its oracle set in-process (the ref too); the first kill lands while the set is written
    Case("bc", "bc.py", _bc_args, lambda d: _pointer(d / "bc" / "checkpoints"), list(range(4, 25, 4)),
         ["bc/orderhead.safetensors", "oracle/shard_*.pt"], ["bc/summary.json", "oracle/manifest.json"],
         BC_WEIGHTS, ckpt_writes=[("bc/checkpoints/step_*.pt", "-")], first_writes=[("oracle/manifest.json", "-")]),
    # DAgger rounds at steps 8 and 16 and joint tuning of the top GPT block; finds the set the bc ref built
    Case("bc_dagger_joint", "bc.py",
         lambda d, s: _bc_args(d, s, "bc.dagger_rounds=2", "bc.dagger_images=4", "bc.joint.top_n=1",
                               "bc.joint.ar_batch_size=4", "env.beliefs=false", oracle=s.oracle),
         lambda d: _pointer(d / "bc" / "checkpoints"), list(range(4, 25, 4)),
         ["bc/orderhead.safetensors", "bc/gpt.safetensors"], ["bc/summary.json"],
         [("bc/gpt.safetensors", "-"), *BC_WEIGHTS], needs=("oracle",)),
    Case("ppo", "ppo.py", _ppo_args, lambda d: _pointer(d / "checkpoints"), list(range(1, 7)),
         ["orderhead.safetensors"], ["summary.json"], [("orderhead.safetensors", "-"), ("summary.json", "-")],
         ckpt_writes=[("checkpoints/step_*.pt", "-")], needs=("head",)),
    Case("ppo_router", "ppo.py", lambda d, s: _ppo_args(d, s, "agent.router=true", "env.decision_cost=1.0"),
         lambda d: _pointer(d / "checkpoints"), list(range(1, 7)), ["orderhead.safetensors"], ["summary.json"],
         [("orderhead.safetensors", "-"), ("summary.json", "-")], needs=("head",)),
    # a rerun skips the policies it finished; results.json equal to an uninterrupted run's
    Case("evaluate", "evaluate.py", _evaluate_args, _policies, [1, 2, 3, 4, 5], ["policies/*.pt"], ["results.json"],
         [("results.json", "-"), ("results.md", "-")], ckpt_writes=[("policies/*.pt", "-")], needs=("head",)),
]


# ----------------------------------------------------------------------------------------------
# Launching and killing
# ----------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # one thread per process (the machine is shared); no wandb
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


class Launch:
    """One run of a case's script in dir d (optionally through kill_in_write), output to a log."""

    def __init__(self, case: Case, d: Path, shared: Shared, write_kill: tuple[str, str] | None = None):
        d.mkdir(parents=True, exist_ok=True)
        self.case, self.d = case, d
        n = len(list(d.glob("launch_*.log")))
        self.log = d / f"launch_{n}.log"
        cmd = [sys.executable, *([str(KILL_IN_WRITE), *write_kill] if write_kill else []),
               str(REPO / "scripts" / case.script), *case.args(d, shared)]
        with open(self.log, "wb") as out:
            # its own session: the kill reaches every process it started, and nothing else
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(LAUNCH_TIMEOUT_S - self.elapsed(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.case.name}: {self.log} ran past {LAUNCH_TIMEOUT_S} s\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def check_timeout(self) -> None:
        if self.elapsed() > LAUNCH_TIMEOUT_S:
            self.kill()
            raise AssertionError(f"{self.case.name}: {self.log} ran past {LAUNCH_TIMEOUT_S} s\n{self.tail()}")


def _finish(launch: Launch) -> None:
    rc = launch.wait()
    assert rc == 0, f"{launch.case.name}: {launch.log} exited with {rc}\n{launch.tail()}"


def _kill_at_boundary(case: Case, d: Path, shared: Shared, b: int) -> tuple[dict, float]:
    """Kill as soon as boundary b is on disk. Returns the record and the interval (s) between the
    last two boundaries this launch wrote (the scale of the random kills)."""
    launch = Launch(case, d, shared)
    seen: list[tuple[float, int]] = []
    while launch.alive():
        launch.check_timeout()
        p = case.probe(d)
        if not seen or p != seen[-1][1]:
            seen.append((launch.elapsed(), p))
        if p >= b:
            launch.kill()
            break
        time.sleep(POLL_S)
    else:
        raise AssertionError(f"{case.name}: the run ended before boundary {b}\n{launch.tail()}")
    times = [t for t, p in seen if p > 0]
    dt = min(b - a for a, b in zip(times, times[1:])) if len(times) >= 2 else 1.0
    return {"kill": "checkpoint boundary", "boundary": b, "at": case.probe(d), "t_s": round(seen[-1][0], 2)}, dt


def _kill_between(case: Case, d: Path, shared: Shared, k: int, dt: float) -> dict:
    """Once the run wrote a new boundary, wait U * dt (U ~ random.Random(k)) and kill."""
    u = random.Random(k).uniform(0.05, 0.95)
    start = case.probe(d)
    launch = Launch(case, d, shared)
    t_new = None
    while launch.alive():
        launch.check_timeout()
        if t_new is None and case.probe(d) > start:
            t_new = launch.elapsed()
        if t_new is not None and launch.elapsed() >= t_new + u * dt:
            at = case.probe(d)
            launch.kill()
            return {"kill": "between checkpoints", "seed": k, "resumed_at": start, "after_boundary": at,
                    "delay_s": round(u * dt, 3), "t_s": round(launch.elapsed(), 2)}
        time.sleep(POLL_S)
    _finish(launch)  # it finished before the kill: still a valid rerun, recorded as such
    return {"kill": "between checkpoints", "seed": k, "resumed_at": start, "after_boundary": None,
            "note": "finished before the kill time"}


def _kill_in_write(case: Case, d: Path, shared: Shared, pattern: str, needle: str) -> dict:
    """Run through kill_in_write: SIGKILL halfway through the write of `pattern` (containing `needle`).
    The target must then be absent or complete, with a half-written temp file next to it."""
    launch = Launch(case, d, shared, (pattern, needle))
    rc = launch.wait()
    assert rc == -signal.SIGKILL, f"{case.name}: no write of {pattern} to kill (exit {rc})\n{launch.tail()}"
    where = d / pattern
    temps = list(where.parent.glob(f".{where.name}.{launch.proc.pid}.*.tmp"))  # the killed writer's own
    assert len(temps) == 1, f"{case.name}: killed, but {len(temps)} temp files of {pattern}: the kill was not mid-write"
    target = temps[0].parent / TEMP_NAME.match(temps[0].name).group(1)
    if target.exists():
        _load_any(target)  # the previous version, complete
    return {"kill": "mid-write", "file": str(target.relative_to(d)), "needle": needle, "progress": case.probe(d),
            "target_after_kill": "previous version" if target.exists() else "absent", "t_s": round(launch.elapsed(), 2)}


# ----------------------------------------------------------------------------------------------
# Comparing
# ----------------------------------------------------------------------------------------------


def _load_any(path: Path) -> Any:
    """The content of an output file; raises on a truncated or corrupt one."""
    from orderplan.infra.checkpoint import load_safetensors, load_torch_checkpoint

    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    if path.suffix == ".pt":
        return load_torch_checkpoint(path)
    return path.read_bytes()


def _check_nothing_truncated(d: Path) -> None:
    for path in d.rglob("*"):
        if path.is_file() and not path.name.startswith(".") and path.suffix in (".json", ".safetensors", ".pt"):
            try:
                _load_any(path)
            except Exception as err:  # noqa: BLE001 - any failure to load is the defect
                raise AssertionError(f"{path} does not load after a kill: {err}") from err


def _leaves(obj: Any, path: str = "") -> dict[str, Any]:
    """Numbers (nan as the string 'nan') and tensors of a JSON / checkpoint tree by path, without the
    volatile keys; strings are left out (run-dir paths differ)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_volatile(k):
                continue
            out.update(_leaves(v, f"{path}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_leaves(v, f"{path}[{i}]"))
    elif isinstance(obj, torch.Tensor):
        out[path] = obj
    elif isinstance(obj, bool | int | float):
        out[path] = "nan" if isinstance(obj, float) and math.isnan(obj) else obj
    elif obj is None:
        out[path] = None
    return out


def _bits(t: torch.Tensor) -> tuple:
    t = t.detach().cpu().contiguous()
    return t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy())


def _assert_same(case: Case, ref: Path, got: Path) -> int:
    """Every output tensor bit-identical, every summary number equal. Returns the tensors compared."""
    tensors = 0
    for pattern in case.outputs:
        a = sorted(p.relative_to(ref) for p in ref.glob(pattern))
        b = sorted(p.relative_to(got) for p in got.glob(pattern))
        assert a and a == b, f"{case.name}: {pattern}: files {a} vs {b}"
        for rel in a:
            la, lb = _leaves(_load_any(ref / rel)), _leaves(_load_any(got / rel))
            assert la.keys() == lb.keys(), f"{case.name}: {rel}: entries differ: {sorted(la.keys() ^ lb.keys())[:10]}"
            diff = [k for k in la
                    if (_bits(la[k]) != _bits(lb[k]) if isinstance(la[k], torch.Tensor) else la[k] != lb[k])]
            assert not diff, f"{case.name}: {rel}: {len(diff)} of {len(la)} entries differ, e.g. {diff[:5]}"
            tensors += sum(isinstance(v, torch.Tensor) for v in la.values())
    for name in case.summaries:
        la, lb = _leaves(_load_any(ref / name)), _leaves(_load_any(got / name))
        assert la.keys() == lb.keys(), f"{case.name}: {name}: keys differ: {sorted(la.keys() ^ lb.keys())[:10]}"
        diff = {k: (la[k], lb[k]) for k in la if la[k] != lb[k]}
        assert not diff, f"{case.name}: {name}: {len(diff)} of {len(la)} numbers differ: {dict(list(diff.items())[:8])}"
    return tensors


# ----------------------------------------------------------------------------------------------
# The harness
# ----------------------------------------------------------------------------------------------


class Refs:
    """Uninterrupted runs by case (a case's ref is started next to its crash chain), and the inputs
    they share: the plain BC ref provides the oracle set and the head of later cases."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Path] = {}
        self.shared = Shared()

    def start(self, case: Case) -> Launch | None:
        if case.name in self.done:
            return None
        self.prepare(case.needs)
        return Launch(case, self.root / case.name, self.shared)

    def finished(self, case: Case, launch: Launch | None) -> Path:
        if launch is not None:
            _finish(launch)
            self.done[case.name] = launch.d
        return self.done[case.name]

    def prepare(self, needs: tuple[str, ...]) -> Shared:
        if "codes" in needs and self.shared.codes is None:
            from tests.conftest import write_toy_codes

            self.shared.codes = write_toy_codes(self.root / "codes")
        if {"oracle", "head"} & set(needs) and self.shared.head is None:
            bc = next(c for c in CASES if c.name == "bc")
            d = self.finished(bc, self.start(bc))
            self.shared.oracle, self.shared.head = d / "oracle", d / "bc" / "orderhead.safetensors"
        return self.shared


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Refs:
    return Refs(tmp_path_factory.mktemp("refs"))


def _record(case: Case, kill: dict) -> dict:
    """Print a kill point (and append it to $CRASH_RESUME_LOG when set)."""
    print(f"[crash] {case.name}: {json.dumps(kill)}", flush=True)
    log = os.environ.get("CRASH_RESUME_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": case.name, **kill}) + "\n")
    return kill


@pytest.mark.slow  # ~7 processes per case
@pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the embedded default")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_killed_runs_resume_to_the_uninterrupted_result(case, refs, tmp_path):
    shared = refs.prepare(case.needs)
    ref_launch = refs.start(case)  # the uninterrupted run goes on next to the chain
    d = tmp_path / "crashed"
    for pattern, needle in case.first_writes:
        _record(case, _kill_in_write(case, d, shared, pattern, needle))
        _check_nothing_truncated(d)
    early = case.boundaries[1:max(2, len(case.boundaries) // 2)]  # >= 2 boundaries seen: an interval to scale by
    kill, dt = _kill_at_boundary(case, d, shared, random.Random(0).choice(early))
    _record(case, {**kill, "interval_s": round(dt, 3)})
    _check_nothing_truncated(d)
    for pattern, needle in case.ckpt_writes:
        _record(case, _kill_in_write(case, d, shared, pattern, needle))
        _check_nothing_truncated(d)
    for k in (0, 1):
        _record(case, _kill_between(case, d, shared, k, dt))
        _check_nothing_truncated(d)
    for pattern, needle in case.writes:
        _record(case, _kill_in_write(case, d, shared, pattern, needle))
        _check_nothing_truncated(d)
    _finish(Launch(case, d, shared))
    ref = refs.finished(case, ref_launch)
    stale = [p for p in d.rglob("*.tmp")]
    assert not stale, f"{case.name}: temp files of killed writers left behind: {stale}"
    # the reruns found the killed runs' locks (orderplan.infra.run_lock) and took them over; the last run
    # released its own
    logs = [p.read_text(errors="replace") for p in sorted(d.glob("launch_*.log"))[1:]]
    assert any("taking over the lock of" in text for text in logs), f"{case.name}: no rerun took over a lock"
    assert not list(d.rglob(".lock")), f"{case.name}: a lock file outlived the finished run"
    # and every output carries a checksum record that matches it
    for pattern in case.outputs:
        for path in d.glob(pattern):
            verify_file(path)
    assert _assert_same(case, ref, d) > 0
