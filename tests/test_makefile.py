"""The Makefile's own logic, run for real with make in a throw-away project (the venv linked in)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def project(tmp_path):
    """A git + DVC project holding the Makefile, with the repository's venv linked in (and its install
    stamp kept newer than pyproject.toml and the lock file, so make does not reinstall anything)."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    # the images' lock file: the venv's install constraints, and a prerequisite of its stamp
    (root / "docker").mkdir()
    shutil.copy2(REPO / "docker" / "requirements-cpu.txt", root / "docker" / "requirements-cpu.txt")
    (root / ".venv").symlink_to(REPO / ".venv")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True, env=env)
    (root / "data.txt").write_text("tracked by DVC\n")
    subprocess.run(["dvc", "add", "-q", "data.txt"], cwd=root, check=True, env=env)
    assert make("setup", root, env).returncode == 0  # as on a clone: the local folder remote is configured
    return root, env


def make(target: str, root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=root,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=300,
    )


def test_a_failed_push_says_why_and_fails(project):
    """`make push` (the end of `make repro`) to a remote it cannot write: DVC's reason is shown and the
    exit status is not 0 (it used to hide the reason and exit 0)."""
    root, env = project
    unwritable = root / "not-a-folder"
    unwritable.write_text("a file where the remote's folder should be\n")
    subprocess.run(
        ["dvc", "remote", "add", "-d", "broken", str(unwritable / "store")], cwd=root, check=True, env=env
    )
    done = make("push", root, env)
    assert done.returncode != 0
    assert "error: dvc push failed" in done.stdout and "not on the default remote" in done.stdout
    assert "ERROR" in done.stdout  # DVC's own reason is not swallowed
    assert "outputs pushed" not in done.stdout


def test_a_push_that_works_says_so(project):
    root, env = project
    done = make("push", root, env)  # to the local folder remote make setup configured, dvc-remote/
    assert done.returncode == 0, done.stdout
    assert "outputs pushed to the default DVC remote" in done.stdout
    assert any((root / "dvc-remote").rglob("*"))


def test_a_second_repro_changes_nothing_while_one_runs(project):
    """Two `make repro` at once: the second stops before writing its S= settings into params.yaml (the
    first one trains with the settings it started with)."""
    import fcntl

    root, env = project
    (root / "data" / "labeled").mkdir(parents=True)  # `make data` then leaves data/ alone
    params = root / "params.yaml"
    params.write_text("train:\n  lr: 0.1\n")
    lock = root / ".dvc" / "tmp" / "kdpipe-repro.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:  # what the running `make repro` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(
            ["make", "--no-print-directory", "repro", "S=train.lr=0.5"],
            cwd=root,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert done.returncode != 0
    assert "another 'make repro' is running in this project" in done.stdout
    assert params.read_text() == "train:\n  lr: 0.1\n"
