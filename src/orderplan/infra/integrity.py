"""Files written atomically, with a checksum record that every reader checks before it uses the bytes.

Writing. `atomic_write(path, write, checksum=True)` streams the file to a temp file beside `path`
while hashing it, fsyncs, renames it onto `path`, and records the digest in `<path>.sha256`:

    {"file": "shard_000_00000.pt", "sha256": ["<hex>"], "bytes": 123456,
     "produced_by": "python scripts/build_oracle.py out_dir=...", "written": "2026-12-05 13:00:00"}

One record per file (not one manifest per directory), so several ranks writing into one directory
never race on a shared file. The record is a sibling, so `sha256sum` can check it by hand.

Crash safety of the pair. The record is written before the rename, accepting the new digest and
the digest of the file being replaced (if any); after the rename it is rewritten with the new digest
only. A kill -9 between any two steps leaves on disk one of the two complete versions of the file (or
none) and a record that accepts it, so a crashed run resumes instead of refusing its own files.

Reading. `verify_file(path)` hashes the file (once per process per inode, size and mtime) and
compares it with its record. A mismatch raises IntegrityError naming the file, both digests, the
command that wrote it and, when the reader knows one, the command that rebuilds it. Files the
project writes and reads back itself (oracle shards and progress files, codes, checkpoints, caches)
require a record (`required=True`); weights given by path, which may come from elsewhere (LlamaGen
checkpoints), are checked when they have one. `record_checksum` (or `python -m
orderplan.infra.integrity record FILE ...`) records a digest for a file written before records
existed, once the user trusts it; `... verify FILE_OR_DIR ...` checks files by hand.

The hashing costs one extra read of each file at load time (the page cache usually serves it); the
default runs' overhead is measured in docs/performance.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "RECORD_SUFFIX",
    "IntegrityError",
    "MissingRecordError",
    "sha256_file",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "record_path",
    "read_record",
    "record_checksum",
    "verify_file",
    "read_json_checked",
    "remove_with_record",
    "command_line",
    "integrity_seconds",
]

PathLike = str | os.PathLike

RECORD_SUFFIX = ".sha256"

# (resolved path, inode, size, mtime_ns) -> hex digest: a rewritten or replaced file (os.replace gives
# a new inode; an in-place edit a new mtime) gets a new key, so no stale hit
_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}

# seconds this process spent on checksums (`integrity_seconds`; scripts/bench_integrity.py reports them)
_SPENT = {"hash_on_write": 0.0, "hash_on_read": 0.0, "records": 0.0, "bytes_hashed": 0.0}


def integrity_seconds() -> dict[str, float]:
    """What checksums cost this process so far: seconds hashing written bytes, hashing files to verify
    them, writing records, and the bytes hashed."""
    return dict(_SPENT)


class IntegrityError(ValueError):
    """A file's bytes do not match its checksum record, or a file that must have a record has none."""


class MissingRecordError(IntegrityError):
    """A file that must have a checksum record has none (written before records existed, or the
    record was deleted): nothing says whether its bytes are the ones written."""


def command_line() -> str:
    """The command line of this process, as a user would retype it ("python scripts/bc.py a=b")."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


# ---------------------------------------------------------------------------- hashing
def stat_key(path: Path) -> tuple[str, int, int, int]:
    """(resolved path, inode, size, mtime_ns): a cache key that changes when the file is replaced or edited."""
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; computed once per process per (resolved path,
    inode, size, mtime)."""
    path = Path(path)
    key = stat_key(path)
    if key not in _HASH_CACHE:
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
        _SPENT["hash_on_read"] += time.perf_counter() - t0
        _SPENT["bytes_hashed"] += key[2]
    return _HASH_CACHE[key]


class _HashingWriter:
    """A write-only binary stream that hashes and counts what passes through it to `f`."""

    def __init__(self, f: IO[bytes]):
        self._f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        t0 = time.perf_counter()
        self.sha.update(view)
        _SPENT["hash_on_write"] += time.perf_counter() - t0
        _SPENT["bytes_hashed"] += len(view)
        self.size += len(view)
        n = self._f.write(view)
        return len(view) if n is None else n

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:  # writers that can seek back (zip central directories) would hash wrongly
        return False


# ---------------------------------------------------------------------------- atomic writes
def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of `path` (and of its record) left by writers killed mid-write (SIGKILL,
    power loss: no `except` ran), so repeated crashes do not pile up half-written files. Only files
    named as `atomic_write` names them whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}(?:{re.escape(RECORD_SUFFIX)})?\.(\d+)\.[0-9a-f]{{8}}\.tmp$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)


