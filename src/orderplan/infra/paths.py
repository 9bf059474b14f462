"""Where config paths point: the package directory (its `configs/` presets and `artifacts/` embedded
default ship inside it as package data) and the one rule that resolves a path a config names."""

from __future__ import annotations

from pathlib import Path

# The package directory: an installed (non-editable) package finds its presets and artifacts here too.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

def resolve_path(path: str | Path | None, must_exist: bool = True, what: str = "file") -> Path | None:
    """A config path as a Path: absolute as given; relative paths are tried against the working
    directory, then against the package directory (where the embedded artifacts ship)."""
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p, PACKAGE_ROOT / p]
    for c in candidates:
        if c.exists():
            return c
    if must_exist:
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"{what} not found: {path} (looked at {tried})")
    return candidates[0]

