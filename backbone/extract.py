"""Encode a data set with a VQ tokenizer once and store the codes (`scripts/extract_codes.py`).

As LlamaGen's `extract_codes_c2i.py`: GPT / oracle / planner training then reads token grids
from disk and never runs the tokenizer. Layout with `flip=true`: rows [0, N) hold the original
images, rows [N, 2N) their horizontal mirrors (same labels), recorded in the meta file.

Imports `backbone.checkpoint`, `backbone.config`, `backbone.data`, `backbone.run_utils`,
`backbone.validation`, `backbone.vq` from this package; never envs or agents.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from backbone.run_utils import console_log
from backbone.run_utils import progress as progress_bar

from backbone.checkpoint import sha256_file
from backbone.config import BackboneConfig, resolve_path
from backbone.data import ImageFolderDataset, embedded_mnist_sha256, images_to_model, load_embedded_mnist, write_codes
from backbone.validation import check_choice, check_int, check_path_exists
from backbone.vq import VQConfig, VQModel, load_llamagen_vq, load_vq_safetensors, vq_preset


@dataclass
class ExtractVQSection:
    preset: str = "tiny_mnist"
    """Architecture of a LlamaGen `.pt` checkpoint (a `.safetensors` file carries its own)."""


@dataclass
class ExtractCodesConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The backbone config group (its VQ preset and weights are the defaults here)."""
    source: str = "mnist_embedded"
    """mnist_embedded (both splits: train, heldout) or image_folder (one split, `split`)."""
    vq_weights: str = "artifacts/tiny_mnist/vq.safetensors"
    """VQ weights: `.safetensors` from train_vq, or LlamaGen's `vq_ds16_c2i.pt`."""
    vq: ExtractVQSection = field(default_factory=ExtractVQSection)
    image_folder: str | None = None
    """ImageNet-style folder (class sub-folders) for source=image_folder."""
    image_size: int = 256
    """ADM center-crop size for source=image_folder."""
    split: str = "train"
    """Split name written for source=image_folder."""
    flip: bool = False
    """Also store horizontally flipped copies (rows N..2N-1)."""
    out_dir: str = "runs/codes/tiny_mnist"
    """Output directory for {split}_codes.npy, {split}_labels.npy, {split}_meta.json."""
    batch_size: int = 256
    """Images per encoder forward."""
    num_workers: int = 0
    """DataLoader workers for source=image_folder (image decoding and resizing)."""
    device: str = "cpu"
    """cpu or cuda."""
    progress: bool = True
    """Show a tqdm progress bar."""


def check_extract_codes(cfg: ExtractCodesConfig, check_paths: bool = True) -> None:
    """Validate configs/extract_codes.yaml's schema before anything loads: ValueError naming the
    key and its range; with `check_paths`, FileNotFoundError for missing VQ weights or image folder."""
    check_choice("source", cfg.source, ("mnist_embedded", "image_folder"))
    check_choice("device", cfg.device, ("cpu", "cuda"))
    check_int("batch_size", cfg.batch_size, 1)
    check_int("num_workers", cfg.num_workers, 0)
    check_int("image_size", cfg.image_size, 1)
    if not str(cfg.out_dir or "").strip():
        raise ValueError(f"out_dir must be a directory path, got {cfg.out_dir!r}")
    if cfg.source == "image_folder" and not cfg.image_folder:
        raise ValueError("source=image_folder needs image_folder=/path/to/split")
    if check_paths:
        check_path_exists("vq_weights", cfg.vq_weights)
        if cfg.source == "image_folder":
            check_path_exists("image_folder", cfg.image_folder)


