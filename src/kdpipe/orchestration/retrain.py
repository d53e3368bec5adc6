"""``kdpipe retrain``: the retraining loop that CI (``.github/workflows/retrain.yml``) and people run.

Locally (the default): clear the executable bit on the DVC-tracked data files, ``dvc pull``,
``dvc repro``, ``dvc push``, then ``dvc metrics diff <rev>`` as Markdown (also appended to
``$GITHUB_STEP_SUMMARY`` when set). With a Kubeflow endpoint (``--kfp-host`` or env
``KDPIPE_KFP_HOST``: :func:`cluster_from_env`) the same loop runs on the cluster: submitting and
waiting are :func:`kdpipe.pipelines.remote.retrain_on_cluster` (the Kubeflow layer); this module
gives it what the cluster reads (:func:`kfp_data_arguments`, :func:`kfp_remote_arguments`) and
brings the result back (:func:`cluster_result`: the run's reports from MLflow into
``reports/<step>/``, then the same metrics diff). The endpoint is only ever shown masked.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.core.errors import KdpipeError
from kdpipe.data.ingest import dvc_executable

KFP_HOST_ENV = "KDPIPE_KFP_HOST"
KFP_NAMESPACE_ENV = "KDPIPE_KFP_NAMESPACE"
CLUSTER_FILE_ENV = "KDPIPE_CLUSTER_FILE"
PIPELINE_VERSION_ENV = "KDPIPE_PIPELINE_VERSION"
DVC_REMOTE_ENV = "KDPIPE_DVC_REMOTE"
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
REPORTS = Path("reports")
# The key that marks a metrics file written from a cluster run's MLflow metrics.
SOURCE_KEY = "source"


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    tolerate_failure: bool = False  # dvc pull: a failure is checked against the workspace instead


@dataclass(frozen=True)
class Cluster:
    """Where and how ``retrain`` runs the pipeline on Kubeflow."""

    host: str
    namespace: str | None = None
    settings_file: str | None = None  # cluster settings the package is compiled with (else the committed one)
    pipeline_version: str | None = None  # an uploaded version to run instead of a package sent inline
    pipeline_name: str = "kdpipe"
    timeout_s: float = 6 * 3600  # a GitHub-hosted job stops after 6 hours
    poll_s: float = 60.0


def plan(push: bool = True, dvc: str | None = None) -> list[Step]:
    """The commands a local ``retrain`` runs, in order (the metrics diff comes after them)."""
    dvc = dvc or dvc_executable()
    steps = [Step("pull", [dvc, "pull"], tolerate_failure=True), Step("repro", [dvc, "repro"])]
    if push:
        steps.append(Step("push", [dvc, "push"]))
    return steps


def retrain(
    repo: str | os.PathLike = ".",
    rev: str = "HEAD",
    push: bool = True,
    summary_path: str | os.PathLike | None = None,
) -> str:
    """Retrain here, in ``repo``; return the Markdown summary (also appended to ``summary_path``,
    default ``$GITHUB_STEP_SUMMARY``)."""
    return write_summary(retrain_here(Path(repo), rev, push), summary_path)


def write_summary(lines: list[str], summary_path: str | os.PathLike | None = None) -> str:
    """The summary's Markdown from its body ``lines``, appended to ``summary_path`` (default
    ``$GITHUB_STEP_SUMMARY``) when there is one."""
    text = "\n".join(["## kdpipe retrain", "", *lines]).rstrip() + "\n"
    summary_path = summary_path if summary_path is not None else os.environ.get(SUMMARY_ENV)
    if summary_path:
        with open(summary_path, "a", encoding="utf-8") as fh:
            fh.write(text)
    return text


def cluster_from_env(kfp_host: str | None = None, namespace: str | None = None) -> Cluster | None:
    """The cluster named by ``kfp_host`` or ``$KDPIPE_KFP_HOST``, with its settings from the
    environment; None when there is no endpoint (retrain runs here)."""
    host = kfp_host if kfp_host is not None else os.environ.get(KFP_HOST_ENV) or None
    if not host:
        return None
    namespace = namespace if namespace is not None else os.environ.get(KFP_NAMESPACE_ENV) or None
    return Cluster(
        host,
        namespace,
        settings_file=os.environ.get(CLUSTER_FILE_ENV) or None,
        pipeline_version=os.environ.get(PIPELINE_VERSION_ENV) or None,
    )


def retrain_here(repo: Path, rev: str, push: bool) -> list[str]:
    """The local loop: pull, repro, push; the summary's lines with the metrics diff."""
    from kdpipe.orchestration.tracking import redact

    lines = []
    cleared = clear_executable_bits(repo)
    if cleared:
        print(
            f"kdpipe retrain: cleared the executable bit on {len(cleared)} data file(s) (e.g. {cleared[0]}): "
            "DVC reports such files as modified on every pull",
            file=sys.stderr,
        )
    for step in plan(push):
        shown = " ".join([Path(step.argv[0]).name, *(redact(a) for a in step.argv[1:])])
        print(f"kdpipe retrain: {shown}", file=sys.stderr, flush=True)
        # The commands' own output goes to stderr: stdout carries only the Markdown summary.
        code = subprocess.run(step.argv, cwd=repo, stdout=_stderr_fd(), env=_venv_env()).returncode
        if code == 0:
            continue
        if step.tolerate_failure:
            missing = missing_tracked_data(repo)
            if missing:
                raise KdpipeError(
                    f"dvc pull failed and the workspace lacks DVC-tracked data: {', '.join(missing)}; "
                    "check the DVC remote and its credentials (environment variables)"
                )
            print(
                "kdpipe retrain: dvc pull failed; the workspace already holds the data, continuing",
                file=sys.stderr,
            )
            lines += ["- `dvc pull` failed; trained on the data already in the workspace", ""]
            continue
        raise KdpipeError(f"`dvc {step.name}` failed (exit {code}); see its output above")
    return [*lines, f"Metrics against `{rev}` (`dvc metrics diff {rev}`):", "", metrics_diff(repo, rev)]


