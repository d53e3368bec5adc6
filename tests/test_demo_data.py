"""The embedded demo data set: real digits, user layout, byte-for-byte deterministic."""

import hashlib
from pathlib import Path

import pytest

from kdpipe.demo_data import DemoSplit, write_demo_data
from kdpipe.errors import KdpipeError


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_counts_and_determinism(tmp_path):
    split = DemoSplit(labeled_per_class=5, test_per_class=3, seed=1)
    counts = write_demo_data(tmp_path / "a", split)
    assert counts == {"labeled": 50, "test": 30, "unlabeled": 5000 - 80}
    a = tmp_path / "a"
    assert sorted(p.name for p in (a / "labeled").iterdir()) == [str(d) for d in range(10)]
    assert all(len(list((a / "labeled" / str(d)).iterdir())) == 5 for d in range(10))
    assert not any(p.is_dir() for p in (a / "unlabeled").iterdir())  # flat: no class folders
    write_demo_data(tmp_path / "b", split)
    assert _tree_digest(a) == _tree_digest(tmp_path / "b")


def test_images_are_real_digits(tmp_path):
    from PIL import Image

    write_demo_data(tmp_path, DemoSplit(labeled_per_class=1, test_per_class=1))
    image = Image.open(next((tmp_path / "labeled" / "0").iterdir()))
    assert image.size == (28, 28) and image.mode == "L"
    pixels = list(image.getdata())
    # Handwriting: mostly dark background with some bright strokes.
    assert 0.05 < sum(v > 128 for v in pixels) / len(pixels) < 0.5


def test_refuses_to_mix_with_existing_data(tmp_path):
    (tmp_path / "labeled").mkdir()
    with pytest.raises(KdpipeError, match="refusing to mix"):
        write_demo_data(tmp_path)
