"""Run the whole Kubeflow pipeline on this machine with ``kfp.local`` (no cluster, no Docker).

Every task runs as a subprocess of the current Python (``SubprocessRunner(use_venv=False)``), so
kdpipe must be installed here, as it is in the image. Accelerator and kfp-kubernetes settings are
ignored locally. Outputs land in ``<pipeline_root>/<pipeline>-<timestamp>/<task>/<output>``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_ROOT = "artifacts/kfp"


def resolve_rev(repo: str, rev: str) -> str:
    """The commit ``rev`` names in the local git repository ``repo`` (empty if it cannot be resolved)."""
    done = subprocess.run(
        ["git", "-C", repo, "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def run_local(
    arguments: dict[str, Any],
    params_file: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    pipeline_root: str | os.PathLike = DEFAULT_ROOT,
    enable_caching: bool = False,
) -> Path:
    """Run the pipeline with ``arguments`` (the data parameters, ``gpus``...; every step group comes
    from ``params_file`` + ``overrides``); return the folder holding this run's task outputs."""
    from kfp import local

    from kdpipe.core.params import load_params
    from kdpipe.pipelines.kfp_pipeline import PIPELINE_NAME, build_pipeline

    root = Path(pipeline_root).resolve()
    before = set(root.glob(f"{PIPELINE_NAME}-*")) if root.is_dir() else set()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=enable_caching,
    )
    build_pipeline(load_params(params_file, overrides))(
        **arguments
    )  # like every step: --params, $KDPIPE_PARAMS or ./params.yaml
    new = sorted(set(root.glob(f"{PIPELINE_NAME}-*")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"kfp.local wrote no run folder under {root}")
    return new[-1]