# ---------------------------------------------------------------- the result of a Kubeflow run


def cluster_tracking_uri(repo: Path) -> str:
    """The MLflow server the cluster's tasks log to, as this machine reaches it:
    ``$MLFLOW_TRACKING_URI``, else ``register.tracking_uri`` of the project's params. There is no
    local fallback: a store on this machine would never hold the cluster run's metrics."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri and (repo / "params.yaml").is_file():
        from kdpipe.core.params import load_params

        uri = load_params(repo / "params.yaml").register.tracking_uri or ""
    if not uri:
        raise KdpipeError(
            "a Kubeflow retrain reads the run's metrics back from MLflow: set MLFLOW_TRACKING_URI to "
            "the server the cluster logs to (the kdpipe-mlflow secret's); nothing was submitted"
        )
    return uri


def cluster_result(repo: Path, rev: str, uri: str, run_id: str) -> list[str]:
    """After KFP run ``run_id`` succeeded: its reports pulled from MLflow into ``reports/`` and the
    metrics diff against ``rev``, as the summary's lines."""
    from kdpipe.orchestration.tracking import redact

    pulled = pull_cluster_reports(repo, uri, run_id)
    return [
        f"Reports pulled back from MLflow (`{redact(uri)}`, runs tagged `kdpipe.execution={run_id}`); "
        f"metrics files hold the run's MLflow metrics, marked by their `{SOURCE_KEY}` key. "
        "`dvc.lock` is not changed: the cluster's outputs stay in its artifact store and the model "
        "in the MLflow registry.",
        "",
        *pulled,
        "",
        f"Metrics against `{rev}` (`dvc metrics diff {rev}`):",
        "",
        metrics_diff(repo, rev),
    ]


def pull_cluster_reports(repo: Path, uri: str, run_id: str) -> list[str]:
    """Write each step's reports from the MLflow runs of KFP run ``run_id`` into
    ``reports/<step>/``; return one summary line per step (and one for the steps not found)."""
    from mlflow import MlflowClient

    from kdpipe.core.catalog import STEPS
    from kdpipe.orchestration.tracking import redact

    client = MlflowClient(uri)
    runs = cluster_step_runs(client, run_id)
    if not runs:
        raise KdpipeError(
            f"Kubeflow run {run_id} succeeded, but {redact(uri)} holds no MLflow run tagged "
            f"kdpipe.execution={run_id}: do the cluster's tasks log there (the kdpipe-mlflow secret)?"
        )
    lines = []
    for step, run in runs.items():
        written, failed = write_step_reports(client, repo / REPORTS / step, step, run, run_id)
        shown = ", ".join(f"`{(REPORTS / step / name).as_posix()}`" for name in written) or "no report"
        lines.append(f"- {step}: {shown}" + (f" (not pulled: {failed})" if failed else ""))
    missing = [step for step in STEPS if step not in runs]
    if missing:
        lines.append(f"- no MLflow run, reports left as they were: {', '.join(missing)}")
    return lines


def cluster_step_runs(client, run_id: str) -> dict[str, Any]:
    """``{step: its MLflow run}`` for KFP run ``run_id``: the nested runs of the parent run(s)
    tagged ``kdpipe.execution=<run id>`` (every task of that run logs under it), in the catalog's
    order; of a step logged twice (a retried task) the latest."""
    from kdpipe.core.catalog import STEPS
    from kdpipe.orchestration.tracking import TAG_EXECUTION, TAG_STEP

    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return {}
    parents = client.search_runs(experiments, filter_string=f"tags.`{TAG_EXECUTION}` = '{run_id}'")
    found: dict[str, Any] = {}
    for parent in parents:
        children = client.search_runs(
            experiments,
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            order_by=["attributes.start_time ASC"],
        )
        for child in children:
            found[child.data.tags.get(TAG_STEP, "")] = child
    return {step: found[step] for step in STEPS if step in found}


