"""Small pieces every script shares: device and process-group discovery, a metric logger that
prints nothing extra by default and mirrors to wandb (offline unless asked) when `logger=wandb`, the
console log of a run (`console_log`: what a run prints, also written to run_dir/<job>.log), and
`job_dir`, which every job's entry function wears: the run directory's writer lock
(`orderplan.infra.run_lock`) around the console log."""

from __future__ import annotations

import functools
import os
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def setup_device(name: str, local_rank: int = 0) -> torch.device:
    """`cpu` or `cuda` (one GPU per process under torchrun). Asking for cuda without a GPU fails
    clearly instead of silently training on the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was requested but no CUDA device is available; use device=cpu")
        dev = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
        torch.cuda.set_device(dev)
        return dev
    raise ValueError(f"unknown device {name!r}; use cpu or cuda")


class Logger:
    """Metric sink: wandb when `run.logger == "wandb"` (mode from `run.wandb.mode`, offline by
    default, files under run_dir), nothing otherwise. Console output is the caller's progress bar."""

    def __init__(self, run: Any, run_dir: Path, enabled: bool = True, job: str = "run"):
        self._wandb = None
        if not enabled or getattr(run, "logger", "none") in ("none", "", None):
            return
        if run.logger != "wandb":
            raise ValueError(f"unknown logger {run.logger!r}; use none or wandb")
        import wandb  # imported lazily: never required unless asked for

        run_dir.mkdir(parents=True, exist_ok=True)
        config = asdict(run) if is_dataclass(run) else dict(run)
        self._wandb = wandb.init(project=run.wandb.project, mode=run.wandb.mode, dir=str(run_dir),
                                 job_type=job, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that redraws often on a terminal and rarely when writing to a log file
    (so logs of long runs stay readable)."""
    import sys

    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 30.0)
    return tqdm(iterable, **kwargs)


# -- the console log of a run -----------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


class _LogFile:
    """The log file, opened on the first line written (so a run refused by its validation leaves no
    file behind), in append mode with a header line per start; every line is flushed to the OS as
    it is written, so a run killed with SIGKILL leaves everything it printed."""

    def __init__(self, path: Path, header: str):
        self.path, self.header = path, header
        self._file = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def opened(self) -> bool:
        return self._file is not None

    def write(self, text: str) -> None:
        with self._lock:
            if self._closed:  # a thread that outlived the run (a progress-bar monitor) writes nothing
                return
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "a", encoding="utf-8", errors="replace")
                    self._file.write(self.header)
                self._file.write(text)
                self._file.flush()  # to the OS now: a SIGKILL later keeps this line
            except OSError as e:  # an unwritable log must not stop the run it records
                self._closed = True
                sys.__stderr__.write(f"warning: cannot write the console log {self.path}: {e}; not logging it\n")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()


class _Tee:
    """A text stream that passes everything to `stream` (the console) and the complete lines of it
    that are not progress-bar redraws to `log`. tqdm redraws a bar by writing a carriage return and
    the bar (and moves nested bars with ANSI escapes), so a line segment holding a carriage return
    or an escape sequence is a redraw and is dropped; text written after it on the same line (a
    warning printed while a bar is shown) is kept."""

    def __init__(self, stream: Any, log: _LogFile):
        self._stream, self._log = stream, log
        self._pending = ""  # the current line so far (redraws left out)
        self._bar = False  # the current line held a redraw
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        with self._lock:
            parts = text.split("\n")
            for i, part in enumerate(parts):
                if "\r" in part or "\x1b[" in part:
                    self._bar = True
                else:
                    self._pending += part
                if i < len(parts) - 1:  # a newline ends this line
                    if self._pending or not self._bar:
                        self._log.write(self._pending + "\n")
                    self._pending, self._bar = "", False
        return len(text) if n is None else n

    def finish(self) -> None:
        """Write an unterminated last line (print(..., end="") before the run ended)."""
        with self._lock:
            if self._pending:
                self._log.write(self._pending + "\n")
            self._pending, self._bar = "", False

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:  # progress bars redraw as often as on the console itself
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self._stream, name)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def tee_console(path: str | Path, job: str = "run") -> Iterator[_LogFile]:
    """Inside the block, sys.stdout and sys.stderr also go to the file `path` (appended; created
    with its parent at the first line, after a header "==== <time> <job> started: <command line>
    (pid, cwd)"), progress-bar redraws left out, each line flushed as written. On leaving, a footer
    says whether the block finished or failed (with the traceback), if the file was opened.
    Nested blocks chain: an inner block's lines also reach the outer block's file."""
    argv = " ".join(shlex.quote(a) for a in sys.argv)
    log = _LogFile(Path(path), f"==== {_now()} {job} started: python {argv} (pid {os.getpid()}, cwd {os.getcwd()})\n")
    out, err = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    prev_out, prev_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    t0 = time.time()
    try:
        yield log
    except BaseException:
        out.finish()
        err.finish()
        if log.opened:
            log.write(f"==== {_now()} {job} failed after {time.time() - t0:.1f} s:\n{traceback.format_exc()}")
        raise
    else:
        out.finish()
        err.finish()
        if log.opened:
            log.write(f"==== {_now()} {job} finished ({time.time() - t0:.1f} s)\n")
    finally:
        # restore only our own streams: something that replaced them inside keeps its replacement
        if sys.stdout is out:
            sys.stdout = prev_out
        if sys.stderr is err:
            sys.stderr = prev_err
        log.close()


def console_log(job: str, dir_field: str = "run_dir") -> Callable[[F], F]:
    """Decorate a run function `fn(run, ...)` so that what it prints (print lines, warnings,
    tracebacks; not progress bars) is also written to `<run.<dir_field>>/<job>.log`
    (`tee_console`), e.g. runs/bc/tiny_mnist/bc.log. Under torchrun, ranks other than 0 write
    `<job>.rank<r>.log`. The file appears with the run's first line of output, so a config refused by
    the validation at the top of `fn` writes nothing."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run_logged(*args: Any, **kwargs: Any) -> Any:
            run = args[0] if args else next(iter(kwargs.values()))
            rank = dist_info()[0]
            name = f"{job}.log" if rank == 0 else f"{job}.rank{rank}.log"
            with tee_console(Path(str(getattr(run, dir_field))) / name, job):
                return fn(*args, **kwargs)

        return run_logged  # type: ignore[return-value]

    return wrap


def job_dir(job: str, dir_field: str = "run_dir") -> Callable[[F], F]:
    """Decorate a job's entry function `fn(run, ...)`: it holds the writer lock of
    `run.<dir_field>` (`orderplan.infra.run_lock.hold_run_dir`; a second run on the directory is
    refused before it writes anything, not even to the log) and logs its console there
    (`console_log`). Training jobs (`orderplan.infra.roles.TRAINING_JOBS`) run inside `training_job`,
    where the evaluation-only feature networks refuse to load."""
    from orderplan.infra.roles import TRAINING_JOBS, training_job
    from orderplan.infra.run_lock import hold_run_dir

    def wrap(fn: F) -> F:
        logged = console_log(job, dir_field)(fn)

        @functools.wraps(fn)
        def held(*args: Any, **kwargs: Any) -> Any:
            run = args[0] if args else next(iter(kwargs.values()))
            with hold_run_dir(Path(str(getattr(run, dir_field))), job, rank=dist_info()[0]):
                if job not in TRAINING_JOBS:
                    return logged(*args, **kwargs)
                with training_job(job):  # the evaluation-only networks refuse to load in here
                    return logged(*args, **kwargs)

        return held  # type: ignore[return-value]

    return wrap
