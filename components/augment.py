"""Component: the augment step (``kdpipe.steps.augment``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from kdpipe.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def augment(prepared: Input[Dataset], augment_params: dict, augmented: Output[Dataset]):
    from kdpipe import kubeflow
    from kdpipe.steps import augment as step

    params = kubeflow.params_from(augment=augment_params)
    policy = step.run(params, prepared.path, augmented.path)
    augmented.metadata["views"] = params.augment.views
    augmented.metadata["policy_keys"] = sorted(policy)
