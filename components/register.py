"""Component: the register step (``kdpipe.steps.register``): MLflow model version, champion alias.

The tracking server comes from ``MLFLOW_TRACKING_URI`` (a Kubernetes secret on a cluster) or
``register.tracking_uri``; without either, MLflow's SQLite store is written inside the
``decision`` artifact (a throw-away registry: set a server for champion/challenger to mean anything).
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from kdpipe.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def register(onnx_model: Input[Model], evaluation: Input[Artifact], prepared: Input[Dataset], min_accuracy: float,
             prepare_params: dict, augment_params: dict, teacher_params: dict, train_params: dict,
             select_params: dict, export_params: dict, evaluate_params: dict, register_params: dict,
             decision: Output[Artifact], execution_key: str = ""):
    """Every group is an input so the MLflow run records the parameters the model was built with."""
    import os

    from kdpipe import kubeflow
    from kdpipe.steps import register as step

    register_params = {**register_params, "min_accuracy": min_accuracy}
    params = kubeflow.params_from(
        data={"prepared": prepared.path}, prepare=prepare_params, augment=augment_params,
        teacher=teacher_params, train=train_params, select=select_params, export=export_params,
        evaluate=evaluate_params, register=register_params,
    )
    kubeflow.tracking_for_task(execution_key)  # the parent-run file in the pod's temporary folder
    if not os.environ.get("MLFLOW_TRACKING_URI") and not params.register.tracking_uri:
        # no tracking server given: a registry in the task's own output, never the image's folder
        os.makedirs(decision.path, exist_ok=True)
        params.register.tracking_uri = f"sqlite:///{os.path.abspath(decision.path)}/mlflow.db"
    result = step.run(params, onnx_model.path, evaluation.path, decision.path)
    decision.metadata.update({k: result[k] for k in ("registered", "model_name", "version", "promoted", "reason")})
