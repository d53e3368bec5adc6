"""Reading the output of the ``prepare`` step.

``prepare`` writes packed uint8 arrays plus ``manifest.json``, which records the sha256 of every
file it wrote. :func:`load_prepared` checks those hashes (so a later step never trains on data that
changed behind DVC's back) and memory-maps the arrays, so large datasets are not read into RAM.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import read_json
from .errors import DataError, IntegrityError

MANIFEST = "manifest.json"
SOURCES = "sources.json"
REJECTED = "rejected.json"
SPLITS = ("train", "val", "unlabeled", "test")
# Array files, in the order prepare writes them; splits with labels have a matching *_y.npy.
ARRAY_FILES = (
    "train_x.npy",
    "train_y.npy",
    "val_x.npy",
    "val_y.npy",
    "unlabeled_x.npy",
    "test_x.npy",
    "test_y.npy",
)
# The teacher-resolution copies prepare writes when the source images are larger than the student's
# size (see kdpipe.steps.prepare); optional, listed in the manifest when present.
TEACHER_COPY_FILES = ("train_xt.npy", "val_xt.npy", "unlabeled_xt.npy", "test_xt.npy")


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks (arrays can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PreparedData:
    """The prepared dataset: ``*_x`` are ``(N, S, S, 3)`` uint8, ``*_y`` are int64 class indices."""

    class_names: list[str]
    image_size: int
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    unlabeled_x: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    manifest: dict[str, Any] = field(repr=False)
    # Teacher-resolution copies (``teacher_image_size`` square), or None when prepare wrote none.
    teacher_image_size: int | None = None
    train_xt: np.ndarray | None = None
    val_xt: np.ndarray | None = None
    unlabeled_xt: np.ndarray | None = None
    test_xt: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_prepared(directory: str | os.PathLike, verify: bool = True, mmap: bool = True) -> PreparedData:
    """Load a ``prepare`` output folder; with ``verify``, every file must match its manifest hash.

    Raises :class:`DataError` when the folder or its manifest is missing and :class:`IntegrityError`
    when a file listed in the manifest is missing, altered, or has the wrong shape.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found; run the prepare step first (`kdpipe prepare`)")
    manifest = read_json(manifest_path)
    files = manifest.get("files") or {}
    for name in ARRAY_FILES:
        if name not in files:
            raise IntegrityError(f"{manifest_path}: does not list {name}; re-run the prepare step")
    _check_files(directory, files, verify)

    mode = "r" if mmap else None
    names = ARRAY_FILES + tuple(n for n in TEACHER_COPY_FILES if n in files)
    arrays = {name[:-4]: np.load(directory / name, mmap_mode=mode, allow_pickle=False) for name in names}
    teacher_size = manifest.get("teacher_image_size")
    data = PreparedData(
        class_names=list(manifest["class_names"]),
        image_size=int(manifest["image_size"]),
        manifest=manifest,
        teacher_image_size=int(teacher_size) if teacher_size and "train_xt" in arrays else None,
        **arrays,
    )
    _check_shapes(directory, data)
    return data


def _check_files(directory: Path, files: dict[str, str], verify: bool) -> None:
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST} but missing; re-run the prepare step")
        if verify and file_sha256(path) != expected:
            raise IntegrityError(
                f"{path}: content does not match the sha256 recorded in {MANIFEST} "
                "(modified after prepare?); re-run the prepare step"
            )


def _check_shapes(directory: Path, data: PreparedData) -> None:
    """Cheap structural checks that catch a manifest and arrays from different runs."""
    size = data.image_size
    for split in SPLITS:
        x = getattr(data, f"{split}_x")
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise IntegrityError(
                f"{directory / f'{split}_x.npy'}: expected uint8 (N, {size}, {size}, 3), got {x.dtype} {x.shape}"
            )
        copy = getattr(data, f"{split}_xt")
        big = data.teacher_image_size
        if copy is not None and (copy.dtype != np.uint8 or copy.shape != (len(x), big, big, 3)):
            raise IntegrityError(
                f"{directory / f'{split}_xt.npy'}: expected uint8 ({len(x)}, {big}, {big}, 3), got {copy.dtype} {copy.shape}"
            )
        if split == "unlabeled":
            continue
        y = getattr(data, f"{split}_y")
        if y.ndim != 1 or len(y) != len(x):
            raise IntegrityError(f"{directory / f'{split}_y.npy'}: {y.shape} labels for {len(x)} images")
