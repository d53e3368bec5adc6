"""Keeping a step's resident memory flat while it streams through memory-mapped arrays.

Pages of a memory map that a step touches stay in its resident set until the map is closed. Two
remedies: streaming passes call :func:`release` after each chunk (``madvise(MADV_DONTNEED)``; the
data stays in the page cache), and training batches of random rows are read with :class:`FileRows`
(``preadv(2)`` straight into the batch buffer, never mapped). Private copy-on-write maps
(``mmap_mode="c"``) are left alone.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

# Python exposes madvise and its constants only where the platform has them (Linux, macOS);
# elsewhere releasing pages is simply not done.
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _memmaps(array: Any) -> Iterator[np.memmap]:
    """The np.memmap objects behind ``array``: itself, the map a view was taken from, or the
    parts of a :class:`kdpipe.data.segments.RowSegments`."""
    parts = getattr(array, "parts", None)
    if parts is not None:  # RowSegments (duck-typed: segments imports nothing from here)
        for part in parts:
            yield from _memmaps(part)
        return
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap) and getattr(array, "_mmap", None) is not None:
            yield array
            return
        array = array.base


def release(*arrays: Any) -> None:
    """Drop the mapped pages of each shared memory-mapped array in ``arrays`` from this process's
    resident set; anything else (arrays in RAM, None, private maps) is left as it is."""
    if _DONTNEED is None:
        return
    for array in arrays:
        for memmap in _memmaps(array):
            if memmap.mode == "c":  # private copy-on-write pages hold the only copy of their writes
                continue
            handle = memmap._mmap
            if not handle.closed:
                handle.madvise(_DONTNEED)


def _whole_file_map(array: Any) -> bool:
    """A C-ordered array mapped from its file as np.load maps it (not a slice: its ``offset`` and
    ``filename`` describe where its first element is)."""
    return (
        isinstance(array, np.memmap)
        and isinstance(array.base, mmap.mmap)
        and array.flags.c_contiguous
        and getattr(array, "filename", None) is not None
    )


class FileRows:
    """Reads rows of memory-mapped ``.npy`` arrays from their files with ``preadv`` instead of
    through the map: one system call per row, straight into its destination, nothing left mapped.

    ``source`` is one array or the parts of a :class:`kdpipe.data.segments.RowSegments` (rows numbered
    across the parts); a row is ``source[i, j, ...]`` for the leading indices given."""

    def __init__(self, parts: list[np.memmap]):
        self.parts = parts
        self.starts = np.cumsum([0, *(len(part) for part in parts)])

    @classmethod
    def of(cls, source: Any) -> FileRows | None:
        """A reader for ``source``, or None where its rows cannot be read from a file this way (an
        array in RAM, a slice of a map, a platform without ``preadv``)."""
        if not hasattr(os, "preadv"):
            return None
        parts = getattr(source, "parts", None) or [source]
        return cls(parts) if all(_whole_file_map(part) for part in parts) else None

    def read(
        self, positions: np.ndarray, slots: np.ndarray, out: np.ndarray, channels_first: bool = False
    ) -> None:
        """``out[slots[j]] = source[tuple(positions[j])]`` for every ``j`` (``positions`` is ``(n, k)``
        leading indices; best given in file order); with ``channels_first`` an HWC row is written as CHW."""
        if not len(positions):
            return
        part = np.searchsorted(self.starts, positions[:, 0], side="right") - 1
        local = positions.copy()
        local[:, 0] -= self.starts[part]
        k = positions.shape[1]
        strides = np.array([p.strides[:k] for p in self.parts], dtype=np.int64)
        offsets = np.array([p.offset for p in self.parts], dtype=np.int64)
        starts = offsets[part] + (local * strides[part]).sum(axis=1)  # byte offset of each row in its file
        # with channels_first a row is read whole (HWC), then written transposed into its slot
        scratch = np.empty(self.parts[0].shape[k:], self.parts[0].dtype) if channels_first else None
        fds = [os.open(p.filename, os.O_RDONLY) for p in self.parts]
        try:
            for slot, which, start in zip(slots.tolist(), part.tolist(), starts.tolist(), strict=True):
                target = scratch if channels_first else out[slot]
                self._read_exactly(fds[which], target, start, which)
                if channels_first:
                    out[slot] = scratch.transpose(2, 0, 1)
        finally:
            for fd in fds:
                os.close(fd)

    def _read_exactly(self, fd: int, target: np.ndarray, start: int, which: int) -> None:
        view = memoryview(target).cast("B")
        while view:
            got = os.preadv(fd, [view], start)
            if got <= 0:
                raise OSError(
                    f"{self.parts[which].filename}: file ended at byte {start} (truncated since it was opened?)"
                )
            view, start = view[got:], start + got
