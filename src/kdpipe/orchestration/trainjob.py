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
NODE_SETTINGS_ENV = "KDPIPE_NODE_SETTINGS"  # ClusterSettings.node_settings() as JSON, on the launching task
POD_NAME_ENV, POD_UID_ENV = "KDPIPE_POD_NAME", "KDPIPE_POD_UID"  # the launcher pod (downward API): the owner
# the torch-distributed runtime's replicated job and container, which the node patches address
NODE_JOB = "node"


def node_command(inputs: Mapping[str, str], output: str, state_dir: str = "") -> list[str]:
    """What every node runs: ``kdpipe distill-node`` with the input and output URIs (and the run's
    folder on the state claim, where it trains and resumes); the params travel in
    ``$KDPIPE_PARAMS_JSON``."""
    args = ["kdpipe", "distill-node", "--output", output]  # the image's kdpipe
    for name in INPUTS:
        args += [f"--{name}", inputs[name]]
    return args + (["--state-dir", state_dir] if state_dir else [])


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
    node_settings: Mapping[str, Any] | None = None,
    owner: Mapping[str, str] | None = None,
    state_dir: str = "",
) -> dict[str, Any]:
    """The TrainJob, built with Kubeflow Trainer's own API models (so its fields are the CRD's).

    ``node_settings`` (:meth:`kdpipe.orchestration.cluster.ClusterSettings.node_settings`) places
    the node pods as the cluster settings place the GPU tasks (runtime patches: node selector,
    tolerations, pull secrets, /dev/shm, labels), sizes them and bounds the job's time;
    ``owner`` (the launcher pod's name and uid) makes Kubernetes delete the TrainJob with its pod;
    ``state_dir`` (on the claim ``node_settings`` mounts) is where the nodes train and resume."""
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
    node = dict(node_settings or {})
    gpu_resource = node.get("gpu_resource") or gpu_resource
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    gpus = {gpu_resource: quantity(str(gpus_per_node))} if gpus_per_node else {}
    sizes = node.get("resources") or {}
    requests = {
        **gpus,
        **{k: quantity(sizes[f"{k}_request"]) for k in ("cpu", "memory") if sizes.get(f"{k}_request")},
    }
    limits = {
        **gpus,
        **{k: quantity(sizes[f"{k}_limit"]) for k in ("cpu", "memory") if sizes.get(f"{k}_limit")},
    }
    owners = None
    if owner and owner.get("name") and owner.get("uid"):
        owners = [
            m.IoK8sApimachineryPkgApisMetaV1OwnerReference(
                api_version="v1", kind="Pod", name=owner["name"], uid=owner["uid"], block_owner_deletion=False
            )
        ]
    job = m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={**node.get("pod_labels", {}), "app.kubernetes.io/part-of": "kdpipe"},
            owner_references=owners,
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(
                name=RUNTIME, kind="ClusterTrainingRuntime", api_group=GROUP
            ),
            active_deadline_seconds=node.get("deadline_seconds") or None,
            runtime_patches=_node_patches(node) if node else None,
            trainer=m.TrainerV1alpha1Trainer(
                image=image,
                command=node_command(inputs, output, state_dir),
                env=variables,
                num_nodes=nodes,
                num_proc_per_node=max(1, gpus_per_node),
                resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(
                    limits=limits or None, requests=requests or None
                ),
            ),
        ),
    )
    return job.to_dict()


