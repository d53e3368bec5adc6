"""The embedded demo data set: real digits, user layout, byte-for-byte deterministic."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from kdpipe.core.errors import KdpipeError
from kdpipe.data.demo import DemoSplit, write_demo_data

pytestmark = pytest.mark.slow  # downloads nothing but decodes and writes the whole demo set (minutes)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_counts_and_determinism(tmp_path):
    split = DemoSplit(labeled_per_class=5, test_per_class=3, seed=1)
    counts = write_demo_data(tmp_path / "a", split)
    assert counts == {"labeled": 50, "test": 30, "unlabeled": 5000 - 80}
    a = tmp_path / "a"
    assert sorted(p.name for p in (a / "labeled").iterdir()) == [str(d) for d in range(10)]
    assert all(len(list((a / "labeled" / str(d)).iterdir())) == 5 for d in range(10))
    # one append-only batch folder, flat inside: no class folders
    assert [p.name for p in (a / "unlabeled").iterdir()] == ["batch-0001"]
    assert not any(p.is_dir() for p in (a / "unlabeled" / "batch-0001").iterdir())
    assert len(list((a / "unlabeled" / "batch-0001").iterdir())) == 5000 - 80
    write_demo_data(tmp_path / "b", split)
    assert _tree_digest(a) == _tree_digest(tmp_path / "b")


def test_images_are_real_digits(tmp_path):
    from PIL import Image

    write_demo_data(tmp_path, DemoSplit(labeled_per_class=1, test_per_class=1))
    image = Image.open(next((tmp_path / "labeled" / "0").iterdir()))
    assert image.size == (28, 28) and image.mode == "L"
    pixels = np.asarray(image).ravel().tolist()
    # Handwriting: mostly dark background with some bright strokes.
    assert 0.05 < sum(v > 128 for v in pixels) / len(pixels) < 0.5


def test_refuses_to_mix_with_existing_data(tmp_path):
    (tmp_path / "labeled").mkdir()
    with pytest.raises(KdpipeError, match="refusing to mix"):
        write_demo_data(tmp_path)


def test_cli_prepares_the_demo_data(tmp_path):
    """Integration: `kdpipe demo-data` then `kdpipe prepare` through the CLI entry point."""
    from kdpipe.cli import main
    from kdpipe.core.atomic import read_json
    from kdpipe.data.prepared import load_prepared

    data, out = tmp_path / "data", tmp_path / "prepared"
    assert main(["demo-data", str(data), "--labeled-per-class", "6", "--test-per-class", "4"]) == 0
    assert (
        main(["prepare", "--data-root", str(data), "--out-dir", str(out), "-S", "prepare.image_size=16"]) == 0
    )
    manifest = read_json(out / "manifest.json")
    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert manifest["counts"] == {"train": 50, "val": 10, "unlabeled": 4900, "test": 40, "rejected": 0}
    assert read_json(out / "rejected.json") == []
    prepared = load_prepared(out)
    assert prepared.train_x.shape == (50, 16, 16, 3) and prepared.train_x.dtype.name == "uint8"
