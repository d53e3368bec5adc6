"""The pipeline's steps, declared once: what each reads, where it writes, which params and reports.

Every front end is derived from this table: the CLI's subcommands (``kdpipe <step>``), the work done
around a step whatever runs it (:func:`run_step`: reports copied, the run logged to MLflow), and the
consistency tests that hold dvc.yaml and the Kubeflow components to it (tests/test_catalog.py).

Imports only the standard library and :mod:`kdpipe.layout`: the CLI reads it before any heavy import.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import layout


@dataclass(frozen=True)
class Step:
    name: str
    summary: str  # one line, the CLI's help
    # run()'s path arguments in order: name -> (default, help); the last one is always out_dir
    paths: dict[str, tuple[str | None, str]]
    # params groups whose values the step reads (dvc.yaml's `params:` and the Kubeflow component's
    # `<group>_params` arguments must name exactly these; "data" reaches Kubeflow as an artifact)
    param_groups: tuple[str, ...]
    # small files the step writes into out_dir that are copied to --reports-dir: DVC tracks them as
    # metrics/plots in git while the (large) output folder is a cached DVC output
    report_files: tuple[str, ...] = ()
    logs_itself: bool = False  # register logs to MLflow with the model; the others through run_step
    options: dict[str, Any] = field(default_factory=dict)  # extra CLI flags: name -> argparse kwargs


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("prepare", "decode, validate, de-duplicate and split the images into packed arrays",
         {"data_root": (None, "data folder (default: params data.root)"),
          "out_dir": (layout.PREPARED, "output folder")},
         ("data", "prepare", "teacher"), ("manifest.json", "rejected.json"),
         options={"check": {"action": "store_true",
                            "help": "only check the data: read, validate and count everything, print the summary "
                                    "(classes, images per split, rejected files and why), write nothing"}}),
    Step("teacher", "fine-tune the (pretrained) teacher on the labeled data (or adopt teacher.checkpoint)",
         {"prepared_dir": (layout.PREPARED, "prepared data"), "out_dir": (layout.TEACHER, "output folder")},
         ("teacher", "augment", "train"), ("metrics.json", "history.json")),
    Step("augment", "write the augmentation sets (K views per training sample) with the teacher's logits on them",
         {"prepared_dir": (layout.PREPARED, "prepared data"),
          "teacher_dir": (layout.TEACHER, "teacher output (its logits are cached when teacher.pt is there)"),
          "out_dir": (layout.AUGMENTED, "output folder")},
         ("augment", "train"), ("policy.json", "preview.png")),
    Step("distill", "run the training recipe (train.recipe); resumes from the last checkpoint",
         {"prepared_dir": (layout.PREPARED, "prepared data"), "augmented_dir": (layout.AUGMENTED, "augmentation sets"),
          "teacher_dir": (layout.TEACHER, "teacher output"), "out_dir": (layout.DISTILL, "output folder")},
         ("train", "augment"), ("metrics.json", "history.json", "schedule.json")),
    Step("select", "pick the deployable model among the candidates within the budget; plot the frontier",
         {"distill_dir": (layout.DISTILL, "distill output"),
          "teacher_dir": (layout.TEACHER, "teacher output (its fine-tuned teacher is a candidate)"),
          "prepared_dir": (layout.PREPARED, "prepared data"), "out_dir": (layout.SELECTED, "output folder")},
         ("select", "export"), ("selection.json", "frontier.json", "frontier.png")),
    Step("export", "export the chosen model to ONNX (+ INT8) behind a torch/onnxruntime parity gate",
         {"selected_dir": (layout.SELECTED, "select output"), "prepared_dir": (layout.PREPARED, "prepared data"),
          "out_dir": (layout.EXPORTED, "output folder")},
         ("export",), ("parity.json",)),
    Step("evaluate", "measure accuracy, per-class metrics, confusion matrix and latency with onnxruntime",
         {"export_dir": (layout.EXPORTED, "export output"), "prepared_dir": (layout.PREPARED, "prepared data"),
          "out_dir": (layout.EVALUATION, "output folder")},
         ("evaluate",), ("metrics.json", "confusion.json", "confusion.png", "per_class.json", "report.md")),
    Step("register", "log the model to MLflow, register a version, move the champion alias if it is better "
                     "on the validation split",
         {"export_dir": (layout.EXPORTED, "export output"), "evaluation_dir": (layout.EVALUATION, "evaluate output"),
          "prepared_dir": (layout.PREPARED, "prepared data (the promotion split)"),
          "out_dir": (layout.REGISTERED, "output folder")},
         ("register",), ("decision.json",), logs_itself=True),
)}


def publish_reports(step: Step, out_dir: str | os.PathLike, reports_dir: str | os.PathLike) -> None:
    """Copy the step's report files from its output folder to ``reports_dir`` (atomically)."""
    import shutil

    from ..atomic import atomic_path

    for name in step.report_files:
        source = Path(out_dir) / name
        if source.is_file():
            with atomic_path(Path(reports_dir) / name) as tmp:
                shutil.copyfile(source, tmp)


def run_step(name: str, params, reports_dir: str | os.PathLike | None = None, track: bool = True,
             **paths: Any) -> Any:
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
        from .. import tracking

        if tracking.tracking_enabled(params):
            tracking.log_step(name, params, out_dir, step.report_files, started_at)
    return result
