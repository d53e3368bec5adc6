"""Crash safety: ``kill -9`` at random points of ``prepare``, ``distill`` and ``export``.

Each step runs through the CLI in a child process that is SIGKILLed, either after a seeded random
delay or exactly before/after its k-th ``os.replace`` (every rename an atomic write makes, so the
windows a random delay rarely hits are hit on purpose). Afterwards:

* an output folder is absent, or byte-for-byte the complete previous output or the complete new
  one; ``load_prepared`` verification passes and ONNX files pass ``onnx.checker`` and load;
* no temporary file is visible to readers (temporary names start with '.');
* ``distill`` resumed after each of 10 random kills finishes with exactly the weights of an
  uninterrupted run, having lost at most one checkpoint interval of iterations.

Children are forked from one pre-imported "zygote" process, so each start costs milliseconds instead
of the seconds torch/onnxruntime take to import, and kill delays land in the step's own work.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml
from zygote import KILLED, Zygote

from kdpipe.core.files import file_sha256
from kdpipe.data.prepared import load_prepared
from kdpipe.training import checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


# ---------------------------------------------------------------- invariants


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file in a step's output folder (hidden ones included: nothing may be extra)."""
    return {
        p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_no_visible_strays(parent: Path, allowed: set[str]) -> None:
    visible = {p.name for p in parent.iterdir() if not p.name.startswith(".")}
    assert visible <= allowed, f"visible leftovers in {parent}: {sorted(visible - allowed)}"


def assert_old_or_new(target: Path, complete: list[dict[str, str]]) -> str:
    """``target`` is absent or exactly one of the complete outputs; returns which ("absent", "0", "1"...)."""
    assert_no_visible_strays(target.parent, {target.name})
    if not target.exists():
        return "absent"
    found = snapshot(target)
    for k, expected in enumerate(complete):
        if found == expected:
            return str(k)
    pytest.fail(f"{target} holds a partial or mixed output: {sorted(found)}")


def params_file(folder: Path, params) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")), encoding="utf-8")
    return path


def kill_at_every_replace(zygote, argv, cwd, reset, check, limit: int = 20) -> int:
    """Kill before and after the 1st, 2nd... os.replace until a run completes; returns the number of
    replace calls a complete run makes. ``reset()`` restores the starting state before each run."""
    for k in range(1, limit + 1):
        for when in ("before", "after"):
            reset()
            code, _, log = zygote.run(argv, cwd, kill_at_replace=[k, when])
            if code == 0 and when == "before":
                check()
                return k - 1
            assert code == KILLED, log
            check()
    pytest.fail(f"still renaming after {limit} calls")


# ---------------------------------------------------------------- prepare


def test_prepare_killed_anywhere_leaves_old_or_new_output(zygote, tmp_path, tiny_params_factory):
    from conftest import write_tiny_dataset

    params = tiny_params_factory()
    work = tmp_path / "work"
    work.mkdir()
    cfg = params_file(tmp_path, params)
    data = write_tiny_dataset(tmp_path / "data", labeled_per_class=40, unlabeled=800, seed=1)
    target = work / "prepared"
    argv = ["prepare", "--params", cfg, "--data-root", data, "--out-dir", target]

    # the previous output (old data) and the reference new output (old data + a new batch)
    code, _, log = zygote.run(argv, tmp_path)
    assert code == 0, log
    old = snapshot(target)
    pristine = tmp_path / "pristine"
    shutil.copytree(target, pristine)
    write_tiny_dataset(tmp_path / "batch", labeled_per_class=0, unlabeled=100, seed=2)
    shutil.move(tmp_path / "batch" / "unlabeled" / "batch-0001", data / "unlabeled" / "batch-0002")
    # timed like the killed runs: over a copy of the previous output, whose images it reuses
    shutil.copytree(pristine, tmp_path / "reference")
    code, seconds, log = zygote.run([*argv[:-1], tmp_path / "reference"], tmp_path)
    assert code == 0, log
    new = snapshot(tmp_path / "reference")
    assert new != old

    def reset():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pristine, target)

    def check():
        if assert_old_or_new(target, [old, new]) != "absent":
            load_prepared(target, verify=True)

    seen = set()
    rng = random.Random(8)
    for _ in range(10):
        reset()
        code, log = zygote.run_killed(argv, tmp_path, delay=rng.uniform(0.0, 1.2 * seconds))
        assert code in (0, KILLED), log
        check()
        seen.add(assert_old_or_new(target, [old, new]))
    assert "0" in seen  # some kills did land before the new output was in place

    renames = kill_at_every_replace(zygote, argv, tmp_path, reset, check)
    # the manifest inside the temp folder (sources.json and rejected.json are written there as they
    # are read, no rename needed); the remembered input hashes; old out; new in
    assert renames >= 4

    code, _, log = zygote.run(argv, tmp_path)  # hidden leftovers of killed runs do not get in the way
    assert code == 0, log
    assert snapshot(target) == new


# ---------------------------------------------------------------- export


