"""Flip one byte inside the payload of a file, the way silent corruption looks (tests/test_corruption.py).

The byte is chosen inside data a reader would use, never in padding or framing, so the file still parses:

- torch files (`.pt`, a zip of stored entries): the middle of the largest tensor's storage entry;
- safetensors: the middle of the largest tensor's byte range;
- `.npy`: the middle of the array data, after the header;
- JSON: a digit in the middle of the text becomes another digit (a count or a value changes).

`flip_payload_byte` returns the offset it changed; `still_parses` proves the format-level reader accepts
the damaged file, i.e. that only a checksum can catch it."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np


def _payload_range(path: Path) -> tuple[int, int]:
    """[start, end) byte offsets of the payload to damage."""
    data = path.read_bytes()
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as zf:
            entries = [i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 0]
            assert entries, f"{path}: no tensor storage in the archive"
            info = max(entries, key=lambda i: i.file_size)
            assert info.compress_type == zipfile.ZIP_STORED, "torch stores entries uncompressed"
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        return start, start + info.file_size
    if path.suffix == ".safetensors":
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        b, e = max(spans, key=lambda s: s[1] - s[0])
        return 8 + n + b, 8 + n + e
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            read_header(f)
            start = f.tell()
        return start, len(data)
    if path.suffix == ".json":
        return 0, len(data)
    raise ValueError(f"no payload rule for {path.suffix}")


def flip_payload_byte(path: str | Path) -> int:
    """Damage one byte of `path`'s payload in place; returns its offset."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    start, end = _payload_range(path)
    if path.suffix == ".json":
        text = data.decode()
        digits = [i for i, ch in enumerate(text) if ch.isdigit()]
        assert digits, f"{path}: no digit to change"
        i = digits[len(digits) // 2]
        data[i] = ord("1") if text[i] != "1" else ord("2")
    else:
        i = (start + end) // 2
        data[i] ^= 0x10
    path.write_bytes(bytes(data))
    return i


def still_parses(path: str | Path) -> None:
    """Raise unless the format-level reader accepts the (damaged) file."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    if path.suffix == ".pt":
        torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    elif path.suffix == ".npy":
        np.load(path, allow_pickle=False)
    elif path.suffix == ".json":
        json.loads(path.read_text())
