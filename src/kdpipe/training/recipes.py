"""The training methods (docs/methods.md) as parts, and the recipes users pick, composed from them.

:mod:`kdpipe.training.losses` holds the formulas; a :class:`Term` is a formula applied to one step's
outputs, with its weight (a ``params.train`` setting's name, a constant or a function of the
settings); a :class:`Method` is one training method (its views, networks, what it trains, its
terms). :func:`compose` merges methods into a :class:`Recipe`, and :data:`RECIPE_METHODS` says which
methods make up each recipe. The loop is :mod:`kdpipe.training.engine`'s; it reads the networks'
outputs from :class:`StepOutputs`.

Design notes: docs/training-internals.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kdpipe.core.params import RECIPE_NAMES, TrainParams
from kdpipe.training import losses


@dataclass
class StepOutputs:
    """The networks' logits for one step: ``student[k]`` / ``teacher[k]`` on view k."""

    labels: torch.Tensor  # -1 for unlabeled samples
    student: list[torch.Tensor]
    teacher: list[torch.Tensor | None]
    student_features: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None


class Hyper:
    """The scalars the loss terms read: every ``params.train`` field by its name (``tau``,
    ``w_consistency``, ``pseudo_threshold``...), plus ``w`` -- the adaptive schedule's current weight
    (its state, starting at ``w_init``) -- and ``label_smoothing`` (the teacher step's). A new weight
    or temperature is a field of TrainParams and nothing more here.

    ``Hyper(w_labels=0.5)`` is the schema's defaults with ``w_labels`` changed (tests, Python API).
    """

    def __init__(self, settings=None, **overrides: float):
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


@dataclass(frozen=True)
class Term:
    """One loss term: ``weight * fn(outputs)``; logged in history.json as ``loss_<name>``.

    ``weight`` is the name of a ``params.train`` setting, a constant, or a function of the settings."""

    name: str
    fn: TermFn
    weight: str | float | Callable[[Hyper], float] = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.weight, str) and self.weight not in TrainParams.model_fields:
            raise ValueError(f"term {self.name!r}: its weight {self.weight!r} is not a params.train setting")

    def weight_value(self, hyper: Hyper) -> float:
        if isinstance(self.weight, str):
            return float(getattr(hyper, self.weight))
        if callable(self.weight):
            return self.weight(hyper)
        return float(self.weight)


