"""Multi-node distill: a Kubeflow Trainer TrainJob launched and awaited by the pipeline's distill task.

When ``nodes > 1`` the distill task sends a TrainJob (Kubeflow Trainer v2) that runs the image on
``nodes`` nodes with ``gpus_per_node`` GPUs each; every node runs ``kdpipe distill-node`` (copy the
inputs from the object store, distill under ``torchrun``, node 0 stages the outputs), and the task
copies the outputs into its own once the TrainJob reports ``Complete``. It needs the
``torch-distributed`` ClusterTrainingRuntime, rights on ``trainjobs`` and the
``kdpipe-object-store`` secret.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kdpipe.core.errors import KdpipeError
from kdpipe.orchestration import objectstore
from kdpipe.orchestration.kubeflow import MLFLOW_SECRET, MLFLOW_SECRET_ENV

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIME = "torch-distributed"
# Object-store credentials for the nodes (the KFP launcher's own are not visible to the TrainJob's pods).
STORE_SECRET = "kdpipe-object-store"
STORE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
INPUTS = ("prepared", "augmented", "teacher")
TRAINJOB_IMAGE_ENV = "KDPIPE_TRAINJOB_IMAGE"  # the nodes' (GPU) image, set on the launching task
GPU_RESOURCE_ENV = "KDPIPE_GPU_RESOURCE"  # the nodes' GPU resource (cluster settings' gpu_resource)


def node_command(inputs: Mapping[str, str], output: str) -> list[str]:
    """What every node runs: ``kdpipe distill-node`` with the input and output URIs; the params
    travel in ``$KDPIPE_PARAMS_JSON``."""
    args = ["kdpipe", "distill-node", "--output", output]  # the image's kdpipe
    for name in INPUTS:
        args += [f"--{name}", inputs[name]]
    return args


def manifest(
    name: str,
    namespace: str,
    image: str,
    nodes: int,
    gpus_per_node: int,
    inputs: Mapping[str, str],
    output: str,
    params: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    gpu_resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    """The TrainJob, built with Kubeflow Trainer's own API models (so its fields are the CRD's)."""
    from kubeflow_trainer_api import models as m

    if nodes < 2:
        raise ValueError(f"a TrainJob is for nodes > 1, got {nodes}")
    variables = [m.IoK8sApiCoreV1EnvVar(name="KDPIPE_PARAMS_JSON", value=json.dumps(params, sort_keys=True))]
    variables += [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in sorted((env or {}).items())]
    secrets = [(STORE_SECRET, key, key) for key in STORE_SECRET_KEYS]
    secrets += [(MLFLOW_SECRET, key, variable) for key, variable in MLFLOW_SECRET_ENV.items()]
    variables += [
        m.IoK8sApiCoreV1EnvVar(
            name=variable,
            value_from=m.IoK8sApiCoreV1EnvVarSource(
                secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=True)
            ),
        )
        for secret, key, variable in secrets
    ]
    gpus = (
        {gpu_resource: m.IoK8sApimachineryPkgApiResourceQuantity(str(gpus_per_node))} if gpus_per_node else {}
    )
    job = m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=namespace, labels={"app.kubernetes.io/part-of": "kdpipe"}
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(
                name=RUNTIME, kind="ClusterTrainingRuntime", api_group=GROUP
            ),
            trainer=m.TrainerV1alpha1Trainer(
                image=image,
                command=node_command(inputs, output),
                env=variables,
                num_nodes=nodes,
                num_proc_per_node=max(1, gpus_per_node),
                resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(
                    limits=gpus or None, requests=gpus or None
                ),
            ),
        ),
    )
    return job.to_dict()


def job_name(execution_key: str) -> str:
    """A valid Kubernetes name, the same for every retry of one pipeline run's distill task."""
    safe = "".join(c if c.isalnum() else "-" for c in execution_key.lower()).strip("-")
    return f"kdpipe-distill-{safe}"[:63].rstrip("-")


def _condition(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """("Complete" | "Failed", message) once the TrainJob has finished."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], cond.get("message", "")
    return None


def run_and_wait(
    job: dict[str, Any],
    api,
    poll_seconds: float = 30.0,
    timeout_seconds: float = 7 * 24 * 3600,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Create the TrainJob (or find it: a retried task resumes waiting for its own), wait until it
    completes; raise :class:`KdpipeError` if it fails or the time runs out. ``api`` is a
    ``kubernetes.client.CustomObjectsApi``."""
    from kubernetes.client.exceptions import ApiException

    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        print(f"distill: TrainJob {namespace}/{name} created ({job['spec']['trainer']['numNodes']} nodes)")
    except ApiException as exc:
        if exc.status != 409:  # 409: it exists, created by an earlier try of this task
            raise KdpipeError(
                f"TrainJob {namespace}/{name}: the cluster refused it ({exc.status}: {exc.reason}); "
                "is Kubeflow Trainer installed, and may this service account create trainjobs?"
            ) from None
        print(f"distill: TrainJob {namespace}/{name} exists; waiting for it")
    waited = 0.0
    while True:
        current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        finished = _condition(current)
        if finished:
            state, message = finished
            if state == "Failed":
                raise KdpipeError(f"TrainJob {namespace}/{name} failed: {message or 'no message'}")
            return current
        if waited >= timeout_seconds:
            raise KdpipeError(f"TrainJob {namespace}/{name} did not finish in {timeout_seconds:.0f} s")
        sleep(poll_seconds)
        waited += poll_seconds


def in_cluster_api():
    """The Kubernetes API as the task's service account sees it (or the local kubeconfig)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def current_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else os.environ.get("KDPIPE_NAMESPACE", "default")


# ---------------------------------------------------------------- on every node
def distill_node(
    inputs: Mapping[str, str], output: str, workdir: str | os.PathLike = "/tmp/kdpipe-node"
) -> int:
    """One node of a TrainJob: fetch the inputs, run torchrun over this node's processes (the runtime's
    ``PET_*`` variables give the node count, rank and rendezvous), and on node 0 upload the outputs."""
    import yaml

    work = Path(workdir)
    local = {name: work / name for name in INPUTS}
    for name, uri in inputs.items():
        objectstore.get(uri, local[name])
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(os.environ["KDPIPE_PARAMS_JSON"])), encoding="utf-8")
    out = work / "student"
    cmd = [
        "torchrun",
        "-m",
        "kdpipe.cli",
        "distill",
        "--params",
        str(params_file),
        "--prepared-dir",
        str(local["prepared"]),
        "--augmented-dir",
        str(local["augmented"]),
        "--teacher-dir",
        str(local["teacher"]),
        "--out-dir",
        str(out),
    ]
    code = subprocess.run(cmd, check=False).returncode
    if code == 0 and os.environ.get("PET_NODE_RANK", "0") == "0":
        objectstore.put(out, output)
    return code
