"""MLflow tracking for the pipeline: one parent run per pipeline execution, one nested run per step.

:func:`tracking_uri` says where runs go; :func:`pipeline_run` opens or resumes the execution's
parent run (its id from env ``KDPIPE_MLFLOW_RUN_ID`` or ``artifacts/mlflow_run.json``) and
:func:`close_pipeline_run` ends it; :func:`step_run` is a step's nested run, tagged ``kdpipe.step``.
Every public function is a no-op on DDP workers other than rank 0. Secrets are dropped
(:func:`log_params_flat`) or masked (:func:`redact`). ``mlflow`` is imported inside functions only.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kdpipe import __version__
from kdpipe.core import layout
from kdpipe.core.atomic import read_json, write_json
from kdpipe.core.errors import KdpipeError

log = logging.getLogger(__name__)

RUN_ID_ENV = "KDPIPE_MLFLOW_RUN_ID"
RUN_FILE = Path(layout.ARTIFACTS) / "mlflow_run.json"
RUN_FILE_ENV = "KDPIPE_MLFLOW_RUN_FILE"  # where the parent run's id is kept, when not RUN_FILE
# A key naming one pipeline execution (a Kubeflow run's id): steps that run in separate pods, with
# no file in common, find their shared parent run by this tag.
EXECUTION_ENV = "KDPIPE_EXECUTION_KEY"
TAG_EXECUTION = "kdpipe.execution"
GIT_COMMIT_ENV = "KDPIPE_GIT_COMMIT"
IMAGE_REF_ENV = "KDPIPE_IMAGE_REF"  # the image a Kubeflow task runs in, set by the pipeline
TAG_IMAGE = "kdpipe.image"


def run_file() -> Path:
    """The file recording this execution's parent run: ``$KDPIPE_MLFLOW_RUN_FILE``, else
    ``artifacts/mlflow_run.json`` of the project (DVC runs every stage from the project root)."""
    return Path(os.environ.get(RUN_FILE_ENV) or RUN_FILE)


DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"

TAG_GIT = "kdpipe.git_commit"
TAG_DATA = "kdpipe.data_version"
TAG_VERSION = "kdpipe.version"
TAG_STEP = "kdpipe.step"

# A key is dropped when one of its words (split on . _ - and camelCase) is one of these.
SECRET_WORDS = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "token",
        "tokens",
        "key",
        "keys",
        "apikey",
        "credential",
        "credentials",
    }
)
_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
# a secret query parameter with its separator, removed whole by without_credentials
_SECRET_QUERY_PAIR = re.compile(
    r"([?&])[^=&\s#]*(?:secret|password|token|key|signature)[^=&\s#]*=[^&\s#]*(&?)", re.IGNORECASE
)
_SECRET_QUERY = re.compile(
    r"([?&][^=&\s]*(?:secret|password|token|key|signature)[^=&\s]*=)[^&\s#]+", re.IGNORECASE
)


# ---------------------------------------------------------------- helpers without mlflow


def is_main_rank() -> bool:
    """True unless this is a non-zero DDP rank (env ``RANK`` set and != "0")."""
    rank = os.environ.get("RANK")
    return rank is None or rank.strip() in ("", "0")


def redact(value: str) -> str:
    """Mask credentials in URIs: ``s3://user:pass@host/x`` -> ``s3://***@host/x``; also masks
    secret-looking query parameters (``?token=abc`` -> ``?token=***``)."""
    value = _URI_USERINFO.sub(r"\1***@", value)
    return _SECRET_QUERY.sub(r"\1***", value)


def without_credentials(value: str) -> str:
    """``value`` with the credentials of any URL in it removed: the user info
    (``https://user:token@host/x`` -> ``https://host/x``) and secret query parameters. What a URL
    may carry when it leaves this process as a pipeline parameter: on a cluster the credentials
    come from Kubernetes secrets."""
    stripped = _URI_USERINFO.sub(r"\1", value)
    return _SECRET_QUERY_PAIR.sub(lambda m: m[1] if m[2] else "", stripped)


def is_secret_key(key: str) -> bool:
    """True when a (dotted) key names a secret as a whole word: ``aws.secret_access_key``,
    ``apiKey``, ``db.password``; not ``keyframes`` or ``monkey``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)  # camelCase -> words
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w}
    return not SECRET_WORDS.isdisjoint(words)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; lists stay leaves."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def safe_params(params: Any) -> dict[str, str]:
    """Flattened params as MLflow strings, without secret keys and with URI credentials masked."""
    out = {}
    for key, value in flatten(params).items():
        if is_secret_key(key):
            continue
        text = "" if value is None else value if isinstance(value, str) else json.dumps(value)
        out[key] = redact(text)[:6000]  # MLflow's param value limit
    return out


