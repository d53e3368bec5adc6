"""Kubeflow Pipelines settings and the glue the KFP components share.

The components in ``components/`` are thin: each validates its params with :mod:`kdpipe.core.params`
and calls ``kdpipe.steps.<step>.run``. What they have in common lives here, in the package that the
image installs, because a lightweight KFP component ships only its own function body.

Settings (read at compile time): the image every component runs in is :func:`image`
(``$KDPIPE_IMAGE`` overrides the default); the Kubernetes secrets the tasks read are the constants
below; the cluster's settings (GPU placement, resources, retries) are :mod:`kdpipe.orchestration.cluster`'s.

This module does not import ``kfp``: the components import it inside their function bodies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdpipe import __version__

IMAGE_ENV = "KDPIPE_IMAGE"
DEFAULT_IMAGE = f"kdpipe:{__version__}"

# GPU tasks (teacher, augment, distill): the resource they request, and the shared-memory volume
# for data loading and DDP (/dev/shm is 64 MiB in a default pod). Node selector, tolerations, the
# volume's size and every task's resources are cluster settings (kdpipe.orchestration.cluster).
GPU_RESOURCE = "nvidia.com/gpu"
SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"

# Kubernetes secrets, mounted as environment variables (optional: a missing secret leaves them
# unset). Keys of the secret -> environment variable names. Credentials never travel as pipeline
# parameters, so they never appear in the compiled YAML, the KFP UI or MLflow.
DVC_SECRET = "kdpipe-dvc-remote"
DVC_SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
GIT_SECRET = "kdpipe-git"  # a private data repository over HTTPS: username (optional) and token
GIT_SECRET_ENV = {"username": "KDPIPE_GIT_USERNAME", "token": "KDPIPE_GIT_TOKEN"}
MLFLOW_SECRET = "kdpipe-mlflow"
MLFLOW_SECRET_ENV = {
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}


def image() -> str:
    """The container image of every component: ``$KDPIPE_IMAGE`` or ``kdpipe:<version>``."""
    return os.environ.get(IMAGE_ENV, "").strip() or DEFAULT_IMAGE


GPU_IMAGE_ENV = "KDPIPE_GPU_IMAGE"


def gpu_image() -> str:
    """The image of the tasks given a GPU (and of a multi-node TrainJob's nodes): ``$KDPIPE_GPU_IMAGE``,
    else :func:`image` (one image for all: the Dockerfile's gpu target also runs on CPUs)."""
    return os.environ.get(GPU_IMAGE_ENV, "").strip() or image()


# ---------------------------------------------------------------- used inside components


# KFP parameters cannot hold None: an unset value (``teacher.weights: null``...) travels as this string.
NULL = "null"


def params_from(**groups: Mapping[str, Any] | None):
    """:class:`kdpipe.core.params.Params` from pipeline parameters given per group (``train={...}``);
    groups not given keep their defaults. Invalid values raise ``ParamsError`` naming the key."""
    from kdpipe.core.params import validate_params

    raw = {
        name: {k: None if v == NULL else v for k, v in values.items()}
        for name, values in groups.items()
        if values is not None
    }
    return validate_params(raw, "pipeline parameters")


def log_numbers(metrics, values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Log every finite number of a (nested) mapping to a KFP ``Metrics`` artifact; returns them."""
    from kdpipe.orchestration.tracking import flatten

    logged = {}
    for key, value in flatten(dict(values), prefix).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        metrics.log_metric(key, float(value))
        logged[key] = float(value)
    return logged


def write_png_page(
    html_path: str | os.PathLike, png_path: str | os.PathLike, title: str, caption: str
) -> None:
    """A self-contained HTML page showing a PNG (inlined: the Kubeflow UI shows an HTML artifact as it is)."""
    import base64
    import html

    encoded = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
    Path(html_path).write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>"
        f"<p>{html.escape(caption)}</p></body></html>",
        encoding="utf-8",
    )


def confusion_matrix(evaluation_dir: str | os.PathLike, class_names: list[str]) -> list[list[int]]:
    """Rows = actual class, columns = predicted, from evaluate's ``confusion.json``."""
    from kdpipe.core.atomic import read_json

    index = {name: k for k, name in enumerate(class_names)}
    matrix = [[0] * len(class_names) for _ in class_names]
    for row in read_json(Path(evaluation_dir) / "confusion.json"):
        matrix[index[row["actual"]]][index[row["predicted"]]] += 1
    return matrix


def distill_command(
    gpus: int, params_file: str, prepared: str, augmented: str, teacher: str, out: str
) -> list[str]:
    """``torchrun`` command line of a DDP distill run over ``gpus`` local GPUs."""
    return [
        "torchrun",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "kdpipe.cli",
        "distill",
        "--params",
        params_file,
        "--prepared-dir",
        prepared,
        "--augmented-dir",
        augmented,
        "--teacher-dir",
        teacher,
        "--out-dir",
        out,
    ]


def tracking_for_task(execution_key: str = "", git_commit: str = "") -> bool:
    """MLflow tracking inside a Kubeflow task: on when the task has a tracking server
    (``MLFLOW_TRACKING_URI`` from the ``kdpipe-mlflow`` secret), never a throw-away store in the pod.

    Every task of one pipeline run logs its step under one parent run: ``execution_key`` (the
    pipeline passes its run id) tags that parent, and each task, a pod of its own, finds it by the
    tag. ``git_commit`` is the commit the run was submitted from (the image holds no repository).
    The parent-run file, the fallback without a key, goes to the pod's temporary folder, never the
    image's working directory. Returns whether to track."""
    import tempfile

    if execution_key:
        os.environ["KDPIPE_EXECUTION_KEY"] = execution_key
    if git_commit:
        os.environ["KDPIPE_GIT_COMMIT"] = git_commit
    os.environ.setdefault(
        "KDPIPE_MLFLOW_RUN_FILE", os.path.join(tempfile.gettempdir(), "kdpipe_mlflow_run.json")
    )
    return bool(os.environ.get("MLFLOW_TRACKING_URI", "").strip())


def registry_for_task(register_params, decision_dir: str, require_tracking_server: bool) -> None:
    """Where the register task records the model. With ``MLFLOW_TRACKING_URI`` (the ``kdpipe-mlflow``
    secret) or ``register.tracking_uri``: there. Without either, a registry would be a throw-away
    SQLite file in the task's output, and "promoted" would mean nothing: an error when the pipeline
    expects a tracking server (``require_tracking_server``, the default on a cluster); otherwise
    (``kdpipe pipeline run-local``) that file, never the image's folder."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip() or register_params.tracking_uri:
        return
    if require_tracking_server:
        from kdpipe.core.errors import KdpipeError

        raise KdpipeError(
            f"register: no MLflow tracking server: the Kubernetes secret {MLFLOW_SECRET!r} (key "
            "MLFLOW_TRACKING_URI) is missing in this namespace and register.tracking_uri is unset; "
            "create the secret, or run with require_tracking_server=false to keep the registry "
            "in the task's output"
        )
    os.makedirs(decision_dir, exist_ok=True)
    register_params.tracking_uri = f"sqlite:///{os.path.abspath(decision_dir)}/mlflow.db"


def fail_quality_gate(accuracy: float, min_accuracy: float) -> None:
    """The else-branch of the pipeline's quality gate: the run must end failed, not green."""
    from kdpipe.core.errors import KdpipeError

    raise KdpipeError(
        f"quality gate: test accuracy {accuracy:.4f} is below min_accuracy {min_accuracy:.4f}; "
        "the model was not registered"
    )


def resumable_dir(state_dir: str, execution_key: str, step: str) -> Path | None:
    """``state_dir/<execution_key>/<step>``: where a step keeps its resume state on the cluster's state
    volume (``state_pvc`` in the cluster settings). A retried or preempted pod of the same pipeline run
    finds its ``last.pt`` there. None without a state volume (the state lives and dies with the pod)."""
    if not state_dir:
        return None
    if not execution_key:
        raise ValueError("a state volume needs the run's execution key to keep runs apart")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in execution_key)
    work = Path(state_dir) / safe / step
    work.mkdir(parents=True, exist_ok=True)
    return work


def publish(work: Path, out_dir: str) -> None:
    """Copy a step's outputs from its working folder to the task's output folder (no-op when they are
    the same folder)."""
    import shutil

    if Path(work).resolve() == Path(out_dir).resolve():
        return
    shutil.copytree(work, out_dir, dirs_exist_ok=True)
