"""The kdpipe Kubeflow pipeline: data -> prepare -> teacher -> augment -> distill -> select -> export ->
evaluate -> (quality gate) -> register.

Pipeline parameters mirror ``params.yaml``: one dict per step group (``train_params``...), with
the file's values as defaults, so a run without arguments trains exactly what ``dvc repro`` would.
Two values are separate parameters: ``min_accuracy`` (``register.min_accuracy``, the quality gate:
a model below it ends the run failed) and ``gpus`` (GPUs per training task). ``git_commit`` (the
commit the run was submitted from) and the run's id reach every task and MLflow;
``require_tracking_server`` makes register fail without an MLflow server (on by default). The ``data`` group's folders do not apply: the data comes
from a DVC revision (``data_repo``, ``data_rev``, ``data_version``).

``kdpipe pipeline compile`` writes :data:`PACKAGE`, which is committed; a test fails when it is stale.
"""

import ast
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from kdpipe.core.catalog import DATA_ARTIFACT, STEPS
from kdpipe.core.params import DEFAULT_PARAMS_FILE, Params, load_params
from kdpipe.orchestration import kubeflow
from kdpipe.orchestration.cluster import (
    GPU_TASKS,
    MIN_BACKEND,
    ClusterSettings,
    load_cluster_settings,
    parse_version,
)
from kdpipe.orchestration.tracking import IMAGE_REF_ENV
from kdpipe.orchestration.trainjob import (
    GPU_RESOURCE_ENV,
    NODE_SETTINGS_ENV,
    POD_NAME_ENV,
    POD_UID_ENV,
    STORE_SECRET,
    STORE_SECRET_KEYS,
    TRAINJOB_IMAGE_ENV,
)
from kdpipe.pipelines.components import data, step_components
from kdpipe.pipelines.components.gate import quality_gate_failed
from kdpipe.training.devices import EXPECT_GPU_ENV

PIPELINE_NAME = "kdpipe"
# Both relative to the project folder (where `kdpipe pipeline` runs): the compiled package is committed there.
PACKAGE = Path("pipelines") / "kdpipe_pipeline.yaml"
PARAMS_FILE = Path(DEFAULT_PARAMS_FILE)
# Each component compiled on its own (for users who build their own pipelines from kdpipe's steps).
COMPONENTS_DIR = Path("components")
# params.yaml groups that become pipeline parameters named "<group>_params": every group a step
# reads (data reaches Kubeflow as an artifact), in the catalog's order.
GROUPS = tuple(dict.fromkeys(g for step in STEPS.values() for g in step.param_groups if g != "data"))
# Values that are pipeline parameters of their own rather than keys of their group's dict.
SEPARATE = {("register", "min_accuracy"): "min_accuracy"}
_NO_REMOTE_CONFIG: dict[str, Any] = {}


def group_defaults(params: Params) -> dict[str, dict[str, Any]]:
    """``{"train_params": {...}, ...}`` from validated params. Separate values are left out. KFP cannot
    store ``None``, so unset values travel as the string ``"null"`` (``kubeflow.params_from`` turns it
    back): leaving them out would let a schema default that is not ``None`` take their place.
    A URL's credentials (``register.tracking_uri`` with a password...) never become a default: the
    compiled package is committed and shown in the KFP UI; the tasks read them from secrets."""
    from kdpipe.orchestration.tracking import without_credentials

    dumped = params.model_dump(mode="json")
    return {
        f"{g}_params": {
            k: kubeflow.NULL if v is None else without_credentials(v) if isinstance(v, str) else v
            for k, v in dumped[g].items()
            if (g, k) not in SEPARATE
        }
        for g in GROUPS
    }


def _gpu_task(task: dsl.PipelineTask, gpus, cluster: ClusterSettings) -> dsl.PipelineTask:
    """GPU request (what places the pod on a GPU node), the cluster's GPU node selector and
    tolerations, and shared memory for data loading and DDP."""
    task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(gpus)
    task.set_env_variable(EXPECT_GPU_ENV, "1")  # fail loudly when CUDA is unusable, never train on the CPU
    task.set_container_image(kubeflow.gpu_image())
    for label, value in cluster.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label, value)
    for toleration in cluster.gpu_tolerations:
        kubernetes.add_toleration(task, **toleration.model_dump(exclude_none=True))
    kubernetes.empty_dir_mount(
        task,
        volume_name=kubeflow.SHM_VOLUME,
        mount_path=kubeflow.SHM_PATH,
        medium="Memory",
        size_limit=cluster.shm_size,
    )
    return task


