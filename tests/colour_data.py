"""Shared test helpers: a tiny 3-class colour data set and a training-free probe model.

Imported by the select/export/evaluate/predict tests (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdpipe.training.models import build_model

COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def write_images(
    root: Path,
    split: str,
    counts: dict[str, int],
    seed: int,
    max_side: int = 24,
    noise: float = 40,
    mixed_formats: bool = False,
) -> None:
    """Noisy solid-colour images of random, non-square sizes under ``root/split/<colour>/``."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        for k in range(n):
            h, w = rng.integers(12, max_side, size=2)
            px = np.clip(np.array(COLOURS[name]) + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
            suffix = "jpg" if mixed_formats and k % 2 else "png"
            path = root / split / name / f"{name}_{k:03d}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px).save(path)


def probe_model(data, seed: int = 0):
    """cnn_tiny with a least-squares head on its random features: varied, class-related
    predictions (a random head tends to answer one class for everything) without training."""
    torch.manual_seed(seed)
    model = build_model("cnn_tiny", data.num_classes, data.image_size).eval()
    with torch.no_grad():
        x = torch.from_numpy(np.array(data.train_x)).permute(0, 3, 1, 2).float() / 255.0
        feats = torch.cat([model.features(x), torch.ones(len(x), 1)], dim=1)
        target = torch.eye(data.num_classes)[torch.from_numpy(np.array(data.train_y))]
        w = torch.linalg.lstsq(feats, target).solution
        model.head.weight.copy_(w[:-1].T)
        model.head.bias.copy_(w[-1])
    return model
