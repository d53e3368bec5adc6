"""Component: the evaluate step (``kdpipe.steps.evaluate``). Returns the test accuracy, which the
pipeline's quality gate compares with ``min_accuracy``."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def evaluate(
    onnx_model: Input[Model],
    prepared: Input[Dataset],
    evaluate_params: dict,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    execution_key: str = "",
    git_commit: str = "",
) -> float:
    from pathlib import Path

    from kdpipe.data.prepared import load_prepared
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(evaluate=evaluate_params)
    result = run_step(
        "evaluate",
        params,
        track=kubeflow.tracking_for_task(execution_key, git_commit),
        export_dir=onnx_model.path,
        prepared_dir=prepared.path,
        out_dir=evaluation.path,
    )
    kubeflow.log_numbers(metrics, {k: v for k, v in result.items() if k != "per_class"})
    class_names = list(load_prepared(prepared.path, verify=False).class_names)
    confusion.log_confusion_matrix(class_names, kubeflow.confusion_matrix(evaluation.path, class_names))
    Path(report.path).write_text(
        (Path(evaluation.path) / "report.md").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return float(result["accuracy"])
