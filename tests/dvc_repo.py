"""Throw-away git + DVC repositories for tests that run the real ``dvc`` and ``kdpipe`` commands
(pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
KDPIPE = str(BIN / "kdpipe")


def repo_env(**extra: str) -> dict[str, str]:
    """This environment with the venv first on PATH (dvc.yaml stages call ``kdpipe``), step tracking
    off and a git identity, plus ``extra``."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "KDPIPE_TRACKING": "0",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        **extra,
    }


def run(cmd, cwd, env, timeout: float = 240) -> str:
    """Run a command; fail the test with its output unless it exits 0. Returns stdout."""
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def init_repo(path: Path, env) -> Path:
    """``git init`` + ``dvc init`` (analytics off) in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], path, env)
    run([DVC, "init", "-q"], path, env)
    run([DVC, "config", "core.analytics", "false"], path, env)
    return path


def commit(path: Path, env, message: str) -> None:
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", message], path, env)
