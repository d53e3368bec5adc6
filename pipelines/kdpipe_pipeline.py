"""The kdpipe Kubeflow pipeline: data -> prepare -> teacher -> augment -> distill -> select -> export ->
evaluate -> (quality gate) -> register.

Pipeline parameters mirror ``params.yaml``: one dict per step group (``train_params``...), with
the file's values as defaults, so a run without arguments trains exactly what ``dvc repro`` would.
Two values are separate parameters: ``min_accuracy`` (``register.min_accuracy``, the quality gate)
and ``gpus`` (GPUs per training task). The ``data`` group's folders do not apply: the data comes
from a DVC revision (``data_repo``, ``data_rev``, ``data_version``).

``kdpipe pipeline compile`` writes :data:`PACKAGE`, which is committed; a test fails when it is stale.
"""

import ast
import os
import re
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from components import augment, data, distill, evaluate, export, prepare, register, select, teacher
from kdpipe import kubeflow
from kdpipe.params import Params, load_params

PIPELINE_NAME = "kdpipe"
PACKAGE = Path(__file__).with_name("kdpipe_pipeline.yaml")
PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
# params.yaml groups that become pipeline parameters named "<group>_params".
GROUPS = ("prepare", "augment", "teacher", "train", "select", "export", "evaluate", "register")
# Values that are pipeline parameters of their own rather than keys of their group's dict.
SEPARATE = {("register", "min_accuracy"): "min_accuracy"}
_NO_REMOTE_CONFIG: dict[str, Any] = {}


def group_defaults(params: Params) -> dict[str, dict[str, Any]]:
    """``{"train_params": {...}, ...}`` from validated params. Separate values are left out. KFP cannot
    store ``None``, so unset values travel as the string ``"null"`` (``kubeflow.params_from`` turns it
    back): leaving them out would let a schema default that is not ``None`` take their place."""
    dumped = params.model_dump(mode="json")
    return {f"{g}_params": {k: kubeflow.NULL if v is None else v for k, v in dumped[g].items()
                            if (g, k) not in SEPARATE} for g in GROUPS}


def _gpu_task(task: dsl.PipelineTask, gpus) -> dsl.PipelineTask:
    """GPU request, GPU node placement and shared memory for a training task."""
    task.set_accelerator_type(kubeflow.GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, *kubeflow.GPU_NODE_SELECTOR)
    kubernetes.add_toleration(task, **kubeflow.GPU_TOLERATION)
    kubernetes.empty_dir_mount(task, volume_name=kubeflow.SHM_VOLUME, mount_path=kubeflow.SHM_PATH,
                               medium="Memory", size_limit=kubeflow.SHM_SIZE)
    return task


def _mlflow_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return kubernetes.use_secret_as_env(task, kubeflow.MLFLOW_SECRET, kubeflow.MLFLOW_SECRET_ENV, optional=True)


# Every step task logs to MLflow under one parent run per pipeline run, found by this key.
EXECUTION = dsl.PIPELINE_JOB_ID_PLACEHOLDER


