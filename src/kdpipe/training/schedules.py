"""Adaptive augmentation schedule: two augmentation probabilities and a distillation weight, per epoch.

With E epochs, ``p2 = min(p_max, p1 + p_max / E)``, starting from ``p1 = 0`` and ``w = w_init``.
Rules: ``adaptive`` (the default: after an epoch with progress ``p1 <- p2``, otherwise
``w <- max(w_min, w - w_step)``), ``linear`` and ``fixed`` (for comparison); docs/methods.md
explains them. The state is plain JSON-able data, so it goes into checkpoints and the tracking
server as is.

Design notes: docs/training-internals.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Rule = Literal["adaptive", "linear", "fixed"]
RULES: tuple[str, ...] = ("adaptive", "linear", "fixed")


@dataclass
class ScheduleState:
    """Where the schedule stands: values for ``epoch`` (1-based) and the record of past epochs."""

    epoch: int = 1
    p1: float = 0.0
    w: float = 1.0
    last_metric: float | None = None  # m_{e-1}; None means -inf (no epoch evaluated yet)
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.p1 = float(state["p1"])
        self.w = float(state["w"])
        last = state.get("last_metric")
        self.last_metric = None if last is None else float(last)
        self.history = [dict(h) for h in state.get("history", [])]


class AugmentationSchedule:
    """The adaptive augmentation schedule's ``(p1, p2, w)`` per epoch; call :meth:`current` before and :meth:`step` after an epoch."""

    def __init__(
        self,
        rule: Rule = "adaptive",
        p_max: float = 0.8,
        total_epochs: int = 8,
        delta: float = 0.0,
        w_init: float = 1.0,
        w_min: float = 0.3,
        w_step: float = 0.1,
        p_fixed: float | None = None,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"schedule rule must be one of {RULES}, got {rule!r}")
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        if not 0.0 <= p_max <= 1.0:
            raise ValueError(f"p_max must be in [0, 1], got {p_max}")
        if w_min > w_init:
            raise ValueError(f"w_min ({w_min}) must not exceed w_init ({w_init})")
        self.rule = rule
        self.p_max = float(p_max)
        self.total_epochs = int(total_epochs)
        self.delta = float(delta)
        self.w_init = float(w_init)
        self.w_min = float(w_min)
        self.w_step = float(w_step)
        self.p_fixed = self.p_max / 2 if p_fixed is None else float(p_fixed)
        p1_start = self.p_fixed if rule == "fixed" else 0.0
        self.state = ScheduleState(epoch=1, p1=p1_start, w=self.w_init)

    @classmethod
    def from_params(cls, train_params: Any, total_epochs: int) -> AugmentationSchedule:
        """Build from :class:`kdpipe.core.params.TrainParams` (duck-typed: reads the adaptive augmentation settings)."""
        return cls(
            rule=train_params.schedule_rule,
            p_max=train_params.p_max,
            total_epochs=total_epochs,
            delta=train_params.progress_margin,
            w_init=train_params.w_init,
            w_min=train_params.w_min,
            w_step=train_params.w_step,
            p_fixed=getattr(train_params, "p_fixed", None),
        )

    @property
    def step_size(self) -> float:
        return self.p_max / self.total_epochs

    def p2(self, p1: float) -> float:
        """``p2 = min(p_max, p1 + p_max / E)``."""
        return min(self.p_max, p1 + self.step_size)

    def current(self) -> tuple[float, float, float]:
        """``(p1_e, p2_e, w_e)`` for the current epoch."""
        p1 = self.state.p1
        return p1, self.p2(p1), self.state.w

    def step(self, metric: float | None = None) -> tuple[float, float, float]:
        """Close the current epoch with its validation ``metric``; return the next ``(p1, p2, w)``.

        ``adaptive`` needs the metric; ``linear`` and ``fixed`` only record it (may be None).
        """
        if self.rule == "adaptive" and (metric is None or math.isnan(metric)):
            raise ValueError("the adaptive schedule needs the epoch's validation metric")
        s = self.state
        p1, p2, w = self.current()
        s.history.append(
            {
                "epoch": s.epoch,
                "p1": p1,
                "p2": p2,
                "w": w,
                "metric": None if metric is None else float(metric),
            }
        )
        if self.rule == "adaptive":
            assert metric is not None  # checked above; narrows the type
            last = -math.inf if s.last_metric is None else s.last_metric
            if metric > last + self.delta:
                s.p1 = p2  # still fitting: make view 1 as hard as view 2 was
            else:
                s.w = max(self.w_min, w - self.w_step)  # stalling: rely less on the teacher
        elif self.rule == "linear":
            s.p1 = p2  # p1 + p_max/E, capped at p_max: exactly p2
        if metric is not None:
            s.last_metric = float(metric)
        s.epoch += 1
        return self.current()

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
