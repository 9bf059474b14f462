"""Typed configuration shared by every script.

The YAML files under `configs/` are read by Hydra; `to_typed` merges them into the dataclasses
below so that a misspelt key (`train.max_step=...`) or a wrong type fails loudly instead of being
silently ignored. Paths in configs are resolved by `resolve_path`.

Imports `backbone.validation` (and, inside `check_backbone_config`, `backbone.loading`); never envs
or agents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from backbone.validation import (check_choice, check_int, check_path_exists, check_positive, check_probability,
                                 check_range)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


@dataclass
class GPTSpec:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields, e.g. {resid_dropout_p: 0.0}


@dataclass
class VQSpec:
    preset: str = "tiny_mnist"


@dataclass
class DataSpec:
    kind: str = "mnist_embedded"  # mnist_embedded | codes
    codes_dir: str | None = None


@dataclass
class BackboneConfig:
    """Which generator stack to use (config group `backbone=`)."""

    name: str = "tiny_mnist"
    gpt: GPTSpec = field(default_factory=GPTSpec)
    gpt_weights: str | None = "artifacts/tiny_mnist/gpt.safetensors"
    vq: VQSpec = field(default_factory=VQSpec)
    vq_weights: str | None = "artifacts/tiny_mnist/vq.safetensors"
    data: DataSpec = field(default_factory=DataSpec)
    block_size: int = 2
    # dtype of the frozen GPT (weights, KV cache, hidden states): auto = bfloat16 on CUDA, float32
    # elsewhere (`backbone.loading.backbone_dtype`). Losses, log-softmaxes, rewards and utilities stay
    # float32 either way; the OrderHead keeps float32 weights. Training the GPT itself
    # (train_backbone.py, joint tuning) keeps float32 weights: bfloat16 is refused there.
    dtype: str = "auto"
    # seed of deterministic, non-degenerate random GPT weights used instead of gpt_weights
    # (`backbone.loading.randomize_gpt`): a stand-in of the preset's shapes for smoke runs, no file
    random_weights: int | None = None


DTYPES = ("auto", "float32", "bfloat16")  # values of backbone.dtype


@dataclass
class WandbConfig:
    project: str = "orderplan"
    mode: str = "offline"


@dataclass
class RunConfig:
    """Fields every script's top-level config shares (subclasses set their own run_dir default)."""

    run_dir: str = "runs/run"
    device: str = "cpu"
    seed: int = 0
    logger: str = "none"  # none | wandb (offline unless wandb.mode=online)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class BackboneTrainConfig:
    init_from: str | None = None
    max_steps: int = 2500
    stop_at: int | None = None  # stop early as if interrupted (checkpoint kept); rerun to continue
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    class_dropout: float = 0.1
    random_frac: float = 1.0
    anneal_frac: float = 0.0
    amp: bool = True
    log_every: int = 50
    eval_every: int = 250
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    eval_seed: int = 1234


