"""Component: the select step (``kdpipe.steps.select``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kdpipe.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def select(student: Input[Model], prepared: Input[Dataset], select_params: dict, register_params: dict,
           selected: Output[Model], summary: Output[Metrics]):
    """``register_params`` names the registry, read when ``select.include_champion`` is on."""
    from kdpipe import kubeflow
    from kdpipe.steps import select as step

    params = kubeflow.params_from(select=select_params, register=register_params)
    selection = step.run(params, student.path, prepared.path, selected.path)
    selected.metadata["chosen"] = selection["chosen"]
    selected.metadata["reason"] = selection["reason"]
    for cand in selection["candidates"]:
        kubeflow.log_numbers(summary, {k: v for k, v in cand.items() if k != "name"}, prefix=str(cand["name"]))
