"""Component: the distill step (``kdpipe.steps.distill``). Runs on GPU nodes on a cluster; with more
than one GPU it runs DDP over them through ``torchrun``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def distill(
    prepared: Input[Dataset],
    augmented: Input[Dataset],
    teacher_model: Input[Model],
    train_params: dict,
    augment_params: dict,
    gpus: int,
    student: Output[Model],
    summary: Output[Metrics],
    execution_key: str = "",
    git_commit: str = "",
    state_dir: str = "",
    nodes: int = 1,
):
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(train=train_params, augment=augment_params)
    track = kubeflow.tracking_for_task(execution_key, git_commit)
    # With a state volume the run trains in this run's folder there, so a retried or preempted pod
    # resumes from its last.pt; the results are then copied into the task's output.
    work = kubeflow.resumable_dir(state_dir, execution_key, "distill") or Path(student.path)
    if nodes > 1:
        # Kubeflow Trainer runs distill on `nodes` nodes of `gpus` GPUs; this task launches and awaits it
        from kdpipe.orchestration import objectstore, trainjob

        staging = student.uri.rstrip("/") + ".trainjob"
        job = trainjob.manifest(
            trainjob.job_name(execution_key or student.uri),
            trainjob.current_namespace(),
            os.environ.get(trainjob.TRAINJOB_IMAGE_ENV) or kubeflow.gpu_image(),
            nodes,
            gpus,
            {"prepared": prepared.uri, "augmented": augmented.uri, "teacher": teacher_model.uri},
            staging,
            params.model_dump(mode="json"),
            env={
                "KDPIPE_EXECUTION_KEY": execution_key,
                "KDPIPE_GIT_COMMIT": git_commit,
                "KDPIPE_TRACKING": "1" if track else "0",
            },
            gpu_resource=os.environ.get(trainjob.GPU_RESOURCE_ENV) or "nvidia.com/gpu",
            node_settings=json.loads(os.environ.get(trainjob.NODE_SETTINGS_ENV) or "{}"),
            owner={
                "name": os.environ.get(trainjob.POD_NAME_ENV, ""),
                "uid": os.environ.get(trainjob.POD_UID_ENV, ""),
            },
            # the nodes mount the state claim too and train in this run's folder there (resume)
            state_dir=str(work) if state_dir else "",
        )
        trainjob.run_and_wait(job, trainjob.in_cluster_api())
        objectstore.get(staging, work)
    elif gpus > 1:
        with tempfile.TemporaryDirectory() as tmp:
            params_file = os.path.join(tmp, "params.yaml")
            Path(params_file).write_text(yaml.safe_dump(params.model_dump(mode="json")), encoding="utf-8")
            cmd = kubeflow.distill_command(
                gpus, params_file, prepared.path, augmented.path, teacher_model.path, str(work)
            )
            print("distill: DDP over", gpus, "GPUs:", " ".join(cmd))
            # rank 0 logs the run (kdpipe.orchestration.tracking logs on the main rank only)
            subprocess.run(cmd, check=True, env={**os.environ, "KDPIPE_TRACKING": "1" if track else "0"})
    else:
        run_step(
            "distill",
            params,
            track=track,
            prepared_dir=prepared.path,
            augmented_dir=augmented.path,
            teacher_dir=teacher_model.path,
            out_dir=str(work),
        )
    kubeflow.publish(work, student.path)
    metrics = json.loads((Path(student.path) / "metrics.json").read_text(encoding="utf-8"))
    student.metadata.update({"recipe": params.train.recipe, "arch": params.train.student_arch, "gpus": gpus})
    kubeflow.log_numbers(summary, metrics)
