"""Model checkpoints: one format for teacher, student and resume states.

A model checkpoint is a plain dict of tensors and JSON-able values, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code is ever executed):

    {"arch": str, "num_classes": int, "image_size": int, "input_size": int | None,
     "class_names": [str], "state_dict": {...}, "meta": {...}}

``image_size`` is the size of the images the model is fed (the prepared data's); ``input_size``,
when set, is the resolution the network resizes them to before computing (a teacher that sees
more pixels than the student, see :mod:`kdpipe.training.models`). The model's normalisation lives inside
the network, so a checkpoint needs nothing else to be used.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from kdpipe.core.atomic import atomic_path
from kdpipe.core.errors import KdpipeError
from kdpipe.training.safe_load import load_tensors


def save(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint atomically (temp file + rename). Through a file object: given a path, torch
    names the archive's root folder after the file, here the random temporary name, so the same
    checkpoint saved twice differed in its bytes (and DVC saw a new output every run)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear error names a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise KdpipeError(f"{path}: checkpoint not found")
    return load_tensors(path, "kdpipe checkpoint")


def model_checkpoint(
    model,
    arch: str,
    num_classes: int,
    image_size: int,
    class_names: list[str],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict saved for a trained model (unwrapping DDP and torch.compile wrappers)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    input_size = getattr(inner, "input_size", None)
    return {
        "arch": arch,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "input_size": None if input_size is None else int(input_size),
        "class_names": list(class_names),
        "state_dict": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
        "meta": dict(meta or {}),
    }


def load_model(path: str | os.PathLike):
    """Rebuild the network stored in a model checkpoint; returns ``(model, checkpoint)``."""
    from kdpipe.training.models import build_model

    ckpt = load(path)
    for key in ("arch", "num_classes", "image_size", "state_dict"):
        if key not in ckpt:
            raise KdpipeError(f"{path}: checkpoint has no '{key}' entry (not a kdpipe model checkpoint)")
    model = build_model(
        ckpt["arch"],
        num_classes=ckpt["num_classes"],
        image_size=ckpt["image_size"],
        input_size=ckpt.get("input_size"),
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


class BestSoFar:
    """The best validation accuracy of each trained network so far, and when it was reached.

    The training loop offers every evaluation; an offer that beats the record returns True, and the
    loop then writes that network's checkpoint. A NaN accuracy (no validation image of a class...)
    counts only as the first record. Its state is part of the resume state (:meth:`state_dict`)."""

    ROLES = ("student", "teacher")

    def __init__(self) -> None:
        self.best = {role: {"accuracy": -1.0, "iteration": 0} for role in self.ROLES}

    def offer(self, role: str, accuracy: float, iteration: int) -> bool:
        if math.isnan(accuracy) and self.best[role]["accuracy"] >= 0:
            return False
        value = -0.0 if math.isnan(accuracy) else accuracy
        if value > self.best[role]["accuracy"]:
            self.best[role] = {"accuracy": value, "iteration": iteration}
            return True
        return False

    def keep_latest(self, role: str, iteration: int, accuracy: float | None = None) -> None:
        """The latest checkpoint is the one kept (no validation split, or a run that keeps its last
        checkpoint); ``accuracy`` is its validation accuracy when there is one."""
        self.best[role] = {"accuracy": accuracy, "iteration": iteration}

    def state_dict(self) -> dict[str, Any]:
        return {role: dict(record) for role, record in self.best.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = {role: dict(state[role]) for role in self.ROLES}
