"""Component: the failing branch of the quality gate, so that a model below ``min_accuracy`` ends the run
failed (red in the KFP UI, a failed run for whoever watches it), not green with nothing registered."""

from kfp import dsl

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def quality_gate_failed(accuracy: float, min_accuracy: float):
    from kdpipe.orchestration import kubeflow

    kubeflow.fail_quality_gate(accuracy, min_accuracy)
