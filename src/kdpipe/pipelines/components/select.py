"""Component: the select step (``kdpipe.steps.select``)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def select(
    student: Input[Model],
    teacher_model: Input[Model],
    prepared: Input[Dataset],
    select_params: dict,
    export_params: dict,
    selected: Output[Model],
    summary: Output[Metrics],
    frontier: Output[HTML],
    execution_key: str = "",
    git_commit: str = "",
):
    """``export_params`` supplies ``opset``: candidates are measured as they will be exported. The
    fine-tuned teacher competes with the student; ``frontier`` shows accuracy against latency."""
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(select=select_params, export=export_params)
    selection = run_step(
        "select",
        params,
        track=kubeflow.tracking_for_task(execution_key, git_commit),
        distill_dir=student.path,
        teacher_dir=teacher_model.path,
        prepared_dir=prepared.path,
        out_dir=selected.path,
    )
    selected.metadata["chosen"] = selection["chosen"]
    selected.metadata["reason"] = selection["reason"]
    for cand in selection["candidates"]:
        kubeflow.log_numbers(
            summary, {k: v for k, v in cand.items() if k != "name"}, prefix=str(cand["name"])
        )
    kubeflow.write_png_page(
        frontier.path,
        f"{selected.path}/frontier.png",
        "Candidates: accuracy against latency",
        selection["reason"],
    )
