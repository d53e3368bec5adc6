"""The label-efficiency benchmark script itself, on a tiny generated npz (the real run is `make bench`).

Checks that it runs every part of its protocol (teacher, the teacher's cached logits, supervised, a
recipe, the equal-wall-clock supervised run, the ceiling) for each seed, also with seeds trained in
parallel worker processes (``--jobs 2``), that both ways give the same table layout, that its
derived figures follow from its raw rows, and that a missing data file is a clear error.
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
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             class_names=np.array(["red", "green", "blue"]))


def run_bench(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    argv = ["--data", str(tmp_path / "tiny.npz"), "--fractions", "0.25", "--seeds", "0", "1",
            "--recipes", "kd", "--iterations", "6", "--path-iterations", "9", "--teacher-iterations", "6",
            "--eval-every", "3",
            "--batch-size", "8", "--student-arch", "cnn_tiny", "--teacher-arch", "cnn_tiny",
            "--teacher-weights", "null", "--teacher-image-size", "16", "--teacher-batch-size", "8",
            "--out", str(out), *extra]
    assert label_efficiency.main(argv) == 0
    return json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("label_eff")
    write_tiny_npz(tmp_path / "tiny.npz")
    return tmp_path, {"serial": run_bench(tmp_path, "serial", "--jobs", "1"),
                      "parallel": run_bench(tmp_path, "parallel", "--jobs", "2")}


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_every_seed_gets_every_run(results, mode):
    tmp_path, by_mode = results
    result = by_mode[mode]
    every = ["cache", "ceiling", "equal_wall_clock", "kd", "path", "supervised", "teacher"]
    kinds_per_seed = {seed: sorted(r["kind"] for r in result["runs"] if r["seed"] == seed) for seed in (0, 1)}
    assert kinds_per_seed == {0: every, 1: every}
    for row in result["runs"]:
        if row["kind"] != "cache":
            assert 0.0 <= row["test_student"] <= 1.0
        if row["kind"] in ("supervised", "kd", "ceiling"):
            assert row["iterations"] == 6
        if row["kind"] == "path":
            assert row["iterations"] == 9
    kd = next(e for e in result["summary"] if e["run"] == "kd")
    assert kd["seeds"] == [0, 1] and len(kd["test_student_per_seed"]) == 2
    md = (tmp_path / mode).with_suffix(".md").read_text()
    assert "| kd |" in md and "Total wall time" in md and "Equal wall clock" in md
    if mode == "parallel":
        assert "2 seeds at a time, 1 thread(s) each" in md


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_derived_figures_follow_from_the_raw_rows(results, mode):
    """Everything the table reports is recomputable from the rows: the equal-wall-clock budget, the
    cost per iteration, the gap closed."""
    result = results[1][mode]
    runs = result["runs"]
    for seed in (0, 1):
        row = {r["kind"]: r for r in runs if r["seed"] == seed}
        path = row["teacher"]["wall_s"] + row["cache"]["wall_s"] + row["path"]["wall_s"]
        assert row["equal_wall_clock"]["path_s"] == pytest.approx(path, abs=0.11)
        per_iteration = max(row["supervised"]["wall_s"], 0.1) / row["supervised"]["iterations"]
        assert row["equal_wall_clock"]["iterations"] == max(1, round(path / per_iteration))
        assert row["cache"]["views"] == 2 * (row["supervised"]["labels_train"] + row["supervised"]["unlabeled"])
    kd = next(e for e in result["summary"] if e["run"] == "kd")
    cost = [next(r for r in runs if r["seed"] == s and r["kind"] == "kd")["s_per_iteration"]
            / next(r for r in runs if r["seed"] == s and r["kind"] == "supervised")["s_per_iteration"] for s in (0, 1)]
    assert kd["cost_per_iteration"] == pytest.approx(sum(cost) / 2)
    for seed, gap in zip((0, 1), kd["gap_closed_per_seed"], strict=True):
        row = {r["kind"]: r for r in runs if r["seed"] == seed}
        low, high = row["supervised"]["test_student"], row["ceiling"]["test_student"]
        expected = None if high - low <= 1e-9 else (row["kd"]["test_student"] - low) / (high - low)
        assert gap == (None if expected is None else pytest.approx(expected))


def test_serial_and_parallel_give_the_same_table_layout(results):
    _, by_mode = results
    rows = {mode: [(e["labels"], e["run"]) for e in r["summary"]] for mode, r in by_mode.items()}
    assert rows["serial"] == rows["parallel"]


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    code = label_efficiency.main(["--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "absent.npz" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