def write_step_reports(client, folder: Path, step: str, run, kfp_run_id: str) -> tuple[list[str], str]:
    """The step's report files from its MLflow run, into ``folder``: ``metrics.json`` from the run's
    metrics (the keys MLflow holds, marked with their source), the others downloaded from its
    artifacts as the step wrote them. Returns the names written and what could not be pulled."""
    from kdpipe.core.catalog import STEPS

    wanted = STEPS[step].report_files
    written = []
    if "metrics.json" in wanted and run.data.metrics:
        write_cluster_metrics(folder / "metrics.json", run, kfp_run_id)
        written.append("metrics.json")
    try:
        written += download_reports(
            client, run.info.run_id, [n for n in wanted if n != "metrics.json"], folder
        )
    except Exception as exc:  # MLflow's artifact stores raise many types (a missing bucket credential...)
        return written, f"artifacts: {_first_line(exc)}"
    return written, ""


def _first_line(exc: BaseException) -> str:
    from kdpipe.orchestration.tracking import redact

    text = str(exc).strip()
    return redact(text.splitlines()[0])[:200] if text else type(exc).__name__


def cluster_metrics(run) -> dict[str, float]:
    """A step run's summary numbers: its MLflow metrics without the per-evaluation curves (those
    are the step's plots, ``history.json`` and ``schedule.json``)."""
    from kdpipe.orchestration.tracking import HISTORY_PREFIX

    curves = (HISTORY_PREFIX, "schedule_")
    return {k: v for k, v in sorted(run.data.metrics.items()) if not k.startswith(curves)}


def write_cluster_metrics(path: Path, run, kfp_run_id: str) -> None:
    from kdpipe.core.atomic import write_json

    source = f"Kubeflow run {kfp_run_id}, MLflow run {run.info.run_id} (metrics as logged there)"
    write_json(path, {**cluster_metrics(run), SOURCE_KEY: source})


def download_reports(client, mlflow_run_id: str, names: list[str], folder: Path) -> list[str]:
    """Download the artifacts of ``names`` that the run holds (at its root, where a step logs its
    report files) into ``folder``, each replaced in one step; returns the names written."""
    import shutil
    import tempfile

    from kdpipe.core.atomic import atomic_path

    present = {a.path for a in client.list_artifacts(mlflow_run_id) if not a.is_dir}
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in (n for n in names if n in present):
            local = client.download_artifacts(mlflow_run_id, name, tmp)
            with atomic_path(folder / name) as target:
                shutil.copyfile(local, target)
            written.append(name)
    return written


def kfp_data_arguments(repo: Path) -> dict[str, str]:
    """Which data the cluster reads: this checkout's commit of its git remote (env ``KDPIPE_DATA_REPO``
    overrides the remote URL). Empty values are left out (the pipeline's defaults apply)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    from kdpipe.orchestration.tracking import without_credentials

    rev = git("rev-parse", "HEAD")
    # a token in the origin URL stays here: the cluster's data task reads it from the kdpipe-git secret
    url = without_credentials(os.environ.get("KDPIPE_DATA_REPO") or git("remote", "get-url", "origin"))
    found = {"data_repo": url, "data_rev": rev, "data_version": rev}
    return {k: v for k, v in found.items() if v}


def kfp_remote_arguments(repo: Path) -> dict[str, Any]:
    """The DVC remote the cluster's data task reads, as ``dvc_remote_config`` (the URL and the
    remote's non-secret settings such as ``endpointurl``): ``$KDPIPE_DVC_REMOTE`` (a URL), else the
    project's default remote. Credentials never travel: the cluster reads them from its secret.
    A local-folder remote is refused: a cluster cannot read this machine's disk."""
    from kdpipe.orchestration.tracking import is_secret_key, without_credentials

    url = os.environ.get(DVC_REMOTE_ENV, "").strip()
    settings: dict[str, Any] = {}
    if not url:
        name, settings = _default_remote(repo)
        url = str(settings.pop("url", ""))
    if "://" not in url:
        raise KdpipeError(
            f"DVC remote {url!r} is a local folder: the cluster cannot read it; push the data to an "
            f"object store (s3://, gs://, azure://...) and set it as the default remote or ${DVC_REMOTE_ENV}"
        )
    public = {
        k: v
        for k, v in settings.items()
        if not is_secret_key(k) and "password" not in k.lower() and isinstance(v, str | int | float | bool)
    }
    return {"dvc_remote_config": {"url": without_credentials(url), **public}}