def _write_temp(path: Path, write: Callable[[IO[bytes]], None], hashed: bool) -> tuple[Path, str | None, int]:
    """Write via `write` to a fresh temp file beside `path`, fsynced: (temp path, sha256 or None, size)."""
    # Same directory => same filesystem => os.replace is an atomic rename. A leading dot keeps
    # half-written files out of globs such as step_*.pt.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 (not mkstemp's 0o600) so the final file gets the usual umask permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _HashingWriter(f) if hashed else f
            write(sink)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # also KeyboardInterrupt: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise
    if hashed:
        return tmp, sink.sha.hexdigest(), sink.size  # type: ignore[union-attr]
    return tmp, None, tmp.stat().st_size


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_record(path: Path, record: dict) -> None:
    t0 = time.perf_counter()
    rec = record_path(path)
    text = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")
    tmp, _, _ = _write_temp(rec, lambda f: f.write(text), hashed=False)
    _replace(tmp, rec)
    _SPENT["records"] += time.perf_counter() - t0


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None], checksum: bool = False,
                 produced_by: str | None = None) -> Path:
    """Call `write(f)` on a temp file next to `path`, fsync it, then rename it onto `path`.

    Streams: `write` may emit a large array without an in-memory copy; `f` is write-only (no seek).
    Temp files of `path` left by a killed writer are removed first. With `checksum=True` the
    digest is recorded in `<path>.sha256` (crash-safe order: see the module docstring), with
    `produced_by` (default: this process's command line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp, digest, size = _write_temp(path, write, hashed=checksum)
    if checksum:
        old = read_record(path, missing_ok=True)
        previous = [h for h in (old or {}).get("sha256", []) if h != digest] if path.exists() else []
        record = {"file": path.name, "sha256": [digest], "bytes": size,
                  "produced_by": produced_by or command_line(), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        # The record goes first: until the rename below, the file on disk is the previous version (or
        # none), so the record accepts both; it drops the previous digest once the new file is in place.
        try:
            _write_record(path, {**record, "sha256": [digest, *previous]} if previous else record)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _replace(tmp, path)
        if previous:
            _write_record(path, record)
    else:
        _replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes, checksum: bool = False) -> Path:
    """Atomically write `data` to `path` (parent directories are created)."""
    return atomic_write(path, lambda f: f.write(data), checksum=checksum)


def atomic_write_json(path: PathLike, data: Any, checksum: bool = False) -> Path:
    """Atomically write `data` as indented JSON. Serialisation errors happen before any I/O."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), checksum=checksum)


# ---------------------------------------------------------------------------- records
def record_path(path: PathLike) -> Path:
    """Where the checksum record of `path` lives: `<path>.sha256`."""
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


def read_record(path: PathLike, missing_ok: bool = False) -> dict | None:
    """The checksum record of `path` (None when there is none and `missing_ok`). Raises IntegrityError
    when the record is missing (unless `missing_ok`) or unreadable."""
    rec = record_path(path)
    if not rec.is_file():
        if missing_ok:
            return None
        raise IntegrityError(f"{path}: no checksum record {rec.name}")
    try:
        record = json.loads(rec.read_text())
        ok = isinstance(record, dict) and isinstance(record.get("sha256"), list) and all(
            isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in record["sha256"])
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{rec}: unreadable checksum record ({e}); the record itself is damaged") from e
    if not ok:
        raise IntegrityError(f"{rec}: not a checksum record (expected {{\"sha256\": [hex, ...], ...}})")
    return record


def record_checksum(path: PathLike, produced_by: str | None = None) -> dict:
    """Record the current digest of an existing file (a file written before records existed, now
    trusted by the user). Returns the record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    record = {"file": path.name, "sha256": [sha256_file(path)], "bytes": path.stat().st_size,
              "produced_by": produced_by or "recorded by hand: python -m orderplan.infra.integrity record",
              "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_record(path, record)
    return record


def verify_file(path: PathLike, rebuild: str | None = None, required: bool = True) -> bool:
    """Check `path` against its checksum record before it is used.

    Returns True when it matches, False when it has no record and `required` is False. Raises
    FileNotFoundError when `path` is missing, and IntegrityError when the digest differs or (with
    `required`) there is no record; the message names the file, the digests, the command that wrote
    it and `rebuild` (how to make it again; default: rerun the command that wrote it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    record = read_record(path, missing_ok=True)
    if record is None:
        if not required:
            return False
        how = rebuild or "rebuild it with the command that wrote it"
        raise MissingRecordError(
            f"{path}: no checksum record ({record_path(path).name}), so its bytes cannot be verified. It was "
            f"written before orderplan recorded checksums, or the record was deleted. To rebuild it: {how}. If you "
            f"trust the file as it is: python -m orderplan.infra.integrity record {shlex.quote(str(path))}")
    actual = sha256_file(path)
    if actual not in record["sha256"]:
        how = rebuild or f"rerun `{record.get('produced_by', 'the command that wrote it')}`"
        raise IntegrityError(
            f"{path}: sha256 {actual} does not match its checksum record ({', '.join(record['sha256'])}, written "
            f"{record.get('written', '?')} by `{record.get('produced_by', '?')}`): the file is corrupt or was changed "
            f"after it was written, and is not used. To rebuild it: {how}")
    return True


def read_json_checked(path: PathLike, rebuild: str | None = None, required: bool = True) -> Any:
    """`json.loads` of a file after `verify_file`; an unparsable file raises IntegrityError too."""
    verify_file(path, rebuild, required)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"cannot read {path}: {e}") from e


def remove_with_record(path: PathLike) -> None:
    """Delete a file and its checksum record (either may be missing)."""
    Path(path).unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- by hand
def _files(targets: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for t in targets:
        p = Path(t)
        if p.is_dir():
            out += sorted(q.with_name(q.name[: -len(RECORD_SUFFIX)]) for q in p.rglob(f"*{RECORD_SUFFIX}"))
        else:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m orderplan.infra.integrity verify PATH ...` (files, or directories: every recorded
    file under them) or `... record FILE ...`. Exit status 1 when a file fails to verify."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m orderplan.infra.integrity", description=main.__doc__)
    parser.add_argument("action", choices=["verify", "record"])
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    bad = 0
    for p in _files(args.paths):
        try:
            if args.action == "record":
                print(f"recorded {p}: {record_checksum(p)['sha256'][0]}")
            else:
                verify_file(p)
                print(f"ok {p}")
        except (IntegrityError, FileNotFoundError) as e:
            print(f"FAILED {e}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
