"""Pieces the training steps (teacher, augment, distill) share: data loading."""

from __future__ import annotations

import os

import numpy as np

from kdpipe.data.mapped import release
from kdpipe.data.prepared import load_prepared
from kdpipe.data.segments import RowSegments
from kdpipe.training.engine import TrainingData

# Arrays are copied into RAM for training (a random batch gathered from a memory map costs a page
# fault per image the first time) until they add up to this budget; the rest stay memory-mapped, so a
# step's memory does not grow with the data set (the prefetching input pipeline hides the mapped
# gathers). The budget goes first to what every step reads: the labeled images, then validation,
# then the unlabeled pool.
IN_MEMORY_LIMIT_BYTES = 128 * 1024**2


class _RamBudget:
    def __init__(self, enabled: bool):
        self.left = IN_MEMORY_LIMIT_BYTES if enabled else 0

    def take(self, array: np.ndarray | None) -> np.ndarray | None:
        """``array`` copied into RAM while the budget allows; otherwise as it is (mapped)."""
        if array is None or not isinstance(array, (np.memmap, RowSegments)) or array.nbytes > self.left:
            return array
        self.left -= array.nbytes
        copy = np.array(array)  # a copy: np.asarray of a memory map would still read from the file
        release(array)  # the copy is what training reads: the mapped pages need not stay resident too
        return copy


def training_data(
    prepared_dir: str | os.PathLike,
    augmented_dir: str | os.PathLike | None = None,
    in_memory: bool = True,
    teacher_copy: bool = False,
    unlabeled: bool = True,
) -> TrainingData:
    """The arrays a trainer samples from.

    Arrays are read into RAM up to :data:`IN_MEMORY_LIMIT_BYTES` in all (none with ``in_memory=False``);
    the others stay mapped. ``augmented_dir`` adds the stored views (and the teacher's cached logits
    when the augment step wrote them); ``teacher_copy`` adds prepare's teacher-resolution arrays when
    they exist; ``unlabeled=False`` leaves the unlabeled images out (empty), for a step that does not
    depend on them."""
    data = load_prepared(
        prepared_dir, splits=("train", "val", "unlabeled") if unlabeled else ("train", "val")
    )
    if not unlabeled:
        data.unlabeled_x = np.zeros((0, *data.train_x.shape[1:]), dtype=np.uint8)
        if data.train_xt is not None:
            data.unlabeled_xt = np.zeros((0, *data.train_xt.shape[1:]), dtype=np.uint8)
    stored = None
    if augmented_dir is not None:
        from kdpipe.data.augmented import load_views

        stored = load_views(augmented_dir, expected_data_version=data.manifest["data_version"])
    copies = teacher_copy and data.train_xt is not None
    ram = _RamBudget(in_memory)
    # in the order the budget serves them
    arrays = {
        "train_x": data.train_x,
        "labeled_views": stored.labeled_views if stored else None,
        "labeled_logits": stored.labeled_logits if stored else None,
        "teacher_train_x": data.train_xt if copies else None,
        "val_x": data.val_x,
        "teacher_val_x": data.val_xt if copies else None,
        "unlabeled_x": data.unlabeled_x,
        "unlabeled_views": stored.unlabeled_views if stored else None,
        "unlabeled_logits": stored.unlabeled_logits if stored else None,
        "teacher_unlabeled_x": data.unlabeled_xt if copies else None,
    }
    return TrainingData(
        class_names=list(data.class_names),
        image_size=int(data.image_size),
        train_y=np.asarray(data.train_y),
        val_y=np.asarray(data.val_y),
        view_kinds=stored.view_kinds if stored else None,
        data_version=data.manifest["data_version"],
        **{name: ram.take(array) for name, array in arrays.items()},
    )
