"""The benchmarks' synthetic image folder: deterministic, in the layout prepare accepts, every image
distinct (prepare would drop copies), and a new unlabeled batch adds exactly what was asked."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from benchmarks.synthetic_images import add_unlabeled_batch, generate, image_files, parse_size
from kdpipe.core.params import Params
from kdpipe.steps import prepare

SIZES = [(40, 30), (32, 32)]  # small, and one needs resizing


def tiny(root, seed=0, workers=1):
    """40 images: 2 classes x 6 labeled, 24 unlabeled, 2 classes x 2 test."""
    return generate(
        root, labeled=12, unlabeled=24, test=4, classes=2, sizes=SIZES, seed=seed, workers=workers
    )


def file_bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in image_files(root)}


def pixel_hashes(paths) -> list[str]:
    hashes = []
    for path in paths:
        with Image.open(path) as img:
            hashes.append(hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest())
    return hashes


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    tiny(tmp_path / "a", seed=3)
    tiny(tmp_path / "b", seed=3, workers=2)  # the worker processes change nothing
    tiny(tmp_path / "c", seed=4)
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 40 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_layout_sizes_and_distinct_pixels(tmp_path):
    summary = tiny(tmp_path / "data")
    files = image_files(tmp_path / "data")
    assert summary.files == len(files) == 40 and summary.bytes == sum(p.stat().st_size for p in files)
    rel = [p.relative_to(tmp_path / "data").as_posix() for p in files]
    assert sum(r.startswith("labeled/class-00/") for r in rel) == 6
    assert sum(r.startswith("labeled/class-01/") for r in rel) == 6
    assert sum(r.startswith("unlabeled/batch-0000/") for r in rel) == 24
    assert sum(r.startswith("test/") for r in rel) == 4
    for path in files:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size in SIZES
    assert len(set(pixel_hashes(files))) == 40


def test_prepare_accepts_everything(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "KDPIPE_CACHE_DIR", str(tmp_path / "cache")
    )  # prepare's decode cache, if any, stays here
    tiny(tmp_path / "data")
    manifest = prepare.run(
        Params(prepare={"image_size": 16}), data_root=tmp_path / "data", out_dir=tmp_path / "prepared"
    )
    counts = manifest["counts"]
    assert counts["rejected"] == 0
    assert counts["train"] + counts["val"] == 12
    assert (counts["unlabeled"], counts["test"]) == (24, 4)
    assert manifest["class_names"] == ["class-00", "class-01"]


def test_added_batch_has_the_requested_new_distinct_images(tmp_path):
    root = tmp_path / "data"
    tiny(root)
    before = image_files(root)
    batch = add_unlabeled_batch(root, 7, workers=1)
    assert batch == root / "unlabeled" / "batch-0001"
    added = sorted(batch.glob("*.jpg"))
    assert len(added) == 7 and len(image_files(root)) == len(before) + 7
    assert not list((root / "unlabeled").glob(".tmp-*"))  # built under a hidden name, then renamed
    assert len(set(pixel_hashes(before + added))) == len(before) + 7
    assert add_unlabeled_batch(root, 1, workers=1).name == "batch-0002"  # numbered after the last one


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("640")
