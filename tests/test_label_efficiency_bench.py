"""The label-efficiency benchmark script itself, on a tiny generated npz (the real run is `make bench`).

Checks that every seed gets every kind of run the protocol promises (teacher, the teacher's unlabeled
round, supervised, supervised on distillation's views for the path's wall clock, the student at each
budget, the converged ceiling), that every run row carries what the issue asks of it, that serial and
parallel seeds give the same layout, that the derived figures follow from the raw rows, and that a
missing data file is a clear error.
"""

import json

import numpy as np
import pytest

from benchmarks import label_efficiency

pytestmark = pytest.mark.slow


def write_tiny_npz(path, per_class: int = 40, size: int = 8, seed: int = 0) -> None:
    """Three colour classes with noise: learnable in a few iterations."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.int16)

    def images(n):
        y = np.repeat(np.arange(3), n)
        x = colours[y][:, None, None, :] + rng.integers(-40, 40, size=(len(y), size, size, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y

    x_train, y_train = images(per_class)
    x_test, y_test = images(per_class // 4)
    np.savez(
        path,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=np.array(["red", "green", "blue"]),
    )


def run_bench(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    argv = [
        "--data",
        str(tmp_path / "tiny.npz"),
        "--fraction",
        "0.25",
        "--seeds",
        "0",
        "1",
        "--iterations",
        "6",
        "--multiples",
        "1",
        "2",
        "--teacher-iterations",
        "6",
        "--round-iterations",
        "4",
        "--pseudo-threshold",
        "0",
        "--eval-every",
        "3",
        "--batch",
        "16",
        "--views",
        "2",
        "--student-arch",
        "cnn_tiny",
        "--teacher-arch",
        "cnn_tiny",
        "--teacher-weights",
        "null",
        "--teacher-image-size",
        "16",
        "--teacher-batch-size",
        "8",
        "--out",
        str(out),
        *extra,
    ]
    assert label_efficiency.main(argv) == 0
    return json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("label_eff")
    write_tiny_npz(tmp_path / "tiny.npz")
    return tmp_path, {
        "serial": run_bench(tmp_path, "serial", "--jobs", "1"),
        "parallel": run_bench(tmp_path, "parallel", "--jobs", "2"),
    }


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_every_seed_gets_every_run(results, mode):
    tmp_path, by_mode = results
    result = by_mode[mode]
    every = [
        "cache",
        "ceiling",
        "student",
        "student",
        "supervised",
        "supervised_same_aug",
        "teacher",
        "teacher_unlabeled",
    ]
    kinds_per_seed = {seed: sorted(r["kind"] for r in result["runs"] if r["seed"] == seed) for seed in (0, 1)}
    assert kinds_per_seed == {0: every, 1: every}
    for row in result["runs"]:
        if row["kind"] == "cache":
            continue
        assert set(row) >= {"seed", "kind", "test_selected", "params", "latency_ms"}
        assert 0.0 <= row["test_selected"] <= 1.0 and row["params"] > 0 and row["latency_ms"] > 0
        if row["kind"] == "student":
            assert row["recipe"] == "kd" and row["iterations"] in (6, 12)
    students = sorted(r["iterations"] for r in result["runs"] if r["kind"] == "student" and r["seed"] == 0)
    assert students == [6, 12]  # 1x and 2x
    md = (tmp_path / mode).with_suffix(".md").read_text()
    assert "teacher gap closed" in md and "equal wall clock" in md and "Command:" in md
    assert result["command"].startswith(".venv/bin/python -m benchmarks.label_efficiency")


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_derived_figures_follow_from_the_raw_rows(results, mode):
    """What the report states is recomputable from the rows: the teacher gap closed, the gap to the
    teacher, the equal-wall-clock budget and difference, the ceiling's passes."""
    result = results[1][mode]
    figures = result["figures"]
    for k, seed in enumerate((0, 1)):
        rows = [r for r in result["runs"] if r["seed"] == seed]
        one = {r["kind"]: r for r in rows if r["kind"] != "student"}
        student = max((r for r in rows if r["kind"] == "student"), key=lambda r: r["iterations"])
        short = min((r for r in rows if r["kind"] == "student"), key=lambda r: r["iterations"])
        teaching = next(r for r in rows if r.get("teaches"))
        assert teaching["kind"] in ("teacher", "teacher_unlabeled")
        sup = one["supervised"]["test_selected"]
        span = teaching["test_selected"] - sup
        expected = (
            None if span <= 1e-9 else (student["test_selected"] - sup) / span
        )  # undefined below supervised
        got = figures["teacher_gap_closed"]["per_seed"][k]
        assert got == (None if expected is None else pytest.approx(expected))
        assert figures["student_vs_teacher_points"]["per_seed"][k] == pytest.approx(
            100 * (student["test_selected"] - teaching["test_selected"])
        )
        assert figures["longer_budget_points"]["per_seed"][k] == pytest.approx(
            100 * (student["test_selected"] - short["test_selected"])
        )
        path = (
            one["teacher"]["wall_s"]
            + one["teacher_unlabeled"]["wall_s"]
            + one["cache"]["wall_s"]
            + short["wall_s"]
        )
        assert one["supervised_same_aug"]["path_s"] == pytest.approx(path, abs=0.11)
        assert figures["equal_wall_clock_points"]["per_seed"][k] == pytest.approx(
            100 * (short["test_selected"] - one["supervised_same_aug"]["test_selected"])
        )
        # the ceiling gets as many passes over all labels as supervised made over its labels (or stops)
        labeled, everything = (
            one["supervised"]["labeled"],
            one["supervised"]["labeled"] + one["supervised"]["unlabeled"],
        )
        passes = one["supervised"]["iterations"] * 16 / labeled
        assert one["ceiling"]["iterations"] <= round(passes * everything / 16)


def test_serial_and_parallel_give_the_same_table_layout(results):
    _, by_mode = results
    rows = {mode: [(e["kind"], e["run"]) for e in r["table"]] for mode, r in by_mode.items()}
    assert rows["serial"] == rows["parallel"]


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    code = label_efficiency.main(["--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "absent.npz" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
