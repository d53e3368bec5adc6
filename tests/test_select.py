"""select: most accurate candidate within the limits, ties to the smaller model, clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from colour_data import write_images

from kdpipe.core.errors import KdpipeError
from kdpipe.core.params import Params
from kdpipe.data.prepared import load_prepared
from kdpipe.steps import prepare, select
from kdpipe.training import checkpoints
from kdpipe.training.models import build_model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    # val_fraction 0.5 of 160/80/80 -> validation holds 80 blue, 40 green, 40 red: a model that always
    # answers "blue" scores 0.5, one that always answers "green" 0.25 -- a difference 160 validation
    # images resolve (with 8 they could not: see the statistical-tie test).
    tmp = tmp_path_factory.mktemp("select")
    write_images(tmp / "data", "labeled", {"blue": 160, "green": 80, "red": 80}, seed=0, max_side=14)
    params = Params()
    params.prepare.val_fraction = 0.5
    prepare.run(params, tmp / "data", tmp / "prepared")
    return tmp / "prepared"


def _constant_model(
    path: Path, prepared: Path, arch: str, answer: str, claimed_acc: float = 0.99, trained_in_run: bool = True
) -> None:
    """A checkpoint whose head always answers ``answer`` (known validation accuracy, no training)."""
    data = load_prepared(prepared)
    model = build_model(arch, data.num_classes, data.image_size)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
        model.head.bias[data.class_names.index(answer)] = 10.0
    meta = {
        "val_accuracy": claimed_acc,
        "role": path.stem,  # deliberately wrong: select must recompute
        "trained_in_run": trained_in_run,
    }
    checkpoints.save(
        checkpoints.model_checkpoint(model, arch, data.num_classes, data.image_size, data.class_names, meta),
        path,
    )


def _distill_dir(tmp_path: Path, prepared: Path, student: tuple[str, str], teacher: tuple[str, str] | None):
    out = tmp_path / "distill"
    out.mkdir()
    _constant_model(out / "student.pt", prepared, *student)
    if teacher:
        _constant_model(out / "teacher.pt", prepared, *teacher)
    return out


def _select(params, distill, prepared, out, teacher_dir=None):
    return select.run(
        params, distill_dir=distill, teacher_dir=teacher_dir, prepared_dir=prepared, out_dir=out
    )


def _teacher_dir(tmp_path: Path, prepared: Path, arch: str, answer: str, trained_in_run: bool = True) -> Path:
    """The teacher step's output: its fine-tuned (or adopted) teacher.pt."""
    out = tmp_path / "teacher"
    out.mkdir()
    _constant_model(out / "teacher.pt", prepared, arch, answer, trained_in_run=trained_in_run)
    return out


def _params(**select_kwargs) -> Params:
    params = Params()
    params.select.latency_runs = 3
    for key, value in select_kwargs.items():
        setattr(params.select, key, value)
    return params


def test_most_accurate_within_limits_wins_and_accuracy_is_recomputed(tmp_path, prepared):
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "green"), teacher=("resnet_tiny", "blue"))
    out = tmp_path / "selected"
    result = _select(_params(), distill, prepared, out)

    assert result["chosen"] == "cotrained_teacher"
    assert (out / "model.pt").read_bytes() == (distill / "teacher.pt").read_bytes()
    written = json.loads((out / "selection.json").read_text())
    assert written["chosen"] == "cotrained_teacher" and written["reason"]
    assert written["limits"] == {"max_params": None, "max_latency_ms": 1.0}
    by_name = {c["name"]: c for c in written["candidates"]}
    assert by_name["student"]["val_accuracy"] == pytest.approx(0.25)  # not the 0.99 claimed in meta
    assert by_name["cotrained_teacher"]["val_accuracy"] == pytest.approx(0.5)
    for cand in written["candidates"]:
        assert set(cand) >= {"name", "path", "arch", "parameters", "val_accuracy", "latency_ms_p50", "meets"}
        assert cand["latency_ms_p50"] > 0 and cand["meets"] == {"max_params": True, "max_latency_ms": True}


def test_equal_accuracy_goes_to_the_smaller_model(tmp_path, prepared):
    # The student is the BIGGER net here, so the tie-break cannot be "student first".
    distill = _distill_dir(tmp_path, prepared, student=("cnn_small", "blue"), teacher=("cnn_tiny", "blue"))
    result = _select(_params(), distill, prepared, tmp_path / "selected")
    by_name = {c["name"]: c for c in result["candidates"]}
    assert by_name["student"]["val_accuracy"] == by_name["cotrained_teacher"]["val_accuracy"]
    assert by_name["cotrained_teacher"]["parameters"] < by_name["student"]["parameters"]
    assert result["chosen"] == "cotrained_teacher" and "fewer parameters" in result["reason"]


