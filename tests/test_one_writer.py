"""One writer per run directory, end to end: while bc.py, ppo.py or evaluate.py runs, a second run of the
same command on the same directory is refused at once with a message naming the holder, and the first
run finishes with the same bytes as a run alone (src/orderplan/infra/run_lock.py).

Slow: seven script launches on the tiny default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orderplan.infra.paths import PACKAGE_ROOT
from tests.test_crash_resume import _leaves  # numbers of a JSON tree, wall times left out

REPO = Path(__file__).resolve().parents[1]
HAVE_DEFAULT = (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the embedded default")]

SMALL_REPORT = ["eval.num_images=4", "eval.batch_size=4", "eval.baselines=[raster,random]"]


def _bc(d: Path, head: Path | None) -> list[str]:
    return [f"run_dir={d}", f"oracle.out_dir={d.parent / 'oracle'}", "oracle.num_images=8", "oracle.batch_size=4",
            "oracle.chunk_images=4", "bc.steps=48", "bc.ckpt_every=8", "bc.batch_size=16", "bc.replay_batch=8",
            *SMALL_REPORT]


def _ppo(d: Path, head: Path | None) -> list[str]:
    return [f"run_dir={d}", f"agent.init_from={head}", "batch_size=8", "ppo.frames_per_batch=128",
            "ppo.total_frames=768", "ppo.minibatch_size=64", "ppo.epochs=1", *SMALL_REPORT]


def _evaluate(d: Path, head: Path | None) -> list[str]:
    return [f"run_dir={d}", "policies=[raster,random,bc]", f"checkpoints.bc={head}", "eval.num_samples=12",
            "eval.num_images=4", "eval.batch_size=6", "eval.gen_batch_size=6", "eval.seed_samples=6",
            "eval.sampler_seeds=[0,1]", "eval.fid_curve=[6,12]", "eval.agreement_images=4", "stats.bootstrap=3",
            "stats.kid_subsets=2", "plots.snapshot_samples=2", "plots.heatmap_images=2", "plots.column_rows=3"]


# (script, args, files compared byte for byte, JSON files compared number for number, wall times aside)
CASES = {"bc": ("bc.py", _bc, ["orderhead.safetensors"], ["summary.json"]),
         "ppo": ("ppo.py", _ppo, ["orderhead.safetensors"], ["summary.json"]),
         "evaluate": ("evaluate.py", _evaluate, [], ["results.json"])}


def _popen(script: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("head") / "bc"
    log = d.parent / "bc.log"
    _finish(_popen("bc.py", _bc(d, None), log), log)
    return d / "orderhead.safetensors"


def _files(d: Path, patterns: list[str]) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for pat in patterns for p in sorted(d.glob(pat))}


@pytest.mark.parametrize("job", list(CASES))
def test_a_second_run_on_a_busy_directory_is_refused_and_the_first_is_untouched(job, head, tmp_path):
    script, args, outputs, summaries = CASES[job]
    alone = tmp_path / "alone" / "run"
    alone.parent.mkdir()
    _finish(_popen(script, args(alone, head), tmp_path / "alone.log"), tmp_path / "alone.log")

    busy = tmp_path / "busy" / "run"
    busy.parent.mkdir()
    first = _popen(script, args(busy, head), tmp_path / "first.log")
    t0 = time.time()
    while not (busy / ".lock").exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() - t0 < 120
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args(busy, head)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert second.returncode != 0
    assert f"{busy} is in use by another run: pid {first.pid}" in second.stdout + second.stderr
    assert first.poll() is None, "the first run ended before the second was refused: the check proved nothing"
    _finish(first, tmp_path / "first.log")

    a, b = _files(alone, outputs), _files(busy, outputs)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), f"{job}: outputs differ from the run alone"
    for name in summaries:
        la = _leaves(json.loads((alone / name).read_text()))
        lb = _leaves(json.loads((busy / name).read_text()))
        assert la and la == lb, f"{job}: {name}: {[k for k in la if la[k] != lb.get(k)][:8]} differ from the run alone"
    assert not (busy / ".lock").exists()
    log = (busy / f"{job}.log").read_text()
    assert log.count(" started: ") == 1  # the refused run wrote nothing, not even to the log