def tracking_uri(params: Any) -> str:
    """Env ``MLFLOW_TRACKING_URI``, else ``register.tracking_uri``, else ``sqlite:///<cwd>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    configured = getattr(getattr(params, "register", None), "tracking_uri", None)
    if configured:
        return configured
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).as_posix()}"


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """``$KDPIPE_GIT_COMMIT`` (a Kubeflow task runs in an image without the repository: the pipeline
    passes the commit it was submitted from), else ``git rev-parse HEAD`` of the project, else
    ``"unknown"`` (outside a repository, or without git)."""
    given = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if given:
        return given
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def data_version(prepared_dir: str | os.PathLike = layout.PREPARED) -> str:
    """``data_version`` of the prepared manifest in ``prepared_dir``, ``"unknown"`` before prepare has run."""
    try:
        return str(read_json(Path(prepared_dir) / "manifest.json")["data_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def run_tags(prepared_dir: str | os.PathLike = layout.PREPARED) -> dict[str, str]:
    tags = {TAG_GIT: git_commit(), TAG_DATA: data_version(prepared_dir), TAG_VERSION: __version__}
    image = os.environ.get(IMAGE_REF_ENV, "").strip()
    if image:
        tags[TAG_IMAGE] = image
    return tags


# ---------------------------------------------------------------- runs


def configure(params: Any) -> str:
    """Point MLflow at :func:`tracking_uri` and select (or create) ``register.experiment``.

    For a SQLite store the experiment is created with ``<cwd>/mlruns`` as artifact location, so a
    local store never scatters artifacts; a server chooses its own artifact root. Credentials in an
    HTTP URI move to ``MLFLOW_TRACKING_USERNAME/PASSWORD``. Returns the URI MLflow now uses.
    """
    _quiet_mlflow()
    _bounded_retries()
    import mlflow

    uri = _move_credentials_to_env(tracking_uri(params))
    mlflow.set_tracking_uri(uri)
    name = getattr(getattr(params, "register", None), "experiment", "kdpipe")
    client = mlflow.MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(name)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingUnavailable(uri, exc) from None
    if experiment is None:
        location = (Path.cwd() / DEFAULT_ARTIFACTS).as_uri() if uri.startswith("sqlite:") else None
        try:
            client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by a concurrent step; set_experiment finds it
    mlflow.set_experiment(name)
    return uri


# How hard a step tries to reach a tracking server before it gives up (MLflow's own settings, which a
# user's environment overrides): MLflow's defaults retry for minutes before failing.
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _bounded_retries() -> None:
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)


class TrackingUnavailable(KdpipeError):
    """The tracking server cannot be reached: one line, after the step's own outputs are written."""

    def __init__(self, uri: str, exc: BaseException):
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r"HTTPConnectionPool\(.*", "connection refused or timed out", redact(reason))
        super().__init__(
            f"MLflow tracking server {redact(uri)} is unreachable ({reason[:200]}); the step's outputs "
            "are written, but it is not recorded. Start the server and run the step again, or set "
            "KDPIPE_TRACKING=0 to run without tracking (retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES)"
        )


