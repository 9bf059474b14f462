"""Checkpoint I/O shared by every training script.

- Atomic writes (`orderplan.infra.integrity.atomic_write`): temp file in the target directory,
  flush + fsync, ``os.replace``. A crash mid-write leaves the previous file intact (``torch.save``
  straight onto the final path, as nanoGPT / LlamaGen do, leaves a truncated checkpoint instead).
- Checksums: checkpoints and weights are written with a sha256 record beside them and checked
  before they are loaded (``load_torch_checkpoint(required=True)`` for files the project wrote
  itself; weights given by path are checked when they carry a record).
- Loading is ``weights_only=True`` only: LlamaGen training checkpoints pickle an
  ``argparse.Namespace`` and are refused with a message that says how to re-save them.
- ``CheckpointManager``: ``step_XXXXXXXX.pt`` files plus a ``last.json`` pointer that moves only
  after the checkpoint is complete (LeRobot's ``update_last_checkpoint``), and RNG-state helpers
  for exact resume."""

from __future__ import annotations

import json
import os
import random
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orderplan.infra.artifacts import check_finite
from orderplan.infra.integrity import (
    IntegrityError,
    MissingRecordError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    remove_with_record,
    sha256_file,
    verify_file,
)

__all__ = [
    "CheckpointCorruptError",
    "UnsafeCheckpointError",
    "IntegrityError",
    "atomic_write",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "save_safetensors",
    "canonical_safetensors",
    "load_safetensors",
    "load_torch_checkpoint",
    "load_cache",
    "extract_model_state",
    "load_state_dict_checked",
    "CheckpointManager",
    "rng_state",
    "set_rng_state",
    "check_identity",
    "sha256_file",
]

PathLike = str | os.PathLike

# Names listed per category in a load_state_dict_checked error before it is cut short.
_MAX_LISTED_KEYS = 20


class CheckpointCorruptError(ValueError):
    """The file exists but is truncated or not a checkpoint of the expected format."""


class UnsafeCheckpointError(ValueError):
    """The file is a valid torch checkpoint that cannot be loaded with ``weights_only=True``."""


