"""Recipes at the loss level: which terms each method sums, with which weights, and where gradients go."""

from __future__ import annotations

import pytest
import torch

from kdpipe.training import losses
from kdpipe.training.recipes import RECIPES, Hyper, StepOutputs, build_recipe, total_loss

N, C = 6, 3
LABELS = torch.tensor([0, 1, 2, -1, -1, -1])


def _logits(seed: int, requires_grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, C, generator=g) * 2).requires_grad_(requires_grad)


def _outputs(recipe, student, teacher=None) -> StepOutputs:
    k = recipe.num_views
    teacher = teacher if teacher is not None else [None] * k
    return StepOutputs(labels=LABELS, student=student, teacher=teacher)


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _parts_close(parts: dict[str, float], expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert parts[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


# ------------------------------------------------------------------------------ recipe structure
def test_recipe_flags_follow_spec():
    sup = build_recipe("supervised")
    assert (sup.uses_teacher, sup.trains_teacher, sup.uses_unlabeled, sup.uses_schedule) == (
        False,
        False,
        False,
        False,
    )
    assert [t.name for t in sup.terms] == ["ce"]

    cot = build_recipe("cotrain")
    assert cot.uses_teacher and cot.trains_teacher and cot.uses_unlabeled and not cot.uses_schedule
    assert [t.name for t in cot.terms] == ["ce_s", "ce_t", "mutual"]
    frozen = build_recipe("cotrain", teacher_trainable=False)
    assert not frozen.trains_teacher and [t.name for t in frozen.terms] == ["ce_s", "mutual"]

    ada = build_recipe("adaptive")
    assert ada.uses_teacher and not ada.trains_teacher and ada.uses_schedule and ada.num_views == 2
    assert ada.view_plan == "scheduled" and ada.teacher_views == (0, 1)
    assert [t.name for t in ada.terms] == ["kd", "truth"]

    con = build_recipe("consistency", views=3)
    assert con.uses_teacher and not con.trains_teacher and con.view_plan == "stored" and con.num_views == 3
    assert con.teacher_views == (0, 1, 2)  # the teacher sees the SAME views as the student
    assert [t.name for t in con.terms] == ["gt", "cons", "kd"]

    full = build_recipe("full", views=2)
    assert full.uses_teacher and full.trains_teacher and full.uses_unlabeled and full.uses_schedule
    assert [t.name for t in full.terms] == ["ce_s", "ce_t", "mutual", "cons"]

    kd = build_recipe("kd")
    assert kd.uses_teacher and not kd.trains_teacher and kd.uses_unlabeled and kd.view_plan == "any"
    assert [t.name for t in kd.terms] == ["ce", "kd"]

    # a frozen teacher means stored views (its logits are cached on them); a trained one, online views
    assert {r: build_recipe(r).reads_stored_views for r in RECIPES} == {
        "supervised": False,
        "kd": True,
        "cotrain": False,
        "adaptive": True,
        "consistency": True,
        "full": False,
    }
    assert frozen.reads_stored_views

    assert [t.name for t in build_recipe("cotrain", feature_matching=True).terms][-1] == "feat"
    assert set(RECIPES) == {"supervised", "kd", "cotrain", "adaptive", "consistency", "full"}
    # which recipes use a teacher, train it, and follow the adaptive schedule (the engine acts on these)
    flags = {
        r: (build_recipe(r).uses_teacher, build_recipe(r).trains_teacher, build_recipe(r).uses_schedule)
        for r in RECIPES
    }
    assert flags == {
        "supervised": (False, False, False),
        "kd": (True, False, False),
        "cotrain": (True, True, False),
        "adaptive": (True, False, True),
        "consistency": (True, False, False),
        "full": (True, True, True),
    }


def test_unknown_recipe_is_rejected():
    with pytest.raises(ValueError, match="unknown recipe"):
        build_recipe("mixup")


# ------------------------------------------------------------------------------ multi-view consistency
@pytest.mark.parametrize("name", ["consistency", "full"])
def test_consistency_term_is_zero_for_identical_views(name):
    recipe = build_recipe(name, views=3)
    z = _logits(0)
    teacher = [_logits(9, requires_grad=False)] * 3
    _, parts = total_loss(recipe, _outputs(recipe, [z, z.clone(), z.clone()], teacher), Hyper())
    assert parts["cons"] == 0.0


@pytest.mark.parametrize("name", ["consistency", "full"])
def test_consistency_term_is_positive_for_different_views(name):
    recipe = build_recipe(name, views=3)
    student = [_logits(0), _logits(1), _logits(2)]
    teacher = [_logits(9, requires_grad=False)] * 3
    _, parts = total_loss(recipe, _outputs(recipe, student, teacher), Hyper())
    assert parts["cons"] > 0.0
    assert parts["cons"] == pytest.approx(_f(losses.pairwise_consistency(student)))


def test_consistency_recipe_combines_its_three_constraints():
    recipe = build_recipe("consistency", views=3)
    student = [_logits(0), _logits(1), _logits(2)]
    teacher = [
        _logits(10, requires_grad=True),
        _logits(11, requires_grad=True),
        _logits(12, requires_grad=True),
    ]
    h = Hyper(w_labels=0.5, w_consistency=2.0, w_distill=3.0, tau=2.0)
    total, parts = total_loss(recipe, _outputs(recipe, student, teacher), h)

    gt = torch.stack([losses.masked_ce(z, LABELS) for z in student]).mean()
    cons = losses.pairwise_consistency(student)
    kd = torch.stack([losses.kd(s, t, 2.0) for s, t in zip(student, teacher, strict=True)]).mean()
    _parts_close(parts, {"gt": _f(gt), "cons": _f(cons), "kd": _f(kd)})
    assert _f(total) == pytest.approx(0.5 * _f(gt) + 2.0 * _f(cons) + 3.0 * _f(kd), rel=1e-5)

    total.backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in student)  # no stop-gradient on views
    assert all(t.grad is None for t in teacher)  # the frozen teacher gets nothing


def test_kd_term_compares_student_and_teacher_on_the_same_view():
    """The consistency method's second constraint: zero when the teacher agrees with the student view by view."""
    recipe = build_recipe("consistency", views=2)
    student = [_logits(0), _logits(1)]
    same = [z.detach().clone() for z in student]
    _, parts = total_loss(recipe, _outputs(recipe, student, same), Hyper())
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6)
    swapped = [same[1], same[0]]  # right outputs, wrong views
    _, parts = total_loss(recipe, _outputs(recipe, student, swapped), Hyper())
    assert parts["kd"] > 1e-3


