"""Building the frozen generator stack from a `backbone=` config: GPT weights (LlamaGen `.pt` or our
`.safetensors`), the VQ tokenizer, the block geometry and the token data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from orderplan.infra.artifacts import verify_artifact
from orderplan.model.blocks import BlockGeometry
from orderplan.infra.checkpoint import (
    extract_model_state,
    load_safetensors,
    load_state_dict_checked,
    load_torch_checkpoint,
    save_safetensors,
)
from orderplan.config.common import DTYPES, BackboneConfig
from orderplan.infra.paths import resolve_path
from orderplan.model.gpt import GPT, GPTConfig, gpt_config
from orderplan.infra.validation import check_choice, check_int, check_path_exists

# The only parameter an official LlamaGen checkpoint lacks: it is zero-initialised, a no-op.
LLAMAGEN_ALLOWED_MISSING = frozenset({"ta_pos_table.weight"})


def backbone_gpt_config(bcfg: BackboneConfig) -> GPTConfig:
    return gpt_config(bcfg.gpt.preset, **dict(bcfg.gpt.overrides))


def backbone_dtype(bcfg: BackboneConfig, device: str | torch.device) -> torch.dtype:
    """The frozen GPT's dtype from `backbone.dtype`: auto = bfloat16 on CUDA (what LlamaGen samples
    in; half the memory and cache traffic), float32 elsewhere (a bf16 episode ran 2x slower than a
    float32 one on the development CPU); float32 / bfloat16 as named."""
    check_choice("backbone.dtype", bcfg.dtype, DTYPES)
    if bcfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, bcfg.dtype)


def backbone_identity(bcfg: BackboneConfig, device: str | torch.device) -> dict:
    """The backbone config as recorded in result caches' identities: every field, except that the
    fields added after caches existed (`dtype`, `random_weights`) enter only when they change the
    numbers (a dtype that resolves to other than float32 on `device`; a random-weights seed), so
    float32 rows cached before them stay valid."""
    out = asdict(bcfg)
    resolved = backbone_dtype(bcfg, device)
    out.pop("dtype")
    if resolved != torch.float32:
        out["dtype"] = str(resolved).removeprefix("torch.")
    if out.get("random_weights") is None:
        out.pop("random_weights", None)
    return out


def backbone_num_blocks(bcfg: BackboneConfig, key: str = "backbone") -> int:
    """N, the number of blocks of a backbone config's geometry, from the config alone (no weights
    are read): what budgets and block counts are validated against before anything loads.
    Raises ValueError naming `{key}.gpt` or `{key}.block_size` when they do not make a geometry."""
    try:
        cfg = backbone_gpt_config(bcfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}.gpt (preset {bcfg.gpt.preset!r}, overrides {dict(bcfg.gpt.overrides)}): {e}") from e
    try:
        return BlockGeometry(cfg.grid_h, cfg.grid_w, bcfg.block_size).num_blocks
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}.block_size={bcfg.block_size!r} does not fit the {cfg.grid_h}x{cfg.grid_w} token "
                         f"grid: {e}") from e


def save_gpt(model: GPT, path: str | Path, metadata: dict | None = None) -> None:
    """Write GPT weights as safetensors (atomically) with its config and `metadata` in the header."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, path, {"gpt_config": model.cfg.to_dict(), **(metadata or {})})


