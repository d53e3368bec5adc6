"""Optimizers and learning-rate schedules for the training loop (student, co-trained teacher, fine-tuning)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def warmup_cosine(total: int, warmup_fraction: float):
    """LR factor per iteration: linear warm-up, then cosine decay to zero at ``total``."""
    warmup = max(1, int(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _decay_groups(params, weight_decay: float, lr: float, role: str) -> list[dict[str, Any]]:
    """Weights decay; norm scales and biases (1-d tensors) do not."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr": lr, "role": role},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr, "role": role},
    ]


def sgd(params: list[nn.Parameter] | Any, cfg, backbone: list[nn.Parameter] | None = None) -> torch.optim.SGD:
    """SGD with Nesterov momentum; no weight decay on BN weights and biases (1-d tensors).

    ``cfg`` is a :class:`kdpipe.training.engine.LoopConfig`. ``backbone`` (a subset of ``params``) learns at
    ``lr * cfg.backbone_lr_scale``: the usual way to fine-tune a pretrained network without undoing
    what it learned, while its new head learns fast."""
    params = list(params)
    in_backbone = {id(p) for p in backbone or []}
    rest = [p for p in params if id(p) not in in_backbone]
    groups = _decay_groups(rest, cfg.weight_decay, cfg.lr, "head")
    if backbone:
        groups += _decay_groups(backbone, cfg.weight_decay, cfg.lr * cfg.backbone_lr_scale, "backbone")
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine decay over ``cfg.max_iterations``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.max_iterations, cfg.warmup_fraction)
    )