def test_parameter_limit_excludes_the_more_accurate_model(tmp_path, prepared):
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "green"), teacher=("cnn_small", "blue"))
    result = _select(_params(max_params=100_000), distill, prepared, tmp_path / "selected")
    assert result["chosen"] == "student"
    assert {c["name"]: c["meets"]["max_params"] for c in result["candidates"]} == {
        "student": True,
        "cotrained_teacher": False,
    }


def test_nothing_fits_names_each_candidate_and_limit(tmp_path, prepared):
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "green"), teacher=("cnn_small", "blue"))
    out = tmp_path / "selected"
    with pytest.raises(KdpipeError) as err:
        _select(_params(max_params=1000, max_latency_ms=1e-6), distill, prepared, out)
    text = str(err.value)
    assert "student (cnn_tiny)" in text and "cotrained_teacher (cnn_small)" in text
    assert "max_params 1000" in text and "max_latency_ms 1e-06" in text and "fallback_fastest" in text
    assert not out.exists()


def test_fallback_fastest_takes_the_lowest_latency(tmp_path, prepared):
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "green"), teacher=("cnn_small", "blue"))
    result = _select(
        _params(max_latency_ms=1e-6, fallback_fastest=True, include_champion=True),
        distill,
        prepared,
        tmp_path / "selected",
    )
    fastest = min(result["candidates"], key=lambda c: c["latency_ms_p50"])
    assert result["chosen"] == fastest["name"]
    assert "fallback_fastest" in result["reason"] and "max_latency_ms" in result["reason"]
    assert all(not c["meets"]["max_latency_ms"] for c in result["candidates"])
    assert result["champion"].startswith("not configured")


def test_student_only_and_missing_student(tmp_path, prepared):
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "red"), teacher=None)
    assert _select(_params(), distill, prepared, tmp_path / "selected")["chosen"] == "student"
    with pytest.raises(KdpipeError, match="student.pt: not found"):
        _select(_params(), tmp_path / "empty", prepared, tmp_path / "selected2")


def test_choose_rule_is_pure():
    cands = [
        {
            "name": "a",
            "arch": "x",
            "parameters": 10,
            "val_accuracy": 0.8,
            "latency_ms_p50": 2.0,
            "meets": {"max_params": True, "max_latency_ms": True},
        },
        {
            "name": "b",
            "arch": "y",
            "parameters": 5,
            "val_accuracy": 0.8,
            "latency_ms_p50": 3.0,
            "meets": {"max_params": True, "max_latency_ms": True},
        },
        {
            "name": "c",
            "arch": "z",
            "parameters": 1,
            "val_accuracy": 0.9,
            "latency_ms_p50": 1.0,
            "meets": {"max_params": True, "max_latency_ms": False},
        },
    ]
    chosen, _ = select.choose(cands, {"max_params": 100, "max_latency_ms": 2.5}, fallback_fastest=False)
    assert chosen["name"] == "b"


def test_a_frozen_input_teacher_is_never_a_candidate(tmp_path, prepared):
    """A teacher.pt the pipeline did not train (adopted as it is, teacher.checkpoint) is listed as
    excluded, with the reason, even when it is the more accurate model: the user asked for a model
    trained on their data."""
    out = tmp_path / "distill"
    out.mkdir()
    _constant_model(out / "student.pt", prepared, "cnn_tiny", "green")
    _constant_model(out / "teacher.pt", prepared, "resnet_tiny", "blue", trained_in_run=False)
    adopted = _teacher_dir(tmp_path, prepared, "resnet_tiny", "blue", trained_in_run=False)
    result = _select(_params(), out, prepared, tmp_path / "selected", teacher_dir=adopted)
    assert result["chosen"] == "student"
    assert [c["name"] for c in result["candidates"]] == ["student"]
    assert [e["name"] for e in result["excluded"]] == ["cotrained_teacher", "teacher"]
    assert (
        all("did not train" in e["reason"] for e in result["excluded"])
        and "did not train" in result["reason"]
    )