def load_any_vq(path: str | os.PathLike, preset: str) -> tuple[VQModel, VQConfig]:
    """`.safetensors` (config from its metadata) or a LlamaGen `.pt` (config = `preset`)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_vq_safetensors(p)
    cfg = vq_preset(preset)
    return load_llamagen_vq(p, cfg), cfg


def _folder_listing_sha256(ds: ImageFolderDataset) -> str:
    """Checksum of (relative path, size, label) of every image: cheap identity of a large folder
    (hashing all ImageNet bytes would take longer than the extraction)."""
    h = hashlib.sha256()
    for path, label in ds.samples:
        h.update(f"{path.relative_to(ds.root)}\t{path.stat().st_size}\t{label}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def encode_batches(model: VQModel, batches, n_images: int, flip: bool, device: torch.device,
                   progress: bool = True, desc: str = "encode") -> tuple[np.ndarray, np.ndarray]:
    """Encode (x [B, C, H, W] in [-1, 1], labels [B]) batches -> (codes [N or 2N, h, w] uint16 /
    int32, labels int64 [N or 2N]); with flip, mirrored copies follow all originals."""
    k = model.config.codebook_size
    dtype = np.uint16 if k <= 65536 else np.int32
    codes = labels = None
    pos = 0
    bar = progress_bar(total=n_images, desc=desc, disable=not progress)
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        c = model.encode_to_codes(x).cpu().numpy()  # [B, h, w]
        if codes is None:  # allocate once the grid is known
            rows = n_images * (2 if flip else 1)
            codes = np.empty((rows, *c.shape[1:]), dtype=dtype)
            labels = np.empty((rows,), dtype=np.int64)
        b = len(c)
        codes[pos : pos + b] = c
        labels[pos : pos + b] = np.asarray(y)
        if flip:
            codes[n_images + pos : n_images + pos + b] = model.encode_to_codes(torch.flip(x, dims=[-1])).cpu().numpy()
            labels[n_images + pos : n_images + pos + b] = np.asarray(y)
        pos += b
        bar.update(b)
    bar.close()
    if pos != n_images:
        raise RuntimeError(f"encoded {pos} images, expected {n_images}")
    return codes, labels


@console_log("extract_codes", dir_field="out_dir")
def extract_codes(cfg: ExtractCodesConfig) -> dict[str, dict]:
    """Encode the configured source and write its splits under out_dir. Returns {split: meta}."""
    check_extract_codes(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda requested but CUDA is not available")
    device = torch.device(cfg.device)
    vq_path = resolve_path(cfg.vq_weights, what="VQ weights")
    model, vq_cfg = load_any_vq(vq_path, cfg.vq.preset)
    model = model.to(device).eval().requires_grad_(False)
    out_dir = Path(cfg.out_dir).expanduser()
    out_dir = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
    common = {
        "vocab_size": vq_cfg.codebook_size,
        "vq_weights": str(vq_path),
        "vq_sha256": sha256_file(vq_path),
        "vq_config": vq_cfg.to_dict(),
        "flip": cfg.flip,
        "config": asdict(cfg),
    }
    written: dict[str, dict] = {}
    t0 = time.time()
    if cfg.source == "mnist_embedded":
        if vq_cfg.in_channels != 1:
            raise ValueError(f"{vq_path}: VQ takes {vq_cfg.in_channels} channels; MNIST needs 1")
        for split in ("train", "heldout"):
            images, labels = load_embedded_mnist(split)
            batches = ((images_to_model(images[i : i + cfg.batch_size]), labels[i : i + cfg.batch_size])
                       for i in range(0, len(images), cfg.batch_size))
            codes, lab = encode_batches(model, batches, len(images), cfg.flip, device, cfg.progress, split)
            meta = {**common, "source": "mnist_embedded", "source_sha256": embedded_mnist_sha256(),
                    "num_source_images": len(images)}
            written[split] = write_codes(out_dir, split, codes, lab, meta)
    elif cfg.source == "image_folder":
        if not cfg.image_folder:
            raise ValueError("source=image_folder needs image_folder=/path/to/split")
        if vq_cfg.in_channels != 3:
            raise ValueError(f"{vq_path}: VQ takes {vq_cfg.in_channels} channels; RGB folders need 3")
        ds = ImageFolderDataset(resolve_path(cfg.image_folder, what="image folder"), cfg.image_size)
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", drop_last=False)
        codes, lab = encode_batches(model, loader, len(ds), cfg.flip, device, cfg.progress, cfg.split)
        meta = {**common, "source": "image_folder", "source_root": str(ds.root),
                "source_listing_sha256": _folder_listing_sha256(ds), "classes": ds.classes,
                "image_size": cfg.image_size, "num_source_images": len(ds)}
        written[cfg.split] = write_codes(out_dir, cfg.split, codes, lab, meta)
    else:
        raise ValueError(f"unknown source {cfg.source!r}; use mnist_embedded or image_folder")
    shapes = ", ".join(f"{s}: {m['shape']}" for s, m in written.items())
    print(f"[extract_codes] {shapes} vocab={vq_cfg.codebook_size} in {time.time() - t0:.1f}s -> {out_dir}")
    return written
