"""The augment step's output format and its reader: K stored views per image (and the teacher's
logits on them), memory-mapped, checked against the hashes in ``policy.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIEW_FILES = ("labeled_views.npy", "unlabeled_views.npy")
LOGIT_FILES = ("labeled_logits.npy", "unlabeled_logits.npy")
# augment settings that change only the preview, not the stored views (left out of policy.json)
PRESENTATION_ONLY = frozenset({"preview_samples"})


@dataclass
class StoredSets:
    """What :func:`load_views` returns: memory-mapped arrays and the policy."""

    labeled_views: np.ndarray
    unlabeled_views: np.ndarray
    view_kinds: list[str]
    labeled_logits: np.ndarray | None
    unlabeled_logits: np.ndarray | None
    policy: dict


def load_views(
    augmented_dir: str | os.PathLike, verify: bool | None = None, expected_data_version: str | None = None
) -> StoredSets:
    """Memory-map the stored views (and logits). Their hashes must match policy.json (``verify``: as
    in :func:`kdpipe.data.prepared.load_prepared`), and with ``expected_data_version`` they must have been
    made from that prepared data set."""
    from kdpipe.core.atomic import read_json
    from kdpipe.core.errors import IntegrityError, KdpipeError
    from kdpipe.data.integrity import first_mismatch

    root = Path(augmented_dir)
    if not (root / "policy.json").is_file():
        raise KdpipeError(f"{root}: no augmentation sets here (run `kdpipe augment` first)")
    policy = read_json(root / "policy.json")
    if policy.get("skipped_for_recipe"):
        raise KdpipeError(
            f"{root}: no views stored here: the augment step ran for recipe "
            f"'{policy['skipped_for_recipe']}', which builds its views during training; run "
            "`kdpipe augment` with the recipe you train (train.recipe)"
        )
    if expected_data_version is not None and policy.get("data_version") != expected_data_version:
        raise IntegrityError(
            f"{root}: these views were made from another prepared data set "
            f"(data version {str(policy.get('data_version'))[:12]}, expected "
            f"{expected_data_version[:12]}); re-run `kdpipe augment`"
        )
    listed = policy.get("files", {})
    present = [name for name in VIEW_FILES + LOGIT_FILES if name in VIEW_FILES or name in listed]
    for name in present:  # logits are absent when the views were made without a teacher
        if not (root / name).is_file() or name not in listed:
            raise IntegrityError(
                f"{root / name}: missing, or not listed in policy.json (re-run `kdpipe augment`)"
            )
    changed = first_mismatch(root, listed, present, full=verify)
    if changed is not None:
        raise IntegrityError(
            f"{root / changed}: content does not match the hash in policy.json (re-run `kdpipe augment`)"
        )
    arrays = {
        name: np.load(root / name, mmap_mode="r") if name in present else None
        for name in VIEW_FILES + LOGIT_FILES
    }
    kinds = policy.get("view_kinds") or ["strong"] * arrays[VIEW_FILES[0]].shape[1]
    return StoredSets(
        arrays[VIEW_FILES[0]],
        arrays[VIEW_FILES[1]],
        list(kinds),
        arrays[LOGIT_FILES[0]],
        arrays[LOGIT_FILES[1]],
        policy,
    )
