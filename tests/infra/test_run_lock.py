"""One writer per run directory (src/orderplan/infra/run_lock.py): a second live run is refused with the
holder's name, a lock left by a killed run is taken over, ranks > 0 follow their own rank 0 only, and the
lock is re-entrant within a process and gone after the run."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orderplan.infra import run_lock
from orderplan.infra.run_lock import LOCK_NAME, RunDirBusyError, hold_run_dir, read_holder

REPO = Path(__file__).resolve().parents[2]


def _holder(directory: Path, env: dict | None = None) -> subprocess.Popen:
    """A process that takes the lock of `directory` and sleeps; returns once it holds it."""
    code = textwrap.dedent(f"""
        import time
        from orderplan.infra.run_lock import hold_run_dir
        with hold_run_dir({str(directory)!r}, "holder"):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunDirBusyError, match=rf"in use by another run: pid {proc.pid} on .*holder"):
            with hold_run_dir(tmp_path / "run", "bc"):
                pytest.fail("entered a directory another live run holds")
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_taken_over_with_a_message(tmp_path, capsys):
    proc = _holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_holder(tmp_path / "run")["pid"] == proc.pid  # the file outlives its holder
    with hold_run_dir(tmp_path / "run", "bc"):
        assert read_holder(tmp_path / "run")["pid"] == os.getpid()
        assert read_holder(tmp_path / "run")["job"] == "bc"
    out = capsys.readouterr().out
    assert f"taking over the lock of {tmp_path / 'run'} left by pid {proc.pid}" in out
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_the_lock_is_reentrant_released_and_leaves_no_empty_directory(tmp_path):
    d = tmp_path / "new_run"
    with hold_run_dir(d, "outer"):
        with hold_run_dir(d, "inner"):  # a job that runs another job on the same directory
            assert read_holder(d)["job"] == "outer"
        assert (d / LOCK_NAME).exists()  # still held by the outer block
    assert not d.exists()  # created here, nothing written: removed
    (tmp_path / "kept").mkdir()
    with hold_run_dir(tmp_path / "kept"):
        (tmp_path / "kept" / "out.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["out.txt"]


def test_released_after_an_exception(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with hold_run_dir(tmp_path, "bc"):
            1 / 0
    with hold_run_dir(tmp_path, "bc"):  # free again
        pass


def test_other_ranks_follow_their_own_rank0_and_refuse_another_group(tmp_path, monkeypatch):
    mine = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "a"}
    proc = _holder(tmp_path, mine)  # "rank 0" of group a
    try:
        for k, v in mine.items():
            monkeypatch.setenv(k, v)
        with hold_run_dir(tmp_path, "bc", rank=1):  # same group: enters at once
            pass
        monkeypatch.setenv("MASTER_PORT", "29501")  # another torchrun job's rank 1
        with pytest.raises(RunDirBusyError, match=f"pid {proc.pid}"):
            with hold_run_dir(tmp_path, "bc", rank=1):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_rank_gives_up_when_its_rank0_never_comes(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "RANK_WAIT_S", 0.3)
    monkeypatch.setenv("MASTER_PORT", "29502")
    t0 = time.time()
    with pytest.raises(RunDirBusyError, match="did not take"):
        with hold_run_dir(tmp_path, "bc", rank=2):
            pass
    assert time.time() - t0 < 5
