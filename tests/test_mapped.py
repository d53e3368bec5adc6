"""Mapped pages are dropped from the resident set after a streaming pass, and no data is lost."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.data.mapped import FileRows, release
from kdpipe.data.segments import RowSegments
from kdpipe.steps.common import _RamBudget
from kdpipe.training.devices import Runtime
from kdpipe.training.engine import predict_logits
from kdpipe.training.views import gather_batch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
CPU = Runtime(torch.device("cpu"), None, False)


def resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (0 when it is not mapped)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if _MAPPING.match(line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def _saved(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, array)
    return path


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_release_drops_read_pages_and_the_data_reads_again(tmp_path):
    images = _images(500)
    path = _saved(tmp_path, "x.npy", images)
    mapped = np.load(path, mmap_mode="r")
    assert int(mapped.sum(dtype=np.int64)) == int(images.sum(dtype=np.int64))
    assert resident_kib(path) >= images.nbytes // 1024 - 8  # every page was read
    release(mapped[10:20])  # a view of the map releases the whole map
    assert resident_kib(path) == 0
    np.testing.assert_array_equal(mapped, images)  # mapped again from the page cache


def test_written_pages_survive_release(tmp_path):
    path = tmp_path / "out.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(400, 32, 32, 3))
    images = _images(400, seed=1)
    out[:200] = images[:200]
    release(out)
    assert resident_kib(path) == 0
    out[200:] = images[200:]
    out.flush()
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(np.load(path), images)  # read from the file, not the map


def test_a_private_map_keeps_its_writes(tmp_path):
    path = _saved(tmp_path, "x.npy", _images(100))
    private = np.load(path, mmap_mode="c")
    private[:] = 7
    release(private)
    assert (private == 7).all()  # dropping copy-on-write pages would have lost this
    assert resident_kib(path) > 0


def test_every_segment_is_released(tmp_path):
    paths = [_saved(tmp_path, f"part{k}.npy", _images(100, seed=k)) for k in range(3)]
    segments = RowSegments([np.load(p, mmap_mode="r") for p in paths])
    np.asarray(segments).sum()
    assert all(resident_kib(p) > 0 for p in paths)
    release(segments, None, np.zeros(3))  # arrays in RAM and None are no-ops
    assert [resident_kib(p) for p in paths] == [0, 0, 0]


def test_batch_gathering_reads_the_files_and_maps_nothing(tmp_path):
    labeled, unlabeled = _images(64), _images(2000, seed=2)
    l_path, u_path = _saved(tmp_path, "l.npy", labeled), _saved(tmp_path, "u.npy", unlabeled)
    l_map, u_map = np.load(l_path, mmap_mode="r"), np.load(u_path, mmap_mode="r")
    rng = np.random.default_rng(0)
    for channels_first in (False, True):
        for _ in range(3):  # random rows, as a training run draws them
            l_idx, u_idx = rng.integers(0, 64, 16), rng.integers(0, 2000, 48)
            batch = gather_batch(l_map, u_map, (l_idx,), (u_idx,), CPU, channels_first).numpy()
            expected = np.concatenate([labeled[l_idx], unlabeled[u_idx]])
            np.testing.assert_array_equal(
                batch, expected.transpose(0, 3, 1, 2) if channels_first else expected
            )
            assert resident_kib(l_path) == resident_kib(u_path) == 0


def test_file_rows_read_segments_and_stored_views(tmp_path):
    # logits of stored views: float32 rows indexed by (sample, view), across two segment files
    parts = [
        np.random.default_rng(k).standard_normal((n, 3, 10)).astype(np.float32) for k, n in enumerate((7, 5))
    ]
    segments = RowSegments(
        [np.load(_saved(tmp_path, f"logits{k}.npy", part), mmap_mode="r") for k, part in enumerate(parts)]
    )
    whole = np.concatenate(parts)
    positions = np.array([[11, 2], [0, 0], [6, 1], [7, 1], [6, 1]])
    out = np.zeros((5, 10), dtype=np.float32)
    reader = FileRows.of(segments)
    assert reader is not None
    reader.read(positions, np.array([4, 3, 2, 1, 0]), out)
    np.testing.assert_array_equal(out, whole[positions[::-1, 0], positions[::-1, 1]])


def test_a_slice_of_a_map_is_copied_from_the_map_and_released(tmp_path):
    images = _images(300)
    path = _saved(tmp_path, "x.npy", images)
    part = np.load(path, mmap_mode="r")[100:]
    assert FileRows.of(part) is None and FileRows.of(np.asarray(images)) is None
    batch = gather_batch(part, part, (np.array([0, 5]),), (np.array([199]),), CPU).numpy()
    np.testing.assert_array_equal(batch, images[[100, 105, 299]])
    assert resident_kib(path) == 0


def test_a_truncated_file_is_named(tmp_path):
    path = _saved(tmp_path, "x.npy", _images(50))
    mapped = np.load(path, mmap_mode="r")
    with open(path, "r+b") as fh:  # the file shrinks after it was mapped (another process rewrote it)
        fh.truncate(path.stat().st_size - 5000)
    with pytest.raises(OSError, match="x.npy"):
        gather_batch(mapped, mapped, (np.array([49]),), (np.array([], dtype=np.int64),), CPU)


def test_predicting_over_a_mapped_array_releases_it(tmp_path):
    path = _saved(tmp_path, "x.npy", _images(300))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32 * 3, 4))
    logits = predict_logits(model, np.load(path, mmap_mode="r"), CPU, batch_size=64)
    assert logits.shape == (300, 4)
    assert resident_kib(path) == 0


def test_an_array_copied_into_ram_is_released(tmp_path):
    images = _images(200)
    path = _saved(tmp_path, "x.npy", images)
    copy = _RamBudget(enabled=True).take(np.load(path, mmap_mode="r"))
    assert not isinstance(copy, np.memmap)
    np.testing.assert_array_equal(copy, images)
    assert resident_kib(path) == 0


def test_prepare_copies_rows_from_the_files_without_mapping_them(tmp_path):
    from kdpipe.data.rowio import gather_rows

    images = _images(600)
    paths = [_saved(tmp_path, "spool.npy", images[:400]), _saved(tmp_path, "segment.npy", images[400:])]
    source = RowSegments([np.load(p, mmap_mode="r") for p in paths])
    rows = np.random.default_rng(1).permutation(600)[:250]  # random rows, as a shuffled split asks for them
    slots = np.arange(250)[::-1].copy()
    out = np.zeros((250, 32, 32, 3), dtype=np.uint8)
    gather_rows(source, (rows,), out, slots=slots)
    np.testing.assert_array_equal(out[slots], images[rows])
    assert [resident_kib(p) for p in paths] == [0, 0]  # while the maps are still open