def test_the_fine_tuned_teacher_ships_when_it_is_best_and_fits_the_budget(tmp_path, prepared):
    """The teacher step's model competes: more accurate and within the limits, it is what ships."""
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "green"), teacher=None)
    teacher_dir = _teacher_dir(tmp_path, prepared, "resnet_tiny", "blue")
    out = tmp_path / "selected"
    result = _select(_params(max_latency_ms=None), distill, prepared, out, teacher_dir=teacher_dir)
    assert [c["name"] for c in result["candidates"]] == ["student", "teacher"]
    assert result["chosen"] == "teacher"
    assert (out / "model.pt").read_bytes() == (teacher_dir / "teacher.pt").read_bytes()


def test_the_latency_budget_keeps_a_slow_teacher_out_and_the_frontier_shows_it(
    tmp_path, prepared, monkeypatch
):
    """A budget between the two candidates' latencies ships the fast student, says why the teacher is
    out, and the frontier lists both with the shipped one marked. (The latencies are fixed here, so the
    test does not depend on how loaded the machine is; the measurement itself is tested above.)"""
    latency = {"cnn_tiny": 0.2, "cnn_small": 0.7}
    monkeypatch.setattr(select, "_latency_p50", lambda model, *args: latency[model.arch])
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "green"), teacher=None)
    teacher_dir = _teacher_dir(tmp_path, prepared, "cnn_small", "blue")
    out = tmp_path / "selected"
    result = _select(_params(max_latency_ms=0.5), distill, prepared, out, teacher_dir=teacher_dir)
    assert result["chosen"] == "student"
    assert "teacher (cnn_small) left out: latency p50 0.700 ms > max_latency_ms 0.5" in result["reason"]
    frontier = {row["name"]: row for row in json.loads((out / "frontier.json").read_text())}
    assert frontier["student"]["shipped"] and not frontier["teacher"]["shipped"]
    assert not frontier["teacher"]["within_budget"] and frontier["teacher"]["val_accuracy"] == pytest.approx(
        0.5
    )
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_limits_ship_the_small_student_over_a_large_cotrained_teacher(tmp_path, prepared):
    """With a large network co-trained in the run, the default latency budget (1 ms on one thread)
    keeps it out, and the reason says so; there is no default parameter limit."""
    distill = _distill_dir(tmp_path, prepared, student=("cnn_tiny", "green"), teacher=("resnet18", "blue"))
    result = _select(_params(latency_runs=10), distill, prepared, tmp_path / "selected")
    by_name = {c["name"]: c for c in result["candidates"]}
    assert by_name["cotrained_teacher"]["val_accuracy"] > by_name["student"]["val_accuracy"]
    assert Params().select.max_params is None
    assert by_name["cotrained_teacher"]["latency_ms_p50"] > Params().select.max_latency_ms
    assert result["chosen"] == "student"
    assert "cotrained_teacher (resnet18) left out: latency p50" in result["reason"]


def test_a_lead_the_validation_split_cannot_resolve_goes_to_the_smaller_model(tmp_path):
    """8 validation images cannot tell 0.5 from 0.25 (95% interval of the paired difference covers 0):
    the smaller model ships, and the reason gives the numbers."""
    write_images(tmp_path / "data", "labeled", {"blue": 8, "green": 4, "red": 4}, seed=0)
    params = Params()
    params.prepare.val_fraction = 0.5
    prepare.run(params, tmp_path / "data", tmp_path / "prepared")
    distill = _distill_dir(
        tmp_path, tmp_path / "prepared", student=("cnn_tiny", "green"), teacher=("resnet_tiny", "blue")
    )
    result = _select(_params(), distill, tmp_path / "prepared", tmp_path / "selected")
    assert result["chosen"] == "student"
    (cmp,) = result["comparisons"]
    assert (
        cmp["a"] == "cotrained_teacher"
        and cmp["validation_images"] == 8
        and cmp["difference"] == pytest.approx(0.25)
    )
    assert cmp["ci95"][0] < 0 < cmp["ci95"][1] and not cmp["resolved"]
    assert "8 validation images" in result["reason"] and "not resolvably below" in result["reason"]


def test_paired_difference_is_exact_on_a_small_case():
    # a right on 3 of 4, b on 1 of 4, disagreeing on 2 images
    cmp = select.paired_difference([True, True, True, False], [True, False, False, False])
    assert cmp["difference"] == pytest.approx(0.5) and cmp["validation_images"] == 4
    half = 1.96 * ((sum((d - 0.5) ** 2 for d in (0, 1, 1, 0)) / 3) / 4) ** 0.5
    assert cmp["ci95"] == pytest.approx([0.5 - half, 0.5 + half])