def _node_patches(node: Mapping[str, Any]) -> list:
    """The cluster settings as a runtime patch of the node pods (the fields Trainer lets a TrainJob
    patch): service account, GPU node selector and tolerations, pull secrets, a memory-backed
    /dev/shm, the state claim, labels."""
    from kubeflow_trainer_api import models as m

    shm, state = "dshm", "kdpipe-state"
    volumes = [
        m.IoK8sApiCoreV1Volume(
            name=shm,
            empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
                medium="Memory",
                size_limit=m.IoK8sApimachineryPkgApiResourceQuantity(node.get("shm_size", "8Gi")),
            ),
        )
    ]
    mounts = [m.IoK8sApiCoreV1VolumeMount(name=shm, mount_path="/dev/shm")]
    if node.get("state_pvc"):  # the resume state, shared by the nodes and the launcher
        volumes.append(
            m.IoK8sApiCoreV1Volume(
                name=state,
                persistent_volume_claim=m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(
                    claim_name=node["state_pvc"]
                ),
            )
        )
        mounts.append(m.IoK8sApiCoreV1VolumeMount(name=state, mount_path=node["state_mount"]))
    pod = m.TrainerV1alpha1PodSpecPatch(
        service_account_name=node.get("service_account") or None,
        node_selector=node.get("node_selector") or None,
        tolerations=[m.IoK8sApiCoreV1Toleration(**t) for t in node.get("tolerations", [])] or None,
        image_pull_secrets=[
            m.IoK8sApiCoreV1LocalObjectReference(name=n) for n in node.get("image_pull_secrets", [])
        ]
        or None,
        volumes=volumes,
        containers=[m.TrainerV1alpha1ContainerPatch(name=NODE_JOB, volume_mounts=mounts)],
    )
    metadata = m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
        labels=node.get("pod_labels") or None, annotations=node.get("pod_annotations") or None
    )
    job = m.TrainerV1alpha1ReplicatedJobPatch(
        name=NODE_JOB,
        template=m.TrainerV1alpha1JobTemplatePatch(
            spec=m.TrainerV1alpha1JobSpecPatch(
                template=m.TrainerV1alpha1PodTemplatePatch(metadata=metadata, spec=pod)
            )
        ),
    )
    return [
        m.TrainerV1alpha1RuntimePatch(
            manager="kdpipe",
            training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
                template=m.TrainerV1alpha1JobSetTemplatePatch(
                    spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[job])
                )
            ),
        )
    ]


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

    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    _create_or_adopt(job, api, sleep)
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
            _delete(api, namespace, name)  # its nodes would keep holding GPUs after the task gave up
            raise KdpipeError(
                f"TrainJob {namespace}/{name} did not finish in {timeout_seconds:.0f} s; it was deleted"
            )
        sleep(poll_seconds)
        waited += poll_seconds


def _create_or_adopt(job: dict[str, Any], api, sleep: Callable[[float], None], tries: int = 30) -> None:
    """Create the TrainJob; one that exists (an earlier try of this task created it) is waited for,
    unless it failed: then it is deleted and created again, so a retry trains instead of failing on
    the same dead job."""
    from kubernetes.client.exceptions import ApiException

    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    for _ in range(tries):
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
            print(
                f"distill: TrainJob {namespace}/{name} created ({job['spec']['trainer']['numNodes']} nodes)"
            )
            return
        except ApiException as exc:
            if exc.status != 409:  # 409: it exists
                raise KdpipeError(
                    f"TrainJob {namespace}/{name}: the cluster refused it ({exc.status}: {exc.reason}); "
                    "is Kubeflow Trainer installed, and may this service account create trainjobs "
                    "(docs/kubeflow-trainjob-role.yaml)?"
                ) from None
        try:
            existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            sleep(2.0)  # gone between the two calls (still being deleted): create it again
            continue
        finished = _condition(existing)
        if finished is None or finished[0] != "Failed":
            print(f"distill: TrainJob {namespace}/{name} exists; waiting for it")
            return
        print(
            f"distill: TrainJob {namespace}/{name} failed earlier ({finished[1] or 'no message'}); replacing it"
        )
        _delete(api, namespace, name)
        sleep(2.0)
    raise KdpipeError(f"TrainJob {namespace}/{name}: could not replace the failed one in {tries} tries")


def _delete(api, namespace: str, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


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
    inputs: Mapping[str, str],
    output: str,
    workdir: str | os.PathLike = "/tmp/kdpipe-node",
    state_dir: str | os.PathLike | None = None,
) -> int:
    """One node of a TrainJob: fetch the inputs, run torchrun over this node's processes (the runtime's
    ``PET_*`` variables give the node count, rank and rendezvous), and on node 0 upload the outputs.
    With ``state_dir`` (the run's folder on the shared state claim) distill trains there, so a node
    restarted after preemption resumes from the last checkpoint instead of starting over."""
    import yaml

    work = Path(workdir)
    local = {name: work / name for name in INPUTS}
    for name, uri in inputs.items():
        objectstore.get(uri, local[name])
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(os.environ["KDPIPE_PARAMS_JSON"])), encoding="utf-8")
    out = Path(state_dir) if state_dir else work / "student"
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
