"""Recipes: SPEC.md's training methods as lists of weighted loss terms over a set of views.

A recipe never owns a training loop (that is :mod:`kdpipe.engine`). It says

* which views of a batch the networks see (``view_plan``),
* whether the teacher is used and whether it is trained,
* whether unlabeled samples are drawn, and whether Method A's schedule drives the views,
* and its loss terms: ``(name, weight_fn, term_fn)`` triples summed into one scalar.

``term_fn(ctx)`` reads network outputs from :class:`StepOutputs`, which runs each network at most
once per step on all the views it needs (one forward per network also keeps DDP happy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import losses

RECIPES = ("supervised", "kd", "cotrain", "adaptive", "consistency", "full")


@dataclass
class StepOutputs:
    """The networks' logits for one step: ``student[k]`` / ``teacher[k]`` on view k."""

    labels: torch.Tensor  # -1 for unlabeled samples
    student: list[torch.Tensor]
    teacher: list[torch.Tensor | None]
    student_features: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None


@dataclass
class Hyper:
    """The scalars terms need: from params, plus the schedule's current ``w``."""

    tau: float = 1.0  # KD temperature (tau^2-scaled terms)
    mutual_tau: float = 1.0  # Method C's mutual term has its own: DML is not tau^2-scaled (see losses.dml)
    w: float = 1.0
    w_mutual: float = 1.0
    w_feat: float = 0.0
    a: float = 1.0
    b: float = 1.0
    c: float = 1.0
    pseudo_threshold: float = 0.0
    label_smoothing: float = 0.0


TermFn = Callable[[StepOutputs, Hyper, "torch.nn.Module | None"], torch.Tensor]
WeightFn = Callable[[Hyper], float]


@dataclass(frozen=True)
class Term:
    name: str
    weight: WeightFn
    fn: TermFn


@dataclass(frozen=True)
class Recipe:
    name: str
    # "weak": one weakly augmented view; "any": one of the stored views, weak or strong, at random
    # (consistent teaching: the teacher's cached answer is for exactly that view, so strong views
    # are as good a lesson as weak ones); "scheduled": view k at Method A's p1 (k = 0) or p2
    # (k >= 1); "stored": the K views written by the augment step (+ light jitter).
    view_plan: str
    num_views: int
    uses_unlabeled: bool
    uses_teacher: bool
    trains_teacher: bool
    uses_schedule: bool
    teacher_views: tuple[int, ...]  # views the teacher must see
    terms: tuple[Term, ...] = field(default_factory=tuple)
    # Whether a term's weight is Method A's w (adaptive); full takes only the view strength from the
    # schedule, so w is neither used nor logged there.
    weights_by_schedule: bool = False

    @property
    def reads_stored_views(self) -> bool:
        """Views come from the augment step's sets: always for Method B, and whenever the teacher is
        frozen, because then its outputs on those views are cached once instead of recomputed at
        every step (see :mod:`kdpipe.views`)."""
        return self.view_plan == "stored" or (self.uses_teacher and not self.trains_teacher)


# ------------------------------------------------------------------------------- loss terms
def _ce_student(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.masked_ce(out.student[0], out.labels, h.label_smoothing)


def _ce_teacher(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.masked_ce(out.teacher[0], out.labels)


def _mutual(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Method C: symmetric KL on ALL samples of the shared view; gradients reach both networks
    # (a frozen teacher's logits carry no graph, which turns this into SSLD-style distillation).
    return losses.dml(out.student[0], out.teacher[0], h.mutual_tau)


def _feature(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.feature_mse(out.student_features, out.teacher_features, proj)


def _kd_view1(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Method A: L_dis = KD(S(x1), T(x1)) on the view augmented with p1.
    return losses.kd(out.student[0], out.teacher[0], h.tau)


def _truth_view2(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Method A: L_truth on the view augmented with p2, teacher pseudo-labels for unlabeled samples.
    return losses.truth_loss(out.student[1], out.teacher[1], out.labels, h.pseudo_threshold)


def _gt_views(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return torch.stack([losses.masked_ce(z, out.labels) for z in out.student]).mean()


def _consistency(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.pairwise_consistency(out.student)


def _kd_all(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Plain distillation: the student matches the teacher on every sample, labeled or not.
    return losses.kd(out.student[0], out.teacher[0], h.tau)


def _kd_views(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Method B: the teacher sees the SAME augmented view as the student, view by view.
    return torch.stack([losses.kd(zs, zt, h.tau) for zs, zt in zip(out.student, out.teacher, strict=True)]).mean()


def _one(h: Hyper) -> float:
    return 1.0


def build_recipe(name: str, views: int = 3, teacher_trainable: bool = True, w_feat: float = 0.0) -> Recipe:
    """The recipe called ``name`` (``params.train.recipe``)."""
    feat = (Term("feat", lambda h: h.w_feat, _feature),) if w_feat > 0 else ()
    if name == "supervised":
        return Recipe(name, "weak", 1, False, False, False, False, (), (Term("ce", _one, _ce_student),))
    if name == "kd":
        # Plain distillation from a fixed teacher: CE on the labels + KD on labeled AND unlabeled samples.
        terms = (Term("ce", lambda h: h.a, _ce_student), Term("kd", lambda h: h.c, _kd_all))
        return Recipe(name, "any", 1, True, True, False, False, (0,), terms)
    if name == "cotrain":
        terms = (Term("ce_s", _one, _ce_student),)
        if teacher_trainable:
            terms += (Term("ce_t", _one, _ce_teacher),)
        terms += (Term("mutual", lambda h: h.w_mutual, _mutual), *feat)
        return Recipe(name, "weak", 1, True, True, teacher_trainable, False, (0,), terms)
    if name == "adaptive":
        terms = (Term("kd", lambda h: h.w, _kd_view1), Term("truth", lambda h: 1.0 - h.w, _truth_view2))
        return Recipe(name, "scheduled", 2, True, True, False, True, (0, 1), terms, weights_by_schedule=True)
    if name == "consistency":
        terms = (
            Term("gt", lambda h: h.a, _gt_views),
            Term("cons", lambda h: h.b, _consistency),
            Term("kd", lambda h: h.c, _kd_views),
        )
        return Recipe(name, "stored", views, True, True, False, False, tuple(range(views)), terms)
    if name == "full":
        # C's co-training on view 0 (shared by both networks) + B's consistency across the
        # student's K views + A's schedule on how strongly the views are augmented.
        terms = (Term("ce_s", _one, _ce_student),)
        if teacher_trainable:
            terms += (Term("ce_t", _one, _ce_teacher),)
        terms += (
            Term("mutual", lambda h: h.w_mutual, _mutual),
            Term("cons", lambda h: h.b, _consistency),
            *feat,
        )
        return Recipe(name, "scheduled", views, True, True, teacher_trainable, True, (0,), terms)
    raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")


def total_loss(recipe: Recipe, out: StepOutputs, hyper: Hyper, projection=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the recipe's weighted terms, and each term's value (unweighted) for the history."""
    total = None
    parts: dict[str, float] = {}
    for term in recipe.terms:
        weight = term.weight(hyper)
        value = term.fn(out, hyper, projection)
        parts[term.name] = float(value.detach())
        if weight:
            total = value * weight if total is None else total + value * weight
    if total is None:  # every weight is zero: keep a graph so backward() still works
        total = out.student[0].sum() * 0.0
    parts["total"] = float(total.detach())
    return total, parts
