"""Few labels, every one used: ``prepare.val_fraction: 0`` keeps no validation split. The teacher is
then checked by cross-validation, training runs fixed schedules (the last checkpoint is the result),
and select ranks the candidates by their agreement with the teacher."""

from __future__ import annotations

import pytest
from conftest import keep_threads as _keep_threads
from conftest import tiny_params, write_tiny_dataset

from kdpipe.core.atomic import read_json
from kdpipe.core.errors import KdpipeError
from kdpipe.core.params import validate_params
from kdpipe.steps import augment, distill, prepare, select, teacher
from kdpipe.training import checkpoints

pytestmark = pytest.mark.slow


def _params(**train):
    raw = tiny_params(**{"recipe": "kd", "max_iterations": 10, **train}).model_dump(mode="json")
    raw["prepare"]["val_fraction"] = 0.0
    raw["teacher"].update(
        arch="tf_efficientnet_lite0",
        weights="efficientnet_lite0_imagenet",
        image_size=32,
        backbone_lr_scale=0.1,
        freeze_batchnorm=True,
        lr=0.001,
        epochs=None,
        max_iterations=4,
        eval_every=2,
        folds=2,
    )
    raw["select"].update(latency_runs=3, max_latency_ms=None)
    return validate_params(raw)


@pytest.fixture(scope="module")
def no_validation(tmp_path_factory):
    base = tmp_path_factory.mktemp("few")
    write_tiny_dataset(base / "data", labeled_per_class=6, unlabeled=12)
    params = _params()
    dirs = {name: base / name for name in ("prepared", "teacher", "augmented", "distill", "selected")}
    manifest = _keep_threads(prepare.run, params, base / "data", dirs["prepared"])
    metrics = _keep_threads(teacher.run, params, dirs["prepared"], dirs["teacher"])
    _keep_threads(augment.run, params, dirs["prepared"], dirs["augmented"], dirs["teacher"])
    summary = _keep_threads(
        distill.run, params, dirs["prepared"], dirs["augmented"], dirs["teacher"], dirs["distill"]
    )
    selection = _keep_threads(
        select.run,
        params,
        distill_dir=dirs["distill"],
        teacher_dir=dirs["teacher"],
        prepared_dir=dirs["prepared"],
        out_dir=dirs["selected"],
    )
    return {
        **dirs,
        "params": params,
        "manifest": manifest,
        "teacher_metrics": metrics,
        "distill_summary": summary,
        "selection": selection,
    }


def test_every_label_trains(no_validation):
    counts = no_validation["manifest"]["counts"]
    assert counts["val"] == 0 and counts["train"] == 18


def test_the_teacher_is_checked_by_cross_validation(no_validation):
    m = no_validation["teacher_metrics"]
    cv = m["cross_validation"]
    assert cv["folds"] == 2 and m["estimated_by"] == "2-fold cross-validation"
    assert 0.0 <= cv["probe_accuracy"] <= 1.0 and 0.0 <= cv["fine_tuned_accuracy"] <= 1.0
    # the floor holds out of fold: the probe is kept exactly when fine-tuning scored clearly below it there
    kept_probe = teacher.probe_clearly_better(cv["fine_tuned_accuracy"], cv["probe_accuracy"], 18)
    assert m["kept"] == ("linear probe" if kept_probe else "fine-tuned")
    assert m["val_accuracy"] == (cv["probe_accuracy"] if kept_probe else cv["fine_tuned_accuracy"])
    assert m["rounds"] == [] and "student_alone" not in m  # both need a validation split to be judged
    for k in range(2):  # each fold fine-tuned on the other one
        assert (no_validation["teacher"] / f"fold-{k}" / "teacher.pt").is_file()


def test_training_keeps_the_last_checkpoint(no_validation):
    ckpt = checkpoints.load(no_validation["distill"] / "student.pt")
    assert ckpt["meta"]["iteration"] == 10 and ckpt["meta"]["val_accuracy"] is None
    assert no_validation["distill_summary"]["best_student"] == {"accuracy": None, "iteration": 10}
    history = read_json(no_validation["distill"] / "history.json")
    assert history and all("val_acc_student" not in row for row in history)


def test_select_ranks_by_agreement_with_the_teacher(no_validation):
    selection = no_validation["selection"]
    by_name = {c["name"]: c for c in selection["candidates"]}
    assert set(by_name) == {"student", "teacher"}
    assert by_name["teacher"]["teacher_agreement"] == 1.0
    assert 0.0 <= by_name["student"]["teacher_agreement"] <= 1.0
    assert all(c["score_by"] == "agreement with the teacher on 12 unlabeled images" for c in by_name.values())
    assert selection["chosen"] == "teacher"  # no budget here: the teacher agrees with itself
    frontier = read_json(no_validation["selected"] / "frontier.json")
    assert {row["name"]: row["accuracy"] for row in frontier} == {
        "student": by_name["student"]["score"],
        "teacher": 1.0,
    }


def test_the_adaptive_schedule_needs_a_validation_split(no_validation, tmp_path):
    with pytest.raises(KdpipeError, match="adaptive schedule follows the validation accuracy"):
        distill.build_trainer(
            _params(recipe="adaptive"),
            no_validation["prepared"],
            no_validation["augmented"],
            no_validation["teacher"],
            tmp_path / "out",
            progress=False,
        )
