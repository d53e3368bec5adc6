"""The pipeline's steps, declared once: what each reads, where it writes, which params and reports.

Every front end is derived from this table: the CLI's subcommands (``kdpipe <step>``), the runner
(:func:`kdpipe.steps.catalog.run_step`), the Kubeflow pipeline, cluster settings and the consistency
tests that hold dvc.yaml and the components to it. Imports only the standard library and
:mod:`kdpipe.core.layout`: every layer may read it, and the CLI reads it before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdpipe.core import layout


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
    # the name of out_dir as a Kubeflow artifact (default: out_dir's folder name); a step that reads
    # it names its component input the same, which is how the pipeline wires the tasks together
    artifact: str = ""

    @property
    def output(self) -> str:
        return self.artifact or self.paths["out_dir"][0].rstrip("/").rsplit("/", 1)[-1]

    def inputs(self) -> dict[str, str]:
        """run()'s input path arguments -> the artifact each one reads: the output of the step whose
        out_dir is that argument's default (:data:`DATA_ARTIFACT` for the data folder)."""
        return {
            arg: DATA_ARTIFACT if default is None else producer(default).output
            for arg, (default, _) in self.paths.items()
            if arg != "out_dir"
        }


# The pipeline's first task fetches the data folder (a DVC revision); the steps that read the data
# folder (default path None: params data.root) read this artifact.
DATA_ARTIFACT = "raw_data"


def producer(path: str) -> Step:
    """The step whose output folder is ``path`` by default."""
    for step in STEPS.values():
        if step.paths["out_dir"][0] == path:
            return step
    raise KeyError(f"no step of the catalog writes {path!r}")


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step(
            "prepare",
            "decode, validate, de-duplicate and split the images into packed arrays",
            {
                "data_root": (None, "data folder (default: params data.root)"),
                "out_dir": (layout.PREPARED, "output folder"),
            },
            ("data", "prepare", "teacher"),
            ("manifest.json", "rejected.json"),
            options={
                "check": {
                    "action": "store_true",
                    "help": "only check the data: read, validate and count everything, print the summary "
                    "(classes, images per split, rejected files and why), write nothing",
                }
            },
        ),
        Step(
            "teacher",
            "fine-tune the (pretrained) teacher on the labeled data (or adopt teacher.checkpoint)",
            {
                "prepared_dir": (layout.PREPARED, "prepared data"),
                "out_dir": (layout.TEACHER, "output folder"),
            },
            ("teacher", "augment", "train"),
            ("metrics.json", "history.json"),
            artifact="teacher_model",
        ),
        Step(
            "augment",
            "write the augmentation sets (K views per training sample) with the teacher's logits on them",
            {
                "prepared_dir": (layout.PREPARED, "prepared data"),
                "teacher_dir": (
                    layout.TEACHER,
                    "teacher output (its logits are cached when teacher.pt is there)",
                ),
                "out_dir": (layout.AUGMENTED, "output folder"),
            },
            ("augment", "train"),
            ("policy.json", "preview.png"),
        ),
        Step(
            "distill",
            "run the training recipe (train.recipe); resumes from the last checkpoint",
            {
                "prepared_dir": (layout.PREPARED, "prepared data"),
                "augmented_dir": (layout.AUGMENTED, "augmentation sets"),
                "teacher_dir": (layout.TEACHER, "teacher output"),
                "out_dir": (layout.DISTILL, "output folder"),
            },
            ("train", "augment"),
            ("metrics.json", "history.json", "schedule.json"),
            artifact="student",
        ),
        Step(
            "select",
            "pick the deployable model among the candidates within the budget; plot the frontier",
            {
                "distill_dir": (layout.DISTILL, "distill output"),
                "teacher_dir": (layout.TEACHER, "teacher output (its fine-tuned teacher is a candidate)"),
                "prepared_dir": (layout.PREPARED, "prepared data"),
                "out_dir": (layout.SELECTED, "output folder"),
            },
            ("select", "export"),
            ("selection.json", "frontier.json", "frontier.png"),
        ),
        Step(
            "export",
            "export the chosen model to ONNX (+ INT8) behind a torch/onnxruntime parity gate",
            {
                "selected_dir": (layout.SELECTED, "select output"),
                "prepared_dir": (layout.PREPARED, "prepared data"),
                "out_dir": (layout.EXPORTED, "output folder"),
            },
            ("export",),
            ("parity.json",),
            artifact="onnx_model",
        ),
        Step(
            "evaluate",
            "measure accuracy, per-class metrics, confusion matrix and latency with onnxruntime",
            {
                "export_dir": (layout.EXPORTED, "export output"),
                "prepared_dir": (layout.PREPARED, "prepared data"),
                "out_dir": (layout.EVALUATION, "output folder"),
            },
            ("evaluate",),
            ("metrics.json", "confusion.json", "confusion.png", "per_class.json", "report.md"),
            artifact="evaluation",
        ),
        # last: register, which changes the model registry (Kubeflow runs it only past the gate)
        Step(
            "register",
            "log the model to MLflow, register a version, move the champion alias if it is better "
            "on the validation split",
            {
                "export_dir": (layout.EXPORTED, "export output"),
                "evaluation_dir": (layout.EVALUATION, "evaluate output"),
                "prepared_dir": (layout.PREPARED, "prepared data (the promotion split)"),
                "out_dir": (layout.REGISTERED, "output folder"),
            },
            ("register",),
            ("decision.json",),
            logs_itself=True,
            artifact="decision",
        ),
    )
}
