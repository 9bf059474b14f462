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

`--config-name` picks another preset of the same job (e.g. `evaluate --config-name
evaluate_generation`), exactly as with `@hydra.main`."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

# job -> (preset, "module:function", "module:Schema")
JOBS: dict[str, tuple[str, str, str]] = {
    "bc": ("bc", "orderplan.train.bc:train_bc", "orderplan.train.bc:BCRun"),
    "ppo": ("ppo", "orderplan.train.ppo_run:run_ppo", "orderplan.train.ppo_run:PPORun"),
    "evaluate": ("evaluate", "orderplan.eval.evaluate:run_evaluation", "orderplan.eval.evaluate:EvaluateRun"),
    "build_oracle": ("build_oracle", "orderplan.train.oracle_data:build_oracle",
                     "orderplan.train.oracle_data:BuildOracleRun"),
    "compare_orders": ("compare_orders", "orderplan.train.compare_orders:compare_orders",
                       "orderplan.train.compare_orders:CompareRun"),
    "power": ("power", "orderplan.eval.power:run_power", "orderplan.eval.power:PowerRun"),
    "extract_codes": ("extract_codes", "orderplan.data.extract:extract_codes",
                      "orderplan.data.extract:ExtractCodesConfig"),
    "train_backbone": ("train_backbone", "orderplan.train.backbone:train_backbone",
                       "orderplan.config.common:TrainBackboneRun"),
    "train_vq": ("train_vq", "orderplan.train.vq:train_vq", "orderplan.train.vq:TrainVQConfig"),
    "train_classifier": ("train_classifier", "orderplan.eval.classifier_training:train_classifier",
                         "orderplan.eval.classifier_training:ClassifierRun"),
}


def _resolve(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def run_job(job: str) -> None:
    """Run `job` with Hydra over sys.argv[1:] (overrides, --config-name, --cfg job, ...)."""
    from orderplan.config.common import to_typed
    from orderplan.config.store import register_schemas

    register_schemas()  # the presets' defaults lists start with their schema (`<preset>_schema`)

    preset, fn_spec, schema_spec = JOBS[job]

    # config_path is relative to this module: the packaged presets, installed or editable
    @hydra.main(config_path="configs", config_name=preset, version_base=None)
    def main(cfg: DictConfig) -> None:
        _resolve(fn_spec)(to_typed(cfg, _resolve(schema_spec)))

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
