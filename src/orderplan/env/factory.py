"""Building environments from the same Hydra configs the scripts use (`make_core`, `make_env`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from orderplan.config.common import BackboneConfig, compose, to_typed
from orderplan.model.loading import check_backbone_config
from orderplan.model.loading import backbone_num_blocks, build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.infra.validation import check_int
from orderplan.env.core import EnvConfig, OrderPlanningCore, check_env_config
from orderplan.env.torchrl_env import OrderPlanningEnv


@dataclass
class EnvRun:
    """Schema of the make_env config (preset src/orderplan/configs/make_env.yaml); every default lives here.
    What orderplan.env.make_env composes: a backbone, an env config, and the batch / device / seed."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    batch_size: int = 16  # env rows
    device: str = "cpu"  # cpu | cuda
    seed: int = 0


def check_env_run(run: EnvRun, check_paths: bool = True) -> None:
    """Validate configs/make_env.yaml's schema: the backbone (weights exist when `check_paths`),
    the env against the backbone's block count, batch_size >= 1. ValueError names the key."""
    check_backbone_config(run.backbone, check_paths=check_paths)
    check_env_config(run.env, num_blocks=backbone_num_blocks(run.backbone))
    check_int("batch_size", run.batch_size, 1, note=" (env rows)")


def _override(key: str, value: Any) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, (list, tuple)):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value}"


def _replace_fields(cfg: Any, overrides: dict[str, Any], where: str) -> Any:
    """A copy of the dataclass `cfg` with `overrides` applied (`dataclasses.replace`; dotted keys such
    as "sampling.cfg_scale" reach nested dataclasses, a dict value updates a nested one field by field).
    Unknown keys raise ValueError naming the key and the valid fields."""
    names = {f.name for f in dataclasses.fields(cfg)}
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ValueError(f"unknown {where} config field {key!r} for {type(cfg).__name__}; "
                             f"its fields are {sorted(names)}")
        sub = getattr(cfg, head)
        if rest or (isinstance(value, dict) and dataclasses.is_dataclass(sub)):
            if not dataclasses.is_dataclass(sub):
                raise ValueError(f"{where}.{head} is not a config group: cannot set {where}.{key}")
            nested.setdefault(head, {}).update({rest: value} if rest else value)
        else:
            direct[key] = value
    for head, sub_over in nested.items():
        direct[head] = _replace_fields(getattr(cfg, head), sub_over, f"{where}.{head}")
    return dataclasses.replace(cfg, **direct)


def make_core(backbone: str | BackboneConfig = "tiny_mnist", env: EnvConfig | None = None, batch_size: int = 16,
              device: str | torch.device = "cpu", seed: int | None = 0, dtype: torch.dtype | None = None,
              **overrides: Any) -> OrderPlanningCore:
    """The batched dynamics. `overrides` are env config fields (`reward="extrapolative"`,
    `budget=[1, 2, 4]`, `mode="generate"`) or dotted config keys (`**{"backbone.gpt_weights": p}`,
    `**{"env.sampling.cfg_scale": 2.0}`).

    A typed `env` (EnvConfig) / `backbone` (BackboneConfig) is the base its overrides apply to
    (with `dataclasses.replace`; the passed objects are not modified); a backbone name or a missing
    env is composed from configs/make_env.yaml with the overrides, as the scripts do (`mode="generate"`
    then starts from the env=generate preset). Unknown keys raise an error naming them; bad values
    (batch_size < 1, env.budget outside [1, N blocks], ...) raise ValueError naming the key before
    any weights are loaded. dtype: the backbone's (hidden states, KV cache); None = backbone.dtype
    (auto: bfloat16 on CUDA, float32 on CPU). Rewards and losses are float32 in either."""
    check_int("batch_size", batch_size, 1, note=" (env rows)")
    env_over: dict[str, Any] = {}
    bb_over: dict[str, Any] = {}
    for key, value in overrides.items():
        if key.startswith("backbone."):
            bb_over[key.removeprefix("backbone.")] = value
        elif key.startswith("env.") or "." not in key:
            env_over[key.removeprefix("env.")] = value
        else:
            raise ValueError(f"unknown override {key!r}: use env config fields or backbone./env. keys")
    bcfg = _replace_fields(backbone, bb_over, "backbone") if isinstance(backbone, BackboneConfig) else None
    ecfg = _replace_fields(env, env_over, "env") if env is not None else None
    if bcfg is None or ecfg is None:
        args = []
        if bcfg is None:
            args.append(f"backbone={backbone}")
            args += [_override(f"backbone.{k}", v) for k, v in bb_over.items()]
        if ecfg is None:
            if env_over.get("mode") == "generate":
                args.append("env=generate")
            args += [_override(f"env.{k}", v) for k, v in env_over.items()]
        run = to_typed(compose("make_env", args), EnvRun)
        bcfg = bcfg or run.backbone
        ecfg = ecfg or run.env
    check_env_config(ecfg, num_blocks=backbone_num_blocks(bcfg))  # before the weights load (the core checks again)
    bb = build_backbone(bcfg, device=device, dtype=dtype)  # dtype None: backbone.dtype (auto: bf16 on CUDA only)
    codes, labels = load_token_data(bcfg, ecfg.split)
    return OrderPlanningCore(bb, codes, labels, ecfg, batch_size, seed=seed)


def make_env(backbone: str | BackboneConfig = "tiny_mnist", batch_size: int = 16, device: str | torch.device = "cpu",
             seed: int | None = 0, **overrides: Any) -> OrderPlanningEnv:
    """The TorchRL env (batch_size=[batch_size]) built from configs/make_env.yaml + overrides."""
    return OrderPlanningEnv(make_core(backbone, batch_size=batch_size, device=device, seed=seed, **overrides))