def load_gpt(path: str | Path, cfg: GPTConfig | None = None) -> GPT:
    """Load GPT weights from our `.safetensors` (config read from the file, and checked against
    `cfg` when given) or from a LlamaGen `.pt` checkpoint (`cfg` required; weights under `model`;
    only `ta_pos_table` may be missing). Raises ValueError naming mismatched fields or keys, and
    ArtifactMismatchError when a manifest.json next to the file records another sha256
    (`orderplan.infra.artifacts.verify_artifact`); non-finite weights are refused by name."""
    path = Path(path)
    verify_artifact(path)
    if path.suffix == ".safetensors":
        state, meta = load_safetensors(path)
        if "gpt_config" not in meta:
            raise ValueError(f"{path}: no gpt_config in the safetensors metadata; not written by save_gpt")
        file_cfg = GPTConfig(**meta["gpt_config"])
        if cfg is not None:
            # Dropout rates do not change the weights; every other field must agree.
            ignore = {"token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                      "initializer_range", "class_dropout_prob"}
            diff = {k: (v, getattr(file_cfg, k)) for k, v in cfg.to_dict().items()
                    if k not in ignore and getattr(file_cfg, k) != v}
            if diff:
                lines = ", ".join(f"{k}: config {a!r} vs file {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"{path}: checkpoint does not match the configured GPT ({lines})")
            file_cfg = cfg
        model = GPT(file_cfg)
        load_state_dict_checked(model, state, context=str(path))
        return model
    if cfg is None:
        raise ValueError(f"{path}: a LlamaGen .pt checkpoint carries no config; pass the GPT preset")
    model = GPT(cfg)
    state = extract_model_state(load_torch_checkpoint(path))
    load_state_dict_checked(model, state, allowed_missing=set(LLAMAGEN_ALLOWED_MISSING), context=str(path))
    return model


def randomize_gpt(gpt: GPT, seed: int) -> GPT:
    """Overwrite every parameter but the norm gains with N(0, 0.02^2) drawn from a CPU generator
    seeded `seed` (the same weights on every machine), in place; returns `gpt`. LlamaGen's own init
    zero-initialises the output layer and the target-aware table, which would make every logit,
    utility and reward of a random backbone degenerate."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return gpt


def random_weights_tag(bcfg: BackboneConfig) -> str | None:
    """Identity of a `random_weights` backbone ("random:<seed>:<preset>:<overrides JSON>": what fixes
    its weights), recorded by the oracle set, BC / PPO checkpoints and OrderHead files so that a
    planner trained on it is never scored on another backbone; None for weights read from a file."""
    if bcfg.random_weights is None:
        return None
    overrides = json.dumps(dict(bcfg.gpt.overrides), sort_keys=True)
    return f"random:{int(bcfg.random_weights)}:{bcfg.gpt.preset}:{overrides}"


def check_random_weights_tag(saved: str | None, bcfg: BackboneConfig, where: str | Path) -> None:
    """Raise ValueError when a planner file's recorded `random_weights_tag` (None: trained on weights
    from a file, or written before the tag existed) differs from the backbone in use."""
    now = random_weights_tag(bcfg)
    if saved != now:
        def say(t: str | None) -> str:
            return f"random weights {t}" if t else "weights from a file (backbone.gpt_weights)"
        raise ValueError(f"{where} was trained on a backbone with {say(saved)}, but this run's backbone has "
                         f"{say(now)}: a planner reads its own backbone's hidden states")


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """eval() + requires_grad_(False): a frozen backbone never samples dropout or class dropout."""
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass
class Backbone:
    """The frozen generator stack used by the env and the agents."""

    cfg: BackboneConfig
    gpt: GPT
    geometry: BlockGeometry
    vq: torch.nn.Module | None

    @property
    def device(self) -> torch.device:
        return self.gpt.output.weight.device


def load_vq(bcfg: BackboneConfig) -> torch.nn.Module | None:
    """The VQ tokenizer of a backbone config, or None when no weights are configured."""
    from orderplan.model.vq import load_llamagen_vq, load_vq_safetensors, vq_preset

    path = resolve_path(bcfg.vq_weights, what="VQ weights") if bcfg.vq_weights else None
    if path is None:
        return None
    if path.suffix == ".safetensors":
        model, vcfg = load_vq_safetensors(path)
        want = vq_preset(bcfg.vq.preset)
        if (vcfg.codebook_size, vcfg.codebook_embed_dim) != (want.codebook_size, want.codebook_embed_dim):
            raise ValueError(f"{path}: VQ codebook {vcfg.codebook_size}x{vcfg.codebook_embed_dim} does not "
                             f"match preset {bcfg.vq.preset} ({want.codebook_size}x{want.codebook_embed_dim})")
        return model
    return load_llamagen_vq(path, vq_preset(bcfg.vq.preset))


def build_backbone(bcfg: BackboneConfig, device: str | torch.device = "cpu", load_weights: bool = True,
                   with_vq: bool = True, dtype: torch.dtype | None = None) -> Backbone:
    """GPT (+ VQ) of a backbone config, frozen, on `device`. `load_weights=False` gives random
    weights with the configured architecture (tests, benchmarks); `backbone.random_weights` (a seed)
    gives `randomize_gpt`'s non-degenerate random weights instead of the file. dtype: the GPT's dtype; None =
    `backbone_dtype` (backbone.dtype). The VQ stays float32 (it decodes images once per episode)."""
    cfg = backbone_gpt_config(bcfg)
    if load_weights and bcfg.random_weights is not None:  # no file: seeded random weights (random_weights_tag)
        if bcfg.gpt_weights:
            raise ValueError(f"backbone {bcfg.name}: random_weights and gpt_weights are both set; set one to null")
        gpt = randomize_gpt(GPT(cfg), bcfg.random_weights)
    elif load_weights:
        path = resolve_path(bcfg.gpt_weights, what="GPT weights") if bcfg.gpt_weights else None
        if path is None:
            raise ValueError(f"backbone {bcfg.name}: set backbone.gpt_weights to a checkpoint path")
        gpt = load_gpt(path, cfg)
    else:
        gpt = GPT(cfg)
    gpt = freeze(gpt).to(device=device, dtype=dtype or backbone_dtype(bcfg, device))
    vq = load_vq(bcfg) if (with_vq and load_weights) else None
    if vq is not None:
        vq = freeze(vq).to(device)
    geom = BlockGeometry(cfg.grid_h, cfg.grid_w, bcfg.block_size)
    return Backbone(cfg=bcfg, gpt=gpt, geometry=geom, vq=vq)


def check_backbone_config(b: BackboneConfig, key: str = "backbone", check_paths: bool = True,
                          gpt_weights: bool = True) -> int:
    """The backbone group: a GPT preset and block_size that make a block geometry, a known data
    kind, and (with `check_paths`) existing weight files / codes directory: backbone.gpt_weights
    must be set unless `gpt_weights=False` (runs that do not read it, i.e. the backbone's own
    training) or `random_weights` (a seed: random weights, no file) is set; the two exclude each
    other. Returns N, the number of blocks."""
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
