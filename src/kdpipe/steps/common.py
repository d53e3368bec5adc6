"""Pieces the training steps (teacher, distill) share: data loading and the runtime."""

from __future__ import annotations

import os

import numpy as np

from ..data import load_prepared
from ..engine import TrainingData


def training_data(prepared_dir: str | os.PathLike, augmented_dir: str | os.PathLike | None = None,
                  in_memory: bool = True) -> TrainingData:
    """The arrays a trainer samples from. Small data sets are read into RAM (random batch
    gathers from a memory map cost a page fault per image); ``in_memory=False`` keeps them mapped."""
    data = load_prepared(prepared_dir)
    load = np.asarray if in_memory else (lambda a: a)
    labeled_views = unlabeled_views = None
    if augmented_dir is not None:
        from .augment import load_views

        labeled_views, unlabeled_views, _ = load_views(augmented_dir)
        labeled_views, unlabeled_views = load(labeled_views), load(unlabeled_views)
    return TrainingData(
        class_names=list(data.class_names), image_size=int(data.image_size),
        train_x=load(data.train_x), train_y=np.asarray(data.train_y), unlabeled_x=load(data.unlabeled_x),
        val_x=load(data.val_x), val_y=np.asarray(data.val_y),
        labeled_views=labeled_views, unlabeled_views=unlabeled_views,
    )
