"""Checking step outputs against their recorded sha256, hashing each file once rather than at every load.

A file is hashed when it is produced and whenever it is handed over; after a full hash matches, its
size, mtime and inode are kept in a stamp in kdpipe's cache folder, and while they stay the same the
file is trusted without reading it. ``kdpipe <step> --verify`` (or ``KDPIPE_VERIFY=1``) hashes
everything regardless. A stamp taken too soon after the file's last change (:data:`RACY_SECONDS`,
:data:`FINE_RACY_SECONDS`) is not trusted.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

RACY_SECONDS = 2.0  # file systems whose times have a one- or two-second granularity
FINE_RACY_SECONDS = 0.05  # nanosecond time stamps: Linux's coarse clock ticks every 1 to 10 ms
VERIFY_ENV = "KDPIPE_VERIFY"


def cache_dir() -> Path:
    """kdpipe's cache folder (see the module docstring)."""
    if os.environ.get("KDPIPE_CACHE_DIR"):
        return Path(os.environ["KDPIPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdpipe"


def full_verification_requested() -> bool:
    return os.environ.get(VERIFY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _stamp_path(directory: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(directory))).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def _identity(path: Path) -> list[int]:
    # ctime too: nobody can set it, so a copy that keeps the mtime (cp -p, a DVC checkout) into a
    # recycled inode still reads as changed
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _read_stamps(directory: Path) -> dict:
    try:
        stamps = json.loads(_stamp_path(directory).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamps.get("files", {}) if isinstance(stamps, dict) else {}


def _trusted(stamp: dict | None, path: Path, expected: str) -> bool:
    if not stamp or stamp.get("sha256") != expected:
        return False
    identity = _identity(path)
    return stamp.get("identity") == identity and not _racy(
        stamp.get("stamped_ns", 0), identity[1], identity[3]
    )


def _racy(stamped_ns, mtime_ns, ctime_ns):
    """Whether a stamp taken at ``stamped_ns`` may predate a same-size change with the same times
    (works element-wise on numpy arrays too)."""
    return stamped_ns - np.maximum(mtime_ns, ctime_ns) < _window_ns(ctime_ns)


def _window_ns(ctime_ns):
    """The racy window of a file whose ctime is ``ctime_ns``: a whole second means a coarse clock."""
    return np.where(np.asarray(ctime_ns) % 1_000_000_000 == 0, RACY_SECONDS * 1e9, FINE_RACY_SECONDS * 1e9)


def first_mismatch(
    directory: str | os.PathLike, expected: dict[str, str], names: Iterable[str], full: bool | None = None
) -> str | None:
    """The first of ``names`` (files of ``directory``) whose sha256 differs from ``expected``, or None.

    ``full``: hash every file (True), trust unchanged stamped files (None: the default, unless
    ``KDPIPE_VERIFY`` is set), or check nothing (False). Files are assumed to exist."""
    if full is False:
        return None
    from kdpipe.core.files import file_sha256

    full = full or full_verification_requested()
    directory = Path(directory)
    stamps = {} if full else _read_stamps(directory)
    verified: dict[str, str] = {}
    for name in names:
        path = directory / name
        if not full and _trusted(stamps.get(name), path, expected[name]):
            continue
        if file_sha256(path) != expected[name]:
            return name
        verified[name] = expected[name]
    if verified:
        record_verified(directory, verified)
    return None


SETTLE_SECONDS = 0.2  # the longest a stamp waits for its files to leave the racy window


def _settle(paths: list[Path]) -> None:
    """Wait until no file is within its racy window (at most :data:`SETTLE_SECONDS`, once per step):
    a step's outputs were just written, and a stamp taken at once would be racy, so the next step
    would hash them all again. On a coarse file system (two seconds) that wait is not made."""
    latest = 0
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        latest = max(latest, max(st.st_mtime_ns, st.st_ctime_ns) + int(_window_ns(st.st_ctime_ns)))
    wait = (latest - time.time_ns()) / 1e9
    if 0 < wait <= SETTLE_SECONDS:
        time.sleep(wait)


def record_verified(directory: str | os.PathLike, digests: dict[str, str]) -> None:
    """Remember that these files of ``directory`` have these sha256 as they are now (best effort)."""
    directory = Path(directory)
    files = _read_stamps(directory)
    _settle([directory / name for name in digests])
    now = time.time_ns()
    for name, digest in digests.items():
        try:
            files[name] = {"sha256": digest, "identity": _identity(directory / name), "stamped_ns": now}
        except OSError:
            files.pop(name, None)
    target = _stamp_path(directory)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(
            json.dumps({"directory": os.fsdecode(os.path.realpath(directory)), "files": files}),
            encoding="utf-8",
        )
        # a cache file, not a step output: a plain atomic rename, no fsync (a lost stamp only means
        # the next load hashes again)
        os.rename(temporary, target)
    except OSError:  # a read-only home or cache: the next load hashes again, nothing else changes
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------- input files (prepare)
#
# The same idea for the user's images: prepare needs every input file's sha256 (its identity in the
# data version, and the key under which the previous output holds its pixels). Reading a million
# photos only to learn that they did not change costs as much as the rest of an incremental
# prepare, so a file's hash is remembered under its identity (device, inode, size, mtime, ctime) and
# trusted while that identity is unchanged and the record is not racy (same rule as the stamps).
# One SQLite file per data root, written and read by kdpipe.data.ledger.Ledger (set-based: a million
# records never sit in memory).


def input_hashes_path(root: str | os.PathLike) -> Path:
    """Where the remembered sha256 of the input files under data root ``root`` are kept."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:32]
    return cache_dir() / "inputs" / f"{key}.sqlite"