def build_pipeline(params: "Params | None" = None):
    """The ``@dsl.pipeline`` function, with parameter defaults taken from ``params`` (default: params.yaml)."""
    params = params or load_params(PARAMS_FILE)
    d = group_defaults(params)

    @dsl.pipeline(name=PIPELINE_NAME, description="kdpipe: semi-supervised distillation of a small image "
                  "classifier from a DVC data revision, exported to ONNX and registered in MLflow")
    def kdpipe_pipeline(
        data_repo: str = "",
        data_rev: str = "HEAD",
        data_version: str = "",
        data_root: str = params.data.root,
        dvc_remote: str = "",
        dvc_remote_config: dict = _NO_REMOTE_CONFIG,
        gpus: int = 1,
        min_accuracy: float = params.register.min_accuracy,
        prepare_params: dict = d["prepare_params"],
        augment_params: dict = d["augment_params"],
        teacher_params: dict = d["teacher_params"],
        train_params: dict = d["train_params"],
        select_params: dict = d["select_params"],
        export_params: dict = d["export_params"],
        evaluate_params: dict = d["evaluate_params"],
        register_params: dict = d["register_params"],
    ):
        data_task = data(repo=data_repo, rev=data_rev, data_version=data_version, data_root=data_root,
                         dvc_remote=dvc_remote, dvc_remote_config=dvc_remote_config).set_display_name("data")
        kubernetes.use_secret_as_env(data_task, kubeflow.DVC_SECRET, kubeflow.DVC_SECRET_ENV, optional=True)

        prep = prepare(raw_data=data_task.outputs["raw_data"], prepare_params=prepare_params,
                       teacher_params=teacher_params, execution_key=EXECUTION)
        prepared = prep.outputs["prepared"]
        teach = teacher(prepared=prepared, teacher_params=teacher_params, augment_params=augment_params,
                        train_params=train_params, execution_key=EXECUTION)
        _gpu_task(teach, 1)
        # after the teacher: its logits on every stored view are computed once, with the views
        aug = augment(prepared=prepared, teacher_model=teach.outputs["teacher_model"],
                      augment_params=augment_params, train_params=train_params, execution_key=EXECUTION)
        _gpu_task(aug, 1)
        dist = distill(prepared=prepared, augmented=aug.outputs["augmented"],
                       teacher_model=teach.outputs["teacher_model"], train_params=train_params,
                       augment_params=augment_params, gpus=gpus, execution_key=EXECUTION)
        _gpu_task(dist, gpus)
        sel = select(student=dist.outputs["student"], prepared=prepared, select_params=select_params,
                     export_params=export_params, execution_key=EXECUTION)
        exp = export(selected=sel.outputs["selected"], prepared=prepared, export_params=export_params,
                     execution_key=EXECUTION)
        ev = evaluate(onnx_model=exp.outputs["onnx_model"], prepared=prepared, evaluate_params=evaluate_params,
                      execution_key=EXECUTION)
        for task in (prep, teach, aug, dist, sel, exp, ev):
            _mlflow_env(task)  # every step logs to the tracking server when the secret exists

        with dsl.If(ev.outputs["Output"] >= min_accuracy, name="quality-gate"):
            reg = register(onnx_model=exp.outputs["onnx_model"], evaluation=ev.outputs["evaluation"],
                           prepared=prepared, min_accuracy=min_accuracy, prepare_params=prepare_params,
                           augment_params=augment_params, teacher_params=teacher_params,
                           train_params=train_params, select_params=select_params, export_params=export_params,
                           evaluate_params=evaluate_params, register_params=register_params,
                           execution_key=EXECUTION)
            reg.set_caching_options(False)  # it changes the registry: never skip it
            _mlflow_env(reg)

    return kdpipe_pipeline


def compile_pipeline(out: str | os.PathLike = PACKAGE, params_file: str | os.PathLike | None = None) -> Path:
    """Compile the pipeline (defaults from ``params_file``, else params.yaml) to ``out``."""
    params = load_params(params_file or PARAMS_FILE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params), package_path=str(out))
    out.write_text(_stable_header(out.read_text(encoding="utf-8")), encoding="utf-8")
    return out


_DEFAULT_DICT = re.compile(r"^(#.*\[Default: )(\{.*\})(\])$")


def _stable_header(text: str) -> str:
    """KFP's header comment prints dict defaults in hash order, which changes from run to run; sort
    them so the same pipeline always compiles to the same bytes (the committed YAML is compared)."""
    lines = text.split("\n")
    for k, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = _DEFAULT_DICT.match(line)
        if match:
            lines[k] = f"{match[1]}{dict(sorted(ast.literal_eval(match[2]).items()))!r}{match[3]}"
    return "\n".join(lines)
