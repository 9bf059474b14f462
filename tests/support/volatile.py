"""Keys of the project's JSON outputs that describe the process rather than its result.

Wall-clock times and throughputs, and bookkeeping of a resume. Tests that compare two runs'
outputs for equality leave these out; one list, so a new timing field is added once.
"""

from __future__ import annotations

VOLATILE_KEYS = frozenset({
    "wall_time_s", "seconds", "wall_s", "build_time_s", "images_per_s", "samples_per_s", "resumed_from",
    "images_built_this_run", "images_skipped_this_run", "states_built_this_run", "run_dir", "created"})
VOLATILE_PREFIXES = ("time/",)


def is_volatile(key: object) -> bool:
    """Whether a JSON key names a wall-clock or bookkeeping quantity."""
    return key in VOLATILE_KEYS or str(key).startswith(VOLATILE_PREFIXES)


def strip_volatile(tree: object) -> object:
    """The JSON tree with every volatile key dropped, at any depth."""
    if isinstance(tree, dict):
        return {k: strip_volatile(v) for k, v in tree.items() if not is_volatile(k)}
    if isinstance(tree, list):
        return [strip_volatile(v) for v in tree]
    return tree
