"""Row I/O for the packed image arrays: gathering rows from memory-mapped files without keeping
their pages resident (prepare's outputs, training batches), and writing arrays by chunks.

Design notes: docs/data-path.md."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from kdpipe.core.atomic import allocated_memmap
from kdpipe.data.mapped import FileRows, release
from kdpipe.data.segments import joined

log = logging.getLogger(__name__)


def hard_link(source: Path, target: Path) -> bool:
    """A second name for an unchanged file (same inode: no copy, and DVC sees it unchanged); False
    where the file system cannot (another device, no hard links), and the rows are copied instead."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


# One record per output row (splits in SPLITS order): what the next prepare needs to reuse the row.
ROW_RECORD = np.dtype([("file", "S64"), ("pixel", "S64"), ("larger", "?")])


def save_column(path: Path, dtype: np.dtype, count: int, chunks: Iterable[np.ndarray]) -> None:
    """A 1-D ``.npy`` of ``count`` elements (the same bytes as np.save), filled chunk by chunk."""
    if count == 0:  # np.memmap cannot map a zero-length array
        np.save(path, np.zeros(0, dtype=dtype))
        return
    dest = allocated_memmap(path, dtype, (count,))
    at = 0
    for chunk in chunks:
        dest[at : at + len(chunk)] = chunk
        at += len(chunk)
        release(dest)  # written pages go to the page cache, not this process's resident set
    if at != count:
        raise AssertionError(f"{path}: wrote {at} rows of {count}")
    dest.flush()
    del dest


def save_rows(
    path: Path,
    sources: dict[int, list[Path]],
    origins: Iterable[list[tuple[int, int]]],
    count: int,
    size: int,
) -> None:
    """Write the rows named by ``origins`` (chunks of (source, row); source SPOOL or a previous
    split) as a standard .npy (same bytes as np.save). Neither the output nor the sources are
    mapped: a chunk's rows are read from the source files into a buffer (``preadv``, in file
    order) and written with ``os.pwrite``, so the resident memory is one chunk. Gathering through a
    map instead would also map up to 64 KiB around each row read (the kernel's fault-around): up
    to 85 MiB per chunk of random rows from a large spool."""
    shape = (count, size, size, 3)
    if not count:  # np.memmap cannot map a zero-length array
        np.save(path, np.zeros(shape, dtype=np.uint8))
        return
    dest = allocated_memmap(path, np.uint8, shape)  # header written, blocks reserved (ENOSPC now, not later)
    offset, row_bytes = int(dest.offset), size * size * 3
    del dest
    fd = os.open(path, os.O_WRONLY)
    try:
        at = 0
        for chunk in origins:
            buffer = gather_origins(sources, chunk, size)
            _write_all(fd, buffer, offset + at * row_bytes, path)
            at += len(buffer)
        os.fsync(fd)
    finally:
        os.close(fd)


def gather_origins(sources: dict[int, list[Path]], origins: list[tuple[int, int]], size: int) -> np.ndarray:
    """The images at ``origins`` ((source, row): SPOOL or a previous split), in that order, read
    source by source from their files."""
    where = np.array(origins, dtype=np.int64).reshape(-1, 2)
    buffer = np.empty((len(where), size, size, 3), dtype=np.uint8)
    for source in np.unique(where[:, 0]).tolist():
        picked = np.flatnonzero(where[:, 0] == source)
        rows = joined([np.load(part, mmap_mode="r") for part in sources[source]])
        gather_rows(rows, (where[picked, 1],), buffer, slots=picked)
    return buffer


def gather_rows(
    source: np.ndarray,
    index: tuple[np.ndarray, ...],
    out: np.ndarray,
    channels_first: bool = False,
    slots: np.ndarray | None = None,
) -> None:
    """``out[slots[j]] = source[index[0][j], index[1][j], ...]`` for every ``j`` (``slots`` default:
    ``j``), in one pass; with ``channels_first`` each HWC image is written as CHW.

    The rows are read in file order (forward through the file, not jumping around) and each is
    written straight into its slot. A memory-mapped source is read from its file with
    :class:`kdpipe.data.mapped.FileRows` (no page of it stays resident); an array in RAM is copied
    from, one memcpy per row (at 224 px 2.5x faster than ``np.take``, which copies byte by byte)."""
    slots = np.arange(len(index[0])) if slots is None else np.asarray(slots)
    positions = np.stack(index, axis=1) if len(index[0]) else np.empty((0, len(index)), dtype=np.int64)
    order = np.lexsort(index[::-1])  # by the first index, then the second: file order
    from_file = FileRows.of(source)
    if from_file is not None:
        from_file.read(positions[order], slots[order], out, channels_first)
        return
    for slot, position in zip(slots[order].tolist(), positions[order].tolist(), strict=True):
        row = source[tuple(position)]
        out[slot] = row.transpose(2, 0, 1) if channels_first else row
    release(source)  # a mapped source FileRows cannot read (a slice of a map): drop what was touched


def _write_all(fd: int, data: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")  # the array's own bytes: no copy
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        view, offset = view[written:], offset + written


def read_row_records(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot map an empty array
        return np.load(path, allow_pickle=False)
