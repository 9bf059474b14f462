"""Encode a data set with a VQ tokenizer once and store the codes (`scripts/extract_codes.py`).

As LlamaGen's `extract_codes_c2i.py`: GPT / oracle / planner training then reads token grids
from disk and never runs the tokenizer. Layout with `flip=true`: rows [0, N) hold the original
images, rows [N, 2N) their horizontal mirrors (same labels), recorded in the meta file.
`source=synthetic` writes seeded synthetic grids in the same format, no VQ and no images
(`synthetic_codes`): the data of the random-weight smoke backbone (configs/backbone/llamagen_b_random.yaml)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from orderplan.infra.run_utils import job_dir
from orderplan.infra.run_utils import progress as progress_bar

from orderplan.infra.checkpoint import sha256_file
from orderplan.config.common import BackboneConfig
from orderplan.infra.paths import resolve_path
from orderplan.data.datasets import ImageFolderDataset, embedded_mnist_sha256, images_to_model, load_embedded_mnist, write_codes
from orderplan.infra.validation import check_choice, check_int, check_path_exists, check_probability
from orderplan.model.vq import VQConfig, VQModel, load_llamagen_vq, load_vq_safetensors, vq_preset


@dataclass
class ExtractVQSection:
    preset: str = "tiny_mnist"
    """Architecture of a LlamaGen `.pt` checkpoint (a `.safetensors` file carries its own)."""


@dataclass
class SyntheticSpec:
    """source=synthetic: class-structured token grids; grid and vocab are the backbone GPT's."""

    train_images: int = 48
    """Grids in the train split (image i has class i % num_classes)."""
    heldout_images: int = 16
    """Grids in the heldout split."""
    num_classes: int = 4
    """Classes (at most the GPT's num_classes)."""
    palette: int = 8
    """Distinct codes per class (each class draws its own from the vocab)."""
    cell: int = 4
    """Side of the constant-code patches of a class template (tokens; divides the grid)."""
    noise: float = 0.1
    """Share of tokens replaced by another code of the class palette."""
    seed: int = 0
    """Templates, palettes and per-image shifts, flips and noise."""


@dataclass
class ExtractCodesConfig:
    """Schema of the extract_codes job (preset src/orderplan/configs/extract_codes.yaml;
    `python scripts/extract_codes.py key=value ...`); every default lives here. Encodes a data set with a
    VQ once; training then reads codes."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The backbone config group (its VQ preset and weights are the defaults here)."""
    source: str = "mnist_embedded"
    """mnist_embedded (both splits: train, heldout), image_folder (one split, `split`) or synthetic
    (both splits, no VQ: `synthetic`)."""
    vq_weights: str | None = "artifacts/tiny_mnist/vq.safetensors"
    """VQ weights: `.safetensors` from train_vq, or LlamaGen's `vq_ds16_c2i.pt` (unused by synthetic)."""
    vq: ExtractVQSection = field(default_factory=ExtractVQSection)
    image_folder: str | None = None
    """ImageNet-style folder (class sub-folders) for source=image_folder."""
    image_size: int = 256
    """ADM center-crop size for source=image_folder (256 -> 16x16 codes with VQ-16)."""
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
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    """source=synthetic: sizes, structure and seed of the grids."""


def check_extract_codes(cfg: ExtractCodesConfig, check_paths: bool = True) -> None:
    """Validate configs/extract_codes.yaml's schema before anything loads: ValueError naming the
    key and its range; with `check_paths`, FileNotFoundError for missing VQ weights or image folder."""
    check_choice("source", cfg.source, ("mnist_embedded", "image_folder", "synthetic"))
    check_choice("device", cfg.device, ("cpu", "cuda"))
    check_int("batch_size", cfg.batch_size, 1)
    check_int("num_workers", cfg.num_workers, 0)
    check_int("image_size", cfg.image_size, 1)
    if not str(cfg.out_dir or "").strip():
        raise ValueError(f"out_dir must be a directory path, got {cfg.out_dir!r}")
    if cfg.source == "image_folder" and not cfg.image_folder:
        raise ValueError("source=image_folder needs image_folder=/path/to/split")
    if cfg.source == "synthetic":
        check_synthetic(cfg.synthetic, cfg.backbone)
    elif check_paths:
        check_path_exists("vq_weights", cfg.vq_weights)
        if cfg.source == "image_folder":
            check_path_exists("image_folder", cfg.image_folder)


