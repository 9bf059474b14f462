"""Integrity checks at load time: the sha256 a manifest records for a committed weight file, and
finite values in every loaded state dict.

Manifests. A directory of published weights (`artifacts/tiny_mnist/`) holds a `manifest.json`
whose top-level entries describe its files: {"gpt": {"file": "gpt.safetensors", "sha256": ...,
...}, "produced_by": "python scripts/build_tiny_default.py"}. `verify_artifact` hashes a file and
compares it with the entry that names it; the weight loaders (`orderplan.model.loading.load_gpt`,
`orderplan.model.vq.load_vq_safetensors` / `load_llamagen_vq`, `orderplan.eval.feature_net.load_classifier`)
call it on every file they open, so a flipped byte in a committed artifact fails with the file name
and the command that rebuilds it instead of loading silently. Files in directories without a
manifest (run outputs, LlamaGen checkpoints) are checked against their own checksum records instead
(`orderplan.infra.integrity`, which also hashes: once per process per resolved path, inode, size and
mtime, so tests that build the default backbone many times pay for one hash).

Non-finite weights. `check_finite` refuses a state dict with nan / inf in any floating tensor,
naming the tensors; `orderplan.infra.checkpoint.load_state_dict_checked` and the VQ loaders call it, so
GPT, VQ, OrderHead and classifier files with non-finite weights never load."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from orderplan.infra.integrity import IntegrityError, sha256_file, stat_key

__all__ = ["MANIFEST_NAME", "ArtifactMismatchError", "NonFiniteWeightsError", "manifest_entry",
           "verify_artifact", "check_finite"]

MANIFEST_NAME = "manifest.json"
_MAX_LISTED = 20  # tensor names listed in a non-finite error before it is cut short

_MANIFEST_CACHE: dict[tuple[str, int, int, int], dict] = {}


class ArtifactMismatchError(IntegrityError):
    """A file's sha256 differs from the one its manifest records."""


class NonFiniteWeightsError(ValueError):
    """A state dict holds nan or inf values."""


def _read_manifest(manifest_path: Path) -> dict:
    key = stat_key(manifest_path)
    if key not in _MANIFEST_CACHE:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactMismatchError(f"cannot read the manifest {manifest_path}: {e}") from e
        if not isinstance(manifest, dict):
            raise ArtifactMismatchError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
        _MANIFEST_CACHE[key] = manifest
    return _MANIFEST_CACHE[key]


def manifest_entry(path: str | os.PathLike, manifest_path: str | os.PathLike | None = None
                   ) -> tuple[str, dict, dict] | None:
    """(entry name, entry, manifest) of the top-level manifest entry whose "file" is `path`'s name
    and which records a sha256; None when there is no such entry (or, with the default
    `manifest_path` = path's directory / manifest.json, no manifest)."""
    path = Path(path)
    mpath = Path(manifest_path) if manifest_path is not None else path.parent / MANIFEST_NAME
    if manifest_path is None and not mpath.is_file():
        return None
    manifest = _read_manifest(mpath)
    for name, entry in manifest.items():
        if isinstance(entry, dict) and entry.get("file") == path.name and "sha256" in entry:
            return name, entry, manifest
    return None


def verify_artifact(path: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> bool:
    """Check `path` against the sha256 its manifest records (default: manifest.json next to it).

    Returns True when verified, False when no manifest lists the file (nothing to check; only with
    the default manifest_path). Raises ArtifactMismatchError (a ValueError) when the hashes differ,
    naming the file, both hashes and the command that rebuilds it (the entry's `produced_by`, else
    the manifest's), and when an explicit `manifest_path` does not list the file."""
    path = Path(path)
    mpath = Path(manifest_path) if manifest_path is not None else path.parent / MANIFEST_NAME
    found = manifest_entry(path, manifest_path)
    if found is None:
        if manifest_path is not None:
            raise ArtifactMismatchError(f"{mpath} has no entry with \"file\": {path.name!r} and a sha256")
        return False
    name, entry, manifest = found
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        rebuild = entry.get("produced_by") or manifest.get("produced_by")
        how = f"rebuild it with `{rebuild}`" if rebuild else "rebuild it with the script that produced it"
        raise ArtifactMismatchError(
            f"{path}: sha256 {actual} does not match the {name!r} entry of {mpath} ({entry['sha256']}): the file "
            f"is corrupt or was replaced. Restore the committed file (e.g. `git checkout -- {path.name}` in "
            f"{path.parent}) or {how}")
    return True


def check_finite(state: Mapping[str, Any], context: str, hint: str | None = None) -> None:
    """Raise NonFiniteWeightsError naming every floating tensor of `state` that holds nan or inf
    (`context`: the file, for the message; `hint`: what to do, replacing the default advice).
    Integer and bool tensors and non-tensors are skipped."""
    bad = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            if value.numel() and not bool(torch.isfinite(value).all()):
                n = int((~torch.isfinite(value)).sum())
                bad.append(f"{name} ({n} of {value.numel()} values)")
    if bad:
        shown = bad[:_MAX_LISTED]
        more = f", ... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        hint = hint or "The file is corrupt or comes from a diverged run; load an earlier checkpoint or retrain"
        raise NonFiniteWeightsError(f"{context}: refusing to load weights with nan / inf values in {len(bad)} "
                                    f"tensor(s): {', '.join(shown)}{more}. {hint}")
