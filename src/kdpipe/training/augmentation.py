"""Batched, on-device image augmentation with per-sample randomness.

Every function takes an ``(N, C, H, W)`` batch (uint8, or float in [0, 1]) and an explicit
``torch.Generator`` on the batch's device, and returns float32 in [0, 1]; the same seed and input
give the same output (per device type). :func:`weak` crops and flips; :func:`strong` is
RandAugment-style (``num_ops`` ops from :data:`OPS`, then random erasing); :func:`augment` applies
``weak``, then ``strong`` with probability ``p`` per sample (adaptive augmentation's ``Aug(x; p)``).
It runs "grouped" on a CPU and "masked" on an accelerator (:func:`groups_on_host`).

Design notes: docs/training-internals.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

COLOR_OPS = ("brightness", "contrast", "saturation", "sharpness", "posterize", "solarize", "autocontrast")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS: tuple[str, ...] = ("identity", *COLOR_OPS, *GEOMETRIC_OPS)

# Strength of each op at magnitude 1.0 (magnitude scales linearly from 0 = no change).
MAX_FACTOR = 0.9  # brightness/contrast/saturation/sharpness: factor 1 +- 0.9 * m
MAX_POSTERIZE_BITS_REMOVED = 4  # 8 bits -> 4 bits
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # fraction of the image side
FILL = 0.5  # grey for pixels a geometric op brings in from outside the image


@dataclass(frozen=True)
class AugmentConfig:
    pad: int = 4
    flip: bool = True
    num_ops: int = 2
    magnitude: float = 0.5
    erase_prob: float = 0.5
    ops: tuple[str, ...] = OPS  # the strong policy's op table
    # Share of a recipe's views that get the strong policy where no schedule decides (augment.p): the
    # augment step stores that share of strong views, and views made during training draw it per sample.
    strong_share: float = 0.5

    @classmethod
    def from_params(cls, augment_params: Any) -> AugmentConfig:
        """From :class:`kdpipe.core.params.AugmentParams` (duck-typed)."""
        return cls(
            pad=augment_params.pad,
            flip=augment_params.flip,
            num_ops=augment_params.num_ops,
            magnitude=augment_params.magnitude,
            erase_prob=augment_params.erase_prob,
            strong_share=augment_params.p,
        )


def groups_on_host(device: torch.device) -> bool:
    """The grouped way on a CPU, the masked way elsewhere (see the module docstring)."""
    return device.type == "cpu"


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``; pass it to the functions below."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; floats are cast to float32 (a copy, the input is never modified)."""
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    return x.to(torch.float32, copy=True)