@dataclass
class TrainBackboneRun(RunConfig):
    """Top-level config of `scripts/train_backbone.py`."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    run_dir: str = "runs/train_backbone/tiny_mnist"
    train: BackboneTrainConfig = field(default_factory=BackboneTrainConfig)


T = TypeVar("T")


def to_typed(cfg: DictConfig | dict, schema: type[T]) -> T:
    """Validate a Hydra config against a dataclass schema and return the dataclass instance.
    Unknown keys and wrong types raise `omegaconf` errors that name the key."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def resolve_path(path: str | Path | None, must_exist: bool = True, what: str = "file") -> Path | None:
    """A config path as a Path: absolute as given; relative paths are tried against the working
    directory, then against the repository root (where the embedded artifacts live)."""
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c
    if must_exist:
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"{what} not found: {path} (looked at {tried})")
    return candidates[0]


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a config from `configs/` the way the scripts do (for tests and library use)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a script's @hydra.main (its search path is configs/)
        return hydra_compose(config_name=config_name, overrides=overrides or [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


# -- validation (one pass per schema, before any work; errors name the dotted key and the range) ----

WANDB_MODES = ("online", "offline", "disabled")


def check_run_config(run: RunConfig) -> None:
    """The fields every script shares: run_dir set, device cpu | cuda[:i], logger none | wandb,
    wandb.mode online | offline | disabled."""
    if not str(run.run_dir or "").strip():
        raise ValueError(f"run_dir must be a directory path, got {run.run_dir!r}")
    if not (run.device == "cpu" or str(run.device).startswith("cuda")):
        raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {run.device!r}")
    check_int("seed", run.seed)
    check_choice("logger", run.logger if run.logger not in ("", None) else "none", ("none", "wandb"))
    check_choice("wandb.mode", run.wandb.mode, WANDB_MODES)


def check_backbone_config(b: BackboneConfig, key: str = "backbone", check_paths: bool = True,
                          gpt_weights: bool = True) -> int:
    """The backbone group: a GPT preset and block_size that make a block geometry, a known data
    kind, and (with `check_paths`) existing weight files / codes directory: backbone.gpt_weights
    must be set unless `gpt_weights=False` (runs that do not read it, i.e. the backbone's own
    training) or `random_weights` (a seed: random weights, no file) is set; the two exclude each
    other. Returns N, the number of blocks."""
    from backbone.loading import backbone_num_blocks  # heavy (torch, the GPT): imported when validating only

    check_int(f"{key}.block_size", b.block_size, 1)
    check_choice(f"{key}.dtype", b.dtype, DTYPES)
    num_blocks = backbone_num_blocks(b, key)
    check_choice(f"{key}.data.kind", b.data.kind, ("mnist_embedded", "codes"))
    check_int(f"{key}.random_weights", b.random_weights, 0, allow_none=True, note=" (null = read gpt_weights)")
    if b.random_weights is not None and b.gpt_weights:
        raise ValueError(f"{key}.random_weights={b.random_weights} and {key}.gpt_weights={b.gpt_weights!r} are both "
                         f"set: random weights replace the file; set one of them to null")
    if check_paths:
        if gpt_weights and b.random_weights is None:  # every run but the backbone's own training reads it
            check_path_exists(f"{key}.gpt_weights", b.gpt_weights)
        # the embedded data is encoded with the VQ at load time: it must exist then
        check_path_exists(f"{key}.vq_weights", b.vq_weights, allow_none=b.data.kind != "mnist_embedded")
        if b.data.kind == "codes":
            check_path_exists(f"{key}.data.codes_dir", b.data.codes_dir,
                              hint="write it with scripts/extract_codes.py")
    return num_blocks


def check_train_backbone_run(run: TrainBackboneRun, check_paths: bool = True) -> None:
    """configs/train_backbone.yaml: positive step counts, sizes and intervals, lr > 0, betas in
    [0, 1), probabilities in [0, 1], train.init_from existing when set."""
    check_run_config(run)
    check_backbone_config(run.backbone, check_paths=check_paths, gpt_weights=False)  # it writes the GPT, reads none
    if run.backbone.dtype == "bfloat16":  # Adam on bf16 weights loses small updates; train.amp autocasts instead
        raise ValueError("backbone.dtype=bfloat16 is for the frozen backbone; train_backbone keeps float32 weights "
                         "(train.amp=true runs the forward in bfloat16 autocast): use backbone.dtype=auto or float32")
    t = run.train
    if check_paths:
        check_path_exists("train.init_from", t.init_from, allow_none=True)
    check_int("train.max_steps", t.max_steps, 1)
    check_int("train.stop_at", t.stop_at, 1, allow_none=True, note=" (null = run to max_steps)")
    check_int("train.batch_size", t.batch_size, 1)
    check_positive("train.lr", t.lr)
    check_range("train.min_lr", t.min_lr, 0.0)
    check_int("train.warmup_steps", t.warmup_steps, 0)
    check_range("train.weight_decay", t.weight_decay, 0.0)
    check_range("train.beta1", t.beta1, 0.0, 1.0, hi_open=True)
    check_range("train.beta2", t.beta2, 0.0, 1.0, hi_open=True)
    check_positive("train.grad_clip", t.grad_clip)
    for name in ("class_dropout", "random_frac", "anneal_frac"):
        check_probability(f"train.{name}", getattr(t, name))
    for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        check_int(f"train.{name}", getattr(t, name), 1)
    check_int("train.eval_seed", t.eval_seed)