def _default_remote(repo: Path) -> tuple[str, dict[str, Any]]:
    """The project's default DVC remote and the settings written for it in its config files (not
    DVC's filled-in defaults), the local file (git-ignored, where CI puts its remote) last."""
    from dvc.repo import Repo

    name, remotes = None, {}
    with Repo(str(repo)) as project:
        for level in ("system", "global", "repo", "local"):
            found = project.config.load_one(level)
            name = found.get("core", {}).get("remote", name)
            for remote, settings in found.get("remote", {}).items():
                remotes[remote] = {**remotes.get(remote, {}), **settings}
    if not name or name not in remotes:
        raise KdpipeError(
            f"{repo}: no default DVC remote, so the cluster cannot read the data; "
            f"set one (dvc remote default NAME) or ${DVC_REMOTE_ENV}"
        )
    return name, dict(remotes[name])


def _venv_env() -> dict[str, str]:
    """This environment with this interpreter's bin folder first on PATH: the dvc.yaml stages call
    ``kdpipe``, which must be this installation even when the venv is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def _stderr_fd() -> int | None:
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a file descriptor
        return None


def metrics_diff(repo: Path, rev: str) -> str:
    """The metrics that changed against ``rev`` (``dvc metrics diff --json``), as a Markdown table of the
    numbers only: the file hashes and settings that DVC also lists are not metrics a reviewer reads."""
    import json

    done = subprocess.run(
        [dvc_executable(), "metrics", "diff", "--json", rev], cwd=repo, capture_output=True, text=True
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise KdpipeError(
            f"dvc metrics diff {rev} failed: {detail[-1] if detail else f'exit {done.returncode}'}"
        )
    rows = numeric_changes(json.loads(done.stdout or "{}"))
    if not rows:
        return f"No metric changed against `{rev}`."
    lines = ["| file | metric | before | after | change |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {path} | {name} | {_number(old)} | {_number(new)} | {_number(change, signed=True)} |"
        for path, name, old, new, change in rows
    ]
    return "\n".join(lines)


def numeric_changes(diff: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(file, metric, before, after, change) for every metric that is a number and changed; file
    hashes (``files.*``, ``*sha256``, ``data_version``), text and unchanged values are left out."""
    rows = []
    for path, metrics in sorted(diff.items()):
        for name, values in sorted((metrics or {}).items()):
            old, new = values.get("old"), values.get("new")
            if name.startswith("files.") or name.endswith(("sha256", "data_version")):
                continue
            if not all(
                v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in (old, new)
            ):
                continue
            if old == new:
                continue
            change = None if old is None or new is None else new - old
            rows.append((path, name, old, new, change))
    return rows


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{value:+d}" if signed else f"{int(value)}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def tracked_data(repo: Path) -> tuple[list[Path], list[str]]:
    """The outputs of the ``.dvc`` files under ``repo`` (the data, not pipeline outputs), and the
    ``.dvc`` files that could not be read."""
    import yaml

    outputs, unreadable = [], []
    for dvc_file in sorted(Path(repo).rglob("*.dvc")):
        if any(
            part.startswith(".") or part in ("artifacts", "dvc-remote")
            for part in dvc_file.relative_to(repo).parts
        ):
            continue
        try:
            outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or []
        except (OSError, yaml.YAMLError):
            unreadable.append(f"{dvc_file} (unreadable)")
            continue
        outputs += [dvc_file.parent / str(out.get("path", "")) for out in outs]
    return outputs, unreadable


def missing_tracked_data(repo: Path) -> list[str]:
    """Outputs of the ``.dvc`` files under ``repo`` (not pipeline outputs) that are not in the workspace."""
    outputs, unreadable = tracked_data(repo)
    return unreadable + [target.relative_to(repo).as_posix() for target in outputs if not target.exists()]


EXECUTABLE = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def clear_executable_bits(repo: Path) -> list[str]:
    """Drop the executable bit from the files of the DVC-tracked data; return their paths.

    Photos copied from a FAT/exFAT card, a Windows share or some zip tools arrive marked executable.
    DVC records files as not executable, so every ``dvc pull`` or ``dvc checkout`` then reports each
    of them as "modified" (and leaves the bit as it was) on a workspace nobody changed. An image is
    not a program: clearing the bit changes no byte and no hash, and the pull reports what really
    changed again."""
    cleared = []
    for target in tracked_data(repo)[0]:
        files = [target] if target.is_file() else (p for p in target.rglob("*") if p.is_file())
        for path in files:
            if path.is_symlink():
                continue  # DVC's own links into its cache: their mode is the cache's, not the user's
            mode = path.stat().st_mode
            if mode & EXECUTABLE:
                path.chmod(stat.S_IMODE(mode) & ~EXECUTABLE)
                cleared.append(path.relative_to(repo).as_posix())
    return cleared
