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
from .params import RECIPE_NAMES


@dataclass
class StepOutputs:
    """The networks' logits for one step: ``student[k]`` / ``teacher[k]`` on view k."""

    labels: torch.Tensor  # -1 for unlabeled samples
    student: list[torch.Tensor]
    teacher: list[torch.Tensor | None]
    student_features: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None


class Hyper:
    """The scalars the loss terms read, by their ``params.train`` names (``tau``, ``a``, ``w_mutual``...),
    plus ``w``, Method A's current weight (the schedule's state, starting at ``w_init``), and
    ``label_smoothing`` (the teacher step's). A new weight or temperature is a field of TrainParams
    and nothing more here: ``Hyper(settings)`` exposes every field.

    ``Hyper(a=0.5)`` is the schema's defaults with ``a`` changed (for tests and the Python API).
    """

    def __init__(self, settings=None, **overrides: float):
        from .params import TrainParams

        settings = settings if settings is not None else TrainParams()
        values = {**settings.model_dump(), "w": settings.w_init, "label_smoothing": 0.0}
        unknown = set(overrides) - set(values)
        if unknown:
            raise TypeError(f"Hyper: unknown setting(s) {', '.join(sorted(unknown))}")
        self.__dict__["_values"] = {**values, **overrides}

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        if name not in self._values:
            raise AttributeError(f"Hyper has no setting {name!r}")
        self._values[name] = value


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


# The terms, named as they appear in history.json (loss_<name>), each with its weight.
CE = Term("ce", _one, _ce_student)
CE_WEIGHTED = Term("ce", lambda h: h.a, _ce_student)
KD_ALL = Term("kd", lambda h: h.c, _kd_all)
CE_STUDENT = Term("ce_s", _one, _ce_student)
CE_TEACHER = Term("ce_t", _one, _ce_teacher)
MUTUAL = Term("mutual", lambda h: h.w_mutual, _mutual)
FEATURE = Term("feat", lambda h: h.w_feat, _feature)
KD_VIEW1 = Term("kd", lambda h: h.w, _kd_view1)
TRUTH_VIEW2 = Term("truth", lambda h: 1.0 - h.w, _truth_view2)
GT_VIEWS = Term("gt", lambda h: h.a, _gt_views)
CONSISTENCY = Term("cons", lambda h: h.b, _consistency)
KD_VIEWS = Term("kd", lambda h: h.c, _kd_views)


def _co_training(teacher_trainable: bool, w_feat: float, *extra: Term) -> tuple[Term, ...]:
    """Method C's terms: both networks' CE on the labels and the mutual term on every sample, then
    ``extra`` terms, then the optional feature matching."""
    teacher_ce = (CE_TEACHER,) if teacher_trainable else ()
    feature = (FEATURE,) if w_feat > 0 else ()
    return (CE_STUDENT, *teacher_ce, MUTUAL, *extra, *feature)


def _supervised(views: int, teacher_trainable: bool, w_feat: float) -> Recipe:
    return Recipe("supervised", view_plan="weak", num_views=1, uses_unlabeled=False, uses_teacher=False,
                  trains_teacher=False, uses_schedule=False, teacher_views=(), terms=(CE,))


def _kd(views: int, teacher_trainable: bool, w_feat: float) -> Recipe:
    # Plain distillation from a fixed teacher: CE on the labels + KD on labeled AND unlabeled samples.
    return Recipe("kd", view_plan="any", num_views=1, uses_unlabeled=True, uses_teacher=True,
                  trains_teacher=False, uses_schedule=False, teacher_views=(0,), terms=(CE_WEIGHTED, KD_ALL))


def _cotrain(views: int, teacher_trainable: bool, w_feat: float) -> Recipe:
    return Recipe("cotrain", view_plan="weak", num_views=1, uses_unlabeled=True, uses_teacher=True,
                  trains_teacher=teacher_trainable, uses_schedule=False, teacher_views=(0,),
                  terms=_co_training(teacher_trainable, w_feat))


def _adaptive(views: int, teacher_trainable: bool, w_feat: float) -> Recipe:
    return Recipe("adaptive", view_plan="scheduled", num_views=2, uses_unlabeled=True, uses_teacher=True,
                  trains_teacher=False, uses_schedule=True, teacher_views=(0, 1), terms=(KD_VIEW1, TRUTH_VIEW2),
                  weights_by_schedule=True)


def _consistency(views: int, teacher_trainable: bool, w_feat: float) -> Recipe:
    return Recipe("consistency", view_plan="stored", num_views=views, uses_unlabeled=True, uses_teacher=True,
                  trains_teacher=False, uses_schedule=False, teacher_views=tuple(range(views)),
                  terms=(GT_VIEWS, CONSISTENCY, KD_VIEWS))


def _full(views: int, teacher_trainable: bool, w_feat: float) -> Recipe:
    # C's co-training on view 0 (shared by both networks) + B's consistency across the student's K
    # views + A's schedule on how strongly the views are augmented.
    return Recipe("full", view_plan="scheduled", num_views=views, uses_unlabeled=True, uses_teacher=True,
                  trains_teacher=teacher_trainable, uses_schedule=True, teacher_views=(0,),
                  terms=_co_training(teacher_trainable, w_feat, CONSISTENCY))


# The recipe table: a new recipe is one builder here plus its name in params.RECIPE_NAMES.
BUILDERS: dict[str, Callable[[int, bool, float], Recipe]] = {
    "supervised": _supervised, "kd": _kd, "cotrain": _cotrain, "adaptive": _adaptive,
    "consistency": _consistency, "full": _full,
}
RECIPES = tuple(BUILDERS)
if set(RECIPES) != set(RECIPE_NAMES):  # the params schema and this table name the same recipes
    raise ImportError(f"recipes: params.RECIPE_NAMES {RECIPE_NAMES} and the builders {RECIPES} differ")


def build_recipe(name: str, views: int = 3, teacher_trainable: bool = True, w_feat: float = 0.0) -> Recipe:
    """The recipe called ``name`` (``params.train.recipe``)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return BUILDERS[name](views, teacher_trainable, w_feat)


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
