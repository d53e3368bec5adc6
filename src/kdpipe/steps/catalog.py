"""Running a step of the catalog (:mod:`kdpipe.core.catalog`) the same way from every front end:
the step's ``run``, then its reports copied and the run logged to MLflow."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

from kdpipe.core import layout
from kdpipe.core.catalog import STEPS, Step  # noqa: F401  (re-exported)


def publish_reports(step: Step, out_dir: str | os.PathLike, reports_dir: str | os.PathLike) -> None:
    """Copy the step's report files from its output folder to ``reports_dir`` (atomically)."""
    import shutil

    from kdpipe.core.atomic import atomic_path

    for name in step.report_files:
        source = Path(out_dir) / name
        if source.is_file():
            with atomic_path(Path(reports_dir) / name) as tmp:
                shutil.copyfile(source, tmp)


def run_step(
    name: str, params, reports_dir: str | os.PathLike | None = None, track: bool = True, **paths: Any
) -> Any:
    """Run ``kdpipe.steps.<name>.run(params, **paths)``, then copy its reports to ``reports_dir`` and
    log it to MLflow as a nested run of this execution (unless ``track`` is false or tracking is off
    in the params or the environment). What every front end calls: CLI, Kubeflow components, Python.
    """
    step = STEPS[name]
    module = importlib.import_module(f"kdpipe.steps.{name}")
    started_at = time.time()  # MLflow shows the step's real duration, not the logging's
    result = module.run(params, **paths)
    out_dir = paths["out_dir"]
    if reports_dir:
        publish_reports(step, out_dir, reports_dir)
    if track and not step.logs_itself:
        from kdpipe.orchestration import tracking

        if tracking.tracking_enabled(params):
            # the prepared data the step read (prepare: wrote) names the run's data version
            prepared = (
                out_dir
                if name == "prepare"
                else paths.get("prepared_dir", step.paths.get("prepared_dir", (None,))[0])
            )
            tracking.log_step(
                name, params, out_dir, step.report_files, started_at, prepared or layout.PREPARED
            )
    return result
