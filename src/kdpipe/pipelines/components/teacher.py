"""Component: the teacher step (``kdpipe.steps.teacher``). Runs on a GPU node on a cluster."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def teacher(
    prepared: Input[Dataset],
    teacher_params: dict,
    augment_params: dict,
    train_params: dict,
    teacher_model: Output[Model],
    summary: Output[Metrics],
    execution_key: str = "",
    git_commit: str = "",
):
    """``train_params`` supplies the device settings (device, amp, channels_last, threads)."""
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(teacher=teacher_params, augment=augment_params, train=train_params)
    result = run_step(
        "teacher",
        params,
        track=kubeflow.tracking_for_task(execution_key, git_commit),
        prepared_dir=prepared.path,
        out_dir=teacher_model.path,
    )
    teacher_model.metadata["arch"] = params.teacher.arch
    teacher_model.metadata["file"] = "teacher.pt"
    kubeflow.log_numbers(summary, result)
