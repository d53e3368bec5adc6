"""When training stops early: patience and a target, on the student's validation accuracy.

Both follow the student, the model the user asked for: a strong (pretrained) teacher would otherwise
meet the target, or stop improving, before the student has learned anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class EarlyStop:
    patience: int  # evaluations without improvement before stopping; 0 = never
    target: float  # stop once the metric reaches it (above 1.0 = never)
    best: float = -1.0
    evals_without_improvement: int = 0
    reason: str | None = None  # why training stops; None while it goes on

    def update(self, metric: float) -> None:
        """Take one evaluation's metric; sets :attr:`reason` when training should stop."""
        if math.isnan(metric):
            return
        if metric > self.best:
            self.best, self.evals_without_improvement = metric, 0
        else:
            self.evals_without_improvement += 1
        if metric >= self.target:
            self.reason = f"target_metric {self.target} reached ({metric:.4f})"
        elif self.patience and self.evals_without_improvement >= self.patience:
            self.reason = f"no improvement in {self.patience} evaluations"

    # the resume state: everything above except the settings, which come from the params
    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.reason = state["reason"]
