"""Range checks for config values. Each schema has one validation function next to it (e.g.
`orderplan.train.bc.check_bc_run`, `orderplan.config.common.check_train_backbone_run`) that calls these
helpers once per field at the top of its run function, so a bad value fails before any data is
loaded, any model is built or any file is written.

Every error names the full dotted key (`bc.steps`), the value given and the allowed range:

    ValueError: bc.steps must be an integer >= 1, got -5

Missing paths raise FileNotFoundError naming the key and where it was looked for.

`to_typed` (src/orderplan/config/common.py) already refuses unknown keys and wrong types; these helpers add
what a type cannot say (ranges, non-empty lists, existing files). They also refuse booleans where a
number is expected and nan / inf everywhere, since Python's `True >= 1` and `nan`'s false
comparisons would otherwise slip through."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_int", "check_range", "check_positive", "check_probability", "check_gamma", "check_choice",
           "check_int_list", "check_budgets", "check_path_exists"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_range_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    if lo is not None:
        return f"an integer >= {lo}"
    if hi is not None:
        return f"an integer <= {hi}"
    return "an integer"


def _real_range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"a number {'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def _fail(key: str, allowed: str, value: Any, note: str = "", allow_none: bool = False) -> None:
    none = " (or null)" if allow_none and "null" not in note else ""  # a note may say what null means
    raise ValueError(f"{key} must be {allowed}{note}{none}, got {value!r}")


def check_int(key: str, value: Any, lo: int | None = None, hi: int | None = None, *, allow_none: bool = False,
              note: str = "") -> None:
    """`value` is an integer in [lo, hi] (either bound may be None = unbounded); None passes only
    with `allow_none`. `note` is appended to the allowed range (e.g. " (the number of blocks)")."""
    if value is None and allow_none:
        return
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(key, _int_range_text(lo, hi), value, note, allow_none)


def check_range(key: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, allow_none: bool = False, note: str = "") -> None:
    """`value` is a finite real number in the interval from lo to hi (open or closed at each end;
    a None bound is unbounded). None passes only with `allow_none`."""
    if value is None and allow_none:
        return
    ok = _is_real(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        _fail(key, _real_range_text(lo, hi, lo_open, hi_open), value, note, allow_none)


def check_positive(key: str, value: Any, *, allow_none: bool = False, note: str = "") -> None:
    """A finite number > 0 (learning rates, temperatures, clip norms)."""
    check_range(key, value, 0.0, lo_open=True, allow_none=allow_none, note=note)


def check_probability(key: str, value: Any, *, allow_none: bool = False, note: str = "") -> None:
    """A number in [0, 1] (dropout rates, mixing fractions, top_p-like shares)."""
    check_range(key, value, 0.0, 1.0, allow_none=allow_none, note=note)


def check_gamma(key: str, value: Any, *, allow_none: bool = False, note: str = "") -> None:
    """A discount factor in (0, 1]."""
    check_range(key, value, 0.0, 1.0, lo_open=True, allow_none=allow_none, note=note)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """`value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_int_list(key: str, values: Any, lo: int | None = None, hi: int | None = None, *, nonempty: bool = True,
                   distinct: bool = False, note: str = "") -> None:
    """A list of integers, each in [lo, hi] (entries named `key[i]` in errors)."""
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise ValueError(f"{key} must be a list of integers, got {values!r}")
    if nonempty and len(values) == 0:
        raise ValueError(f"{key} must be a non-empty list, each entry {_int_range_text(lo, hi)}{note}, got []")
    for i, v in enumerate(values):
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"{key}[{i}] must be {_int_range_text(lo, hi)}{note}, got {v!r} (in {key}={list(values)})")
    if distinct and len(set(values)) != len(values):
        raise ValueError(f"{key} must hold distinct values, got {list(values)}")


def check_budgets(key: str, budgets: Any, num_blocks: int | None, *, allow_none: bool = False) -> None:
    """A router's budget list: non-empty block counts, each in [1, num_blocks] (the geometry's
    number of blocks; None checks only the lower bound)."""
    if budgets is None and allow_none:
        return
    check_int_list(key, budgets, 1, num_blocks, note=" (the number of blocks)" if num_blocks is not None else "")


def check_path_exists(key: str, path: Any, *, allow_none: bool = False, hint: str = "") -> Path | None:
    """The file or directory `path` names exists (relative paths: the working directory, then the
    repository root, as `orderplan.config.common.resolve_path` looks). Returns the resolved path (None for
    an unset path with `allow_none`). Raises FileNotFoundError naming the key."""
    from orderplan.infra.paths import resolve_path

    if path is None or str(path) == "":
        if allow_none:
            return None
        raise ValueError(f"{key} must be set to a path, got {path!r}{'; ' + hint if hint else ''}")
    try:
        return resolve_path(path, must_exist=True, what=key)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}{'; ' + hint if hint else ''}") from None
