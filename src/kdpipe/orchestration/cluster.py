"""What the Kubeflow pipeline needs to know about the cluster it runs on, decided at compile time.

* :class:`ClusterSettings` -- GPU placement, shared memory, per-task CPU/memory, retries and time
  limits; loaded from a YAML file (``kdpipe pipeline compile --cluster cluster.yaml``), unknown keys
  refused. The defaults work on any cluster whose GPU nodes run NVIDIA's device plugin.
* Image references: a run sent to a server must name its image by registry and digest.
* The oldest Kubeflow Pipelines backend the compiled pipeline runs on, and its check.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdpipe.core.catalog import STEPS
from kdpipe.core.errors import KdpipeError

# The step tasks of the pipeline, in order: the data task, then every step of the catalog.
TASKS = ("data", *STEPS)
GPU_TASKS = ("teacher", "augment", "distill")

# Optional secrets (``secretAsEnv.optional``) are understood from backend 2.15 on: 2.14 rejects the
# field as unknown, and 2.3-2.5 drop it, so a missing secret blocks the pod.
MIN_BACKEND = (2, 15, 0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Toleration(_Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class TaskSettings(_Strict):
    """Kubernetes quantities as strings ("2", "500m", "8Gi"); null = not set. The defaults set a CPU
    limit of twice the request: a namespace with a ResourceQuota on limits.cpu rejects pods without
    one (set ``cpu_limit: null`` where no quota asks for it: a limit throttles a data loader)."""

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None
    retries: int = Field(0, ge=0, le=10, description="retries of a failed pod (preemption, node loss)")
    timeout_seconds: int = Field(
        0, ge=0, description="the pod's time limit (activeDeadlineSeconds); 0 = none"
    )


def _task(cpu: str, memory: str, memory_limit: str, retries: int, hours: float) -> TaskSettings:
    return TaskSettings(
        cpu_request=cpu,
        cpu_limit=str(2 * int(cpu)),
        memory_request=memory,
        memory_limit=memory_limit,
        retries=retries,
        timeout_seconds=int(hours * 3600),
    )


def _default_tasks() -> dict[str, TaskSettings]:
    # a step without an entry here (a new one) gets modest, bounded, retried settings
    return {name: _task("1", "2Gi", "8Gi", 2, 2) for name in TASKS} | {
        "data": _task("1", "2Gi", "8Gi", 2, 2),
        "prepare": _task("4", "8Gi", "32Gi", 2, 12),
        "teacher": _task("4", "16Gi", "64Gi", 2, 24),
        "augment": _task("4", "16Gi", "64Gi", 2, 12),
        "distill": _task("8", "32Gi", "96Gi", 3, 72),
        "select": _task("2", "4Gi", "16Gi", 2, 2),
        "export": _task("2", "4Gi", "16Gi", 2, 2),
        "evaluate": _task("2", "4Gi", "16Gi", 2, 2),
        # register moves the registry's @champion: a retry after a half-done registration would
        # register twice, so it is never retried
        "register": _task("1", "2Gi", "8Gi", 0, 1),
    }


_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
_LABEL_KEY = re.compile(r"(?:[a-z0-9.-]{1,253}/)?[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


class ClusterSettings(_Strict):
    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="labels a GPU node must carry, e.g. {nvidia.com/gpu.present: 'true'} with NVIDIA's "
        "feature discovery, {cloud.google.com/gke-accelerator: nvidia-l4} on GKE; empty = any "
        "node with free GPUs",
    )
    gpu_tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu")])
    shm_size: str = Field("8Gi", description="/dev/shm of GPU tasks (64 MiB by default in a pod)")
    image_pull_secrets: list[str] = Field(default_factory=list, description="secrets for a private registry")
    state_pvc: str | None = Field(
        None,
        description="an existing PersistentVolumeClaim where distill keeps each run's resume state "
        "(last.pt), so a retried or preempted pod resumes; null = in the pod (a retry starts over)",
    )
    state_mount: str = Field("/kdpipe-state", description="where the state volume is mounted")
    distill_nodes: int = Field(
        1,
        ge=1,
        le=256,
        description="nodes for distill; above 1 it runs as a Kubeflow Trainer TrainJob of this many nodes with "
        "`gpus` GPUs each, launched and awaited by a CPU-only distill task",
    )
    tasks: dict[str, TaskSettings] = Field(default_factory=_default_tasks)
    # Fit with the cluster's tenants: queue and cost labels, admission annotations, MIG slices.
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        description="labels on every task's pod, e.g. {kueue.x-k8s.io/queue-name: team-a, cost-center: ml}",
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="annotations on every task's pod (PodDefaults, sidecar injection...)",
    )
    service_account: str | None = Field(
        None,
        description="the Kubernetes service account of the run's pods (KFP sets it per run: submit, "
        "schedule and retrain pass it) and of a multi-node distill's nodes; null = the namespace's "
        "pipeline runner",
    )
    gpu_resource: str = Field(
        "nvidia.com/gpu",
        pattern=r"^[a-z0-9.-]+/[A-Za-z0-9._-]+$",
        description="the extended resource a GPU task requests: nvidia.com/gpu, or a MIG slice such as "
        "nvidia.com/mig-1g.10gb",
    )

    @model_validator(mode="after")
    def _label_values_are_kubernetes_labels(self) -> ClusterSettings:
        for key, value in self.pod_labels.items():
            if not _LABEL_VALUE.fullmatch(value) or not _LABEL_KEY.fullmatch(key):
                raise ValueError(
                    f"pod_labels: {key}: {value!r} is not a Kubernetes label (a name of at most 63 letters, "
                    "digits, '-', '_' or '.', with an optional DNS prefix; the value likewise, or empty)"
                )
        return self

    def task(self, name: str) -> TaskSettings:
        return self.tasks.get(name, TaskSettings())

    def node_settings(self) -> dict[str, Any]:
        """What a multi-node distill's TrainJob nodes need of these settings (placement, resources,
        deadline, labels), as plain JSON: the launcher task reads it from ``$KDPIPE_NODE_SETTINGS``."""
        distill = self.task("distill")
        return {
            "node_selector": dict(self.gpu_node_selector),
            "tolerations": [t.model_dump(exclude_none=True) for t in self.gpu_tolerations],
            "image_pull_secrets": list(self.image_pull_secrets),
            "shm_size": self.shm_size,
            "pod_labels": dict(self.pod_labels),
            "pod_annotations": dict(self.pod_annotations),
            "gpu_resource": self.gpu_resource,
            "resources": distill.model_dump(
                include={"cpu_request", "cpu_limit", "memory_request", "memory_limit"}
            ),
            "deadline_seconds": distill.timeout_seconds or None,
            # every node mounts the state claim where the launcher does, and trains in the run's
            # folder there: a restarted TrainJob resumes from its last.pt (needs ReadWriteMany)
            "service_account": self.service_account,
            "state_pvc": self.state_pvc,
            "state_mount": self.state_mount,
        }

    @model_validator(mode="before")
    @classmethod
    def _merge_with_the_defaults(cls, data: Any) -> Any:
        """A file that sets one key of one task keeps every other default."""
        if not isinstance(data, dict) or "tasks" not in data:
            return data
        tasks = data["tasks"] or {}
        if not isinstance(tasks, dict):
            raise ValueError("tasks: expected a mapping of task name -> settings")
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(
                f"tasks: unknown task(s) {', '.join(sorted(unknown))}; tasks are {', '.join(TASKS)}"
            )
        defaults = {name: task.model_dump() for name, task in _default_tasks().items()}
        merged = {name: {**defaults[name], **(tasks.get(name) or {})} for name in TASKS}
        return {**data, "tasks": merged}


def load_cluster_settings(path: str | Path | None) -> ClusterSettings:
    """The settings in ``path`` (YAML), or the defaults; a bad file is one error naming it."""
    if path is None:
        return ClusterSettings()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return ClusterSettings.model_validate(raw)
    except OSError as exc:
        raise KdpipeError(f"{path}: cannot read the cluster settings ({exc.strerror})") from None
    except (yaml.YAMLError, ValidationError, ValueError) as exc:
        raise KdpipeError(f"{path}: invalid cluster settings: {exc}") from None


# ---------------------------------------------------------------- image references
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_registry(ref: str) -> str | None:
    """The registry host of an image reference, or None for a bare name (``kdpipe:0.1.0``), which a
    cluster would look up on Docker Hub."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def check_image_for_cluster(ref: str) -> str:
    """``ref`` when a cluster can pull it and KFP's cache cannot confuse two builds; else an error
    that says what to pass."""
    hint = (
        "name it by registry and digest, e.g. --image registry.example.com/team/kdpipe@sha256:<64 hex> "
        "(the release workflow prints it; `buildah push --digestfile` writes it)"
    )
    if image_registry(ref) is None:
        raise KdpipeError(f"image {ref!r} names no registry: a cluster cannot pull it; {hint}")
    if not _DIGEST.search(ref):
        raise KdpipeError(
            f"image {ref!r} is not pinned by digest: KFP caches task results by the image "
            f"name, so a rebuilt tag would keep serving the old code's results; {hint}"
        )
    return ref


# ---------------------------------------------------------------- backend version
def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"2.15.0"``, ``"v2.15.0-rc.1"`` -> (2, 15, 0); None when it is not a version."""
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", (text or "").strip())
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_backend_version(tag: str | None, host: str) -> tuple[int, int, int] | None:
    """Refuse a backend older than :data:`MIN_BACKEND`; None when the server does not say."""
    version = parse_version(tag or "")
    if version is not None and version < MIN_BACKEND:
        needed = ".".join(map(str, MIN_BACKEND))
        raise KdpipeError(
            f"{host}: Kubeflow Pipelines backend {tag} is older than {needed}, the oldest this "
            f"pipeline runs on (optional secrets); upgrade it, or compile with "
            f"`kdpipe pipeline compile --backend-version {tag}` and create every secret"
        )
    return version
