"""One writer per run directory: an advisory lock file, `<dir>/.lock`, held for the whole run.

The file holds who has it (JSON: pid, host, job, command line, start time, torchrun group) and is
locked with `fcntl.flock`, which the kernel drops when the holder dies, however it dies. So:

- a second run on the same directory finds the flock taken and is refused, with a message naming the
  holder (RunDirBusyError), before it writes anything;
- a lock left by a killed run (kill -9, power loss) is free at the kernel level; the next run takes it
  over and says whose it was;
- the holder removes the file when it exits normally.

Under torchrun rank 0 holds the lock. The other ranks wait (up to `RANK_WAIT_S`) until the file names
their own torchrun group (MASTER_ADDR, MASTER_PORT and TORCHELASTIC_RUN_ID: two live groups cannot
share a master port), and are refused when a live holder from another group has it. Locks are
re-entrant within a process (a job that runs another job on the same directory).

flock works on local filesystems and on NFS (Linux emulates it with NFS byte-range locks). A
platform without fcntl (Windows) runs without the lock, with a warning."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orderplan.infra.integrity import command_line

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RANK_WAIT_S", "RunDirBusyError", "hold_run_dir", "read_holder"]

LOCK_NAME = ".lock"
RANK_WAIT_S = 120.0  # how long ranks > 0 wait for rank 0 to take the lock

_HELD: dict[str, tuple[int, int]] = {}  # resolved dir -> (open fd, nesting depth), this process


class RunDirBusyError(RuntimeError):
    """Another live run holds the lock of this run directory."""


def _group() -> str | None:
    """This process's torchrun group, or None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "MASTER_PORT" not in os.environ:
        return None
    return "{}:{}/{}".format(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                             os.environ.get("TORCHELASTIC_RUN_ID", ""))


def read_holder(directory: str | os.PathLike) -> dict | None:
    """Who the lock file of `directory` names (None when there is none or it is empty or unreadable)."""
    try:
        text = (Path(directory) / LOCK_NAME).read_text()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not written its name yet"
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('job', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')})")


def _open_locked(path: Path) -> int:
    """Open `path` (created if needed) and take its flock without blocking; retry while the file we
    locked was unlinked and replaced by its previous holder's release (then another process could
    lock the new file: both would think they held the lock). Raises BlockingIOError when taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise BlockingIOError(str(e)) from e
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _acquire(directory: Path, job: str) -> int:
    path = directory / LOCK_NAME
    try:
        fd = _open_locked(path)
    except BlockingIOError:
        raise RunDirBusyError(
            f"{directory} is in use by another run: {_describe(read_holder(directory))}. Only one run may write a "
            "run directory at a time; wait for it to finish, or use another run_dir / out_dir.") from None
    previous = read_holder(directory)
    if previous and previous.get("pid") != os.getpid():
        print(f"taking over the lock of {directory} left by {_describe(previous)}, which is gone "
              "(killed or crashed); resuming")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "command": command_line(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "group": _group()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder, sort_keys=True) + "\n").encode(), 0)
    os.fsync(fd)
    return fd


def _wait_for_rank0(directory: Path) -> None:
    """Ranks > 0: return once rank 0 of this torchrun group holds the lock; refuse another live group's."""
    group, t0 = _group(), time.time()
    while True:
        holder = read_holder(directory)
        if holder and holder.get("group") == group:
            return
        if holder and holder.get("group") != group and fcntl is not None:
            try:  # a shared flock succeeds only when nobody holds the lock: then the file is stale
                fd = os.open(directory / LOCK_NAME, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    stale = True
                except OSError:
                    stale = False
                finally:
                    os.close(fd)
            except FileNotFoundError:
                stale = True
            if not stale:
                raise RunDirBusyError(f"{directory} is in use by another run: {_describe(holder)}; use another "
                                      "run_dir / out_dir")
        if time.time() - t0 > RANK_WAIT_S:
            raise RunDirBusyError(f"{directory}: rank 0 of this torchrun group did not take the run directory's "
                                  f"lock within {RANK_WAIT_S:.0f} s (holder now: {_describe(holder)})")
        time.sleep(0.1)


@contextmanager
def hold_run_dir(directory: str | os.PathLike, job: str = "run", rank: int = 0) -> Iterator[None]:
    """Hold the lock of `directory` (created if missing) inside the block: rank 0 takes it, other
    ranks wait for their rank 0 (see the module docstring). Raises RunDirBusyError when another live
    run holds it. The lock file is removed on leaving; a directory this call created and nothing
    else wrote is removed too, so a run refused at validation leaves nothing behind."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    if fcntl is None:  # pragma: no cover - Windows
        warnings.warn(f"no fcntl on this platform: {directory} is not locked against a second run", stacklevel=3)
        yield
        return
    if rank != 0:
        _wait_for_rank0(directory)
        yield
        return
    if key in _HELD:  # re-entrant: this process already holds it
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    fd = _acquire(directory, job)
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        del _HELD[key]
        # unlink while still holding the flock, then close: a process that opened the old file and
        # waits for its flock sees the inode change and retries on a fresh file (`_open_locked`)
        (directory / LOCK_NAME).unlink(missing_ok=True)
        os.close(fd)
        if created:
            try:
                directory.rmdir()  # only succeeds when empty
            except OSError:
                pass