def _quiet_mlflow() -> None:
    """MLflow's chatter is not the step's output: the SQLite store's "creating tables" INFO lines
    (alembic) and a "Downloading artifacts" progress bar when register reads a model back. A user's
    own setting of the variable wins."""
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _move_credentials_to_env(uri: str) -> str:
    """``http(s)://user:pass@host`` -> ``http(s)://host`` plus ``MLFLOW_TRACKING_USERNAME/PASSWORD``.

    MLflow prints run URLs and exports the URI to ``os.environ`` for subprocesses; with the
    credentials in its own variables they are sent as basic auth but never printed or recorded.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(user)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(password)
    return urllib.parse.urlunsplit(parts._replace(netloc=hostport))


def _stored_run_id(uri: str) -> tuple[str | None, str]:
    """The parent run id to resume and where it came from ("env", "file" or "")."""
    env = os.environ.get(RUN_ID_ENV, "").strip()
    if env:
        return env, "env"
    try:
        stored = read_json(run_file())
    except (OSError, ValueError):
        return None, ""
    # A file left by a run against another store must not be resumed here.
    if isinstance(stored, dict) and stored.get("tracking_uri") == redact(uri) and stored.get("run_id"):
        return str(stored["run_id"]), "file"
    return None, ""


def _execution_run(client, key: str) -> str | None:
    """The active parent run tagged with execution ``key``, in any experiment (a step may log to
    another experiment than the first one did); the oldest when two steps raced to create it."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{TAG_EXECUTION}` = '{key}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _settings_differ(client, run_id: str, params: Any) -> bool:
    """Whether ``params`` give another value to a setting the parent run has logged already."""
    if params is None:
        return False
    logged = client.get_run(run_id).data.params
    return any(key in logged and logged[key] != value for key, value in safe_params(params).items())


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


@contextlib.contextmanager
def pipeline_run(
    params: Any, run_name: str | None = None, prepared_dir: str | os.PathLike = layout.PREPARED
) -> Iterator[Any]:
    """Start or resume the parent run of this pipeline execution; yields the ``ActiveRun``.

    Resumes ``$KDPIPE_MLFLOW_RUN_ID`` (an error if that run does not exist), else the run tagged
    with ``$KDPIPE_EXECUTION_KEY`` (a Kubeflow run: every task of one run shares its parent, although
    each task is a pod of its own), else the run recorded in ``artifacts/mlflow_run.json`` (ignored
    if stale, or when it logged other values for these settings: a step re-run by hand with other
    settings is another execution); otherwise creates a run and records it there. Tags: git commit, data version, kdpipe
    version, and the execution key when there is one. Yields ``None`` on non-zero ranks.
    """
    if not is_main_rank():
        yield None
        return
    import mlflow

    uri = configure(params)
    active = mlflow.active_run()
    run_id, source = _stored_run_id(uri)
    if active is not None and active.info.run_id == run_id:
        yield active  # already inside this execution's parent (a step calling a step)
        return
    client = mlflow.MlflowClient(uri)
    execution = os.environ.get(EXECUTION_ENV, "").strip()
    if execution and source != "env":
        run_id, source = _execution_run(client, execution), "execution"
    if run_id and not _run_exists(client, run_id):
        if source == "env":
            raise KdpipeError(f"{RUN_ID_ENV}={run_id}: no such active run in {redact(uri)}")
        run_id = None
    if run_id and source == "file" and _settings_differ(client, run_id, params):
        # A step run by hand with other settings than the execution it would join: a parent records
        # the settings its steps used, so this is another execution, with a parent of its own.
        run_id = None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        mlflow.set_tags({**run_tags(prepared_dir), **({TAG_EXECUTION: execution} if execution else {})})
        if run_id is None and source != "env":
            write_json(
                run_file(),
                {
                    "run_id": run.info.run_id,
                    "experiment_id": run.info.experiment_id,
                    "tracking_uri": redact(uri),
                },
            )
        yield run


