"""Where outputs cannot go: a read-only file system, a full disk, a read-only reports folder, a
killed earlier run's temporary folders, and outputs other users must be able to read.

Every failure must be one line naming the path and what to do (exit 2, no traceback), with the
previous output intact and no temporary folder left behind. Read-only and full file systems are
real ones: small tmpfs mounts made by the test (it needs root, or is skipped with the reason).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import without_read_anything_capabilities, write_tiny_dataset

from kdpipe.cli import main

pytestmark = pytest.mark.slow


def _can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    probe = Path("/tmp") / f"kdpipe-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True
        )
        if done.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount(8) to make a small tmpfs")


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real, small file system at ``path`` (unmounted afterwards, whatever happens)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _params(tmp_path: Path, size: int = 16) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(f"prepare:\n  image_size: {size}\n", encoding="utf-8")
    return path


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _no_temporaries(folder: Path) -> list[str]:
    return [
        p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp" in p.name or ".old." in p.name)
    ]


@needs_mount
def test_read_only_output_folder_is_one_line_before_any_work(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", labeled_per_class=3, unlabeled=2)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        code, err = _run(
            ["prepare", "--params", _params(tmp_path), "--data-root", data, "--out-dir", ro / "out"], capsys
        )
    assert code == 2 and "Traceback" not in err
    assert (
        f"{ro}/out: cannot write (Read-only file system); the file system is read-only" in err
        or f"{ro}: cannot write (Read-only file system); the file system is read-only" in err
    )


@needs_mount
def test_read_only_reports_folder_fails_before_the_output_is_written(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", labeled_per_class=3, unlabeled=2)
    out = tmp_path / "out"
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        code, err = _run(
            [
                "prepare",
                "--params",
                _params(tmp_path),
                "--data-root",
                data,
                "--out-dir",
                out,
                "--reports-dir",
                ro / "reports",
            ],
            capsys,
        )
    assert code == 2 and "read-only" in err
    assert not out.exists()  # nothing half-done: the output was not written either


@needs_mount
def test_full_disk_during_prepare_keeps_the_previous_output_and_leaves_no_temporaries(tmp_path, capsys):
    """A memory-mapped write to a full disk used to kill prepare with SIGBUS and leave a hidden
    temporary folder filling the disk; now: one line, the previous output intact, nothing left."""
    small = write_tiny_dataset(tmp_path / "small", labeled_per_class=3, unlabeled=2, size=16)
    big = write_tiny_dataset(tmp_path / "big", labeled_per_class=10, unlabeled=400, size=64, seed=3)
    params = _params(tmp_path, size=64)
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "prepared"
        assert _run(["prepare", "--params", params, "--data-root", small, "--out-dir", out], capsys)[0] == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        # 400+ images of 64x64x3 = 5 MB of arrays (plus the decode spool): far more than 2 MB
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "kdpipe.cli",
                "prepare",
                "--params",
                str(params),
                "--data-root",
                str(big),
                "--out-dir",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "KDPIPE_TRACKING": "0"},
        )
        assert done.returncode == 2, (done.returncode, done.stderr[-2000:])  # not -7 (SIGBUS)
        assert "No space left on device" in done.stderr and "the disk is full" in done.stderr
        assert "Traceback" not in done.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert _no_temporaries(disk) == []


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", labeled_per_class=3, unlabeled=2)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process id that no longer runs
    stale = tmp_path / f".prepared.{child.pid}-x1y2.tmp"
    stale.mkdir()
    (stale / "train_x.npy").write_bytes(b"\0" * 1024)
    old = tmp_path / f".prepared.old.{child.pid}"
    old.mkdir()
    live = tmp_path / f".prepared.{os.getpid()}-busy.tmp"  # a writer that still runs: left alone
    live.mkdir()
    code, err = _run(
        ["prepare", "--params", _params(tmp_path), "--data-root", data, "--out-dir", tmp_path / "prepared"],
        capsys,
    )
    assert code == 0, err
    assert not stale.exists() and not old.exists() and live.exists()


def test_outputs_get_the_permissions_of_the_umask(tmp_path, capsys):
    """Temporaries are owner-only; finished outputs must be readable by other users (a serving
    container), as the umask says."""
    data = write_tiny_dataset(tmp_path / "data", labeled_per_class=3, unlabeled=2)
    old = os.umask(0o022)
    try:
        code, err = _run(
            [
                "prepare",
                "--params",
                _params(tmp_path),
                "--data-root",
                data,
                "--out-dir",
                tmp_path / "prepared",
                "--reports-dir",
                tmp_path / "reports",
            ],
            capsys,
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "prepared").stat().st_mode & 0o777 == 0o755
    for path in [*(tmp_path / "prepared").iterdir(), *(tmp_path / "reports").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert np.load(tmp_path / "prepared" / "train_x.npy").shape[1:] == (16, 16, 3)


def test_an_ingested_batch_gets_the_permissions_of_the_umask(tmp_path, capsys):
    """A new unlabeled batch folder and its files: readable by the other users of a shared data folder."""
    data = write_tiny_dataset(tmp_path / "data", labeled_per_class=3, unlabeled=2)
    source = (
        write_tiny_dataset(tmp_path / "new", labeled_per_class=1, unlabeled=3) / "unlabeled" / "batch-0001"
    )
    report = tmp_path / "ingest.json"
    old = os.umask(0o022)
    try:
        code, err = _run(["ingest", source, "--data-root", data, "--no-dvc", "--report", report], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    batch = data / json.loads(report.read_text())["batch"]
    assert batch.stat().st_mode & 0o777 == 0o755
    files = list(batch.rglob("*.png"))
    assert files and all(f.stat().st_mode & 0o777 == 0o644 for f in files)


def test_an_unreadable_image_is_rejected_when_run_as_a_normal_user(tmp_path):
    """Root reads anything, so when the tests run as root the CLI runs without the capabilities that
    allow it (a normal user's rights); a file with mode 000 is then unreadable as it is for any user."""
    data = write_tiny_dataset(tmp_path / "data", labeled_per_class=3, unlabeled=2)
    locked = data / "unlabeled" / "batch-0001" / "u_000.png"
    params = _params(tmp_path)
    locked.chmod(0o000)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "kdpipe.cli",
                "prepare",
                "--params",
                str(params),
                "--data-root",
                str(data),
                "--out-dir",
                str(tmp_path / "prepared"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=without_read_anything_capabilities,
            env={**os.environ, "KDPIPE_TRACKING": "0"},
        )
    finally:
        locked.chmod(0o644)  # so that pytest can clean up
    assert done.returncode == 0, done.stderr[-2000:]
    rejected = {r["path"]: r for r in json.loads((tmp_path / "prepared" / "rejected.json").read_text())}
    entry = rejected["unlabeled/batch-0001/u_000.png"]
    assert entry["reason"] == "unreadable" and "Permission denied" in entry["detail"]
    assert "unreadable" in done.stdout  # the summary line lists it