def _cluster_task(task: dsl.PipelineTask, name: str, cluster: ClusterSettings) -> dsl.PipelineTask:
    """The task's requests and limits, retries and time limit, pull secrets, and the name of its image
    (recorded in MLflow: which build produced a model)."""
    settings = cluster.task(name)
    for setter, value in (
        (task.set_cpu_request, settings.cpu_request),
        (task.set_cpu_limit, settings.cpu_limit),
        (task.set_memory_request, settings.memory_request),
        (task.set_memory_limit, settings.memory_limit),
    ):
        if value:
            setter(value)
    if settings.retries:
        # exponential back-off from a minute: a preempted node needs time to be replaced
        task.set_retry(
            num_retries=settings.retries,
            backoff_duration="60s",
            backoff_factor=2.0,
            backoff_max_duration="3600s",
        )
    if settings.timeout_seconds:
        kubernetes.set_timeout(task, settings.timeout_seconds)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, cluster.image_pull_secrets)
    for key, value in cluster.pod_labels.items():
        kubernetes.add_pod_label(task, key, value)
    for key, value in cluster.pod_annotations.items():
        kubernetes.add_pod_annotation(task, key, value)
    on_gpu = name in GPU_TASKS and not (name == "distill" and cluster.distill_nodes > 1)
    task.set_env_variable(IMAGE_REF_ENV, kubeflow.gpu_image() if on_gpu else kubeflow.image())
    return task


def _mlflow_env(task: dsl.PipelineTask, optional_secrets: bool) -> dsl.PipelineTask:
    return kubernetes.use_secret_as_env(
        task, kubeflow.MLFLOW_SECRET, kubeflow.MLFLOW_SECRET_ENV, optional=optional_secrets
    )


# Every step task logs to MLflow under one parent run per pipeline run, found by this key.
EXECUTION = dsl.PIPELINE_JOB_ID_PLACEHOLDER
# The steps after this one run only when its returned accuracy passes the gate (``min_accuracy``).
GATE_STEP = "evaluate"
# Steps that change something outside the run (the registry): KFP must never reuse a cached result.
UNCACHED = ("register",)


def pipeline_parameters(params: Params) -> list[inspect.Parameter]:
    """The pipeline's parameters with their defaults: the data revision, the run's own values, then
    one ``<group>_params`` dict per params group that some step reads."""
    d = group_defaults(params)
    own: list[tuple[str, type, Any]] = [
        ("data_repo", str, ""),
        ("data_rev", str, "HEAD"),
        ("data_version", str, ""),
        ("data_root", str, params.data.root),
        ("dvc_remote", str, ""),
        ("dvc_remote_config", dict, _NO_REMOTE_CONFIG),
        ("gpus", int, 1),
        ("min_accuracy", float, params.register.min_accuracy),
        ("git_commit", str, ""),
        ("require_tracking_server", bool, True),
        *((f"{g}_params", dict, d[f"{g}_params"]) for g in GROUPS),
    ]
    return [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind)
        for name, kind, default in own
    ]


def _component_inputs(component) -> list[str]:
    return list(component.component_spec.inputs or {})


def _step_task(step, component, args: dict, outputs: dict, cluster: ClusterSettings) -> dsl.PipelineTask:
    """A catalog step's task, wired by name: each input artifact is the output of the step that
    writes it (the catalog says which), and every other input named like a pipeline parameter, a
    cluster value (:func:`_cluster_arguments`) or the run context receives that value."""
    available = {**args, **_cluster_arguments(cluster), "execution_key": EXECUTION}
    wanted = _component_inputs(component)
    kwargs = {artifact: outputs[artifact] for artifact in dict.fromkeys(step.inputs().values())}
    kwargs.update({name: available[name] for name in wanted if name not in kwargs and name in available})
    return component(**kwargs)


def _cluster_arguments(cluster: ClusterSettings) -> dict[str, Any]:
    """Component inputs that come from the cluster settings, not from the run's parameters."""
    return {
        "state_dir": cluster.state_mount if cluster.state_pvc else "",  # distill resumes from there
        "nodes": cluster.distill_nodes,
    }


def _place(task: dsl.PipelineTask, name: str, gpus, cluster: ClusterSettings, optional_secrets: bool) -> None:
    """Where and how a step's task runs: GPU nodes for the GPU steps (distill over several nodes
    only launches a TrainJob), a durable state volume for distill, the tracking secret everywhere."""
    if name == "distill" and cluster.distill_nodes > 1:
        _trainjob_launcher(task, cluster, optional_secrets)
    elif name in GPU_TASKS:
        _gpu_task(task, gpus if name == "distill" else 1, cluster)
    if name == "distill" and cluster.state_pvc:  # durable resume state: a retried or preempted pod resumes
        kubernetes.mount_pvc(task, pvc_name=cluster.state_pvc, mount_path=cluster.state_mount)
    if name in UNCACHED:
        task.set_caching_options(False)
    _mlflow_env(task, optional_secrets)  # every step logs to the tracking server when the secret exists


def _trainjob_launcher(task: dsl.PipelineTask, cluster: ClusterSettings, optional_secrets: bool) -> None:
    """The distill task that only launches and awaits the multi-node TrainJob, whose nodes hold the GPUs."""
    task.set_env_variable(TRAINJOB_IMAGE_ENV, kubeflow.gpu_image())
    task.set_env_variable(GPU_RESOURCE_ENV, cluster.gpu_resource)
    # the nodes' placement, size and deadline, and the launcher pod as the TrainJob's owner
    task.set_env_variable(NODE_SETTINGS_ENV, json.dumps(cluster.node_settings(), sort_keys=True))
    kubernetes.use_field_path_as_env(task, POD_NAME_ENV, "metadata.name")
    kubernetes.use_field_path_as_env(task, POD_UID_ENV, "metadata.uid")
    # the launcher stages the inputs and reads the result itself (fsspec): it needs the same
    # object-store credential as the nodes, and only this task gets it
    kubernetes.use_secret_as_env(
        task, STORE_SECRET, {key: key for key in STORE_SECRET_KEYS}, optional=optional_secrets
    )


