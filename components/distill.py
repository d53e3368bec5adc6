"""Component: the distill step (``kdpipe.steps.distill``). Runs on GPU nodes on a cluster; with more
than one GPU it runs DDP over them through ``torchrun``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kdpipe.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def distill(prepared: Input[Dataset], augmented: Input[Dataset], teacher_model: Input[Model], train_params: dict,
            augment_params: dict, gpus: int, student: Output[Model], summary: Output[Metrics]):
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    from kdpipe import kubeflow
    from kdpipe.steps import distill as step

    params = kubeflow.params_from(train=train_params, augment=augment_params)
    if gpus > 1:
        with tempfile.TemporaryDirectory() as tmp:
            params_file = os.path.join(tmp, "params.yaml")
            Path(params_file).write_text(yaml.safe_dump(params.model_dump(mode="json")), encoding="utf-8")
            cmd = kubeflow.distill_command(gpus, params_file, prepared.path, augmented.path, teacher_model.path,
                                           student.path)
            print("distill: DDP over", gpus, "GPUs:", " ".join(cmd))
            subprocess.run(cmd, check=True, env={**os.environ, "KDPIPE_TRACKING": "0"})
    else:
        step.run(params, prepared.path, augmented.path, teacher_model.path, student.path)
    metrics = json.loads((Path(student.path) / "metrics.json").read_text(encoding="utf-8"))
    student.metadata.update({"recipe": params.train.recipe, "arch": params.train.student_arch, "gpus": gpus})
    kubeflow.log_numbers(summary, metrics)
