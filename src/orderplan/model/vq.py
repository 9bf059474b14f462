"""VQ image tokenizer with LlamaGen's VQ-16 architecture and parameter names.

The network is the taming-transformers / LlamaGen convolutional auto-encoder: an encoder
that downsamples by 2 per level (all levels but the last), a 1x1 `quant_conv` into a small
code space, an l2-normalised codebook, a 1x1 `post_quant_conv` and a mirrored decoder.
Submodule and parameter names equal LlamaGen's `tokenizer/tokenizer_image/vq_model.py`, so the
official `vq_ds16_c2i.pt` loads into the `vq_16` preset with `load_state_dict(strict=True)`.

Shapes: images [B, C, H, W] in [-1, 1]; latents [B, D, h, w] with D = codebook_embed_dim and
h = H / 2**(len(encoder_ch_mult) - 1); codes LongTensor [B, h, w] in [0, codebook_size)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from orderplan.infra.integrity import verify_file
from orderplan.infra.artifacts import check_finite, verify_artifact

# --------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------


@dataclass
class VQConfig:
    """Architecture and loss hyper-parameters of the tokenizer (LlamaGen `ModelArgs` + the
    encoder/decoder arguments LlamaGen hard-codes)."""

    codebook_size: int = 16384
    """Number of codes K."""
    codebook_embed_dim: int = 8
    """Dimension D of a code vector (the `quant_conv` output channels)."""
    codebook_l2_norm: bool = True
    """Nearest-code search and lookup on l2-normalised vectors (cosine similarity)."""
    codebook_show_usage: bool = True
    """Register LlamaGen's `quantize.codebook_used` buffer [65536]. The official checkpoint
    contains it, so it must exist for a strict load; it is a usage statistic, not a weight."""
    commit_loss_beta: float = 0.25
    """Weight beta of the commitment loss."""
    entropy_loss_ratio: float = 0.0
    """LlamaGen's codebook entropy regulariser weight; not implemented here, must be 0."""
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per encoder level; len - 1 = number of 2x downsamplings."""
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per decoder level (listed low level first, as in the encoder)."""
    z_channels: int = 256
    """Channels of the encoder output / decoder input around the 1x1 quant convs."""
    dropout_p: float = 0.0
    """Dropout inside residual blocks."""
    in_channels: int = 3
    """Image channels (3 RGB, 1 grayscale); the decoder outputs the same number."""
    ch: int = 128
    """Base channel width."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has one more per level, as in LlamaGen)."""
    norm_groups: int = 32
    """GroupNorm groups (LlamaGen: 32). Every channel width must be divisible by it."""

    def __post_init__(self) -> None:
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        if self.entropy_loss_ratio != 0.0:
            raise ValueError("entropy_loss_ratio != 0 is not implemented (LlamaGen uses 0 for VQ-16)")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder_ch_mult and decoder_ch_mult must have the same length")
        widths = [self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"channel widths {sorted(set(widths))} not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per code along one side (16 for VQ-16, 4 for tiny_mnist)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["encoder_ch_mult"] = list(self.encoder_ch_mult)
        d["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VQConfig keys: {sorted(unknown)}")
        return cls(**d)


VQ_PRESETS: dict[str, VQConfig] = {
    # LlamaGen VQ-16 (`VQ_16()` with default ModelArgs): 256x256 RGB -> 16x16 codes, 16384 x 8.
    "vq_16": VQConfig(),
    # Embedded default: 32x32 grayscale MNIST -> 8x8 codes, 256 x 8 (about 1.3 MB float32).
    "tiny_mnist": VQConfig(
        codebook_size=256,
        codebook_embed_dim=8,
        encoder_ch_mult=(1, 2, 2),
        decoder_ch_mult=(1, 2, 2),
        z_channels=32,
        in_channels=1,
        ch=16,
        num_res_blocks=1,
        norm_groups=8,
    ),
}


def vq_preset(name: str) -> VQConfig:
    """A fresh copy of a named preset (`vq_16`, `tiny_mnist`)."""
    if name not in VQ_PRESETS:
        raise ValueError(f"unknown VQ preset {name!r}; choose from {sorted(VQ_PRESETS)}")
    return dataclasses.replace(VQ_PRESETS[name])


# --------------------------------------------------------------------------------------------
# Building blocks (names follow LlamaGen so state dicts are interchangeable)
# --------------------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice plus a residual; a 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Ci, H, W] -> [B, Co, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convs for q, k, v and output."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> same
        b, c, h, w = x.shape
        n = self.norm(x)
        # [B, 1, HW, C]: one head of width C; SDPA's default scale 1/sqrt(C) equals LlamaGen's.
        q, k, v = (t(n).reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LlamaGen's asymmetric (right/bottom) zero padding: H -> H/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv: H -> 2H."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> [B, z_channels, H/f, W/f], f = 2**(levels - 1)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, cfg.encoder_ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            last = level == len(mult) - 1
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()  # attention only at the lowest resolution
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(block_in, ch * m, cfg.dropout_p, g))
                block_in = ch * m
                if last:
                    block.attn.append(AttnBlock(block_in, g))
            if not last:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, cfg.dropout_p, g), AttnBlock(block_in, g),
             ResnetBlock(block_in, block_in, cfg.dropout_p, g)]
        )
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, in_channels, h*f, w*f]; conv_blocks[0] is the lowest level."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, cfg.decoder_ch_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, cfg.dropout_p, g), AttnBlock(block_in, g),
             ResnetBlock(block_in, block_in, cfg.dropout_p, g)]
        )
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, ch * mult[level], cfg.dropout_p, g))
                block_in = ch * mult[level]
                if level == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in, g))
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class QuantizeOutput(NamedTuple):
    z_q: torch.Tensor
    """[B, D, h, w] quantised latents with straight-through gradients to the encoder."""
    codes: torch.Tensor
    """[B, h, w] long code indices."""
    codebook_loss: torch.Tensor
    """Scalar mean ||sg(z) - e||^2: moves codes towards encoder outputs."""
    commitment_loss: torch.Tensor
    """Scalar mean ||z - sg(e)||^2 (not multiplied by beta): keeps the encoder near its codes."""


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (`quantize.embedding.weight` [K, D])."""

    # Rows of the [rows, K] distance matrix computed at once; bounds memory for K = 16384.
    _CHUNK = 4096

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.n_e, self.e_dim, self.l2_norm = cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.n_e, 1.0 / self.n_e)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.codebook_show_usage:
            # Same name and size as LlamaGen (a rolling window of recent code ids, float32).
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        """[K, D] code vectors as used for search and lookup (l2-normalised if configured)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] (already normalised if l2_norm) -> [N] long index of the closest code."""
        e = self.codebook()
        e_sq = (e * e).sum(-1)  # [K]
        out = []
        for zc in z.split(self._CHUNK):
            # ||z||^2 is constant per row, so argmin ||z - e||^2 = argmin (||e||^2 - 2 z.e).
            out.append((e_sq - 2.0 * zc @ e.t()).argmin(dim=-1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        """z [B, D, h, w] (quant_conv output) -> QuantizeOutput."""
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # [B, h, w, D]
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        with torch.no_grad():
            codes = self.nearest(z.reshape(-1, d)).view(b, h, w)
        e = self.codebook()[codes]  # [B, h, w, D], differentiable w.r.t. the codebook
        codebook_loss = F.mse_loss(e, z.detach())
        commitment_loss = F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()  # straight-through: forward value e, gradient to z
        return QuantizeOutput(z_q.permute(0, 3, 1, 2), codes, codebook_loss, commitment_loss)

    @torch.no_grad()
    def record_usage(self, codes: torch.Tensor) -> None:
        """Push code ids into LlamaGen's rolling `codebook_used` window (no-op without it)."""
        if not hasattr(self, "codebook_used"):
            return
        flat = codes.reshape(-1)[-self.codebook_used.numel():].to(self.codebook_used)
        n = flat.numel()
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], flat]))


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """codes (any shape) -> (usage = fraction of the K codes that occur, perplexity = exp of
    the entropy of the empirical code distribution, in [1, K])."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class VQModel(nn.Module):
    """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] -> pre-quantisation latents [B, D, H/f, W/f]."""
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, D, h, w] -> images [B, C, h*f, w*f] (unclamped, ~[-1, 1])."""
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode_to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] -> LongTensor codes [B, H/f, W/f]."""
        z = self.encode_latents(x).permute(0, 2, 3, 1)  # [B, h, w, D]
        if self.quantize.l2_norm:
            z = F.normalize(z, dim=-1)
        b, h, w, d = z.shape
        return self.quantize.nearest(z.reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes LongTensor [B, h, w] -> images [B, C, h*f, w*f] clamped to [-1, 1]."""
        if codes.dtype not in (torch.int64, torch.int32) or codes.dim() != 3:
            raise ValueError(f"codes must be an integer tensor [B, h, w], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes out of range [0, {self.config.codebook_size})")
        z_q = self.quantize.codebook()[codes.long()].permute(0, 3, 1, 2)  # [B, D, h, w]
        return self.decode_latents(z_q).clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass. x [B, C, H, W] in [-1, 1] -> (recon [B, C, H, W] unclamped, losses).

        losses: `recon_mse` (in [-1, 1] units), `codebook`, `commitment` (unweighted),
        `loss` = recon_mse + codebook + beta * commitment, and the detached diagnostics
        `usage` (fraction of codes used in this batch) and `perplexity`; `codes` [B, h, w].
        """
        q = self.quantize(self.encode_latents(x))
        recon = self.decode_latents(q.z_q)
        recon_mse = F.mse_loss(recon, x)
        usage, perplexity = codebook_stats(q.codes, self.config.codebook_size)
        return recon, {
            "recon_mse": recon_mse,
            "codebook": q.codebook_loss,
            "commitment": q.commitment_loss,
            "loss": recon_mse + q.codebook_loss + self.config.commit_loss_beta * q.commitment_loss,
            "usage": torch.tensor(usage),
            "perplexity": torch.tensor(perplexity),
            "codes": q.codes,
        }


# --------------------------------------------------------------------------------------------
# Checkpoint I/O
# --------------------------------------------------------------------------------------------

# Optional in a LlamaGen file: a usage statistic, absent when trained with show_usage=False.
_OPTIONAL_KEYS = ("quantize.codebook_used",)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state and k not in _OPTIONAL_KEYS)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__}"
        f" != model {expected[k]}"
        for k in expected
        if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"mis-shaped keys [{'; '.join(shapes)}]")
    if problems:
        raise ValueError(f"{source} does not match the VQ config: " + "; ".join(problems))


def load_llamagen_vq(path: str | os.PathLike, cfg: VQConfig) -> VQModel:
    """Load a LlamaGen VQ checkpoint (`vq_ds16_c2i.pt`: weights under `model`) into `cfg`.

    Loads with `weights_only=True`; LlamaGen's training checkpoints also pickle an
    `argparse.Namespace` under `args`, which is allow-listed (it only holds plain values).
    Returns the model in eval mode on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ checkpoint not found: {path}")
    verify_artifact(path)  # a file its directory's manifest.json lists must match the recorded sha256
    verify_file(path, required=False)  # and a file with a checksum record (written by save_vq_safetensors) its record
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle globals, not a torch file at all
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from e
    state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with a 'model' key), got {type(state).__name__}")
    model = VQModel(cfg)
    check_state_dict(model, state, str(path))
    check_finite(state, str(path))
    model.load_state_dict(state, strict=not any(k not in state for k in _OPTIONAL_KEYS))
    return model.eval()


