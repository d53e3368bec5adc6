"""Shared pytest fixtures. Every image is generated in tmp_path: no binary test data is checked in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _noise_rgb(size: tuple[int, int], seed: int) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def make_image():
    """Factory: ``make_image(path, size=(12, 12), seed=0, mode="RGB", **save_kwargs) -> Path``.

    Writes random-noise pixels (distinct per seed) converted to ``mode``; the format follows the
    file extension. Parent folders are created.
    """
    from PIL import Image

    def make(path, size=(12, 12), seed=0, mode="RGB", **save_kwargs) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(_noise_rgb(size, seed))
        if mode != "RGB":
            img = img.convert(mode)
        img.save(path, **save_kwargs)
        return path

    return make


@pytest.fixture
def image_dataset(tmp_path, make_image):
    """Factory building a small valid data root; returns its path.

    ``image_dataset(classes={"cat": 5, "dog": 5}, unlabeled=4, test={"cat": 2, "dog": 2})``.
    Every image is distinct; unlabeled images go in ``unlabeled/batch-0001/``.
    """

    def build(classes=None, unlabeled=4, test=None, root=None) -> Path:
        root = Path(root or tmp_path / "data")
        classes = {"cat": 5, "dog": 5} if classes is None else classes
        test = {"cat": 2, "dog": 2} if test is None else test
        seed = 1000
        for split, counts in (("labeled", classes), ("test", test)):
            for name, n in counts.items():
                for k in range(n):
                    seed += 1
                    make_image(root / split / name / f"{name}_{k:03d}.png", seed=seed)
        for k in range(unlabeled):
            seed += 1
            make_image(root / "unlabeled" / "batch-0001" / f"u_{k:03d}.png", seed=seed)
        return root

    return build