# ------------------------------------------------------------------------------ adaptive augmentation
@pytest.mark.parametrize("w", [1.0, 0.7, 0.3])
def test_adaptive_loss_is_w_weighted_mix_of_distillation_and_truth(w):
    recipe = build_recipe("adaptive")
    student = [_logits(0), _logits(1)]
    teacher = [_logits(5, requires_grad=False), _logits(6, requires_grad=False)]
    total, parts = total_loss(recipe, _outputs(recipe, student, teacher), Hyper(w=w, tau=2.0))
    kd = _f(losses.kd(student[0], teacher[0], 2.0))  # L_dis on view 1
    truth = _f(losses.truth_loss(student[1], teacher[1], LABELS))  # L_truth on view 2
    _parts_close(parts, {"kd": kd, "truth": truth})
    assert _f(total) == pytest.approx(w * kd + (1 - w) * truth, rel=1e-5)
    total.backward()
    # view 1 only feeds the distillation term, so with w = 1 it is the only view that learns
    assert student[0].grad.abs().sum() > 0
    assert (student[1].grad is None or float(student[1].grad.abs().sum()) == 0.0) == (w == 1.0)


# ------------------------------------------------------------------------------ co-training
def test_cotrain_loss_sends_gradients_into_both_networks():
    recipe = build_recipe("cotrain")
    zs, zt = _logits(0), _logits(1)
    total, parts = total_loss(recipe, _outputs(recipe, [zs], [zt]), Hyper(w_mutual=2.0))
    ce_s, ce_t = _f(losses.masked_ce(zs, LABELS)), _f(losses.masked_ce(zt, LABELS))
    mutual = _f(losses.dml(zs, zt))
    _parts_close(parts, {"ce_s": ce_s, "ce_t": ce_t, "mutual": mutual})
    assert _f(total) == pytest.approx(ce_s + ce_t + 2.0 * mutual, rel=1e-5)
    total.backward()
    assert zs.grad.abs().sum() > 0 and zt.grad.abs().sum() > 0
    # unlabeled rows (label -1) still get a gradient: the mutual term covers ALL samples
    assert zs.grad[3:].abs().sum() > 0 and zt.grad[3:].abs().sum() > 0


