"""The one source of config defaults: every run schema (a typed dataclass) registered in Hydra's
ConfigStore as `<preset>_schema`. Each preset in `orderplan/configs/` starts its defaults list with
its schema, so Hydra composes schema defaults, then the backbone and env groups, then the preset's
own overrides; a misspelt key fails at composition. The YAML files hold presets and overrides only
(`tests/config/test_defaults.py` checks that no YAML value repeats its schema default).

Schemas are named as "module:Class" strings and imported when registered, so this room needs none
of the rooms that define them at import time."""

from __future__ import annotations

import importlib

from hydra.core.config_store import ConfigStore

# preset (configs/<name>.yaml) -> its schema
SCHEMAS: dict[str, str] = {
    "bc": "orderplan.train.bc:BCRun",
    "bc_generated": "orderplan.train.bc:BCRun",
    "build_oracle": "orderplan.train.oracle_data:BuildOracleRun",
    "compare_orders": "orderplan.train.compare_orders:CompareRun",
    "evaluate": "orderplan.eval.evaluate:EvaluateRun",
    "evaluate_generation": "orderplan.eval.evaluate:EvaluateRun",
    "evaluate_steps": "orderplan.eval.evaluate:EvaluateRun",
    "evaluate_steps_router": "orderplan.eval.evaluate:EvaluateRun",
    "evaluate_spaces": "orderplan.eval.evaluate:EvaluateRun",
    "evaluate_quality": "orderplan.eval.evaluate:EvaluateRun",
    "evaluate_quality_curve": "orderplan.eval.evaluate:EvaluateRun",
    "evaluate_quality_discriminator": "orderplan.eval.evaluate:EvaluateRun",
    "extract_codes": "orderplan.data.extract:ExtractCodesConfig",
    "make_env": "orderplan.env.factory:EnvRun",
    "power": "orderplan.eval.power:PowerRun",
    "ppo": "orderplan.train.ppo_run:PPORun",
    "ppo_generated": "orderplan.train.ppo_run:PPORun",
    "ppo_parallel": "orderplan.train.ppo_run:PPORun",
    "train_backbone": "orderplan.config.common:TrainBackboneRun",
    "train_classifier": "orderplan.eval.classifier_training:ClassifierRun",
    "train_autoencoder": "orderplan.eval.autoencoder:AutoencoderRun",
    "reward_alignment": "orderplan.eval.alignment:AlignmentRun",
    "quality": "orderplan.train.quality:QualityRun",
    "quality_discriminator": "orderplan.train.quality:QualityRun",
    "headroom": "orderplan.eval.headroom:HeadroomRun",
    "schedule_nll": "orderplan.eval.schedule_nll:ScheduleNLLRun",
    "train_vq": "orderplan.train.vq:TrainVQConfig",
}
# config group -> (the key it fills, its schema): group presets hold overrides of these defaults
GROUP_SCHEMAS: dict[str, str] = {
    "backbone": "orderplan.config.common:BackboneConfig",
    "env": "orderplan.env.core:EnvConfig",
}


def schema_of(preset: str) -> type:
    """The dataclass behind configs/<preset>.yaml."""
    module, name = SCHEMAS[preset].split(":")
    return getattr(importlib.import_module(module), name)


def group_schema(group: str) -> type:
    module, name = GROUP_SCHEMAS[group].split(":")
    return getattr(importlib.import_module(module), name)


_registered = False


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent): `<preset>_schema` at the root."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    for preset in SCHEMAS:
        cs.store(name=f"{preset}_schema", node=schema_of(preset))
    _registered = True