# ------------------------------------------------------------------------------- loss terms
def _ce_student(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.masked_ce(out.student[0], out.labels, h.label_smoothing)


def _ce_teacher(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.masked_ce(out.teacher[0], out.labels)


def _mutual(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Co-training: symmetric KL on ALL samples of the shared view; gradients reach both networks
    # (a frozen teacher's logits carry no graph, which turns this into SSLD-style distillation).
    return losses.dml(out.student[0], out.teacher[0], h.mutual_tau)


def _feature(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.feature_mse(out.student_features, out.teacher_features, proj)


def _kd_view1(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Adaptive augmentation: distillation on the view augmented with p1.
    return losses.kd(out.student[0], out.teacher[0], h.tau)


def _truth_view2(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Adaptive augmentation: the "truth" loss on the view augmented with p2, the teacher's
    # pseudo-labels for unlabeled samples.
    return losses.truth_loss(out.student[1], out.teacher[1], out.labels, h.pseudo_threshold)


def _gt_views(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return torch.stack([losses.masked_ce(z, out.labels) for z in out.student]).mean()


def _consistency(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    return losses.pairwise_consistency(out.student)


def _kd_all(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Plain distillation: the student matches the teacher on every sample, labeled or not.
    return losses.kd(out.student[0], out.teacher[0], h.tau)


def _kd_views(out: StepOutputs, h: Hyper, proj) -> torch.Tensor:
    # Multi-view consistency: the teacher sees the SAME augmented view as the student, view by view.
    return torch.stack(
        [losses.kd(zs, zt, h.tau) for zs, zt in zip(out.student, out.teacher, strict=True)]
    ).mean()


# The terms, named as they appear in history.json (loss_<name>), each with its weight.
CE = Term("ce", _ce_student)
CE_KD = Term("ce", _ce_student, "w_kd_labels")
KD_ALL = Term("kd", _kd_all, "w_distill")
CE_STUDENT = Term("ce_s", _ce_student)
CE_TEACHER = Term("ce_t", _ce_teacher)
MUTUAL = Term("mutual", _mutual, "w_mutual")
FEATURE = Term("feat", _feature, "w_features")
KD_VIEW1 = Term("kd", _kd_view1, lambda h: h.w)
TRUTH_VIEW2 = Term("truth", _truth_view2, lambda h: 1.0 - h.w)
GT_VIEWS = Term("gt", _gt_views, "w_labels")
CONSISTENCY = Term("cons", _consistency, "w_consistency")
KD_VIEWS = Term("kd", _kd_views, "w_distill")


# ------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One training method, as what it adds to a recipe.

    ``view_plan`` (see :mod:`kdpipe.training.views`): "weak" -- one weakly augmented view; "any" -- one of
    the stored views, weak or strong, at random (the teacher's cached answer is for exactly that
    view, so a strong view is as good a lesson as a weak one); "scheduled" -- view k at the adaptive
    schedule's p1 (k = 0) or p2 (k >= 1); "stored" -- the K views written by the augment step.
    None leaves the choice to the other methods of the recipe (alone: "weak").

    ``schedule``: None, "strength" (the adaptive schedule sets how strongly views are augmented), or
    "strength+weights" (it also sets the weight ``w`` of the distillation and truth terms).
    """

    name: str
    terms: tuple[Term, ...]
    view_plan: str | None = None
    num_views: int = 1
    teacher_views: tuple[int, ...] = ()  # views the teacher must see
    uses_unlabeled: bool = False
    uses_teacher: bool = False
    trains_teacher: bool = False
    schedule: str | None = None
    # The result is the last checkpoint rather than the best on validation (keep_checkpoint: auto)
    keeps_last: bool = False


def supervised_learning() -> Method:
    """Cross-entropy on the labels; the baseline every benchmark compares with."""
    return Method("supervised learning", terms=(CE,))


def distillation() -> Method:
    """Distillation from a fixed teacher by function matching: the student matches the teacher's
    answer on the very view it sees, for labeled AND unlabeled samples alike (``kd``); a cross-entropy
    on the labels is optional (``w_kd_labels``, off by default: the labels reach the student through
    the teacher, and hard labels on a few images drawn again and again are memorised). Its result is
    the last checkpoint: a validation split picked earlier, worse ones by noise (BENCHMARKS.md)."""
    return Method(
        "distillation",
        terms=(CE_KD, KD_ALL),
        view_plan="any",
        teacher_views=(0,),
        uses_unlabeled=True,
        uses_teacher=True,
        keeps_last=True,
    )


def co_training(teacher_trainable: bool = True, feature_matching: bool = False) -> Method:
    """Co-training (``cotrain``): both networks' CE on the labels and the mutual term on every sample of one shared
    view; the teacher learns too unless frozen; optional feature matching."""
    terms = (
        CE_STUDENT,
        *((CE_TEACHER,) if teacher_trainable else ()),
        MUTUAL,
        *((FEATURE,) if feature_matching else ()),
    )
    return Method(
        "co-training",
        terms=terms,
        teacher_views=(0,),
        uses_unlabeled=True,
        uses_teacher=True,
        trains_teacher=teacher_trainable,
    )


def adaptive_augmentation() -> Method:
    """Adaptive augmentation (``adaptive``): two views augmented at the schedule's p1 and p2; distillation on the first, the
    truth loss on the second, weighted w and 1 - w by the schedule."""
    return Method(
        "adaptive augmentation",
        terms=(KD_VIEW1, TRUTH_VIEW2),
        view_plan="scheduled",
        num_views=2,
        teacher_views=(0, 1),
        uses_unlabeled=True,
        uses_teacher=True,
        schedule="strength+weights",
    )


def multi_view_consistency(views: int) -> Method:
    """Multi-view consistency (``consistency``): K stored views; CE on each, consistency between them, KD on each view from the
    teacher seeing the same view."""
    return Method(
        "multi-view consistency",
        terms=(GT_VIEWS, CONSISTENCY, KD_VIEWS),
        view_plan="stored",
        num_views=views,
        teacher_views=tuple(range(views)),
        uses_unlabeled=True,
        uses_teacher=True,
    )


def consistency_across_views(views: int) -> Method:
    """Multi-view consistency's term between views alone, on the student's K views of whatever plan the recipe uses."""
    return Method("consistency across views", terms=(CONSISTENCY,), num_views=views, uses_unlabeled=True)


def augmentation_schedule() -> Method:
    """The adaptive augmentation schedule alone: it sets how strongly the views are augmented (not any weight)."""
    return Method("augmentation schedule", terms=(), view_plan="scheduled", schedule="strength")


@dataclass(frozen=True)
class Recipe:
    """What the engine runs: the methods' needs merged (:func:`compose`) and their terms in order."""

    name: str
    view_plan: str
    num_views: int
    uses_unlabeled: bool
    uses_teacher: bool
    trains_teacher: bool
    uses_schedule: bool
    teacher_views: tuple[int, ...]
    terms: tuple[Term, ...] = field(default_factory=tuple)
    # Whether a term's weight is the schedule's w (adaptive); full takes only the view strength from
    # the schedule, so w is neither used nor logged there.
    weights_by_schedule: bool = False
    methods: tuple[str, ...] = ()
    keeps_last: bool = False  # see Method.keeps_last
    # A frozen teacher run on fresh views at every step (function matching without a finite set of
    # views) instead of its outputs cached on the augment step's stored views: the choice where the
    # teacher is cheap to run (a GPU). See :func:`teacher_runs_online`.
    teacher_online: bool = False

    @property
    def reads_stored_views(self) -> bool:
        """Views come from the augment step's sets when the teacher is frozen and not run online: its
        outputs on those views are cached once instead of recomputed at every step (see
        :mod:`kdpipe.training.views`)."""
        return self.uses_teacher and not self.trains_teacher and not self.teacher_online

    @property
    def matches_features(self) -> bool:
        """A term compares the networks' features (through a learned projection)."""
        return any(term.fn is _feature for term in self.terms)


def compose(name: str, *methods: Method) -> Recipe:
    """One recipe from methods: their terms in order, the union of what they need. Two methods that
    ask for different view plans cannot be combined (a batch has one plan)."""
    plans = {m.view_plan for m in methods if m.view_plan is not None}
    if len(plans) > 1:
        raise ValueError(f"recipe {name!r}: its methods ask for different view plans {sorted(plans)}")
    view_counts = {m.num_views for m in methods if m.num_views > 1}
    if len(view_counts) > 1:
        raise ValueError(
            f"recipe {name!r}: its methods ask for different numbers of views {sorted(view_counts)}"
        )
    return Recipe(
        name,
        view_plan=plans.pop() if plans else "weak",
        num_views=view_counts.pop() if view_counts else 1,
        uses_unlabeled=any(m.uses_unlabeled for m in methods),
        uses_teacher=any(m.uses_teacher for m in methods),
        trains_teacher=any(m.trains_teacher for m in methods),
        uses_schedule=any(m.schedule for m in methods),
        teacher_views=tuple(sorted({k for m in methods for k in m.teacher_views})),
        terms=tuple(term for m in methods for term in m.terms),
        weights_by_schedule=any(m.schedule == "strength+weights" for m in methods),
        methods=tuple(m.name for m in methods),
        keeps_last=any(m.keeps_last for m in methods),
    )


@dataclass(frozen=True)
class RecipeSettings:
    """The settings that change a recipe's make-up: ``params.train``'s views, teacher_trainable and
    whether feature matching has a weight (w_features > 0)."""

    # the defaults are the schema's (one place): a recipe built without params matches params.yaml's
    views: int = TrainParams.model_fields["views"].default
    teacher_trainable: bool = TrainParams.model_fields["teacher_trainable"].default
    feature_matching: bool = False


# The recipe table: each recipe is the methods it composes. A new recipe is a line here plus its name
# in params.RECIPE_NAMES (which validates train.recipe without importing torch).
RECIPE_METHODS: dict[str, Callable[[RecipeSettings], tuple[Method, ...]]] = {
    "supervised": lambda s: (supervised_learning(),),
    "kd": lambda s: (distillation(),),
    "cotrain": lambda s: (co_training(s.teacher_trainable, s.feature_matching),),
    "adaptive": lambda s: (adaptive_augmentation(),),
    "consistency": lambda s: (multi_view_consistency(s.views),),
    # the product's combination: co-training on view 0 (shared by both networks), the consistency
    # term across the student's K views, and the adaptive schedule on how strongly they are augmented
    "full": lambda s: (
        co_training(s.teacher_trainable, s.feature_matching),
        consistency_across_views(s.views),
        augmentation_schedule(),
    ),
}
RECIPES = tuple(RECIPE_METHODS)
if set(RECIPES) != set(RECIPE_NAMES):  # the params schema and this table name the same recipes
    raise ImportError(f"recipes: params.RECIPE_NAMES {RECIPE_NAMES} and the table {RECIPES} differ")


def build_recipe(
    name: str,
    views: int = RecipeSettings.views,  # the schema's defaults (see RecipeSettings)
    teacher_trainable: bool = RecipeSettings.teacher_trainable,
    feature_matching: bool = False,
    teacher_online: bool = False,
) -> Recipe:
    """The recipe called ``name`` (``params.train.recipe``)."""
    from dataclasses import replace

    if name not in RECIPE_METHODS:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    recipe = compose(name, *RECIPE_METHODS[name](RecipeSettings(views, teacher_trainable, feature_matching)))
    return replace(
        recipe, teacher_online=teacher_online and recipe.uses_teacher and not recipe.trains_teacher
    )


def teacher_runs_online(train_params) -> bool:
    """``train.teacher_online``: on, off, or auto -- on where training runs on CUDA. There a frozen
    teacher's forward pass costs little next to the student's step, so every step gets fresh views;
    on a CPU it costs several student steps per image, so its outputs are cached on stored views."""
    choice = train_params.teacher_online
    if choice != "auto":
        return choice == "on"
    if train_params.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def recipe_for(train_params) -> Recipe:
    """The recipe ``params.train`` asks for."""
    return build_recipe(
        train_params.recipe,
        views=train_params.views,
        teacher_trainable=train_params.teacher_trainable,
        feature_matching=train_params.w_features > 0,
        teacher_online=teacher_runs_online(train_params),
    )


def total_loss(
    recipe: Recipe, out: StepOutputs, hyper: Hyper, projection=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the recipe's weighted terms, and each term's value (unweighted) for the history, as
    detached tensors on the device: reading them on the host would wait for the step at every step."""
    total = None
    parts: dict[str, torch.Tensor] = {}
    for term in recipe.terms:
        weight = term.weight_value(hyper)
        value = term.fn(out, hyper, projection)
        parts[term.name] = value.detach()
        if weight:
            total = value * weight if total is None else total + value * weight
    if total is None:  # every weight is zero: keep a graph so backward() still works
        total = out.student[0].sum() * 0.0
    parts["total"] = total.detach()
    return total, parts
