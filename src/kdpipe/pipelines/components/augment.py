"""Component: the augment step (``kdpipe.steps.augment``): the stored views and the teacher's logits on
them. It runs after the teacher, on a GPU node on a cluster (the teacher's inference is the bulk of it)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def augment(
    prepared: Input[Dataset],
    teacher_model: Input[Model],
    augment_params: dict,
    train_params: dict,
    augmented: Output[Dataset],
    execution_key: str = "",
    git_commit: str = "",
):
    """``train_params`` supplies the device settings the teacher runs with."""
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(augment=augment_params, train=train_params)
    policy = run_step(
        "augment",
        params,
        track=kubeflow.tracking_for_task(execution_key, git_commit),
        prepared_dir=prepared.path,
        teacher_dir=teacher_model.path,
        out_dir=augmented.path,
    )
    augmented.metadata["views"] = params.augment.views
    # recipes whose teacher is trained in the run store no views (the policy says for which recipe)
    augmented.metadata["stored_views"] = not policy.get("skipped_for_recipe")
    augmented.metadata["view_kinds"] = policy.get("view_kinds", [])
    augmented.metadata["teacher_logits"] = policy.get("teacher") is not None
