"""Small pieces every script shares: device and process-group discovery, and a metric logger that
prints nothing extra by default and mirrors to wandb (offline unless asked) when `logger=wandb`.

Imports no other project module; never envs or agents.
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

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