def test_export_killed_anywhere_leaves_old_or_new_output(zygote, tmp_path, tiny_pipeline_dirs):
    from kdpipe.export.onnx import check_onnx, make_session

    d = tiny_pipeline_dirs
    selected = tmp_path / "selected"
    selected.mkdir()
    shutil.copyfile(d["teacher"] / "teacher.pt", selected / "model.pt")
    cfg = params_file(tmp_path, d["params"])
    work = tmp_path / "work"
    work.mkdir()
    target = work / "exported"
    base = ["export", "--params", cfg, "--selected-dir", selected, "--prepared-dir", d["prepared"]]
    old_argv = [*base, "-S", "export.int8=false", "--out-dir", target]
    new_argv = [*base, "-S", "export.int8=true", "-S", "export.calibration_samples=16", "--out-dir", target]

    code, _, log = zygote.run(old_argv, tmp_path)
    assert code == 0, log
    old = snapshot(target)
    pristine = tmp_path / "pristine"
    shutil.copytree(target, pristine)
    code, seconds, log = zygote.run([*new_argv[:-1], tmp_path / "reference"], tmp_path)
    assert code == 0, log
    new = snapshot(tmp_path / "reference")
    assert "model.int8.onnx" in new and "model.int8.onnx" not in old

    def reset():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pristine, target)

    def check():
        if assert_old_or_new(target, [old, new]) == "absent":
            return
        assert json.loads((target / "parity.json").read_text())["passed"] is True
        for model in target.glob("*.onnx"):
            check_onnx(model)
            make_session(model)

    rng = random.Random(9)
    for _ in range(5):
        reset()
        code, log = zygote.run_killed(new_argv, tmp_path, delay=rng.uniform(0.0, 1.2 * seconds))
        assert code in (0, KILLED), log
        check()

    renames = kill_at_every_replace(zygote, new_argv, tmp_path, reset, check)
    assert renames >= 4  # parity.json, preprocess.json inside the temp folder; old out; new in


# ---------------------------------------------------------------- distill: 10 kills, 10 resumes

DISTILL_TRAIN = {
    "recipe": "full",
    "max_iterations": 24,
    "epoch_iterations": 6,
    "eval_every": 6,
    "checkpoint_every": 4,
    "threads": 1,
}
TRIALS = 10


def _distill_state(out: Path) -> dict:
    last = checkpoints.load(out / "last.pt")
    return {
        "last": last,
        "student.pt": checkpoints.load(out / "student.pt"),
        "teacher.pt": checkpoints.load(out / "teacher.pt"),
        "history": json.loads((out / "history.json").read_text()),
    }


def _same_tensors(a: dict, b: dict, what: str) -> None:
    import torch

    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _without_timing(history):
    return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]


def _assert_complete_files(out: Path) -> int:
    """Every file a killed distill left is whole; returns the iteration of last.pt (0 if none)."""
    assert_no_visible_strays(
        out, {"last.pt", "student.pt", "teacher.pt", "history.json", "schedule.json", "metrics.json"}
    )
    for path in out.glob("*.pt"):
        checkpoints.load(path)  # raises on a truncated file
    for path in out.glob("*.json"):
        json.loads(path.read_text())
    return int(checkpoints.load(out / "last.pt")["iteration"]) if (out / "last.pt").exists() else 0


def test_distill_killed_ten_times_resumes_to_the_same_weights(
    zygote, tmp_path, tiny_pipeline_dirs, tiny_params_factory
):
    d = tiny_pipeline_dirs
    params = tiny_params_factory(**DISTILL_TRAIN)
    cfg = params_file(tmp_path, params)

    def argv(out):
        return [
            "distill",
            "--params",
            cfg,
            "--prepared-dir",
            d["prepared"],
            "--augmented-dir",
            d["augmented"],
            "--teacher-dir",
            d["teacher"],
            "--out-dir",
            out,
        ]

    code, _, log = zygote.run(argv(tmp_path / "reference"), tmp_path)
    assert code == 0, log
    reference = _distill_state(tmp_path / "reference")
    assert reference["last"]["iteration"] == DISTILL_TRAIN["max_iterations"]

    # Each kill lands at a point the child reports (after its k-th step, or while a checkpoint is being
    # renamed into place after it), never after a delay: a loaded machine changes nothing.
    rng = random.Random(10)
    interval = DISTILL_TRAIN["checkpoint_every"]
    report = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        where = [rng.randint(1, DISTILL_TRAIN["max_iterations"] - 1), rng.choice(["step", "replace"])]
        code, _, log = zygote.run(argv(out), tmp_path, kill_at_iteration=where)
        assert code == KILLED, f"trial {trial}: not killed at {where}\n{log}"
        reached = max([int(n) for n in re.findall(r"^ITER (\d+)$", log, flags=re.MULTILINE)], default=0)
        saved = _assert_complete_files(out) if out.exists() else 0
        lost = reached - saved
        assert 0 <= lost <= interval, f"trial {trial}: reached {reached}, last.pt at {saved}"
        assert not (out / "metrics.json").exists()  # it really was interrupted

        code, _, log = zygote.run(argv(out), tmp_path)  # resume, no sleep
        assert code == 0, log
        if saved:
            assert f"at iteration {saved}" in log and "resuming from" in log, log
        final = _distill_state(out)
        assert final["last"]["iteration"] == DISTILL_TRAIN["max_iterations"]
        _same_tensors(final["last"]["student"], reference["last"]["student"], f"trial {trial} student")
        _same_tensors(final["last"]["teacher"], reference["last"]["teacher"], f"trial {trial} teacher")
        for name in ("student.pt", "teacher.pt"):
            _same_tensors(final[name]["state_dict"], reference[name]["state_dict"], f"trial {trial} {name}")
        assert _without_timing(final["history"]) == _without_timing(reference["history"])
        report.append((tuple(where), reached, saved, lost))
    print("distill kill/resume trials (kill point, iteration reached, last.pt iteration, lost):", report)
    assert len({saved for _, _, saved, _ in report}) >= 3  # the kills spread over the run
