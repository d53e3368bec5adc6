"""The label-efficiency benchmark script itself, on a tiny generated npz (the real run is `make bench`).

Checks that it runs every part of its protocol (teacher, supervised, a recipe, the ceiling) for
each seed, also with seeds trained in parallel worker processes (``--jobs 2``), that both ways give
the same table layout, and that a missing data file is a clear error.
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
            "--recipes", "cotrain", "--iterations", "6", "--teacher-iterations", "6", "--eval-every", "3",
            "--batch-size", "8", "--student-arch", "cnn_tiny", "--teacher-arch", "cnn_tiny",
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
    kinds_per_seed = {seed: sorted(r["kind"] for r in result["runs"] if r["seed"] == seed) for seed in (0, 1)}
    assert kinds_per_seed == {0: ["ceiling", "cotrain", "supervised", "teacher"],
                              1: ["ceiling", "cotrain", "supervised", "teacher"]}
    for row in result["runs"]:
        assert 0.0 <= row["test_student"] <= 1.0
        assert row["kind"] == "teacher" or row["iterations"] == 6
    cotrain = next(e for e in result["summary"] if e["run"] == "cotrain")
    assert cotrain["seeds"] == [0, 1] and len(cotrain["test_student_per_seed"]) == 2
    supervised = next(e for e in result["summary"] if e["run"] == "supervised")
    if supervised["gap_closed"] is not None:  # defined only where the ceiling beat supervised on N labels
        assert supervised["gap_closed"] == pytest.approx(0.0)
    md = (tmp_path / mode).with_suffix(".md").read_text()
    assert "| cotrain |" in md and "Total wall time" in md
    if mode == "parallel":
        assert "2 seeds at a time, 1 thread(s) each" in md


def test_serial_and_parallel_give_the_same_table_layout(results):
    _, by_mode = results
    rows = {mode: [(e["labels"], e["run"]) for e in r["summary"]] for mode, r in by_mode.items()}
    assert rows["serial"] == rows["parallel"]


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    code = label_efficiency.main(["--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "absent.npz" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
