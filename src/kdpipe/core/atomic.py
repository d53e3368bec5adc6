"""Atomic file and directory writes.

Every artifact is written to a temporary sibling and renamed into place when complete, so a crash
(even ``kill -9``) never leaves a half-written file: readers see the old version or the new one.
A write that fails on a read-only, full or foreign file system raises a one-line
:class:`KdpipeError`; temporaries of writers that no longer run are removed by the next write; the
finished file gets the user's umask permissions; :func:`allocated_memmap` reserves a memory-mapped
array's blocks up front, so a full disk fails at once.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdpipe.core.errors import KdpipeError

# errno -> what the user should do; these can only mean "this place cannot take the output".
_WRITE_ERRORS = {
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.ENOSPC: "the disk is full; free some space and run again",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run again",
    errno.EACCES: "permission denied; check the folder's permissions or choose another output folder",
    errno.EPERM: "operation not permitted; check the folder's permissions or choose another output folder",
}
# Inside a write block other errors may concern inputs; only these are surely about the output.
_OUTPUT_ONLY_ERRORS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)
OUTPUT_ERRNOS = frozenset(_WRITE_ERRORS)


def write_error(target: str | os.PathLike, exc: OSError) -> KdpipeError:
    """One line for a write that failed: the path, the reason, what to do, and that nothing was lost."""
    advice = _WRITE_ERRORS.get(exc.errno, "")
    from kdpipe.core.files import shown

    reason = exc.strerror or str(exc)
    return KdpipeError(
        f"{shown(target)}: cannot write ({reason}){'; ' + advice if advice else ''} "
        "(the previous output, if any, is unchanged)"
    )


@contextlib.contextmanager
def _write_errors_as_messages(target: Path, inside: bool = False) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (_OUTPUT_ONLY_ERRORS if inside else OUTPUT_ERRNOS):
            raise write_error(target, exc) from None
        raise


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: Path) -> None:
    """The mode a plainly created file (0666) or folder (0777) would get under the current umask."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_abandoned(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries that killed writers left beside ``target``; returns what was removed.

    Recognised by name (``.<name>.<pid>-<random>.tmp...`` and ``.<name>.old.<pid>``) and only when
    that process no longer runs: a concurrent writer's temporary is never touched."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)-.*\.tmp.*|old\.(\d+))$")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or _pid_alive(int(match[1] or match[2])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Fail now, in one line, if ``folder`` cannot be created or written: before a step spends minutes
    computing a result it could not save (or saves half of: outputs, then reports)."""
    folder = Path(folder)
    with _write_errors_as_messages(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(folder / "probe"), suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)


def allocated_memmap(path: str | os.PathLike, dtype, shape: tuple[int, ...]):
    """``numpy.lib.format.open_memmap`` for writing, with the file's blocks reserved first.

    A memory-mapped write to a full disk kills the process with SIGBUS (no message, temporary files
    left behind); reserving the space turns that into an ``ENOSPC`` error before anything is written."""
    import numpy as np

    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = os.path.getsize(path)
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        del array
        raise write_error(path, exc) from None
    except AttributeError:  # no posix_fallocate on this platform: nothing reserved, still correct
        pass
    return array


def fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk too, or a power cut could undo it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds.

    The temporary file is removed if the block raises, so failures leave the old file untouched.
    """
    target = Path(target)
    with _write_errors_as_messages(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target)
        fd, tmp_name = tempfile.mkstemp(
            prefix=_temp_prefix(target), suffix=f".tmp{suffix}", dir=target.parent
        )
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _write_errors_as_messages(target, inside=True):
            yield tmp
        with _write_errors_as_messages(target):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            normal_mode(tmp)
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths show up in metrics and manifests.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target`` as a whole.

    Used for step outputs that are directories: a step killed half-way leaves the previous output
    (or nothing) in place, never a mix.
    """
    target = Path(target)
    with _write_errors_as_messages(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with _write_errors_as_messages(target, inside=True):
            yield tmp
        with _write_errors_as_messages(target):
            normal_mode(tmp)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old.{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
