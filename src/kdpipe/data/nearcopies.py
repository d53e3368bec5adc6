"""Near-copies of test images: the same photo re-encoded, resized or saved in another format.

Every image is reduced to a colour thumbnail of ``THUMBNAIL`` x ``THUMBNAIL`` pixels (area-averaged,
independent of ``prepare.image_size``); an image whose thumbnail is within ``MAX_RMS`` (RMS
difference on the 0-255 scale) of a test image's thumbnail counts as a copy of it. The search is
exact: thumbnails are compared at 8 x 8 first, and only the pairs that pass at full size.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

THUMBNAIL = 16
COARSE = 8  # the exact pre-filter's size (THUMBNAIL must be a multiple of it)
MAX_RMS = 4.0
_CHUNK = 4096  # images compared at a time (memory: _CHUNK x test images x 4 bytes)


def _pool_axis(images: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Area average along ``axis`` down (or up) to ``size`` cells, each the mean of the input pixels
    it overlaps (the cells of torch's adaptive average pooling)."""
    n = images.shape[axis]
    sums = np.cumsum(images, axis=axis, dtype=np.float64)
    sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)
    cells = np.arange(size)
    starts, ends = (cells * n) // size, -((-(cells + 1) * n) // size)
    shape = [1] * images.ndim
    shape[axis] = size
    return (np.take(sums, ends, axis=axis) - np.take(sums, starts, axis=axis)) / (ends - starts).reshape(
        shape
    )


def thumbnails(images: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, size * size * 3) float32 area-averaged thumbnails."""
    pooled = _pool_axis(_pool_axis(np.asarray(images), 1, size), 2, size)
    return pooled.reshape(len(images), -1).astype(np.float32)


def coarse(thumbs: np.ndarray) -> np.ndarray:
    """The ``COARSE`` x ``COARSE`` version of ``THUMBNAIL``-sized thumbnails (2 x 2 block means)."""
    step = THUMBNAIL // COARSE
    grid = thumbs.reshape(len(thumbs), COARSE, step, COARSE, step, 3)
    return grid.mean(axis=(2, 4)).reshape(len(thumbs), -1)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


@dataclass(frozen=True)
class Match:
    index: int  # the image's position in the stream given to :meth:`ReferenceThumbnails.matches`
    test: int  # the test image it copies (position in the test thumbnails)
    rms: float


class ReferenceThumbnails:
    """The test images' thumbnails, against which other images are checked."""

    def __init__(self, thumbs: np.ndarray, max_rms: float = MAX_RMS):
        self.fine = thumbs.astype(np.float32)
        self.coarse = coarse(self.fine)
        self.max_rms = max_rms

    def __len__(self) -> int:
        return len(self.fine)

    def matches(self, chunks: Iterable[np.ndarray]) -> Iterator[Match]:
        """Every image (chunks of thumbnails, in order) within ``max_rms`` of a test image, with the
        closest such test image."""
        offset = 0
        for thumbs in chunks:
            for start in range(0, len(thumbs), _CHUNK):
                yield from self._chunk_matches(thumbs[start : start + _CHUNK], offset + start)
            offset += len(thumbs)

    def _chunk_matches(self, thumbs: np.ndarray, offset: int) -> Iterator[Match]:
        if not len(self) or not len(thumbs):
            return
        limit = self.max_rms**2
        # + 1: room for float32 rounding, so that the pre-filter never drops a pair that qualifies
        near = _squared_distances(coarse(thumbs), self.coarse) / self.coarse.shape[1] <= limit + 1.0
        for i in np.flatnonzero(near.any(axis=1)).tolist():
            candidates = np.flatnonzero(near[i])
            d = _squared_distances(thumbs[i : i + 1], self.fine[candidates])[0] / self.fine.shape[1]
            best = int(np.argmin(d))
            if d[best] <= limit:
                yield Match(offset + i, int(candidates[best]), float(np.sqrt(d[best])))
