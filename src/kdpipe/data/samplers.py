"""Endless, seeded, resumable index samplers: the labeled and unlabeled batches of a training step.

:class:`EndlessSampler` cuts seeded per-epoch permutations into global batches
(``batch_size * world_size``) and gives rank ``r`` every ``world_size``-th index of each, so any
epoch can be rebuilt from the seed and the ranks together draw what one process would.
:class:`LabeledUnlabeledSampler` pairs a labeled and an unlabeled sampler. The state (``epoch``,
``position``) is global, so a checkpoint written by rank 0 resumes every rank.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class EndlessSampler:
    """Endless stream of index batches over ``range(n)``; see the module docstring."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        stream: int = 0,
    ) -> None:
        if n < 1:
            raise ValueError(f"sampler needs at least one item, got n={n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.stream = int(stream)
        self.epoch = 0
        self.position = 0
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def drops_remainder(self) -> bool:
        """True when each epoch is cut into whole distinct global batches (``n >= GB``)."""
        return self.n >= self.global_batch

    def _epoch_stream(self, epoch: int) -> np.ndarray:
        """The part of epoch ``epoch``'s permutation that is used (cached for the current epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
            if self.drops_remainder:
                perm = perm[: (self.n // self.global_batch) * self.global_batch]
            self._cached = (epoch, perm.astype(np.int64))
        return self._cached[1]

    def _next_global(self) -> np.ndarray:
        parts: list[np.ndarray] = []
        need = self.global_batch
        while need > 0:
            perm = self._epoch_stream(self.epoch)
            take = perm[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(perm):
                self.epoch += 1
                self.position = 0
        return np.concatenate(parts)

    def next(self) -> np.ndarray:
        """This rank's next batch: int64 array of ``batch_size`` indices."""
        return self._next_global()[self.rank :: self.world_size]

    def __iter__(self) -> EndlessSampler:
        return self

    def __next__(self) -> np.ndarray:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "stream": self.stream,
            "n": self.n,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off. The data set size, seed and batch layout must match,
        otherwise the positions would mean different samples."""
        for key in ("seed", "stream", "n", "batch_size", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state mismatch: {key}={state[key]} in the checkpoint, {getattr(self, key)} now"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._cached = None


def unlabeled_batch_size(batch_size: int, mu: float) -> int:
    """``round(mu * batch_size)``, halves rounded up (Python's ``round`` would round 2.5 to 2)."""
    return int(math.floor(mu * batch_size + 0.5))


class LabeledUnlabeledSampler:
    """Pairs of (labeled, unlabeled) index batches from two independent endless samplers.

    ``batch_size`` labeled and ``round(mu * batch_size)`` unlabeled indices per rank per step (no
    unlabeled ones when ``mu == 0`` or the unlabeled set is empty). ``iteration`` counts the pairs
    drawn (the iteration counter saved in every checkpoint, see docs/methods.md, "Batches").
    """

    def __init__(
        self,
        n_labeled: int,
        n_unlabeled: int,
        batch_size: int,
        mu: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.labeled = EndlessSampler(n_labeled, batch_size, seed, rank, world_size, stream=0)
        self.unlabeled_size = unlabeled_batch_size(batch_size, mu) if n_unlabeled > 0 else 0
        self.unlabeled: EndlessSampler | None = None
        if self.unlabeled_size > 0:
            # stream=1: independent of the labeled stream even with the same seed
            self.unlabeled = EndlessSampler(
                n_unlabeled, self.unlabeled_size, seed, rank, world_size, stream=1
            )
        self.iteration = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        labeled = self.labeled.next()
        unlabeled = self.unlabeled.next() if self.unlabeled is not None else np.empty(0, dtype=np.int64)
        self.iteration += 1
        return labeled, unlabeled

    def __iter__(self) -> LabeledUnlabeledSampler:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "labeled": self.labeled.state_dict(),
            "unlabeled": None if self.unlabeled is None else self.unlabeled.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labeled.load_state_dict(state["labeled"])
        has_unlabeled = state.get("unlabeled") is not None
        if has_unlabeled != (self.unlabeled is not None):
            raise ValueError(
                "sampler state mismatch: unlabeled stream present in only one of checkpoint and config"
            )
        if self.unlabeled is not None:
            self.unlabeled.load_state_dict(state["unlabeled"])
        self.iteration = int(state["iteration"])
