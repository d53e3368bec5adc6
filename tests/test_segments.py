"""RowSegments: several row files read as one array (prepare's unlabeled split after ingests)."""

from __future__ import annotations

import numpy as np
import pytest

from kdpipe.data.rowio import gather_rows
from kdpipe.data.segments import RowSegments, segment_file, segment_sizes


@pytest.fixture
def parts(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (5, 1, 7)]
    mapped = []
    for k, a in enumerate(arrays):
        np.save(tmp_path / f"p{k}.npy", a)
        mapped.append(np.load(tmp_path / f"p{k}.npy", mmap_mode="r"))
    return arrays, mapped


def test_reads_like_the_concatenated_array(parts):
    arrays, mapped = parts
    whole = np.concatenate(arrays)
    rows = RowSegments(mapped)
    assert len(rows) == 13 and rows.shape == whole.shape and rows.dtype == whole.dtype and rows.ndim == 4
    assert rows.nbytes == whole.nbytes
    assert np.array_equal(np.asarray(rows), whole)
    for k in (0, 4, 5, 6, 12, -1, -13):
        assert np.array_equal(rows[k], whole[k])
        assert np.array_equal(rows[(k,)], whole[k])
    index = np.array([12, 0, 5, 5, 6, 3])
    assert np.array_equal(rows[index], whole[index])
    assert np.array_equal(rows[[2, 11]], whole[[2, 11]])
    assert np.array_equal(rows[index > 4], whole[np.flatnonzero(index > 4)])
    for piece in (slice(3, 9), slice(0, 5), slice(5, 6), slice(None, 100), slice(2, 12, 3), slice(7, 7)):
        assert np.array_equal(np.asarray(rows[piece]), whole[piece])
    with pytest.raises(IndexError):
        rows[13]
    with pytest.raises(IndexError):
        rows[np.array([0, 13])]


def test_a_slice_stays_a_view_of_the_files(parts):
    _, mapped = parts
    piece = RowSegments(mapped)[3:9]
    assert isinstance(piece, RowSegments)
    assert all(isinstance(p, np.memmap) for p in piece.parts)


def test_gather_rows_reads_across_segments(parts):
    arrays, mapped = parts
    whole = np.concatenate(arrays)
    index = np.array([12, 0, 5, 9, 1])
    out = np.empty((5, 3, 4, 4), dtype=np.uint8)
    gather_rows(RowSegments(mapped), (index,), out, channels_first=True)
    assert np.array_equal(out, whole[index].transpose(0, 3, 1, 2))


def test_segments_follow_batch_folders_and_close_at_the_size():
    row = 10  # bytes per row
    # a folder is never split; a segment closes once it holds 30 bytes (3 rows)
    assert segment_sizes(["a"] * 5 + ["b"] * 2 + ["c"] * 2 + ["d"], row, 30) == [5, 4, 1]
    assert segment_sizes([], row, 30) == []
    # folders added after the existing ones change only the open (last) segment
    before = segment_sizes(["a"] * 5 + ["b"] * 2, row, 30)
    after = segment_sizes(["a"] * 5 + ["b"] * 2 + ["c"] * 4, row, 30)
    assert after[: len(before) - 1] == before[:-1]
    assert segment_file("unlabeled", "x", 0) == "unlabeled_x.npy"
    assert segment_file("unlabeled", "xt", 2) == "unlabeled_xt.2.npy"


def test_small_segmented_arrays_are_read_into_ram(parts, monkeypatch):
    from kdpipe.steps.common import _RamBudget

    arrays, mapped = parts
    taken = _RamBudget(True).take(RowSegments(mapped))
    assert isinstance(taken, np.ndarray) and not isinstance(taken, np.memmap)
    assert np.array_equal(taken, np.concatenate(arrays))
    assert isinstance(_RamBudget(False).take(RowSegments(mapped)), RowSegments)


@pytest.mark.parametrize("recipe", ["kd", "cotrain"])
def test_training_on_segments_equals_training_on_one_file(tmp_path, monkeypatch, tiny_pipeline_dirs, recipe):
    """The same data prepared as one unlabeled file and as three segments (batch folders): augment and
    distill give the same bytes, with the arrays read from their files (no RAM copy)."""
    import hashlib
    import json
    import shutil

    import torch
    from conftest import tiny_params, write_tiny_dataset

    import kdpipe.data.segments
    import kdpipe.steps.common
    from kdpipe.core.files import file_sha256
    from kdpipe.data.prepared import load_prepared
    from kdpipe.steps import augment, distill, prepare

    data = write_tiny_dataset(tmp_path / "data", unlabeled=30)
    for k in (2, 3):  # two more batch folders
        more = write_tiny_dataset(
            tmp_path / f"more{k}", labeled_per_class=0, test_per_class=0, unlabeled=9, seed=k
        )
        shutil.move(more / "unlabeled" / "batch-0001", data / "unlabeled" / f"batch-000{k}")
    params = tiny_params(recipe=recipe, max_iterations=10)
    monkeypatch.setattr(kdpipe.steps.common, "IN_MEMORY_LIMIT_BYTES", 0)
    threads = torch.get_num_threads()
    results = {}
    try:
        for name, min_bytes in (("one", 1 << 40), ("segments", 1)):
            monkeypatch.setattr(kdpipe.data.segments, "SEGMENT_MIN_BYTES", min_bytes)
            prepared, augmented, out = (
                tmp_path / f"{name}-{part}" for part in ("prepared", "augmented", "distill")
            )
            prepare.run(params, data, prepared)
            assert len(load_prepared(prepared).manifest.get("segments", {}).get("unlabeled", [0])) == (
                3 if name == "segments" else 1
            )
            augment.run(params, prepared, augmented, tiny_pipeline_dirs["teacher"])
            summary = distill.run(params, prepared, augmented, tiny_pipeline_dirs["teacher"], out)
            views = sorted(p.name for p in augmented.glob("*.npy"))
            # the checkpoint holds run metadata (paths, times): compare what was learned and measured
            state = torch.load(out / "student.pt", map_location="cpu", weights_only=False)["state_dict"]
            weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in state.values())).hexdigest()
            results[name] = (
                {v: file_sha256(augmented / v) for v in views},
                weights,
                [
                    {k: v for k, v in h.items() if k != "train_seconds"}
                    for h in json.loads((out / "history.json").read_text())
                ],
                summary["iterations"],
            )
    finally:
        torch.set_num_threads(threads)
    assert results["one"] == results["segments"]
    assert results["one"][3] == 10
    assert results["one"][1] == results["segments"][1]