def check_synthetic(spec: SyntheticSpec, backbone: BackboneConfig, key: str = "synthetic") -> None:
    """The synthetic section against the backbone's GPT (grid, vocab, classes): ValueError naming the key."""
    from orderplan.model.loading import backbone_gpt_config

    gpt = backbone_gpt_config(backbone)
    check_int(f"{key}.train_images", spec.train_images, 1)
    check_int(f"{key}.heldout_images", spec.heldout_images, 1)
    check_int(f"{key}.num_classes", spec.num_classes, 1, gpt.num_classes, note=" (the GPT's classes)")
    check_int(f"{key}.palette", spec.palette, 1, gpt.vocab_size, note=" (the GPT's vocab)")
    check_int(f"{key}.cell", spec.cell, 1)
    if gpt.grid_h % spec.cell or gpt.grid_w % spec.cell:
        raise ValueError(f"{key}.cell={spec.cell} must divide the {gpt.grid_h}x{gpt.grid_w} token grid")
    check_probability(f"{key}.noise", spec.noise)
    check_int(f"{key}.seed", spec.seed)


def synthetic_codes(spec: SyntheticSpec, n: int, grid_h: int, grid_w: int, vocab_size: int,
                    stream: int) -> tuple[np.ndarray, np.ndarray]:
    """n seeded grids -> (codes int64 [n, grid_h, grid_w] in [0, vocab_size), labels int64 [n], image i
    of class i % num_classes). Each class has a palette of `palette` distinct codes and a template of
    cell x cell patches of one palette entry each (both drawn from `spec.seed`, shared by the splits);
    an image is its class template cyclically shifted by up to a cell, mirrored with probability 1/2,
    with a `noise` share of tokens set to a random entry of the palette (drawn from (seed, stream):
    splits use different streams). Neighbouring tokens agree and classes differ, so the grids are
    not i.i.d. uniform codes."""
    classes = np.random.default_rng([spec.seed, 0])
    palettes = np.stack([classes.choice(vocab_size, spec.palette, replace=False) for _ in range(spec.num_classes)])
    coarse = classes.integers(0, spec.palette, (spec.num_classes, grid_h // spec.cell, grid_w // spec.cell))
    templates = coarse.repeat(spec.cell, axis=1).repeat(spec.cell, axis=2)  # [C, H, W] palette indices
    rng = np.random.default_rng([spec.seed, stream])
    labels = np.arange(n, dtype=np.int64) % spec.num_classes
    index = np.empty((n, grid_h, grid_w), dtype=np.int64)
    for i, c in enumerate(labels):
        grid = np.roll(templates[c], tuple(rng.integers(0, spec.cell, 2)), axis=(0, 1))
        index[i] = grid[:, ::-1] if rng.random() < 0.5 else grid
    noisy = rng.random(index.shape) < spec.noise
    index[noisy] = rng.integers(0, spec.palette, int(noisy.sum()))
    codes = np.take_along_axis(palettes[labels], index.reshape(n, -1), axis=1).reshape(index.shape)
    return codes.astype(np.int64), labels


def write_synthetic(cfg: ExtractCodesConfig, out_dir: Path) -> dict[str, dict]:
    """Write the train and heldout splits of `synthetic_codes` under out_dir (`write_codes`)."""
    from orderplan.model.loading import backbone_gpt_config

    gpt = backbone_gpt_config(cfg.backbone)
    written = {}
    for stream, (split, n) in enumerate((("train", cfg.synthetic.train_images),
                                         ("heldout", cfg.synthetic.heldout_images)), start=1):
        codes, labels = synthetic_codes(cfg.synthetic, n, gpt.grid_h, gpt.grid_w, gpt.vocab_size, stream)
        meta = {"vocab_size": gpt.vocab_size, "source": "synthetic", "synthetic": asdict(cfg.synthetic),
                "num_source_images": n, "flip": False, "config": asdict(cfg)}
        written[split] = write_codes(out_dir, split, codes, labels, meta)
    return written


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


@job_dir("extract_codes", dir_field="out_dir")
def extract_codes(cfg: ExtractCodesConfig) -> dict[str, dict]:
    """Encode the configured source and write its splits under out_dir. Returns {split: meta}."""
    check_extract_codes(cfg)
    if cfg.source == "synthetic":  # no tokenizer, no images
        out_dir = Path(cfg.out_dir).expanduser()
        written = write_synthetic(cfg, out_dir if out_dir.is_absolute() else Path.cwd() / out_dir)
        shapes = ", ".join(f"{s}: {m['shape']}" for s, m in written.items())
        print(f"[extract_codes] synthetic {shapes} vocab={written['train']['vocab_size']} -> {out_dir}")
        return written
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
