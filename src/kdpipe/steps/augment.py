"""The ``augment`` step: write the augmentation sets (SPEC Method B) and a preview sheet.

For every training sample (labeled train split and unlabeled pool) it stores K views made with
``Aug(x; augment.p)`` (weak ops always, the strong policy with probability p), seeded, as packed
uint8 arrays the trainer memory-maps:

    labeled_views.npy    (N_train, K, S, S, 3)
    unlabeled_views.npy  (N_unlabeled, K, S, S, 3)
    policy.json          the resolved policy (every knob, the op table, the seed)
    preview.png          original + its K views for a few samples (a contact sheet)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_dir, write_json
from ..data import file_sha256, load_prepared
from ..layout import AUGMENTED, PREPARED
from ..progress import Progress

CHUNK = 1024  # images augmented per call: bounded memory for large pools


def _views_for(images: np.ndarray, views: int, p: float, cfg, gen, desc: str) -> np.ndarray:
    import torch

    from ..augmentation import augment

    out = np.empty((len(images), views, *images.shape[1:]), dtype=np.uint8)
    bar = Progress(len(images), desc)
    for start in range(0, len(images), CHUNK):
        chunk = torch.from_numpy(np.array(images[start:start + CHUNK])).permute(0, 3, 1, 2)
        for k in range(views):
            view = augment(chunk, gen, p, cfg)
            out[start:start + len(chunk), k] = (view.mul(255).round().clamp(0, 255).to(torch.uint8)
                                                .permute(0, 2, 3, 1).numpy())
        bar.update(len(chunk))
    bar.close()
    return out


def contact_sheet(originals: np.ndarray, views: np.ndarray, path: Path, scale: int = 3) -> None:
    """One row per sample: the original, then its K views, with a 2-pixel white gutter."""
    from PIL import Image

    n, k = views.shape[:2]
    size = originals.shape[1]
    cell = size * scale + 2
    sheet = Image.new("RGB", (cell * (k + 1), max(1, cell * n)), "white")
    for row in range(n):
        for col, image in enumerate([originals[row], *views[row]]):
            tile = Image.fromarray(image).resize((size * scale, size * scale), Image.Resampling.NEAREST)
            sheet.paste(tile, (col * cell + 1, row * cell + 1))
    sheet.save(path, format="PNG")


def run(params, prepared_dir: str | os.PathLike = PREPARED, out_dir: str | os.PathLike = AUGMENTED) -> dict:
    from ..augmentation import OPS, AugmentConfig, make_generator

    cfg_params = params.augment
    data = load_prepared(prepared_dir)
    cfg = AugmentConfig.from_params(cfg_params)
    gen = make_generator(cfg_params.seed)
    unlabeled = data.unlabeled_x
    if cfg_params.max_unlabeled:
        unlabeled = unlabeled[: cfg_params.max_unlabeled]
    with atomic_dir(out_dir) as tmp:
        labeled_views = _views_for(data.train_x, cfg_params.views, cfg_params.p, cfg, gen, "augment labeled")
        unlabeled_views = _views_for(unlabeled, cfg_params.views, cfg_params.p, cfg, gen, "augment unlabeled")
        np.save(tmp / "labeled_views.npy", labeled_views)
        np.save(tmp / "unlabeled_views.npy", unlabeled_views)
        shown = min(cfg_params.preview_samples, len(labeled_views))
        if shown:
            contact_sheet(np.asarray(data.train_x[:shown]), labeled_views[:shown], tmp / "preview.png")
        policy = {
            **cfg_params.model_dump(),
            "ops": list(OPS),
            "weak": {"pad": cfg.pad, "flip": cfg.flip, "crop": "random crop with reflect padding"},
            "strong": {"num_ops": cfg.num_ops, "magnitude": cfg.magnitude, "erase_prob": cfg.erase_prob,
                       "applied_with_probability": cfg_params.p},
            "counts": {"labeled": len(labeled_views), "unlabeled": len(unlabeled_views)},
            "data_version": data.manifest["data_version"],
            "files": {name: file_sha256(tmp / name) for name in ("labeled_views.npy", "unlabeled_views.npy")},
        }
        write_json(tmp / "policy.json", policy)
    print(f"augment: {len(labeled_views)} labeled and {len(unlabeled_views)} unlabeled samples x "
          f"{cfg_params.views} views -> {out_dir}")
    return policy


def load_views(augmented_dir: str | os.PathLike, verify: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Memory-map the stored views; with ``verify`` their hashes must match policy.json."""
    from ..atomic import read_json
    from ..errors import IntegrityError, KdpipeError

    root = Path(augmented_dir)
    if not (root / "policy.json").is_file():
        raise KdpipeError(f"{root}: no augmentation sets here (run `kdpipe augment` first)")
    policy = read_json(root / "policy.json")
    arrays = []
    for name in ("labeled_views.npy", "unlabeled_views.npy"):
        path = root / name
        if not path.is_file() or name not in policy.get("files", {}):
            raise IntegrityError(f"{path}: missing, or not listed in policy.json (re-run `kdpipe augment`)")
        if verify and file_sha256(path) != policy["files"][name]:
            raise IntegrityError(f"{path}: content does not match the hash in policy.json (re-run `kdpipe augment`)")
        arrays.append(np.load(path, mmap_mode="r"))
    return arrays[0], arrays[1], policy
