"""Component: the prepare step (``kdpipe.steps.prepare``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def prepare(
    raw_data: Input[Dataset],
    prepare_params: dict,
    teacher_params: dict,
    prepared: Output[Dataset],
    summary: Output[Metrics],
    execution_key: str = "",
    git_commit: str = "",
):
    """``teacher_params`` supplies ``image_size``: prepare keeps a teacher-resolution copy of large images."""
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(prepare=prepare_params, teacher=teacher_params)
    manifest = run_step(
        "prepare",
        params,
        track=kubeflow.tracking_for_task(execution_key, git_commit),
        data_root=raw_data.path,
        out_dir=prepared.path,
    )
    prepared.metadata["data_version"] = manifest["data_version"]
    prepared.metadata["class_names"] = manifest["class_names"]
    kubeflow.log_numbers(summary, manifest["counts"], prefix="images")
