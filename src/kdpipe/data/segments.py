"""Several ``.npy`` files of rows read as one array: prepare's unlabeled split, kept in segments.

Why segments: ``kdpipe ingest`` adds unlabeled images as a new batch folder. If the unlabeled split
were one file, every ingest would rewrite (and re-hash, and make DVC re-hash and re-cache) the whole
split: at a million 224-pixel photos, 150 GB for a 1% batch. Kept as one file per run of batch
folders (see :func:`segment_sizes`), the files of earlier batches do not change: the next prepare
hard-links them into its output, reuses their recorded sha256, and DVC finds them unchanged.

Readers see one array: :class:`RowSegments` has the ``len``/``shape``/``dtype`` of the whole, rows
and index arrays gather across the files, a slice stays lazy, and ``np.asarray`` joins them (only
done for data small enough to hold in RAM).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

# A segment is closed once it holds this many bytes of pixels: small batch folders are grouped (the
# number of files stays bounded), and a new batch rewrites at most one segment below this size.
SEGMENT_MIN_BYTES = 64 << 20


def segment_sizes(groups: Iterable[str], row_bytes: int, min_bytes: int | None = None) -> list[int]:
    """Rows per segment for rows in order whose batch folders are ``groups`` (one per row, read once:
    an iterator will do).

    Consecutive rows of one folder stay together; folders are added to the open segment until it
    holds ``min_bytes``. Only the open (last) segment can change when folders are added after the
    existing ones, which is how ``kdpipe ingest`` names its batches."""
    min_bytes = SEGMENT_MIN_BYTES if min_bytes is None else min_bytes
    sizes: list[int] = []
    open_rows = 0
    for _, rows in itertools.groupby(groups):
        open_rows += sum(1 for _ in rows)
        if open_rows * row_bytes >= min_bytes:
            sizes.append(open_rows)
            open_rows = 0
    if open_rows:
        sizes.append(open_rows)
    return sizes


def segment_file(split: str, kind: str, k: int) -> str:
    """``unlabeled_x.npy`` for the first segment (the only one in most data sets), then ``unlabeled_x.1.npy``..."""
    return f"{split}_{kind}.npy" if k == 0 else f"{split}_{kind}.{k}.npy"


class RowSegments:
    """Row-wise concatenation of arrays with the same row shape, without copying them."""

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("RowSegments needs at least one array")
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])
        self.dtype = parts[0].dtype
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.ndim = len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.parts))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        joined = np.concatenate(self.parts) if len(self.parts) > 1 else np.array(self.parts[0])
        return joined if dtype is None else joined.astype(dtype, copy=False)

    def _locate(self, row: int) -> tuple[int, int]:
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return k, row - int(self.starts[k])

    def __getitem__(self, key):
        if isinstance(key, tuple):  # gather_rows asks for source[(row,)]
            if len(key) != 1:
                raise IndexError("RowSegments takes one index (rows)")
            key = key[0]
        if isinstance(key, (int, np.integer)):
            k, row = self._locate(int(key))
            return self.parts[k][row]
        if isinstance(key, slice):
            return self._slice(key)
        return self._gather(np.asarray(key))

    def _slice(self, key: slice) -> RowSegments | np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            return self._gather(np.arange(start, stop, step))
        parts = []
        for k, part in enumerate(self.parts):
            lo, hi = max(start, int(self.starts[k])), min(stop, int(self.starts[k + 1]))
            if lo < hi:
                parts.append(part[lo - int(self.starts[k]) : hi - int(self.starts[k])])
        return RowSegments(parts) if parts else self.parts[0][:0]  # lazy: still views of the files

    def _gather(self, index: np.ndarray) -> np.ndarray:
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = np.where(index < 0, index + len(self), index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} rows")
        out = np.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.starts, index, side="right") - 1
        for k in np.unique(which).tolist():
            at = np.flatnonzero(which == k)
            out[at] = self.parts[k][index[at] - self.starts[k]]
        return out


def joined(parts: list[np.ndarray]) -> np.ndarray | RowSegments:
    """One file's array as it is; several as a :class:`RowSegments`."""
    return parts[0] if len(parts) == 1 else RowSegments(parts)
