"""``kdpipe retrain``: the retraining loop that CI (``.github/workflows/retrain.yml``) and people run.

Locally (the default): clear the executable bit on the DVC-tracked data files, ``dvc pull``,
``dvc repro``, ``dvc push``, then ``dvc metrics diff <rev>`` as Markdown (also appended to
``$GITHUB_STEP_SUMMARY`` when set). With a Kubeflow endpoint (``--kfp-host`` or env
``KDPIPE_KFP_HOST``) it submits the KFP pipeline instead, with what the cluster needs to read this
revision's data; the endpoint is only ever shown masked.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import json
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
DVC_REMOTE_ENV = "KDPIPE_DVC_REMOTE"
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    tolerate_failure: bool = False  # dvc pull: a failure is checked against the workspace instead


def plan(
    kfp_host: str | None = None,
    push: bool = True,
    dvc: str | None = None,
    data: dict[str, Any] | None = None,
    namespace: str | None = None,
) -> list[Step]:
    """The commands ``retrain`` runs, in order (the metrics diff comes after them). ``data``: the
    pipeline's data arguments for a Kubeflow submission (``data_repo``, ``data_rev``, ``data_version``,
    ``dvc_remote_config``)."""
    if kfp_host:
        overrides = [
            arg
            for key, value in (data or {}).items()
            for arg in ("-S", f"{key}={json.dumps(value) if isinstance(value, dict) else value}")
        ]
        where = ["--namespace", namespace] if namespace else []
        return [
            Step(
                "submit",
                [
                    sys.executable,
                    "-m",
                    "kdpipe.cli",
                    "pipeline",
                    "submit",
                    "--host",
                    kfp_host,
                    *where,
                    *overrides,
                ],
            )
        ]
    dvc = dvc or dvc_executable()
    steps = [Step("pull", [dvc, "pull"], tolerate_failure=True), Step("repro", [dvc, "repro"])]
    if push:
        steps.append(Step("push", [dvc, "push"]))
    return steps


def retrain(
    repo: str | os.PathLike = ".",
    rev: str = "HEAD",
    kfp_host: str | None = None,
    push: bool = True,
    summary_path: str | os.PathLike | None = None,
    namespace: str | None = None,
) -> str:
    """Run the plan in ``repo``; return the Markdown summary (also appended to ``summary_path``)."""
    from kdpipe.orchestration.tracking import redact

    repo = Path(repo)
    kfp_host = kfp_host if kfp_host is not None else os.environ.get(KFP_HOST_ENV) or None
    namespace = namespace if namespace is not None else os.environ.get(KFP_NAMESPACE_ENV) or None
    data = None
    if kfp_host:
        data = {**kfp_data_arguments(repo), **kfp_remote_arguments(repo)}
        if not os.environ.get("KFP_TOKEN"):
            print(
                "kdpipe retrain: warning: KFP_TOKEN is unset; the submission is unauthenticated",
                file=sys.stderr,
            )
    lines = ["## kdpipe retrain", ""]
    if not kfp_host:
        cleared = clear_executable_bits(repo)
        if cleared:
            print(
                f"kdpipe retrain: cleared the executable bit on {len(cleared)} data file(s) (e.g. {cleared[0]}): "
                "DVC reports such files as modified on every pull",
                file=sys.stderr,
            )
    for step in plan(kfp_host, push, data=data, namespace=namespace):
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
        if step.name == "submit":
            raise KdpipeError(f"submitting the Kubeflow pipeline to {redact(kfp_host)} failed (exit {code})")
        raise KdpipeError(f"`dvc {step.name}` failed (exit {code}); see its output above")
    if kfp_host:
        lines += [
            f"Submitted the Kubeflow pipeline to `{redact(kfp_host)}`; training runs on the cluster.",
            "",
        ]
    else:
        lines += [f"Metrics against `{rev}` (`dvc metrics diff {rev}`):", "", metrics_diff(repo, rev)]
    text = "\n".join(lines).rstrip() + "\n"
    summary_path = summary_path if summary_path is not None else os.environ.get(SUMMARY_ENV)
    if summary_path:
        with open(summary_path, "a", encoding="utf-8") as fh:
            fh.write(text)
    return text


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