def _rand(gen: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    """Shape ``(N,)`` -> ``(N, 1, 1, 1)`` to broadcast over an image batch."""
    return v.view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------- weak


def weak(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Weak policy: random crop with reflect padding (offset per sample), then (if ``flip``) a
    horizontal flip of each sample with probability 0.5.

    Crop and flip are one ``gather`` with per-sample pixel indices (a flipped sample just reads its
    columns backwards), done before the float conversion so it moves uint8 bytes when it can.
    """
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if pad <= 0 and not flip:
        return to_float(x)
    n, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        # reflect needs pad < side; fall back to replicate for tiny images
        mode = "reflect" if pad < h and pad < w else "replicate"
        src = F.pad(x if x.dtype == torch.uint8 else x.float(), (pad, pad, pad, pad), mode=mode)
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen, device=dev)
    else:
        src = x
        offsets = torch.zeros(2, n, dtype=torch.long, device=dev)
    cols = torch.arange(w, device=dev).view(1, w).expand(n, w)
    if flip:
        flipped = _rand(gen, n, dev) < 0.5
        cols = torch.where(flipped.view(n, 1), cols.flip(1), cols)
    rows = offsets[0].view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (N, H)
    cols = offsets[1].view(n, 1) + cols  # (N, W)
    wp = src.shape[3]
    flat = (rows.view(n, h, 1) * wp + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
    out = src.reshape(n, c, -1).gather(2, flat).view(n, c, h, w)
    # the gather made a fresh tensor, so no further copy is needed for float input
    return out.to(torch.float32) / 255.0 if out.dtype == torch.uint8 else out.to(torch.float32)


# --------------------------------------------------------------------------------- colour ops


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)`` (ITU-R 601 weights); a 1-channel image is its own luma."""
    if x.shape[1] == 3:
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        return 0.299 * r + 0.587 * g + 0.114 * b
    return x.mean(dim=1, keepdim=True)


def _blend(x: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``base + factor * (x - base)``: factor 1 = unchanged, 0 = base, > 1 = exaggerated."""
    return (base + _per_sample(factor) * (x - base)).clamp(0.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 smoothing kernel PIL's sharpness uses ([1 1 1; 1 5 1; 1 1 1] / 13).

    As (3x3 box sum + 4 * centre) / 13: avg_pool2d is much faster on CPU than a depthwise conv.
    """
    box = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1) * 9.0
    return (box + 4.0 * x) / 13.0


def _color_op(name: str, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Apply colour op ``name`` to the whole batch; ``level`` in [-1, 1] per sample (sign * magnitude)."""
    factor = 1.0 + MAX_FACTOR * level
    if name == "brightness":
        return _blend(x, torch.zeros_like(x[:, :1]), factor)
    if name == "contrast":
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if name == "saturation":
        return _blend(x, _gray(x), factor)
    if name == "sharpness":
        return _blend(x, _blur(x), factor)
    strength = level.abs()  # the remaining ops have no direction
    if name == "posterize":
        bits_removed = torch.round(MAX_POSTERIZE_BITS_REMOVED * strength)
        step = _per_sample(2.0**bits_removed)
        return torch.floor(torch.round(x * 255.0) / step) * step / 255.0
    if name == "solarize":
        threshold = _per_sample(1.0 - strength)  # strength 0 -> threshold 1 -> nothing inverted
        return torch.where(x > threshold, 1.0 - x, x)
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        span = hi - lo
        stretched = (x - lo) / span.clamp(min=1e-6)
        return torch.where(span > 1e-6, stretched, x)
    raise ValueError(f"unknown colour op {name!r}")


# ------------------------------------------------------------------------------ geometric ops


def _op_matrix(name: str, level: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 matrix in ``affine_grid`` coordinates (output -> input, range [-1, 1])."""
    n = level.shape[0]
    m = torch.eye(3, dtype=level.dtype, device=level.device).repeat(n, 1, 1)
    if name == "rotate":
        a = level * math.radians(MAX_ROTATE_DEG)
        cos, sin = torch.cos(a), torch.sin(a)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    elif name == "shear_x":
        m[:, 0, 1] = level * MAX_SHEAR
    elif name == "shear_y":
        m[:, 1, 0] = level * MAX_SHEAR
    elif name == "translate_x":
        m[:, 0, 2] = level * MAX_TRANSLATE * 2.0  # the grid spans 2 units per image side
    elif name == "translate_y":
        m[:, 1, 2] = level * MAX_TRANSLATE * 2.0
    else:
        raise ValueError(f"unknown geometric op {name!r}")
    return m


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One ``grid_sample`` for the batch with per-sample matrices (``(N, 3, 3)``)."""
    grid = F.affine_grid(theta[:, :2, :], list(x.shape), align_corners=False)
    # sampling (x - FILL) with zero padding and adding FILL back = padding with the FILL grey
    return F.grid_sample(x - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + FILL


# ---------------------------------------------------------------------------------- erasing


def random_erase(x: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """Random erasing: with probability ``prob`` per sample, fill one rectangle (2-33 % of the
    image area, aspect ratio 0.3-3.3, log-uniform) with a random colour."""
    n, c, h, w = x.shape
    dev = x.device
    apply = _rand(gen, n, dev) < prob
    area = (0.02 + (0.33 - 0.02) * _rand(gen, n, dev)) * (h * w)
    log_r = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * _rand(gen, n, dev)
    ratio = torch.exp(log_r)
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    top = torch.floor(_rand(gen, n, dev) * (h - eh + 1))
    left = torch.floor(_rand(gen, n, dev) * (w - ew + 1))
    colour = torch.rand(n, c, 1, 1, generator=gen, device=dev)
    ys = torch.arange(h, device=dev, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=x.dtype).view(1, 1, w)
    inside = (
        (ys >= top.view(n, 1, 1))
        & (ys < (top + eh).view(n, 1, 1))
        & (xs >= left.view(n, 1, 1))
        & (xs < (left + ew).view(n, 1, 1))
    )
    mask = (inside & apply.view(n, 1, 1)).unsqueeze(1)  # (N, 1, H, W)
    return torch.where(mask, colour.expand_as(x), x)


# ----------------------------------------------------------------------------------- strong


def strong(
    x: torch.Tensor,
    gen: torch.Generator,
    num_ops: int = 2,
    magnitude: float = 0.5,
    erase_prob: float = 0.5,
    ops: Sequence[str] = OPS,
    grouped: bool | None = None,
) -> torch.Tensor:
    """RandAugment-style strong policy on every sample, then random erasing.

    Each of the ``num_ops`` rounds draws, per sample, one op uniformly from ``ops`` and a sign; the
    op's strength is ``sign * magnitude`` (see the ``MAX_*`` constants; autocontrast has none).
    Colour ops run in round order; the geometric ops of all rounds are composed into one matrix per
    sample and applied once at the end (one interpolation instead of several keeps the image sharp,
    and it is one kernel call). Geometry is in normalised coordinates, i.e. meant for square images.
    ``grouped``: the way to run the ops (see the module docstring); None chooses by device.
    """
    unknown = [name for name in ops if name not in OPS]
    if unknown or not ops:
        raise ValueError(f"unknown augmentation ops {unknown}; choose from {OPS}")
    x = to_float(x)
    n, dev = x.shape[0], x.device
    # Every round's draws come first, in the order the rounds make them (op, then sign, round by
    # round). Nothing else reads the generator before random erasing, and the ops never depend on
    # the image data, so this is the same random stream as drawing round by round.
    rounds = []
    for _ in range(num_ops):
        op = torch.randint(0, len(ops), (n,), generator=gen, device=dev)
        sign = torch.where(_rand(gen, n, dev) < 0.5, -1.0, 1.0)
        rounds.append((op, sign * float(magnitude)))
    # The geometric ops of all rounds only compose a matrix per sample (applied once, below), so they
    # need nothing from the host either.
    theta = torch.eye(3, device=dev).repeat(n, 1, 1)
    has_geometric = torch.zeros(n, dtype=torch.bool, device=dev)
    for op, level in rounds:
        for k, name in enumerate(ops):
            if name in GEOMETRIC_OPS:
                chosen = op == k
                theta = torch.where(chosen.view(n, 1, 1), theta @ _op_matrix(name, level), theta)
                has_geometric |= chosen
    if rounds:
        apply = _apply_grouped if (groups_on_host(dev) if grouped is None else grouped) else _apply_masked
        x = apply(x, rounds, ops, theta, has_geometric)
    if erase_prob > 0:
        x = random_erase(x, gen, erase_prob)
    return x.clamp(0.0, 1.0)


def _apply_grouped(
    x: torch.Tensor, rounds, ops: Sequence[str], theta: torch.Tensor, has_geometric: torch.Tensor
) -> torch.Tensor:
    """Each colour op on the samples that drew it, then the warp on the samples with a geometric op."""
    n, dev = x.shape[0], x.device
    # The one host synchronisation: how many samples drew each op in each round, and how many are
    # warped, read in a single .tolist() (each colour op runs on a subset of that size). Counted
    # with a comparison, not torch.bincount, which synchronises by itself on CUDA.
    op_ids = torch.arange(len(ops), device=dev)
    counts = [(op.view(n, 1) == op_ids).sum(dim=0) for op, _ in rounds]
    sizes = torch.cat([*counts, has_geometric.sum().view(1)]).tolist()
    for r, (op, level) in enumerate(rounds):
        # samples grouped by op: group k is order[start : start + count of op k]
        order = torch.argsort(op, stable=True)
        start = 0
        for k, name in enumerate(ops):
            count = sizes[r * len(ops) + k]
            if name in COLOR_OPS and count:
                idx = order[start : start + count]
                x.index_copy_(0, idx, _color_op(name, x.index_select(0, idx), level.index_select(0, idx)))
            start += count
    if sizes[-1]:  # some sample drew a geometric op
        # the warped samples in ascending order (what has_geometric.nonzero() gives, without its
        # synchronisation): a stable sort puts the samples with key 0 (geometric) first
        idx = torch.argsort(has_geometric.logical_not().to(torch.uint8), stable=True)[: sizes[-1]]
        x.index_copy_(0, idx, _warp(x.index_select(0, idx), theta.index_select(0, idx)))
    return x


def _apply_masked(
    x: torch.Tensor, rounds, ops: Sequence[str], theta: torch.Tensor, has_geometric: torch.Tensor
) -> torch.Tensor:
    """Each colour op and the warp on the whole batch, kept where drawn: no host synchronisation."""
    n = x.shape[0]
    for op, level in rounds:
        for k, name in enumerate(ops):
            if name in COLOR_OPS:
                x = torch.where((op == k).view(n, 1, 1, 1), _color_op(name, x, level), x)
    # an identity matrix would not quite give the image back (bilinear sampling of a computed grid)
    return torch.where(has_geometric.view(n, 1, 1, 1), _warp(x, theta), x)


def augment(
    x: torch.Tensor, gen: torch.Generator, p: float, cfg: AugmentConfig, grouped: bool | None = None
) -> torch.Tensor:
    """``Aug(x; p)``: weak ops on every sample, then the strong policy on each sample with probability ``p``.

    With ``p == 0`` the strong policy is skipped entirely (no random numbers drawn for it). Grouped
    (see the module docstring; None chooses by device), it runs only on the selected samples;
    masked, on every sample, kept for the selected ones.
    """
    x = weak(x, gen, pad=cfg.pad, flip=cfg.flip)
    if p <= 0:
        return x
    grouped = groups_on_host(x.device) if grouped is None else grouped

    def strong_on(v: torch.Tensor) -> torch.Tensor:
        return strong(
            v,
            gen,
            num_ops=cfg.num_ops,
            magnitude=cfg.magnitude,
            erase_prob=cfg.erase_prob,
            ops=cfg.ops,
            grouped=grouped,
        )

    selected = _rand(gen, x.shape[0], x.device) < p
    if p >= 1:
        # rand() < 1 always: every sample is selected, so skip reading the selection back (a host
        # synchronisation); the draw above still happens, to keep the random stream unchanged
        return strong_on(x)
    if not grouped:
        return torch.where(selected.view(-1, 1, 1, 1), strong_on(x), x)
    # the subset's size sets how many random numbers strong() draws, so it must reach the host
    idx = selected.nonzero().squeeze(1)
    if len(idx) == 0:
        return x
    return x.index_copy_(0, idx, strong_on(x.index_select(0, idx)))