def test_cotrain_mutual_term_uses_every_sample_but_ce_only_labeled():
    recipe = build_recipe("cotrain")
    zs, zt = _logits(0), _logits(1)
    zs2 = zs.detach().clone()
    zs2[3:, 0] += 5.0  # change only the unlabeled rows
    _, a = total_loss(recipe, _outputs(recipe, [zs], [zt]), Hyper())
    _, b = total_loss(recipe, _outputs(recipe, [zs2], [zt]), Hyper())
    assert a["ce_s"] == pytest.approx(b["ce_s"])
    assert a["mutual"] != pytest.approx(b["mutual"])


def test_all_zero_weights_still_give_a_differentiable_zero():
    recipe = build_recipe("consistency", views=2)
    student = [_logits(0), _logits(1)]
    teacher = [_logits(2, requires_grad=False), _logits(3, requires_grad=False)]
    total, parts = total_loss(
        recipe, _outputs(recipe, student, teacher), Hyper(w_labels=0.0, w_consistency=0.0, w_distill=0.0)
    )
    assert _f(total) == 0.0 and parts["total"] == 0.0
    assert parts["gt"] > 0  # still recorded for the history
    total.backward()  # must not raise


# ------------------------------------------------------------------------------ composition
def test_recipes_are_compositions_of_the_methods_in_the_table():
    from kdpipe.training.recipes import RECIPE_METHODS

    assert set(RECIPE_METHODS) == set(RECIPES)
    full = build_recipe("full", views=3)
    assert full.methods == ("co-training", "consistency across views", "augmentation schedule")
    # full takes the views' strength from the schedule, not its weight w
    assert full.view_plan == "scheduled" and full.num_views == 3 and not full.weights_by_schedule
    assert build_recipe("adaptive").weights_by_schedule
    assert build_recipe("consistency").methods == ("multi-view consistency",)


def test_methods_that_disagree_on_the_views_cannot_be_composed():
    from kdpipe.training.recipes import Method, adaptive_augmentation, compose, distillation

    with pytest.raises(ValueError, match="different view plans"):
        compose("bad", distillation(), adaptive_augmentation())
    with pytest.raises(ValueError, match="different numbers of views"):
        compose("bad", adaptive_augmentation(), Method("three views", terms=(), num_views=3))


def test_a_term_weight_must_name_a_train_setting():
    from kdpipe.training.recipes import Term

    with pytest.raises(ValueError, match="w_entropy"):
        Term("entropy", lambda out, h, proj: out.student[0].sum(), "w_entropy")
    assert Term("kd", lambda out, h, proj: None, "w_distill").weight_value(Hyper(w_distill=0.25)) == 0.25
    assert Term("t", lambda out, h, proj: None, lambda h: 1.0 - h.w).weight_value(Hyper(w=0.75)) == 0.25


def test_each_weight_setting_scales_only_its_terms():
    """Doubling one w_* setting doubles exactly the terms that name it in the total."""
    recipe = build_recipe("consistency", views=2)
    student = [_logits(1), _logits(2)]
    teacher = [_logits(3, False), _logits(4, False)]
    base_total, parts = total_loss(recipe, _outputs(recipe, student, teacher), Hyper())
    for setting, term in (("w_labels", "gt"), ("w_consistency", "cons"), ("w_distill", "kd")):
        total, _ = total_loss(recipe, _outputs(recipe, student, teacher), Hyper(**{setting: 2.0}))
        assert _f(total) == pytest.approx(_f(base_total) + _f(parts[term]), rel=1e-5), setting


def test_the_contributing_guide_example_recipe_composes_and_draws_distinct_views():
    """CONTRIBUTING.md, worked example 2: distillation + the consistency term across 2 views."""
    import numpy as np

    from kdpipe.training.recipes import compose, consistency_across_views, distillation
    from kdpipe.training.views import StoredViews

    recipe = compose("kd_consistency", distillation(), consistency_across_views(2))
    assert (recipe.view_plan, recipe.num_views, recipe.teacher_views) == ("any", 2, (0,))
    assert [t.name for t in recipe.terms] == ["ce", "kd", "cons"] and recipe.reads_stored_views
    views = StoredViews.__new__(StoredViews)  # only the view choice is exercised here
    views.recipe, views.schedule = recipe, None
    views.strong = torch.tensor([False, True, False, True])
    views.gen = torch.Generator().manual_seed(0)
    first, second = views.choose(64)
    assert bool((first != second).all())  # two different stored views of every sample
    assert set(np.unique(first.numpy())) | set(np.unique(second.numpy())) == {0, 1, 2, 3}
