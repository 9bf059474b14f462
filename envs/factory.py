"""Building environments from the same Hydra configs the scripts use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from backbone.config import BackboneConfig, compose, to_typed
from backbone.loading import build_backbone, load_token_data
from envs.core import EnvConfig, OrderPlanningCore
from envs.torchrl_env import OrderPlanningEnv


@dataclass
class EnvRun:
    """Schema of configs/make_env.yaml."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0


def _override(key: str, value: Any) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, (list, tuple)):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value}"


def make_core(backbone: str | BackboneConfig = "tiny_mnist", env: EnvConfig | None = None, batch_size: int = 16,
              device: str | torch.device = "cpu", seed: int | None = 0, dtype: torch.dtype | None = None,
              **overrides: Any) -> OrderPlanningCore:
    """The batched dynamics. `overrides` are env config fields (`reward="extrapolative"`,
    `budget=[1, 2, 4]`, `mode="generate"`) or dotted config keys (`**{"backbone.gpt_weights": p}`)."""
    if isinstance(backbone, BackboneConfig) and env is not None and not overrides:
        bcfg, ecfg = backbone, env
    else:
        args = [f"backbone={backbone}"] if isinstance(backbone, str) else []
        if overrides.get("mode") == "generate":
            args.append("env=generate")
        args += [_override(k if "." in k else f"env.{k}", v) for k, v in overrides.items()]
        run = to_typed(compose("make_env", args), EnvRun)
        bcfg = backbone if isinstance(backbone, BackboneConfig) else run.backbone
        ecfg = env or run.env
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    bb = build_backbone(bcfg, device=device, dtype=dtype)
    codes, labels = load_token_data(bcfg, ecfg.split)
    return OrderPlanningCore(bb, codes, labels, ecfg, batch_size, seed=seed)


def make_env(backbone: str | BackboneConfig = "tiny_mnist", batch_size: int = 16, device: str | torch.device = "cpu",
             seed: int | None = 0, **overrides: Any) -> OrderPlanningEnv:
    """The TorchRL env (batch_size=[batch_size]) built from configs/make_env.yaml + overrides."""
    return OrderPlanningEnv(make_core(backbone, batch_size=batch_size, device=device, seed=seed, **overrides))