@contextlib.contextmanager
def step_run(
    name: str,
    params: Any = None,
    started_at: float | None = None,
    prepared_dir: str | os.PathLike = layout.PREPARED,
) -> Iterator[Any]:
    """A nested run for one step inside :func:`pipeline_run`; yields its ``ActiveRun``.

    Tagged ``kdpipe.step=<name>`` plus the parent's tags. Yields ``None`` on non-zero ranks.
    ``started_at`` (epoch seconds) is when the step itself began: the run is logged after the step,
    and its duration in MLflow must be the step's, not the few seconds of logging.
    """
    if not is_main_rank():
        yield None
        return
    import mlflow

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("step_run() must be used inside pipeline_run()")
    if params is not None:
        tags = run_tags(prepared_dir)
    else:  # copy the parent's tags; ActiveRun.data is a snapshot from its start, so read it back
        parent_tags = mlflow.MlflowClient().get_run(parent.info.run_id).data.tags
        tags = {k: v for k, v in parent_tags.items() if k.startswith("kdpipe.")}
    tags[TAG_STEP] = name
    if started_at is None:
        with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
            yield run
        return
    created = mlflow.MlflowClient().create_run(
        parent.info.experiment_id,
        start_time=int(started_at * 1000),
        run_name=name,
        tags={**tags, "mlflow.parentRunId": parent.info.run_id},
    )
    with mlflow.start_run(run_id=created.info.run_id, nested=True) as run:
        yield run


def close_pipeline_run() -> None:
    """End this execution: forget the parent recorded in ``artifacts/mlflow_run.json`` so the
    next execution starts a new parent. A parent given by ``$KDPIPE_MLFLOW_RUN_ID`` is left alone."""
    if is_main_rank() and not os.environ.get(RUN_ID_ENV):
        run_file().unlink(missing_ok=True)


def _active_run_id() -> str:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        # Logging without a run would silently create one in the default experiment.
        raise RuntimeError("no active MLflow run: call inside pipeline_run() / step_run()")
    return run.info.run_id


# ---------------------------------------------------------------- logging


