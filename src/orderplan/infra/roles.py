"""Evaluation-only files: the networks FID is measured in never enter a training job.

A planner tuned, rewarded or selected with the FID feature network can game it, and a
measurement made in the space it was trained for proves nothing. So the committed feature networks
(the digit classifier and the autoencoder of `artifacts/tiny_mnist/`) refuse to load while a
training job runs. `job_dir` marks the training jobs (TRAINING_JOBS) with `training_job`; the
loaders call `refuse_in_training`, which compares the file's sha256 with the manifest entries named
in EVALUATION_ONLY, so a renamed copy is refused too.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orderplan.infra.integrity import sha256_file
from orderplan.infra.paths import PACKAGE_ROOT

__all__ = ["TRAINING_JOBS", "EVALUATION_ONLY", "EvaluationOnlyError", "training_job", "current_training_job",
           "refuse_in_training"]

TRAINING_JOBS = frozenset({"bc", "ppo", "build_oracle", "compare_orders", "train_backbone", "train_vq", "quality"})
EVALUATION_ONLY = ("classifier", "autoencoder")  # entries of artifacts/tiny_mnist/manifest.json
_MANIFEST = PACKAGE_ROOT / "artifacts" / "tiny_mnist" / "manifest.json"
_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("orderplan_training_job", default=None)


class EvaluationOnlyError(RuntimeError):
    """A training job tried to load a network that only evaluation may read."""


@contextmanager
def training_job(job: str) -> Iterator[None]:
    """Mark the code inside as the training job `job` (nested marks keep the innermost name)."""
    token = _JOB.set(job)
    try:
        yield
    finally:
        _JOB.reset(token)


def current_training_job() -> str | None:
    return _JOB.get()


def _evaluation_only_hashes() -> dict[str, str]:
    try:
        manifest = json.loads(_MANIFEST.read_text())
    except (OSError, ValueError):
        return {}
    return {manifest[k]["sha256"]: k for k in EVALUATION_ONLY if isinstance(manifest.get(k), dict)}


def refuse_in_training(path: str | Path) -> None:
    """EvaluationOnlyError when a training job is running and `path` holds one of the committed
    evaluation-only networks (by sha256, so under any name)."""
    job = _JOB.get()
    if job is None or not Path(path).is_file():
        return
    name = _evaluation_only_hashes().get(sha256_file(path))
    if name is not None:
        raise EvaluationOnlyError(
            f"{path} is the {name} that FID and the final table are measured in; it is evaluation-only and the "
            f"{job} job must not load it (train a separate network for a reward or for model selection)")
