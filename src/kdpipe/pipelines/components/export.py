"""Component: the export step (``kdpipe.steps.export``): ONNX (+ INT8) behind the parity gate."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def export(
    selected: Input[Model],
    prepared: Input[Dataset],
    export_params: dict,
    onnx_model: Output[Model],
    parity: Output[Metrics],
    execution_key: str = "",
    git_commit: str = "",
):
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(export=export_params)
    report = run_step(
        "export",
        params,
        track=kubeflow.tracking_for_task(execution_key, git_commit),
        selected_dir=selected.path,
        prepared_dir=prepared.path,
        out_dir=onnx_model.path,
    )
    onnx_model.metadata.update(
        {"framework": "onnx", "file": "model.onnx", "opset": params.export.opset, "int8": params.export.int8}
    )
    kubeflow.log_numbers(parity, report)
