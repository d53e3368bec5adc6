"""Pieces the training steps (teacher, augment, distill) share: data loading."""

from __future__ import annotations

import os

import numpy as np

from ..data import load_prepared
from ..engine import TrainingData

# An array up to this size is copied into RAM for training (a random batch gathered from a memory map
# costs a page fault per image); a larger one stays memory-mapped, so memory stays bounded at scale.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3


def _in_ram(array: np.ndarray, in_memory: bool) -> np.ndarray:
    """``array`` copied into RAM when asked and small enough; otherwise as it is (mapped)."""
    if in_memory and isinstance(array, np.memmap) and array.nbytes <= IN_MEMORY_LIMIT_BYTES:
        return np.array(array)  # a copy: np.asarray of a memory map would still read from the file
    return array


def training_data(prepared_dir: str | os.PathLike, augmented_dir: str | os.PathLike | None = None,
                  in_memory: bool = True, teacher_copy: bool = False) -> TrainingData:
    """The arrays a trainer samples from.

    Arrays up to :data:`IN_MEMORY_LIMIT_BYTES` are read into RAM (random batch gathers from a memory
    map cost a page fault per image); larger ones, and all with ``in_memory=False``, stay mapped. ``augmented_dir`` adds the stored views (and the
    teacher's cached logits when the augment step wrote them); ``teacher_copy`` adds prepare's
    teacher-resolution arrays when they exist."""
    data = load_prepared(prepared_dir, splits=("train", "val", "unlabeled"))
    def load(array: np.ndarray) -> np.ndarray:
        return _in_ram(array, in_memory)

    stored: dict = {}
    if augmented_dir is not None:
        from .augment import load_views

        sets = load_views(augmented_dir, expected_data_version=data.manifest["data_version"])
        stored = {"labeled_views": load(sets.labeled_views), "unlabeled_views": load(sets.unlabeled_views),
                  "view_kinds": sets.view_kinds,
                  "labeled_logits": None if sets.labeled_logits is None else load(sets.labeled_logits),
                  "unlabeled_logits": None if sets.unlabeled_logits is None else load(sets.unlabeled_logits)}
    copies: dict = {}
    if teacher_copy and data.train_xt is not None:
        copies = {"teacher_train_x": load(data.train_xt), "teacher_val_x": load(data.val_xt),
                  "teacher_unlabeled_x": load(data.unlabeled_xt)}
    return TrainingData(
        class_names=list(data.class_names), image_size=int(data.image_size),
        train_x=load(data.train_x), train_y=np.asarray(data.train_y), unlabeled_x=load(data.unlabeled_x),
        val_x=load(data.val_x), val_y=np.asarray(data.val_y), **stored, **copies,
    )