def _data_task(args: dict, optional_secrets: bool) -> dsl.PipelineTask:
    task = data(
        repo=args["data_repo"],
        rev=args["data_rev"],
        data_version=args["data_version"],
        data_root=args["data_root"],
        dvc_remote=args["dvc_remote"],
        dvc_remote_config=args["dvc_remote_config"],
    ).set_display_name("data")
    kubernetes.use_secret_as_env(
        task, kubeflow.DVC_SECRET, kubeflow.DVC_SECRET_ENV, optional=optional_secrets
    )
    kubernetes.use_secret_as_env(
        task, kubeflow.GIT_SECRET, kubeflow.GIT_SECRET_ENV, optional=optional_secrets
    )
    return task


def build_pipeline(
    params: "Params | None" = None, cluster: ClusterSettings | None = None, optional_secrets: bool = True
):
    """The ``@dsl.pipeline`` function, with parameter defaults taken from ``params`` (default:
    params.yaml) and the cluster's settings (default: :class:`kdpipe.orchestration.cluster.ClusterSettings`).
    ``optional_secrets=False`` compiles for a backend older than 2.15: every secret must then exist.

    The tasks are the catalog's steps in order (:func:`kdpipe.pipelines.components.step_components`),
    after the data task; the steps after :data:`GATE_STEP` run inside the quality gate."""
    params = params or load_params(PARAMS_FILE)
    cluster = cluster or ClusterSettings()
    parameters = pipeline_parameters(params)
    components = step_components()
    names = list(components)
    gated = names[names.index(GATE_STEP) + 1 :]

    def kdpipe_pipeline(*values):
        args = dict(zip([p.name for p in parameters], values, strict=True))
        data_task = _data_task(args, optional_secrets)
        _cluster_task(data_task, "data", cluster)
        outputs = {DATA_ARTIFACT: data_task.outputs[DATA_ARTIFACT]}

        def add(name: str) -> dsl.PipelineTask:
            task = _step_task(STEPS[name], components[name], args, outputs, cluster)
            outputs[STEPS[name].output] = task.outputs[STEPS[name].output]
            _place(task, name, args["gpus"], cluster, optional_secrets)
            _cluster_task(task, name, cluster)
            return task

        gate = [add(name) for name in names if name not in gated][-1]
        with dsl.If(gate.outputs["Output"] >= args["min_accuracy"], name="quality-gate"):
            for name in gated:
                add(name)
        with dsl.Else(name="quality-gate-failed"):
            # a model below the gate ends the run failed, not green with nothing registered
            failed = quality_gate_failed(accuracy=gate.outputs["Output"], min_accuracy=args["min_accuracy"])
            failed.set_caching_options(False)
            _cluster_task(failed, "register", cluster)

    # KFP reads a pipeline's parameters from its signature: this one is made from the catalog
    kdpipe_pipeline.__signature__ = inspect.Signature(parameters)
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="kdpipe: semi-supervised distillation of a small image "
        "classifier from a DVC data revision, exported to ONNX and registered in MLflow",
    )(kdpipe_pipeline)


def compile_pipeline(
    out: str | os.PathLike = PACKAGE,
    params_file: str | os.PathLike | None = None,
    cluster_file: str | os.PathLike | None = None,
    backend_version: str | None = None,
) -> Path:
    """Compile the pipeline (defaults from ``params_file``, else params.yaml; cluster settings from
    ``cluster_file``, else the defaults) to ``out``. ``backend_version`` below 2.15 drops the fields
    older backends reject (optional secrets)."""
    params = load_params(params_file or PARAMS_FILE)
    optional_secrets = True
    if backend_version is not None:
        version = parse_version(backend_version)
        if version is None:
            raise ValueError(f"--backend-version {backend_version!r}: expected a version like 2.14.0")
        optional_secrets = version >= MIN_BACKEND
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(params, load_cluster_settings(cluster_file), optional_secrets=optional_secrets)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    out.write_text(_stable_header(out.read_text(encoding="utf-8")), encoding="utf-8")
    return out


def compile_components(folder: str | os.PathLike = COMPONENTS_DIR) -> list[Path]:
    """Compile every component to ``folder/<name>.yaml``: what ``kfp.components.load_component_from_file``
    reads to use a kdpipe step in another pipeline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for component in (data, *step_components().values(), quality_gate_failed):
        out = folder / f"{component.name.replace('-', '_')}.yaml"
        compiler.Compiler().compile(component, package_path=str(out))
        out.write_text(_stable_header(out.read_text(encoding="utf-8")), encoding="utf-8")
        written.append(out)
    return written


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
