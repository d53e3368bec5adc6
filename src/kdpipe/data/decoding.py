"""Decoding prepare's candidate files on every core, straight into disk-backed spools.

Each file is read once, for both its sha256 and its pixels; a file whose sha256 is ``known`` (an
SQLite file from :meth:`kdpipe.data.ledger.Ledger.write_previous`) is only hashed. Workers write
the resized pixels into the spool files themselves, and the results come back in input order, so
the outputs are identical for any ``prepare.workers``.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import multiprocessing
import os
import sqlite3
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from kdpipe.core.errors import DataError
from kdpipe.data.imaging import RejectedImage, resize_square, validate_image

# Bump when the decoded pixels of the same file change (e.g. draft decoding came in with version 2):
# an earlier prepare's rows are then not reused.
DECODE_VERSION = 2
_TASKS_PER_CALL = 16  # files per round trip to a worker: amortises the inter-process overhead
_CALLS_IN_FLIGHT_PER_WORKER = 4  # bounded look-ahead: memory stays flat however many files there are
# Fewer files than this decode in-process. Forking two workers costs a few tens of milliseconds, about
# what two images take to decode, so from 16 files (an ingest of 1% of a small data set) the pool wins.
SERIAL_BELOW = 16


@dataclass(frozen=True)
class DecodeSettings:
    """What decides whether a file is accepted and what its pixels become (prepare's settings)."""

    image_size: int
    teacher_image_size: int | None  # a second copy at this size; None: no copy
    max_image_pixels: int
    min_side: int
    max_aspect_ratio: float


@dataclass(frozen=True)
class Spool:
    """A ``.npy`` file of ``(rows, size, size, 3)`` uint8 that workers fill row by row.

    Created sparse: rows never written (rejected or reused files) take no disk space."""

    path: str
    offset: int  # bytes before the first row (the .npy header)
    size: int

    @property
    def row_bytes(self) -> int:
        return self.size * self.size * 3

    @classmethod
    def create(cls, path: Path, rows: int, size: int) -> Spool:
        array = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8, shape=(max(rows, 1), size, size, 3)
        )
        offset = int(array.offset)
        del array
        return cls(str(path), offset, size)

    def open(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def write(self, fd: int, row: int, pixels: np.ndarray) -> None:
        data = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        written = os.pwrite(fd, data, self.offset + row * self.row_bytes)
        if written != len(data):  # a short write: the file system is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)


@dataclass(frozen=True)
class Outcome:
    """What became of one file: rejected (``reason``, ``detail``), reused (known hash) or decoded."""

    file_hash: str = ""
    reason: str = ""
    detail: str = ""
    reused: bool = False
    larger: bool = False  # both sides of the source exceed image_size
    pixel_hash: str = ""  # sha256 of the image_size pixels (identical images in any format match)

    @property
    def rejected(self) -> bool:
        return bool(self.reason)


@dataclass(frozen=True)
class _Job:
    settings: DecodeSettings
    spool: Spool
    teacher_spool: Spool | None
    known: str | None  # SQLite file whose table ``rows`` lists (``file``) the sha256 of files not to decode


_JOB: _Job | None = None  # the job of this process (set in every worker, and in-process when serial)
_FDS: dict[str, int] = {}
_KNOWN: sqlite3.Connection | None = None  # this process's own connection to the job's ``known``


def _start(job: _Job) -> None:
    global _JOB, _KNOWN
    _JOB = job
    _FDS.clear()
    _KNOWN = None  # a connection inherited through fork must not be used (nor closed) by the child


def _start_worker(job: _Job, parent: int) -> None:
    """A pool worker's start: it dies with prepare. A ``kill -9`` of prepare would otherwise leave
    its workers waiting forever on the task queue (they hold its write end themselves, so it never
    reaches end-of-file)."""
    _die_with_parent(parent)
    _start(job)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def _fd(spool: Spool) -> int:
    if spool.path not in _FDS:
        _FDS[spool.path] = os.open(spool.path, os.O_WRONLY)
    return _FDS[spool.path]


def _is_known(file_hash: str) -> bool:
    global _KNOWN
    if _JOB.known is None:
        return False
    if _KNOWN is None:
        _KNOWN = sqlite3.connect(f"{Path(_JOB.known).absolute().as_uri()}?mode=ro", uri=True)
    return _KNOWN.execute("SELECT 1 FROM rows WHERE file = ? LIMIT 1", (file_hash,)).fetchone() is not None


def _decode_one(row: int, path: str) -> Outcome:
    job = _JOB
    settings = job.settings
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Outcome(reason="unreadable", detail=f"cannot read the file: {exc.strerror or exc}")
    file_hash = hashlib.sha256(data).hexdigest()
    if _is_known(file_hash):
        return Outcome(file_hash=file_hash, reused=True)
    largest = max(settings.image_size, settings.teacher_image_size or 0)
    try:
        rgb = validate_image(Path(path), settings, data=data, draft_size=largest)
    except RejectedImage as exc:
        return Outcome(file_hash=file_hash, reason=exc.reason, detail=exc.detail)
    small = resize_square(rgb, settings.image_size)
    job.spool.write(_fd(job.spool), row, small)
    if job.teacher_spool is not None:
        job.teacher_spool.write(_fd(job.teacher_spool), row, resize_square(rgb, settings.teacher_image_size))
    return Outcome(
        file_hash=file_hash,
        larger=min(rgb.shape[0], rgb.shape[1]) > settings.image_size,
        pixel_hash=hashlib.sha256(small.tobytes()).hexdigest(),
    )


def _decode_many(tasks: list[tuple[int, str]]) -> list[tuple[int, Outcome]]:
    return [(row, _decode_one(row, path)) for row, path in tasks]


def worker_count(setting: int) -> int:
    """``prepare.workers``: 0 means every core this process may use (its CPU affinity, and in a
    container its cgroup CPU quota: a pod limited to 4 CPUs on a 64-core node gets 4)."""
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The CPUs a cgroup v2 quota allows (rounded up), or None without a quota."""
    try:
        limit, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(1, -(-int(limit) // int(period)))


def decode_files(
    tasks: Iterable[tuple[int, str]],
    count: int,
    settings: DecodeSettings,
    spool: Spool,
    teacher_spool: Spool | None,
    known: str | None,
    workers: int,
) -> Iterator[tuple[int, Outcome]]:
    """Decode each ``(row, path)`` of ``tasks`` (``count`` of them) into that row of the spools; yield
    ``(row, Outcome)`` in task order. Tasks are read as the workers need them: none is held in a list."""
    job = _Job(settings, spool, teacher_spool, None if known is None else os.fspath(known))
    if workers <= 1 or count < SERIAL_BELOW:
        yield from _decode_serially(job, tasks)
    else:
        yield from _decode_in_pool(job, tasks, workers, _tasks_per_call(count, workers))


def _decode_serially(job: _Job, tasks: Iterable[tuple[int, str]]) -> Iterator[Outcome]:
    _start(job)
    try:
        for row, path in tasks:
            yield row, _decode_one(row, path)
    finally:
        _close_fds()


def _tasks_per_call(count: int, workers: int) -> int:
    """Files per round trip: _TASKS_PER_CALL, or fewer when there are too few files to give every
    worker a full call (40 new files on 4 workers: 10 each, not 16, 16, 8 and nothing)."""
    return max(1, min(_TASKS_PER_CALL, -(-count // workers)))


def _decode_in_pool(
    job: _Job, tasks: Iterable[tuple[int, str]], workers: int, per_call: int
) -> Iterator[tuple[int, Outcome]]:
    # fork where there is one (as torch's DataLoader does): workers start at once, with the job in
    # memory, and do not re-run the caller's main module, which spawn and forkserver do (a script
    # without a __main__ guard would start workers recursively; under pytest every worker would
    # import the whole test session). Workers use no threads or locks the parent may hold: they only
    # read files, decode with Pillow and write with os.pwrite.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    remaining = iter(tasks)
    chunks = iter(lambda: list(islice(remaining, per_call)), [])
    # A forked worker's garbage collector would write to the header of every object it inherited (the
    # parent's per-image records), copying their pages into each worker; frozen objects are skipped.
    gc.freeze()
    try:
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(job, os.getpid())
        ) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(_decode_many, chunk))
                if len(pending) >= workers * _CALLS_IN_FLIGHT_PER_WORKER:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
    except BrokenProcessPool:
        raise DataError(
            "prepare: a decoding process died (out of memory?); run again with prepare.workers=1 "
            "to decode in one process, or with fewer workers"
        ) from None
    finally:
        gc.unfreeze()


def _close_fds() -> None:
    global _KNOWN
    for fd in _FDS.values():
        os.close(fd)
    _FDS.clear()
    if _KNOWN is not None:
        _KNOWN.close()
        _KNOWN = None
