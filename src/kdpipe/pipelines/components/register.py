"""Component: the register step (``kdpipe.steps.register``): MLflow model version, champion alias.

The tracking server comes from ``MLFLOW_TRACKING_URI`` (a Kubernetes secret on a cluster) or
``register.tracking_uri``. Without either the task fails when ``require_tracking_server`` (the
default: a cluster run must not report "promoted" into a throw-away registry); ``kdpipe pipeline
run-local`` turns it off, and MLflow's SQLite store is then written inside the ``decision`` artifact.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def register(
    onnx_model: Input[Model],
    evaluation: Input[Artifact],
    prepared: Input[Dataset],
    min_accuracy: float,
    prepare_params: dict,
    augment_params: dict,
    teacher_params: dict,
    train_params: dict,
    select_params: dict,
    export_params: dict,
    evaluate_params: dict,
    register_params: dict,
    decision: Output[Artifact],
    execution_key: str = "",
    git_commit: str = "",
    require_tracking_server: bool = True,
):
    """Every group is an input so the MLflow run records the parameters the model was built with."""
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps import register as step

    register_params = {**register_params, "min_accuracy": min_accuracy}
    params = kubeflow.params_from(
        prepare=prepare_params,
        augment=augment_params,
        teacher=teacher_params,
        train=train_params,
        select=select_params,
        export=export_params,
        evaluate=evaluate_params,
        register=register_params,
    )
    kubeflow.tracking_for_task(execution_key, git_commit)
    kubeflow.registry_for_task(params.register, decision.path, require_tracking_server)
    result = step.run(params, onnx_model.path, evaluation.path, prepared.path, decision.path)
    decision.metadata.update(
        {k: result[k] for k in ("registered", "model_name", "version", "promoted", "reason")}
    )