def log_params_flat(params: Any) -> dict[str, str]:
    """Log params flattened (``train.lr``...) to the active run; returns what was logged.

    Keys naming a secret are dropped, URI credentials in values masked (:func:`safe_params`).
    MLflow params are immutable, so keys already logged (a resumed parent) are skipped and a
    changed value is reported in a warning instead of failing the step.
    """
    if not is_main_rank():
        return {}
    import mlflow
    from mlflow.entities import Param

    run_id = _active_run_id()
    client = mlflow.MlflowClient()
    existing = client.get_run(run_id).data.params
    new = {}
    for key, value in safe_params(params).items():
        if key not in existing:
            new[key] = value
        elif existing[key] != value:
            log.warning(
                "MLflow param %s already logged as %r; not changing it to %r", key, existing[key], value
            )
    items = [Param(k, v) for k, v in new.items()]
    for start in range(0, len(items), 100):  # log_batch accepts at most 100 params per call
        client.log_batch(run_id, params=items[start : start + 100])
    return new


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def metric_name(key: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / space``; replace anything else."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def log_metrics_flat(values: Mapping[str, Any], step: int = 0, prefix: str = "") -> dict[str, float]:
    """Log every finite numeric leaf of a (nested) mapping to the active run; returns them."""
    if not is_main_rank():
        return {}
    import mlflow

    _active_run_id()
    metrics = {}
    for key, value in flatten(dict(values)).items():
        number = _finite_number(value)
        if number is not None:
            metrics[metric_name(prefix + key)] = number
    if metrics:
        mlflow.log_metrics(metrics, step=step)
    return metrics


HISTORY_PREFIX = "curve_"


def log_history(history_path: str | os.PathLike, prefix: str = HISTORY_PREFIX) -> int:
    """Log ``history.json`` (a list of per-evaluation dicts) as metrics with ``step=iteration``.

    Every finite numeric field but ``iteration`` becomes a metric named ``<prefix><field>``: the
    curves keep apart from the step's summary numbers (``val_acc_student`` is the BEST validation
    accuracy, as the step reports it; ``curve_val_acc_student`` is its history, whose latest point is
    the last evaluation). Returns the number of points.
    """
    if not is_main_rank():
        return 0
    import time

    import mlflow
    from mlflow.entities import Metric

    run_id = _active_run_id()
    rows = read_json(history_path)
    if not isinstance(rows, list):
        raise KdpipeError(f"{history_path}: expected a list of evaluations")
    now = int(time.time() * 1000)
    points = []
    for row in rows:
        step = int(row.get("iteration", 0))
        for key, value in row.items():
            number = _finite_number(value)
            if key != "iteration" and number is not None:
                points.append(Metric(metric_name(prefix + key), number, now, step))
    client = mlflow.MlflowClient()
    for start in range(0, len(points), 1000):  # log_batch limit
        client.log_batch(run_id, metrics=points[start : start + 1000])
    return len(points)


def log_artifacts(paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> list[str]:
    """Log files and folders (a folder keeps its name) to the active run; missing ones are skipped
    with a warning. Returns the names logged."""
    if not is_main_rank():
        return []
    import mlflow

    _active_run_id()
    logged = []
    for path in map(Path, paths):
        if path.is_dir():
            sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
            mlflow.log_artifacts(str(path), artifact_path=sub)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        else:
            log.warning("artifact %s does not exist; not logged", path)
            continue
        logged.append(path.name)
    return logged


def tracking_enabled(params: Any) -> bool:
    """Steps log to MLflow unless ``register.track_steps`` is false or ``$KDPIPE_TRACKING`` is 0."""
    return bool(params.register.track_steps) and os.environ.get("KDPIPE_TRACKING", "1") != "0"


def log_step(
    name: str,
    params: Any,
    out_dir: str | os.PathLike,
    report_files: Iterable[str] = (),
    started_at: float | None = None,
    prepared_dir: str | os.PathLike = layout.PREPARED,
) -> None:
    """Record one finished pipeline step in this execution's parent run, as a nested run (tagged with
    the data version of ``prepared_dir``, the prepared data the step read or wrote).

    Logs the (redacted) params on the parent, and on the step's run: the numbers of the step's
    ``metrics.json``, the per-evaluation curves of ``history.json`` and ``schedule.json`` (step =
    iteration / epoch), and the step's small report files as artifacts.
    """
    if not is_main_rank():
        return
    try:
        _log_step(name, params, Path(out_dir), report_files, started_at, prepared_dir)
    except KdpipeError:
        raise
    except Exception as exc:  # MLflow and requests raise many types when a server goes away mid-way
        if _is_unreachable(exc):
            raise TrackingUnavailable(tracking_uri(params), exc) from None
        raise


def _is_unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return any(
        sign in text
        for sign in (
            "Max retries exceeded",
            "Connection refused",
            "ConnectionError",
            "Failed to establish a new connection",
            "timed out",
        )
    )


def _log_step(
    name: str,
    params: Any,
    out: Path,
    report_files: Iterable[str],
    started_at: float | None,
    prepared_dir: str | os.PathLike,
) -> None:
    with pipeline_run(params, run_name="kdpipe", prepared_dir=prepared_dir):
        log_params_flat(params)
        with step_run(name, params, started_at, prepared_dir):
            if (out / "metrics.json").is_file():
                step_metrics = read_json(out / "metrics.json")
                log_metrics_flat(flatten(step_metrics))
                log_warnings(step_metrics.get("warnings") if isinstance(step_metrics, dict) else None)
            if (out / "history.json").is_file():
                log_history(out / "history.json")
            if (out / "schedule.json").is_file():
                _log_schedule(out / "schedule.json")
            log_artifacts([out / f for f in report_files if (out / f).is_file()])


def log_warnings(lines: list[str] | None) -> None:
    """A step's warnings (a teacher below its probe or its student...) as the run's ``warnings`` tag,
    one per line, and their count as a metric: visible in the run list, not only in a log."""
    import mlflow

    lines = [str(line) for line in lines or []]
    mlflow.log_metric("warnings", len(lines))
    if lines:
        mlflow.set_tag("warnings", redact("\n".join(lines))[:4000])


def _log_schedule(path: Path) -> None:
    for row in read_json(path):
        log_metrics_flat({f"schedule_{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
