"""Reading the output of the ``prepare`` step.

``prepare`` writes packed uint8 arrays plus ``manifest.json``, which records the sha256 of every
file it wrote. :func:`load_prepared` checks those hashes (so a later step never trains on data that
changed behind DVC's back: a changed file is hashed again, an unchanged one is trusted, see
:mod:`kdpipe.data.integrity`) and memory-maps the arrays, so large datasets are not read into RAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.core.atomic import read_json
from kdpipe.core.errors import DataError, IntegrityError
from kdpipe.data.segments import joined, segment_file

MANIFEST = "manifest.json"
SOURCES = "sources.json"
REJECTED = "rejected.json"
# What the teacher stage reads, with the hashes of those files: its only DVC dependency on the prepared
# data, so that new unlabeled images (which it does not read unless teacher.unlabeled_rounds > 0) do
# not re-train it.
TEACHER_INPUTS = "teacher_inputs.json"
ROWS = (
    "rows.npy"  # per output row: the source file's sha256, the pixels' sha256 (prepare reuses rows by them)
)
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


@dataclass
class PreparedData:
    """The prepared dataset: ``*_x`` are ``(N, S, S, 3)`` uint8, ``*_y`` are int64 class indices."""

    class_names: list[str]
    image_size: int
    # None for the splits a step did not ask for (``load_prepared(splits=...)``)
    train_x: np.ndarray | None
    train_y: np.ndarray | None
    val_x: np.ndarray | None
    val_y: np.ndarray | None
    unlabeled_x: np.ndarray | None
    test_x: np.ndarray | None
    test_y: np.ndarray | None
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


def load_prepared(
    directory: str | os.PathLike,
    verify: bool | None = None,
    mmap: bool = True,
    splits: tuple[str, ...] = SPLITS,
) -> PreparedData:
    """Load a ``prepare`` output folder: the arrays of ``splits`` only (the others are None).

    Integrity (see :mod:`kdpipe.data.integrity`): each file must match its manifest hash; ``verify=None``
    hashes only files that changed since their hash last matched, ``True`` hashes every one
    (``--verify``), ``False`` only checks they exist.

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
    names = [n for n in (*ARRAY_FILES, *TEACHER_COPY_FILES) if n in files and n.split("_")[0] in splits]
    parts = {name: segment_names(manifest, name) for name in names}
    _check_files(directory, files, [part for name in names for part in parts[name]], verify)

    mode = "r" if mmap else None
    arrays = {
        name[:-4]: joined(
            [np.load(directory / part, mmap_mode=mode, allow_pickle=False) for part in parts[name]]
        )
        for name in names
    }
    teacher_image_size = manifest.get("teacher_image_size")
    has_copy = "train_xt.npy" in files and teacher_image_size
    data = PreparedData(
        class_names=list(manifest["class_names"]),
        image_size=int(manifest["image_size"]),
        manifest=manifest,
        teacher_image_size=int(teacher_image_size) if has_copy else None,
        **{
            f"{split}_{kind}": arrays.get(f"{split}_{kind}")
            for split in SPLITS
            for kind in ("x", "y")
            if split != "unlabeled" or kind == "x"
        },
        **{name[:-4]: arrays.get(name[:-4]) for name in TEACHER_COPY_FILES},
    )
    _check_shapes(directory, data)
    return data


def teacher_inputs(manifest: dict[str, Any], reads_unlabeled: bool) -> dict[str, Any]:
    """The content of :data:`TEACHER_INPUTS` for ``manifest``: the classes, sizes and file hashes of
    the labeled training and validation arrays (and their teacher-resolution copies), plus the
    unlabeled ones when the teacher reads them; ``version`` is the hash of all of it."""
    import hashlib
    import json

    splits = ("train", "val", "unlabeled") if reads_unlabeled else ("train", "val")
    record = {
        "class_names": list(manifest["class_names"]),
        "image_size": manifest["image_size"],
        "teacher_image_size": manifest.get("teacher_image_size"),
        "reads_unlabeled": reads_unlabeled,
        "files": {
            name: sha for name, sha in sorted(manifest["files"].items()) if name.split("_")[0] in splits
        },
    }
    record["version"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return record


def segment_rows(manifest: dict[str, Any], split: str) -> list[int]:
    """Rows per file of ``split``'s arrays: the manifest's ``segments`` (see :mod:`kdpipe.data.segments`),
    else one file holding the whole split."""
    return (manifest.get("segments") or {}).get(split) or [int(manifest["counts"][split])]


def segment_names(manifest: dict[str, Any], name: str) -> list[str]:
    """The files that hold array ``name`` (``unlabeled_x.npy``...): itself, or its segments."""
    split, kind = name[:-4].split("_", 1)
    return [segment_file(split, kind, k) for k in range(len(segment_rows(manifest, split)))]


def _check_files(directory: Path, files: dict[str, str], names: list[str], verify: bool | None) -> None:
    from kdpipe.data.integrity import first_mismatch

    for name in names:
        if not (directory / name).is_file():
            raise IntegrityError(
                f"{directory / name}: listed in {MANIFEST} but missing; re-run the prepare step"
            )
    changed = first_mismatch(directory, files, names, full=verify)
    if changed is not None:
        raise IntegrityError(
            f"{directory / changed}: content does not match the sha256 recorded in {MANIFEST} "
            "(modified after prepare?); re-run the prepare step"
        )


def _check_shapes(directory: Path, data: PreparedData) -> None:
    """Cheap structural checks that catch a manifest and arrays from different runs."""
    size = data.image_size
    for split in SPLITS:
        x = getattr(data, f"{split}_x")
        if x is None:  # not loaded
            continue
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
