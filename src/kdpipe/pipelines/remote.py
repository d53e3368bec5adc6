"""Submit the compiled pipeline to a Kubeflow Pipelines server, or schedule it.

Arguments start from the defaults compiled into the package and take ``-S`` overrides
(``-S train.lr=0.1``, ``-S register.min_accuracy=0.9``, ``-S data_rev=v2``), validated with the
params schema. The API token comes only from ``$KFP_TOKEN``. Before anything is sent, the server's
backend version is checked, the tasks are pointed at the ``--image`` / ``$KDPIPE_IMAGE`` (registry
and digest required), and the run gets ``git_commit``. :func:`run_version` runs an uploaded version
instead of a package, :func:`wait_for_run` follows a run until it stops, and
:func:`retrain_on_cluster` is ``kdpipe retrain``'s loop on Kubeflow (submit, wait, pull the result back).

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kdpipe.orchestration.retrain import Cluster

TOKEN_ENV = "KFP_TOKEN"


def package_defaults(package: str | os.PathLike) -> dict[str, Any]:
    """Root parameters of a compiled pipeline and their default values."""
    with open(package, encoding="utf-8") as fh:
        spec = next(iter(yaml.safe_load_all(fh)))
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {name: p.get("defaultValue") for name, p in params.items()}


def pipeline_arguments(package: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """All pipeline arguments: the package's defaults with ``-S`` overrides applied, validated."""
    from kdpipe.core.errors import ParamsError
    from kdpipe.orchestration.kubeflow import NULL, params_from
    from kdpipe.pipelines.kfp_pipeline import SEPARATE

    args = package_defaults(package)
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError(f"override {item!r}: expected group.key=value or parameter=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        group, _, field = key.partition(".")
        if field and (group, field) in SEPARATE:
            args[SEPARATE[group, field]] = value
        elif field and f"{group}_params" in args:
            # an unset value travels as kubeflow.NULL, like the compiled defaults (KFP stores no None)
            args[f"{group}_params"] = {
                **(args[f"{group}_params"] or {}),
                field: NULL if value is None else value,
            }
        elif not field and key in args:
            args[key] = value
        else:
            raise ParamsError(
                f"override {item!r}: no such pipeline parameter or params group "
                f"(parameters: {', '.join(sorted(args))})"
            )
    groups = {name.removesuffix("_params"): value for name, value in args.items() if name.endswith("_params")}
    params_from(**groups)  # raises ParamsError naming the bad key
    return {k: v for k, v in args.items() if v is not None}


def client(host: str, namespace: str | None = None):
    import kfp

    token = os.environ.get(TOKEN_ENV) or None
    kwargs = {"namespace": namespace} if namespace else {}
    return kfp.Client(host=host, existing_token=token, **kwargs)


def server_version(host: str) -> tuple[str | None, str]:
    """The backend's version (``tag_name`` of the v1beta1 health endpoint, which every 2.x backend
    still serves), and when there is none, why: unreachable, or not reported."""
    request = urllib.request.Request(host.rstrip("/") + "/apis/v1beta1/healthz")
    token = os.environ.get(TOKEN_ENV)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (the user's own endpoint)
            tag = json.loads(response.read().decode("utf-8")).get("tag_name") or None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, f"cannot be reached ({getattr(exc, 'reason', exc)})"
    return tag, "does not report its version" if tag is None else f"reports version {tag!r}"


def check_server(host: str, force_version: bool = False) -> None:
    """Refuse a backend older than the pipeline needs, and one whose version is unknown (KFP says
    "unknown" when its TAG_NAME is unset) or that cannot be reached, unless ``force_version``."""
    from kdpipe.core.errors import KdpipeError
    from kdpipe.orchestration.cluster import MIN_BACKEND, check_backend_version
    from kdpipe.orchestration.tracking import redact

    tag, why = server_version(host)
    if check_backend_version(tag, redact(host)) is not None:
        return
    needed = ".".join(map(str, MIN_BACKEND))
    line = (
        f"{redact(host)}: the Kubeflow Pipelines backend {why}; this pipeline needs backend {needed} or newer"
    )
    if not force_version:
        raise KdpipeError(
            f"{line}: check the URL and $KFP_TOKEN, or pass --force-backend-version if it is {needed}+"
        )
    print(f"warning: {line} (--force-backend-version: submitting anyway)", file=sys.stderr)


def scrub_credentials(arguments: dict[str, Any]) -> dict[str, Any]:
    """The pipeline arguments with every URL's credentials removed (and secret-named keys of nested
    settings dropped), one warning line per parameter changed: KFP keeps parameters in its database,
    UI and Argo spec, so a token in ``data_repo`` or a DVC remote URL would be readable by anyone
    who sees the run. The tasks read credentials from their Kubernetes secrets."""
    from kdpipe.orchestration.tracking import is_secret_key, without_credentials

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return without_credentials(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not is_secret_key(str(k))}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    cleaned = {}
    for name, value in arguments.items():
        cleaned[name] = clean(value)
        if cleaned[name] != value:
            print(
                f"warning: pipeline parameter {name}: credentials removed (they never travel as parameters; "
                "the tasks read them from their Kubernetes secrets, see docs/kubeflow.md)",
                file=sys.stderr,
            )
    return cleaned


def package_images(docs: list[dict]) -> set[str]:
    return {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}


def with_image(docs: list[dict], image: str, gpu_image: str | None = None) -> list[dict]:
    """The package with its tasks on ``image``, and those given a GPU (and a multi-node TrainJob's
    nodes) on ``gpu_image`` (default: ``image``); the image names they record in MLflow follow."""
    from kdpipe.orchestration.tracking import IMAGE_REF_ENV
    from kdpipe.orchestration.trainjob import TRAINJOB_IMAGE_ENV
    from kdpipe.training.devices import EXPECT_GPU_ENV

    gpu_image = gpu_image or image
    for executor in docs[0]["deploymentSpec"]["executors"].values():
        container = executor["container"]
        env = {v.get("name"): v for v in container.get("env", [])}
        on_gpu = env.get(EXPECT_GPU_ENV, {}).get("value") == "1"
        container["image"] = gpu_image if on_gpu else image
        if IMAGE_REF_ENV in env:
            env[IMAGE_REF_ENV]["value"] = container["image"]
        if TRAINJOB_IMAGE_ENV in env:
            env[TRAINJOB_IMAGE_ENV]["value"] = gpu_image
    return docs


@contextmanager
def package_for_cluster(package: str | os.PathLike, image: str | None, gpu_image: str | None = None):
    """The package to send: ``package`` with its tasks on ``image`` (default ``$KDPIPE_IMAGE``; else the
    package's own) and its GPU tasks on ``gpu_image`` (default ``$KDPIPE_GPU_IMAGE``, else ``image``);
    each must name a registry and a digest. Yields the path of a temporary copy."""
    from kdpipe.orchestration.cluster import check_image_for_cluster

    with open(package, encoding="utf-8") as fh:
        docs = list(yaml.safe_load_all(fh))
    image = image or os.environ.get("KDPIPE_IMAGE", "").strip() or None
    gpu_image = gpu_image or os.environ.get("KDPIPE_GPU_IMAGE", "").strip() or None
    if image:
        docs = with_image(
            docs, check_image_for_cluster(image), gpu_image and check_image_for_cluster(gpu_image)
        )
    for ref in sorted(package_images(docs)):
        check_image_for_cluster(ref)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(package).name
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
        yield path


def with_git_commit(package: str | os.PathLike, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` plus the commit this checkout is at, unless given (recorded by every task)."""
    from kdpipe.orchestration.tracking import git_commit

    if "git_commit" in package_defaults(package) and not arguments.get("git_commit"):
        return {**arguments, "git_commit": git_commit(Path(__file__).resolve().parent)}
    return arguments


def default_run_name(arguments: dict[str, Any]) -> str:
    """``kdpipe data <version> code <commit>``: which data and which code, readable in the run list."""
    data = str(arguments.get("data_version") or arguments.get("data_rev") or "?")
    code = str(arguments.get("git_commit") or "unknown")
    return f"kdpipe data {data[:20]} code {code[:12]}"


def submit(
    host: str,
    package: str | os.PathLike,
    arguments: dict[str, Any],
    experiment: str = "kdpipe",
    run_name: str | None = None,
    namespace: str | None = None,
    image: str | None = None,
    gpu_image: str | None = None,
    force_version: bool = False,
    service_account: str | None = None,
) -> str:
    """Create one run of the package on ``image`` (GPU tasks on ``gpu_image``), its pods under
    ``service_account`` (else the namespace's default runner); returns the run id."""
    check_server(host, force_version)
    arguments = scrub_credentials(arguments)
    with (
        package_for_cluster(package, image, gpu_image) as sent,
        _api_errors("submitting the run", "nothing was submitted"),
    ):
        arguments = with_git_commit(sent, arguments)
        result = client(host, namespace).create_run_from_pipeline_package(
            str(sent),
            arguments=arguments,
            run_name=run_name or default_run_name(arguments),
            experiment_name=experiment,
            namespace=namespace,
            service_account=service_account,
        )
    return result.run_id


@contextlib.contextmanager
def _api_errors(what: str, outcome: str) -> Iterator[None]:
    """A refusal of the KFP API as one line (its status and message), not a client traceback."""
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        raise _api_error(exc, what, outcome) from None


def _api_error(exc, what: str, outcome: str):
    """The KdpipeError for an ``ApiException``: its status and the server's message, in one line."""
    from kdpipe.core.errors import KdpipeError

    detail = (exc.body or "").strip() if isinstance(exc.body, str) else ""
    try:
        detail = json.loads(detail).get("error") or json.loads(detail).get("message") or detail
    except (ValueError, AttributeError):
        pass
    return KdpipeError(f"{what} failed: {exc.status} {exc.reason}: {detail[:300]}; {outcome}")


def release_version(cwd: str | os.PathLike = ".") -> str | None:
    """The git tag naming the checked-out commit exactly (a release), or None."""
    import subprocess

    done = subprocess.run(
        ["git", "describe", "--tags", "--exact-match"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() or None


def upload(
    host: str,
    package: str | os.PathLike,
    name: str,
    version: str,
    namespace: str | None = None,
    image: str | None = None,
    gpu_image: str | None = None,
    force_version: bool = False,
) -> dict[str, Any]:
    """Upload the package on ``image`` as version ``version`` of the pipeline ``name`` (created on the
    first upload), so the KFP UI keeps every release and runs can name the version they ran. A
    version name that exists already is refused: a release is never replaced under the same name."""
    from kdpipe.core.errors import KdpipeError

    check_server(host, force_version)
    with (
        package_for_cluster(package, image, gpu_image) as sent,
        _api_errors(f"uploading version {version!r} of pipeline {name!r}", "nothing was replaced"),
    ):
        kfp_client = client(host, namespace)
        pipeline_id = kfp_client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline_id = kfp_client.upload_pipeline(
                str(sent),
                pipeline_name=name,
                description="kdpipe: semi-supervised distillation",
                namespace=namespace,
            ).pipeline_id
        if find_version(kfp_client, pipeline_id, version) is not None:
            raise KdpipeError(
                f"pipeline {name!r} already has a version {version!r}: a release is never replaced; "
                "name a new one (--version)"
            )
        created = kfp_client.upload_pipeline_version(
            str(sent), pipeline_version_name=version, pipeline_id=pipeline_id, description=f"kdpipe {version}"
        )
    return {"pipeline_id": pipeline_id, "version_id": created.pipeline_version_id, "version": version}


def find_version(kfp_client, pipeline_id: str, version: str):
    """The version named ``version`` of the pipeline ``pipeline_id``, or None."""
    by_name = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": version}]}
    )
    listed = kfp_client.list_pipeline_versions(pipeline_id, filter=by_name, page_size=10)
    return next((v for v in listed.pipeline_versions or [] if v.display_name == version), None)


def version_run_name(arguments: dict[str, Any], version: str) -> str:
    """``kdpipe data <version> release <version name>``: an uploaded version names its own code."""
    data = str(arguments.get("data_version") or arguments.get("data_rev") or "?")
    return f"kdpipe data {data[:20]} release {version[:40]}"


def run_version(
    host: str,
    name: str,
    version: str,
    arguments: dict[str, Any],
    experiment: str = "kdpipe",
    run_name: str | None = None,
    namespace: str | None = None,
    force_version: bool = False,
    service_account: str | None = None,
) -> str:
    """Create one run of the uploaded version ``version`` of the pipeline ``name`` (what
    :func:`upload` made: its images and cluster settings are the ones it was uploaded with), so the
    KFP UI lists the run under that release. Returns the run id."""
    from kdpipe.core.errors import KdpipeError

    check_server(host, force_version)
    arguments = scrub_credentials(arguments)
    with _api_errors(f"running version {version!r} of pipeline {name!r}", "nothing was submitted"):
        kfp_client = client(host, namespace)
        pipeline_id = kfp_client.get_pipeline_id(name)
        found = None if pipeline_id is None else find_version(kfp_client, pipeline_id, version)
        if found is None:
            raise KdpipeError(
                f"pipeline {name!r} has no version {version!r} on this server: upload it first "
                f"(kdpipe pipeline upload --name {name} --version {version})"
            )
        experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
        run = kfp_client.run_pipeline(
            experiment_id,
            run_name or version_run_name(arguments, version),
            params=arguments,
            pipeline_id=pipeline_id,
            version_id=found.pipeline_version_id,
            service_account=service_account,
        )
    return run.run_id


# KFP's run states (v2beta1 RuntimeState) after which nothing more happens to a run.
FINAL_STATES = frozenset({"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED"})
# Failed polls in a row that are tolerated: over hours of waiting a gateway or API server restarts.
POLL_RETRIES = 3


def wait_for_run(
    host: str,
    run_id: str,
    namespace: str | None = None,
    timeout_s: float = 6 * 3600,
    poll_s: float = 60.0,
) -> str:
    """Poll the run until it reaches one of :data:`FINAL_STATES` and return that state. Raises a
    one-line :class:`KdpipeError` when ``timeout_s`` passes first (the run goes on on the cluster)
    or when the API refuses the poll. kfp's own ``wait_for_run_completion`` is not used: it does
    not count CANCELED as final and would wait for a canceled run until its timeout."""
    from kdpipe.core.errors import KdpipeError
    from kdpipe.orchestration.tracking import redact

    kfp_client = client(host, namespace)
    deadline = time.monotonic() + timeout_s
    failures, state = 0, "not reported yet"
    while True:
        polled = _run_state(kfp_client, run_id)
        failures = failures + 1 if polled is None else 0
        if failures > POLL_RETRIES:
            raise KdpipeError(
                f"reading the state of Kubeflow run {run_id} on {redact(host)} failed {failures} times "
                "in a row (server errors or no connection); the run itself goes on on the cluster"
            )
        state = polled or state
        if state in FINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise KdpipeError(
                f"Kubeflow run {run_id} on {redact(host)} did not finish within {timeout_s:g} s "
                f"(state {state}); it goes on on the cluster: follow it in the KFP UI"
            )
        time.sleep(poll_s)


def _run_state(kfp_client, run_id: str) -> str | None:
    """The run's state, or None when the server answered with a server error (5xx) or could not be
    reached, which is worth another poll; any other refusal (unknown run, no access) is one line."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return str(kfp_client.get_run(run_id).state or "RUNTIME_STATE_UNSPECIFIED").upper()
    except HTTPError:  # no connection (after urllib3's own retries)
        return None
    except ApiException as exc:
        if (exc.status or 0) >= 500:
            return None
        raise _api_error(
            exc, f"reading the state of run {run_id}", "the run itself is not affected"
        ) from None


def check_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != 6:
        raise ValueError(
            f"--cron {cron!r}: KFP needs 6 fields (seconds minutes hours day-of-month month "
            "day-of-week), e.g. '0 0 3 * * *' for 03:00 every day"
        )
    return " ".join(fields)


def schedule(
    host: str,
    package: str | os.PathLike,
    arguments: dict[str, Any],
    name: str,
    cron: str,
    experiment: str = "kdpipe",
    namespace: str | None = None,
    enable_caching: bool = False,
    image: str | None = None,
    gpu_image: str | None = None,
    force_version: bool = False,
    service_account: str | None = None,
) -> dict[str, Any]:
    """Create the recurring run ``name`` on ``image`` (pods under ``service_account``), replacing any recurring run of that name in the
    experiment. KFP has no update call: the new one is created first and the old ones deleted after,
    so a failed create leaves the old schedule running (never no schedule at all).
    One run at a time, no catch-up. Caching is off by default, so each run reads the data anew."""
    cron = check_cron(cron)
    check_server(host, force_version)
    arguments = scrub_credentials(arguments)
    with package_for_cluster(package, image, gpu_image) as sent:
        kfp_client = client(host, namespace)
        experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
        by_name = json.dumps(
            {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
        )
        listed = kfp_client.list_recurring_runs(experiment_id=experiment_id, filter=by_name, page_size=100)
        replaced = [r.recurring_run_id for r in (listed.recurring_runs or []) if r.display_name == name]
        with _api_errors(f"creating the recurring run {name!r}", "the recurring runs of that name are kept"):
            created = kfp_client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=name,
                cron_expression=cron,
                max_concurrency=1,
                no_catchup=True,
                pipeline_package_path=str(sent),
                params=with_git_commit(sent, arguments),
                enable_caching=enable_caching,
                service_account=service_account,
            )
        for recurring_run_id in replaced:  # only once the new one exists
            kfp_client.delete_recurring_run(recurring_run_id)
    return {"recurring_run_id": created.recurring_run_id, "replaced": replaced, "cron": cron}


# ---------------------------------------------------------------- kdpipe retrain on Kubeflow

# The compiled package a project commits (kfp_pipeline.PACKAGE, named here to spare that import).
COMMITTED_PACKAGE = Path("pipelines") / "kdpipe_pipeline.yaml"


def retrain_on_cluster(
    repo: str | os.PathLike, rev: str, cluster: Cluster, summary_path: str | os.PathLike | None = None
) -> str:
    """``kdpipe retrain`` with a Kubeflow endpoint (``cluster``): run the pipeline for ``repo``'s
    commit and data, wait for the run, pull its reports back from MLflow into ``reports/`` and diff
    the metrics against ``rev``. Returns the Markdown summary (also appended to ``summary_path``)."""
    from kdpipe.orchestration import retrain as loop
    from kdpipe.orchestration.tracking import redact

    repo = Path(repo)
    uri = loop.cluster_tracking_uri(repo)  # first: without it the run's result cannot come back
    arguments = {**loop.kfp_data_arguments(repo), **loop.kfp_remote_arguments(repo)}
    if not os.environ.get(TOKEN_ENV):
        print(
            "kdpipe retrain: warning: KFP_TOKEN is unset; the submission is unauthenticated", file=sys.stderr
        )
    # kfp prints run links on stdout, which carries only the Markdown summary
    with contextlib.redirect_stdout(sys.stderr):
        run_id, what = start_retrain_run(repo, cluster, arguments)
        print(f"kdpipe retrain: Kubeflow run {run_id} ({what}); waiting for it to finish", file=sys.stderr)
        state = wait_until_succeeded(cluster, run_id)
    ran = f"Trained on Kubeflow (`{redact(cluster.host)}`): run `{run_id}`, {what}, ended {state}."
    return loop.write_summary([ran, "", *loop.cluster_result(repo, rev, uri, run_id)], summary_path)


def start_retrain_run(repo: Path, cluster: Cluster, arguments: dict[str, Any]) -> tuple[str, str]:
    """Start the run: the uploaded ``cluster.pipeline_version``, else the package compiled with the
    cluster settings file (else the committed one) on ``$KDPIPE_IMAGE`` and ``$KDPIPE_GPU_IMAGE``.
    Returns the run id and, for the summary, what runs."""
    if cluster.pipeline_version:
        _note_version_ignores(cluster)
        run_id = run_version(
            cluster.host,
            cluster.pipeline_name,
            cluster.pipeline_version,
            arguments,
            namespace=cluster.namespace,
            service_account=_service_account(repo, cluster.settings_file),
        )
        return run_id, f"uploaded version `{cluster.pipeline_version}` of pipeline `{cluster.pipeline_name}`"
    with package_for_retrain(repo, cluster.settings_file) as package:
        run_id = submit(
            cluster.host,
            package,
            arguments,
            namespace=cluster.namespace,
            service_account=_service_account(repo, cluster.settings_file),
        )
    settings = (
        f"cluster settings `{cluster.settings_file}`" if cluster.settings_file else "default cluster settings"
    )
    return run_id, f"the pipeline with {settings}"


def _service_account(repo: Path, settings_file: str | None) -> str | None:
    """The cluster settings file's service account: KFP sets it per run, not in the package."""
    from kdpipe.orchestration.cluster import load_cluster_settings

    if not settings_file:
        return None
    path = Path(settings_file) if Path(settings_file).is_absolute() else repo / settings_file
    return load_cluster_settings(path).service_account


def _note_version_ignores(cluster: Cluster) -> None:
    """An uploaded version carries the images and settings it was uploaded with: say so when others
    are configured, rather than let them look applied."""
    from kdpipe.orchestration.retrain import CLUSTER_FILE_ENV

    unused = [
        name
        for name, value in (
            (CLUSTER_FILE_ENV, cluster.settings_file),
            ("KDPIPE_IMAGE", os.environ.get("KDPIPE_IMAGE")),
            ("KDPIPE_GPU_IMAGE", os.environ.get("KDPIPE_GPU_IMAGE")),
        )
        if value
    ]
    if unused:
        print(
            f"kdpipe retrain: note: version {cluster.pipeline_version!r} runs with the images and "
            f"cluster settings it was uploaded with; {', '.join(unused)} not applied",
            file=sys.stderr,
        )


@contextmanager
def package_for_retrain(repo: Path, settings_file: str | None) -> Iterator[Path]:
    """The package to submit: compiled from the project's params and ``settings_file`` (relative to
    the project) into a temporary folder, as ``kdpipe pipeline compile --cluster`` does; without a
    settings file, the committed one."""
    from kdpipe.core.errors import KdpipeError

    if not settings_file:
        yield repo / COMMITTED_PACKAGE
        return
    from kdpipe.pipelines.kfp_pipeline import compile_pipeline

    params = repo / "params.yaml"
    settings = Path(settings_file) if Path(settings_file).is_absolute() else repo / settings_file
    with tempfile.TemporaryDirectory() as tmp:
        try:
            package = compile_pipeline(
                Path(tmp) / COMMITTED_PACKAGE.name, params if params.is_file() else None, settings
            )
        except ValueError as exc:  # compile's one-line refusals
            raise KdpipeError(str(exc)) from None
        yield package


def wait_until_succeeded(cluster: Cluster, run_id: str) -> str:
    """Wait for the run; its final state when it succeeded, else one line naming it and its state."""
    from kdpipe.core.errors import KdpipeError
    from kdpipe.orchestration.tracking import redact

    state = wait_for_run(cluster.host, run_id, cluster.namespace, cluster.timeout_s, cluster.poll_s)
    if state != "SUCCEEDED":
        raise KdpipeError(
            f"Kubeflow run {run_id} on {redact(cluster.host)} ended {state}: nothing was pulled back; "
            "its tasks' logs are in the KFP UI"
        )
    return state