def save_vq_safetensors(model: VQModel, cfg: VQConfig, path: str | os.PathLike) -> None:
    """Write the state dict (float tensors as stored) with the config as JSON metadata
    (`vq_config`), atomically, with its checksum record."""
    from safetensors.torch import save

    from orderplan.infra.checkpoint import atomic_write_bytes, canonical_safetensors

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"vq_config": json.dumps(cfg.to_dict()), "format": "orderplan.vq/1"}
    atomic_write_bytes(path, canonical_safetensors(save(state, metadata=meta)), checksum=True)


def load_vq_safetensors(path: str | os.PathLike) -> tuple[VQModel, VQConfig]:
    """Read a file written by `save_vq_safetensors` -> (model in eval mode on CPU, config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ weights not found: {path}")
    verify_artifact(path)  # a file its directory's manifest.json lists must match the recorded sha256
    verify_file(path, required=False)  # and a file with a checksum record (written by save_vq_safetensors) its record
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "vq_config" not in meta:
        raise ValueError(f"{path}: no 'vq_config' in the safetensors metadata (not written by save_vq_safetensors?)")
    cfg = VQConfig.from_dict(json.loads(meta["vq_config"]))
    state = load_file(str(path))
    model = VQModel(cfg)
    check_state_dict(model, state, str(path))
    check_finite(state, str(path))
    model.load_state_dict(state, strict=not any(k not in state for k in _OPTIONAL_KEYS))
    return model.eval(), cfg