# ---------------------------------------------------------------------------- identities
def check_identity(saved: Mapping[str, Any], now: Mapping[str, Any], where: PathLike, hint: str,
                   what: str = "it was made with a different setup") -> None:
    """Refuse to continue something saved under another identity (a checkpoint to resume, a data set
    to extend or reuse): raise ValueError naming every differing key with its saved and current
    value, "{where}: {what}: k: saved a vs now b; ... {hint}".

    Keys are those of `now` (in order), then those only `saved` has; a key missing on one side
    reads as None, so a key added later with the value None keeps older files valid."""
    keys = [*now, *(k for k in saved if k not in now)]
    diff = [f"{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"{where}: {what}: " + "; ".join(diff) + f". {hint}")


def atomic_torch_save(obj: Any, path: PathLike, checksum: bool = False) -> Path:
    """Atomically ``torch.save(obj, path)``; with ``checksum`` its digest is recorded
    (`orderplan.infra.integrity`)."""
    return atomic_write(path, lambda f: torch.save(obj, f), checksum=checksum)


# ---------------------------------------------------------------------------- safetensors
def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Atomically save tensors to a ``.safetensors`` file, with its checksum record.

    Tensors are moved to CPU and made contiguous; tensors sharing storage (tied weights) are
    cloned, since safetensors refuses aliases. ``metadata`` values are JSON-encoded (safetensors
    metadata is str -> str); ``load_safetensors`` decodes them.
    """
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"save_safetensors: {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(ptr)
        tensors[key] = t
    meta: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        try:
            meta[str(key)] = json.dumps(value, sort_keys=True)
        except TypeError as e:
            raise TypeError(
                f"save_safetensors: metadata[{key!r}] is not JSON-serialisable: {e}"
            ) from e
    return atomic_write_bytes(path, canonical_safetensors(st_save(tensors, metadata=meta)), checksum=True)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted. safetensors writes the metadata
    map in hash order, which changes from process to process, so identical weights and metadata
    would give different bytes (and checksums) in two runs; sorted, the same content is the same
    file. The tensor data (offsets relative to the data section) is unchanged."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def load_safetensors(path: PathLike, rebuild: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(state_dict, metadata)`` from a ``.safetensors`` file, on CPU, after checking it
    against its checksum record when it has one (``rebuild``: how to make it again, for the error).

    Metadata values are JSON-decoded; a value that is not JSON (a file written by another tool)
    is returned as the raw string. Raises FileNotFoundError / CheckpointCorruptError (a
    ValueError) / IntegrityError (a ValueError) naming the path.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    verify_file(path, rebuild, required=False)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError on mmap
        raise CheckpointCorruptError(
            f"cannot read safetensors file {path} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    metadata: dict[str, Any] = {}
    for key, value in raw_meta.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return tensors, metadata


# ---------------------------------------------------------------------------- torch checkpoints
def load_torch_checkpoint(path: PathLike, rebuild: str | None = None, required: bool = False) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with actionable errors, after
    checking the file against its checksum record (``required``: a file without one is refused;
    else it is checked when it has one; ``rebuild``: how to make it again, for the error).

    Raises:
        FileNotFoundError: no file at ``path``.
        IntegrityError (ValueError): the bytes differ from the record, or ``required`` and none.
        UnsafeCheckpointError (ValueError): the file pickles arbitrary Python objects.
        CheckpointCorruptError (ValueError): truncated / not a torch checkpoint / not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_file(path, rebuild, required)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            detail = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
            culprit = f" (it contains a {detail.group(1)})" if detail else ""
            raise UnsafeCheckpointError(
                f"{path} cannot be loaded with weights_only=True: it pickles Python objects other "
                f"than tensors and plain containers{culprit}. LlamaGen training checkpoints do "
                "this (an argparse.Namespace under 'args'). We never unpickle such objects, as "
                "that can execute arbitrary code. Fix: once, in a Python session you trust, "
                "re-save only the model weights:\n"
                f"    ckpt = torch.load({str(path)!r}, map_location='cpu', weights_only=False)\n"
                "    torch.save({'model': ckpt['model']}, 'clean.pt')"
            ) from e
        raise CheckpointCorruptError(
            f"cannot load checkpoint {path} (truncated or corrupt?): {type(e).__name__}: {msg[:300]}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointCorruptError(
            f"checkpoint {path} holds a {type(obj).__name__}, expected a dict"
        )
    return obj


def load_cache(path: PathLike, identity: Any, tag: str = "") -> dict | None:
    """A cache file written by ``atomic_torch_save(..., checksum=True)`` as a dict with an
    ``"identity"`` key: its contents when the file is intact and holds ``identity``, else None, after
    printing why it is recomputed (no record, bytes differ from the record, unloadable, another
    setup). A cache is never trusted past its checksum; it is rebuilt instead."""
    path = Path(path)
    if not path.is_file():
        return None
    prefix = f"{tag} " if tag else ""
    try:
        done = load_torch_checkpoint(path, required=True)
    except ValueError as err:  # IntegrityError, CheckpointCorruptError, UnsafeCheckpointError
        print(f"{prefix}{err}\n{prefix}{path.name} is a cache: recomputing it", flush=True)
        return None
    if done.get("identity") != identity:
        print(f"{prefix}{path} was computed with another setup: recomputing it", flush=True)
        return None
    return done


_WRAPPER_KEYS = ("model", "module", "state_dict")
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def extract_model_state(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """Model weights from a checkpoint dict, with wrapper prefixes stripped.

    LlamaGen convention: weights under ``"model"`` when present (``"module"`` and
    ``"state_dict"`` are also accepted, in that order), else the dict itself. Leading ``module.``
    (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped, in any combination.
    """
    state: Mapping[str, Any] = ckpt
    for key in _WRAPPER_KEYS:
        if isinstance(ckpt.get(key), Mapping):
            state = ckpt[key]
            break
    out: dict[str, Any] = OrderedDict()
    for key, value in state.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _KEY_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name in out:
            raise ValueError(
                f"two checkpoint keys map to {name!r} after stripping DDP/compile prefixes"
            )
        out[name] = value
    return out


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED_KEYS]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    allowed_missing: Iterable[str] = frozenset(),
    context: str = "",
) -> list[str]:
    """Load ``state_dict`` into ``module`` after checking every key and shape.

    Raises ValueError listing (each list cut at a readable length) the missing keys not in
    ``allowed_missing``, the unexpected keys, and the mis-shaped keys with expected and got shapes,
    or naming the tensors that hold nan / inf (``orderplan.infra.artifacts.check_finite``).
    Nothing is loaded when it raises. Tensors are converted to the dtype of the module's tensor.

    Returns:
        The sorted keys of ``allowed_missing`` that were actually missing (they keep the module's
        current values, e.g. a zero-initialised ``ta_pos_table``).
    """
    allowed = set(allowed_missing)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    bad_missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict
        and isinstance(expected[k], torch.Tensor)
        and isinstance(state_dict[k], torch.Tensor)
        and expected[k].shape != state_dict[k].shape
    ]
    if bad_missing or unexpected or misshaped:
        where = f"{context}: " if context else ""
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing keys", bad_missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", misshaped),
            )
            if items
        ]
        raise ValueError(
            f"{where}state dict does not match {type(module).__name__}:\n" + "\n".join(parts)
        )
    check_finite(state_dict, context or type(module).__name__)
    converted = {
        k: v.to(dtype=expected[k].dtype)
        if isinstance(v, torch.Tensor) and isinstance(expected[k], torch.Tensor)
        else v
        for k, v in state_dict.items()
    }
    module.load_state_dict(converted, strict=False)
    return sorted(k for k in missing if k in allowed)


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy (global legacy RNG) and torch CPU / CUDA RNG states.

    Only tensors and plain Python types, so a checkpoint holding it loads with weights_only=True
    (numpy's state tuple holds an ndarray, which weights_only refuses: stored as a tensor).
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states captured by ``rng_state`` (missing sections are left untouched)."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npst = state["numpy"]
        keys = npst["keys"]
        keys = (keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)).astype(np.uint32)
        np.random.set_state(
            (npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) != torch.cuda.device_count():
            warnings.warn(
                f"checkpoint has {len(cuda_states)} CUDA RNG states but {torch.cuda.device_count()} "
                "devices are visible; restoring the first min(...) only",
                stacklevel=2,
            )
        for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=i)


# ---------------------------------------------------------------------------- resume manager
# Types torch.load(weights_only=True) accepts; exact types, since subclasses (namedtuple,
# defaultdict, numpy scalars, OmegaConf containers) pickle by class and are refused on load.
_SAFE_LEAVES = (
    str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size
)
_SAFE_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def _find_unsafe(obj: Any, where: str = "state") -> str | None:
    """Path and type of the first value torch.load(weights_only=True) would refuse, else None."""
    if isinstance(obj, torch.Tensor) or type(obj) in _SAFE_LEAVES:
        return None
    if type(obj) in _SAFE_CONTAINERS:
        if isinstance(obj, dict):
            items = [(f"{where} key {k!r}", k) for k in obj]
            items += [(f"{where}[{k!r}]", v) for k, v in obj.items()]
        else:
            items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
        return next((f for sub, v in items if (f := _find_unsafe(v, sub))), None)
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


_STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointManager:
    """Training checkpoints for exact resume: ``step_{step:08d}.pt`` + ``last.json`` pointer.

    ``save`` writes the checkpoint atomically, then atomically moves the pointer, then prunes,
    so at every instant ``last.json`` names a complete file. ``state`` should carry everything a
    resume needs (model, optimizer, scheduler, scaler, ``rng_state()``, step, sampler state) as
    tensors and plain Python types: it is checked before writing, because a checkpoint that only
    loads with weights_only=False is found out at resume time, hours later.
    """

    POINTER = "last.json"

    def __init__(self, ckpt_dir: PathLike, keep_last: int = 3) -> None:
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.ckpt_dir / f"step_{step:08d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every ``step_*.pt`` in the directory, ascending by step."""
        if not self.ckpt_dir.is_dir():
            return []
        found = []
        for p in self.ckpt_dir.iterdir():
            m = _STEP_FILE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, step: int, state: dict) -> Path:
        """Write ``state`` for ``step``, move the pointer to it, prune to ``keep_last`` files."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        bad = _find_unsafe(state)
        if bad:
            raise TypeError(
                f"checkpoint state is not loadable with weights_only=True: {bad}. Store tensors "
                "and plain Python types only (e.g. float(x) for numpy scalars, "
                "OmegaConf.to_container(cfg) for configs)."
            )
        path = atomic_torch_save(state, self.path_for(step), checksum=True)
        atomic_write_json(self.ckpt_dir / self.POINTER, {"file": path.name, "step": step}, checksum=True)
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        ckpts = self.checkpoints()
        survivors = {p for _, p in ckpts[-self.keep_last:]} | {keep}
        for _, p in ckpts:
            if p not in survivors:
                remove_with_record(p)

    def _pointed(self) -> Path | None:
        pointer = self.ckpt_dir / self.POINTER
        if not pointer.is_file():
            return None
        try:
            verify_file(pointer, required=False)
            name = json.loads(pointer.read_text())["file"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # IntegrityError is a ValueError
            warnings.warn(f"ignoring unreadable checkpoint pointer {pointer}: {e}", stacklevel=3)
            return None
        # Only a bare file name inside ckpt_dir is honoured (the directory may have been moved).
        return self.ckpt_dir / Path(str(name)).name

    def _candidates(self) -> list[Path]:
        """Pointer target first, then the other checkpoints newest first."""
        pointed = self._pointed()
        rest = [p for _, p in reversed(self.checkpoints()) if p != pointed]
        return ([pointed] if pointed is not None else []) + rest

    @staticmethod
    def _looks_complete(path: Path) -> bool:
        # Check without unpickling: the checksum record (a file without one counts, so that
        # load_latest raises on it), then torch.save's zip, whose central directory sits at the
        # end, so truncated or overwritten files fail to open. load_latest() loads.
        try:
            verify_file(path, required=False)
        except IntegrityError:
            return False
        try:
            with zipfile.ZipFile(path) as zf:
                return len(zf.namelist()) > 0
        except (OSError, zipfile.BadZipFile):
            return False

    def latest(self) -> Path | None:
        """Checkpoint to resume from: the pointer's target, or (with a warning) the newest
        complete-looking checkpoint if the target is missing or corrupt. None if there is none."""
        pointed = self._pointed()
        for path in self._candidates():
            if path.is_file() and self._looks_complete(path):
                if pointed is not None and path != pointed:
                    warnings.warn(
                        f"checkpoint pointer names {pointed.name}, which is missing or corrupt; "
                        f"falling back to {path.name}",
                        stacklevel=2,
                    )
                return path
        return None

    def load_latest(self) -> dict | None:
        """Load the checkpoint ``latest()`` would pick, falling back past files that fail to
        load or whose bytes differ from their checksum record (with a warning naming the file).
        None if there is none. A checkpoint refused by weights_only is an error, not corruption,
        and is raised; so is one without a checksum record (IntegrityError: written before
        records existed; resuming past it would start over and prune it), and one whose "model"
        weights hold nan / inf (NonFiniteWeightsError naming the tensors)."""
        pointed = self._pointed()
        for path in self._candidates():
            if not path.is_file():
                continue
            try:
                state = load_torch_checkpoint(path, required=True)
            except MissingRecordError:
                raise
            except IntegrityError as e:
                warnings.warn(f"skipping a checkpoint that fails its checksum: {e}", stacklevel=2)
                continue
            except CheckpointCorruptError as e:
                warnings.warn(f"skipping unloadable checkpoint: {e}", stacklevel=2)
                continue
            if pointed is not None and path != pointed:
                warnings.warn(
                    f"checkpoint pointer names {pointed.name}, which is missing or corrupt; "
                    f"resuming from {path.name}",
                    stacklevel=2,
                )
            if isinstance(state.get("model"), Mapping):  # a diverged run's weights: resuming would go on with nan
                check_finite(state["model"], f"checkpoint {path} (model weights)",
                             f"Delete {path.name} to resume from the checkpoint before it, or use a new run_dir")
            return state
        return None
