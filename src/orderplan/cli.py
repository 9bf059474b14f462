"""The jobs, one Hydra entry point each, over the YAML presets packaged in `orderplan/configs/`.

    orderplan-bc key=value ...            # console script (pip install .)
    python -m orderplan bc key=value ...  # the same job through the package
    python scripts/bc.py key=value ...    # the same job from a checkout

| job              | preset                  | what it runs                                   |
|------------------|-------------------------|------------------------------------------------|
| bc               | bc.yaml                 | orderplan.train.bc.train_bc                    |
| ppo              | ppo.yaml                | orderplan.train.ppo_run.run_ppo                |
| evaluate         | evaluate.yaml           | orderplan.eval.evaluate.run_evaluation         |
| build_oracle     | build_oracle.yaml       | orderplan.train.oracle_data.build_oracle       |
| compare_orders   | compare_orders.yaml     | orderplan.train.compare_orders.compare_orders  |
| power            | power.yaml              | orderplan.eval.power.run_power                 |
| extract_codes    | extract_codes.yaml      | orderplan.data.extract.extract_codes           |
| train_backbone   | train_backbone.yaml     | orderplan.train.backbone.train_backbone        |
| train_vq         | train_vq.yaml           | orderplan.train.vq.train_vq                    |
| train_classifier | train_classifier.yaml   | orderplan.eval.classifier_training.train_classifier |
| train_autoencoder | train_autoencoder.yaml | orderplan.eval.autoencoder.train_autoencoder   |
| reward_alignment | reward_alignment.yaml   | orderplan.eval.alignment.reward_alignment      |
| quality          | quality.yaml            | orderplan.train.quality.run_quality            |
| headroom         | headroom.yaml           | orderplan.eval.headroom.run_headroom           |
| schedule_nll     | schedule_nll.yaml       | orderplan.eval.schedule_nll.run_schedule_nll   |

`--config-name` picks another preset of the same job (e.g. `evaluate --config-name
evaluate_generation`), exactly as with `@hydra.main`."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

# job -> (preset, "module:function"); the preset's schema comes from orderplan.config.store
JOBS: dict[str, tuple[str, str]] = {
    "bc": ("bc", "orderplan.train.bc:train_bc"),
    "ppo": ("ppo", "orderplan.train.ppo_run:run_ppo"),
    "evaluate": ("evaluate", "orderplan.eval.evaluate:run_evaluation"),
    "build_oracle": ("build_oracle", "orderplan.train.oracle_data:build_oracle"),
    "compare_orders": ("compare_orders", "orderplan.train.compare_orders:compare_orders"),
    "power": ("power", "orderplan.eval.power:run_power"),
    "extract_codes": ("extract_codes", "orderplan.data.extract:extract_codes"),
    "train_backbone": ("train_backbone", "orderplan.train.backbone:train_backbone"),
    "train_vq": ("train_vq", "orderplan.train.vq:train_vq"),
    "train_classifier": ("train_classifier", "orderplan.eval.classifier_training:train_classifier"),
    "train_autoencoder": ("train_autoencoder", "orderplan.eval.autoencoder:train_autoencoder"),
    "reward_alignment": ("reward_alignment", "orderplan.eval.alignment:reward_alignment"),
    "quality": ("quality", "orderplan.train.quality:run_quality"),
    "headroom": ("headroom", "orderplan.eval.headroom:run_headroom"),
    "schedule_nll": ("schedule_nll", "orderplan.eval.schedule_nll:run_schedule_nll"),
}


def _resolve(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def run_job(job: str) -> None:
    """Run `job` with Hydra over sys.argv[1:] (overrides, --config-name, --cfg job, ...)."""
    from orderplan.config.common import to_typed
    from orderplan.config.store import register_schemas, schema_of

    register_schemas()  # the presets' defaults lists start with their schema (`<preset>_schema`)

    _, fn_spec = JOBS[job]

    # config_path is relative to this module: the packaged presets, installed or editable;
    # --config-name may pick another preset of the job, so its schema is looked up after composing
    @hydra.main(config_path="configs", config_name=JOBS[job][0], version_base=None)
    def main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        schema = schema_of(HydraConfig.get().job.config_name)
        if schema is not schema_of(JOBS[job][0]):
            raise SystemExit(f"--config-name {HydraConfig.get().job.config_name} is a preset of another job "
                             f"(schema {schema.__name__}); {job} takes {schema_of(JOBS[job][0]).__name__} presets")
        _resolve(fn_spec)(to_typed(cfg, schema))

    main()


def _entry(job: str) -> Callable[[], None]:
    def entry() -> None:
        run_job(job)
    entry.__name__ = job
    entry.__doc__ = f"Console script orderplan-{job.replace('_', '-')}: the {job} job."
    return entry


bc = _entry("bc")
ppo = _entry("ppo")
evaluate = _entry("evaluate")
build_oracle = _entry("build_oracle")
compare_orders = _entry("compare_orders")
power = _entry("power")
extract_codes = _entry("extract_codes")
train_backbone = _entry("train_backbone")
train_vq = _entry("train_vq")
train_classifier = _entry("train_classifier")
train_autoencoder = _entry("train_autoencoder")
reward_alignment = _entry("reward_alignment")
quality = _entry("quality")
headroom = _entry("headroom")
schedule_nll = _entry("schedule_nll")


def dispatch(argv: list[str] | None = None) -> None:
    """`python -m orderplan JOB [overrides...]`: run one job (Hydra sees the rest of argv)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in JOBS:
        names = ", ".join(JOBS)
        raise SystemExit(f"usage: python -m orderplan JOB [key=value ...]\n  JOB is one of: {names}"
                         + (f"\n  unknown job {argv[0]!r}" if argv else ""))
    job = argv[0]
    sys.argv = [f"orderplan-{job}", *argv[1:]]
    run_job(job)
