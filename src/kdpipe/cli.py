"""The ``kdpipe`` command line: one subcommand per pipeline step, plus helpers.

Start-up is lazy: this module imports only the standard library, and each subcommand imports its
step module (and so torch, mlflow...) when it runs, so ``kdpipe --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from kdpipe.core import layout
from kdpipe.steps import catalog

PARAMS_HELP = "params file (default: params.yaml, or $KDPIPE_PARAMS)"


def _add_params_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, help=PARAMS_HELP)
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="GROUP.KEY=VALUE",
        help="override one parameter (repeatable), e.g. -S train.recipe=cotrain",
    )


def _load_params(args: argparse.Namespace):
    from kdpipe.core.params import load_params

    return load_params(args.params, args.overrides)


def _step(name: str) -> Callable[[argparse.Namespace], Any]:
    """A handler that loads params and runs the step through :func:`kdpipe.steps.catalog.run_step`."""

    def handler(args: argparse.Namespace) -> Any:
        from pathlib import Path

        from kdpipe.core.atomic import check_writable

        kwargs = {arg: getattr(args, arg) for arg in catalog.STEPS[name].paths}
        params = _load_params(args)
        if getattr(args, "verify", False):  # read by every loader of step outputs (kdpipe.data.integrity)
            from kdpipe.data.integrity import VERIFY_ENV

            os.environ[VERIFY_ENV] = "1"
        if getattr(args, "check", False):  # prepare --check: read and report, write nothing
            return importlib.import_module(f"kdpipe.steps.{name}").run(params, **kwargs, check=True)
        # Where the results go must take them, before any work: the output folder's parent (it is
        # replaced as a whole) and the reports folder.
        for folder in (Path(args.out_dir).parent, args.reports_dir):
            if folder:
                check_writable(folder)
        return catalog.run_step(name, params, reports_dir=args.reports_dir, **kwargs)

    return handler


# Kept for readers of the CLI's table (and its tests): derived from the step catalog.
STEPS: dict[str, tuple[str, dict[str, tuple[str | None, str]]]] = {
    name: (step.summary, step.paths) for name, step in catalog.STEPS.items()
}
REPORT_FILES: dict[str, tuple[str, ...]] = {name: step.report_files for name, step in catalog.STEPS.items()}


def _demo_data(args: argparse.Namespace) -> None:
    from kdpipe.data.demo import DemoSplit, write_demo_data

    counts = write_demo_data(
        args.dir, DemoSplit(args.labeled_per_class, args.test_per_class, args.seed), args.force
    )
    print(f"wrote demo data to {args.dir}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


def _masked(node: Any, key: str = "") -> Any:
    """Params as shown to people: credentials in URIs (``user:pass@``) and secret-named keys masked."""
    from kdpipe.orchestration.tracking import is_secret_key, redact

    if isinstance(node, dict):
        return {k: _masked(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_masked(v, key) for v in node]
    if isinstance(node, str):
        return "***" if is_secret_key(key) else redact(node)
    return node


def _params_check(args: argparse.Namespace) -> None:
    params = _load_params(args)
    if args.add_missing:
        from kdpipe.core.params import DEFAULT_PARAMS_FILE, add_missing_defaults

        target = args.params or os.environ.get("KDPIPE_PARAMS") or DEFAULT_PARAMS_FILE
        added = add_missing_defaults(target)
        for line in added:
            print(f"{target}: added {line}")
        print(f"{target}: {len(added)} missing settings added at their defaults")
        return
    if args.write:
        from kdpipe.core.params import DEFAULT_PARAMS_FILE, write_overrides

        target = args.params or os.environ.get("KDPIPE_PARAMS") or DEFAULT_PARAMS_FILE
        for line in write_overrides(target, args.overrides):
            print(f"{target}: {line}")
        return
    if args.show:
        import yaml

        print(yaml.safe_dump(_masked(params.model_dump(mode="json")), sort_keys=False), end="")
    else:
        print(f"{args.params or 'params.yaml'}: ok")


def _predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kdpipe.core.atomic import check_writable
    from kdpipe.core.errors import KdpipeError
    from kdpipe.steps.predict import (
        check_output,
        classified,
        format_predictions,
        predict,
        summary_line,
        write_predictions,
    )

    if args.output:  # before classifying anything: the results must have somewhere to go
        check_output(args.output)
        check_writable(Path(args.output).parent)
    rows = predict(
        args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size, provider=args.provider
    )
    if args.output:
        write_predictions(rows, args.output)
    else:
        sys.stdout.write(format_predictions(rows, "csv"))
    print(summary_line(rows), file=sys.stderr)
    if not classified(rows):  # the rows (with each file's reason) are written; the exit code says it failed
        raise KdpipeError(f"none of the {len(rows)} image(s) could be classified (each row says why)")


# ---------------------------------------------------------------- kdpipe pipeline ... (Kubeflow)


def _pipelines(module: str):
    """``kdpipe.pipelines.<module>``: imported on demand, since kfp is slow to import."""
    return importlib.import_module(f"kdpipe.pipelines.{module}")


def _pipeline_compile(args: argparse.Namespace) -> None:
    from kdpipe.core.errors import KdpipeError

    if args.image:
        os.environ["KDPIPE_IMAGE"] = args.image  # read when the components are imported
    if args.gpu_image:
        os.environ["KDPIPE_GPU_IMAGE"] = args.gpu_image
    pipeline = _pipelines("kfp_pipeline")
    try:
        out = pipeline.compile_pipeline(
            args.out or pipeline.PACKAGE, args.params, args.cluster, args.backend_version
        )
    except ValueError as exc:
        raise KdpipeError(str(exc)) from None
    print(f"pipeline compiled -> {out}")
    # the committed components/ go with the committed package; a compile elsewhere (--out) leaves them
    components_dir = (
        args.components_dir
        if args.components_dir is not None
        else (None if args.out else pipeline.COMPONENTS_DIR)
    )
    if components_dir:
        written = pipeline.compile_components(components_dir)
        print(f"{len(written)} components compiled -> {components_dir}/")


def _pipeline_run_local(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kdpipe.core.errors import KdpipeError

    local = _pipelines("local")
    version = args.data_version or local.resolve_rev(args.data_repo, args.data_rev)
    if not version:
        raise KdpipeError(
            f"{args.data_repo}: cannot resolve git revision {args.data_rev!r}; pass --data-version"
        )
    repo = os.path.abspath(args.data_repo) if os.path.isdir(args.data_repo) else args.data_repo
    from kdpipe.orchestration.tracking import git_commit

    # Locally, a run without an MLflow server keeps its registry in the register task's output.
    code_commit = git_commit(Path(local.__file__).resolve().parent)  # the kdpipe checkout, not the data's
    arguments = {
        "data_repo": repo,
        "data_rev": args.data_rev,
        "data_version": version,
        "git_commit": code_commit,
        "require_tracking_server": bool(os.environ.get("MLFLOW_TRACKING_URI", "").strip()),
    }
    try:
        run_dir = local.run_local(arguments, args.params, args.overrides, args.pipeline_root)
    except RuntimeError as exc:  # kfp.local: a task failed (its own error is in the output above)
        import re

        raise KdpipeError(re.sub(r"\x1b\[[0-9;]*m", "", str(exc))) from None
    print(f"pipeline run-local: done -> {run_dir}")


def _pipeline_remote_args(args: argparse.Namespace) -> dict[str, Any]:
    return _pipelines("remote").pipeline_arguments(args.package, args.overrides)


def _pipeline_submit(args: argparse.Namespace) -> None:
    run_id = _pipelines("remote").submit(
        args.host,
        args.package,
        _pipeline_remote_args(args),
        args.experiment,
        args.run_name,
        args.namespace,
        image=args.image,
        gpu_image=args.gpu_image,
        force_version=args.force_backend_version,
        service_account=args.service_account,
    )
    print(f"pipeline submitted: run {run_id} in experiment {args.experiment!r}")


def _pipeline_upload(args: argparse.Namespace) -> None:
    from kdpipe.core.errors import KdpipeError

    remote = _pipelines("remote")
    version = args.version or remote.release_version()
    if not version:
        raise KdpipeError("name the version (--version), or run from a commit with a git tag (the release's)")
    done = remote.upload(
        args.host,
        args.package,
        args.name,
        version,
        args.namespace,
        image=args.image,
        gpu_image=args.gpu_image,
        force_version=args.force_backend_version,
    )
    print(
        f"pipeline uploaded: {args.name!r} version {version!r} ({done['version_id']}, pipeline {done['pipeline_id']})"
    )


def _pipeline_schedule(args: argparse.Namespace) -> None:
    from kdpipe.core.errors import KdpipeError

    remote = _pipelines("remote")
    try:
        remote.check_cron(args.cron)
    except ValueError as exc:
        raise KdpipeError(str(exc)) from None
    done = remote.schedule(
        args.host,
        args.package,
        _pipeline_remote_args(args),
        args.name,
        args.cron,
        args.experiment,
        args.namespace,
        enable_caching=args.cache,
        image=args.image,
        gpu_image=args.gpu_image,
        force_version=args.force_backend_version,
        service_account=args.service_account,
    )
    action = f"replaced {len(done['replaced'])}" if done["replaced"] else "created"
    print(
        f"pipeline scheduled: {args.name!r} ({done['cron']}), recurring run {done['recurring_run_id']} ({action})"
    )


def _add_pipeline_commands(sub) -> None:
    pipe = sub.add_parser(
        "pipeline",
        help="the Kubeflow pipeline: compile, run locally, submit, schedule",
        description="the Kubeflow pipeline: compile, run locally (kfp.local), submit, schedule",
    )
    cmds = pipe.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    comp = cmds.add_parser("compile", help="compile the pipeline (defaults from params.yaml) to YAML")
    comp.add_argument("--params", default=None, help=PARAMS_HELP)
    comp.add_argument("--out", default=None, help="output file (default: pipelines/kdpipe_pipeline.yaml)")
    comp.add_argument(
        "--components-dir",
        default=None,
        metavar="DIR",
        help="also compile each component to DIR/<name>.yaml (default: components/ unless --out is given)",
    )
    comp.add_argument(
        "--cluster",
        default=None,
        metavar="FILE",
        help="cluster settings (YAML: GPU node selector, tolerations, per-task resources, retries, "
        "timeouts; see docs/kubeflow.md); default: settings that work on GKE, EKS, AKS and "
        "GPU-operator clusters",
    )
    comp.add_argument(
        "--image",
        default=None,
        help="the image every task runs in (default: $KDPIPE_IMAGE, else kdpipe:<version>)",
    )
    comp.add_argument(
        "--gpu-image",
        default=None,
        help="the image of the tasks given a GPU (default: $KDPIPE_GPU_IMAGE, else --image)",
    )
    comp.add_argument(
        "--backend-version",
        default=None,
        metavar="VERSION",
        help="the Kubeflow Pipelines backend to compile for; below 2.15 the optional-secret "
        "fields are left out (every secret must then exist)",
    )
    comp.set_defaults(handler=_pipeline_compile)

    loc = cmds.add_parser(
        "run-local", help="run the whole pipeline here with kfp.local (subprocesses, no cluster)"
    )
    _add_params_options(loc)
    loc.add_argument(
        "--data-repo", default=".", help="DVC project (path or git URL) holding the data (default: .)"
    )
    loc.add_argument("--data-rev", default="HEAD", help="git revision of the data (default: HEAD)")
    loc.add_argument(
        "--data-version", default=None, help="data version label (default: the commit of --data-rev)"
    )
    loc.add_argument(
        "--pipeline-root", default="artifacts/kfp", help="where task outputs go (default: %(default)s)"
    )
    loc.set_defaults(handler=_pipeline_run_local)

    for name, help_text, handler in (
        ("submit", "submit one run to a Kubeflow Pipelines server", _pipeline_submit),
        (
            "upload",
            "upload the package as a named version of the pipeline (the KFP UI keeps every release)",
            _pipeline_upload,
        ),
        (
            "schedule",
            "create or replace a recurring run (cron, 6 fields) on a Kubeflow Pipelines server",
            _pipeline_schedule,
        ),
    ):
        cmd = cmds.add_parser(
            name, help=help_text, description=help_text + "; the API token is read from $KFP_TOKEN"
        )
        cmd.add_argument(
            "--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.com/pipeline"
        )
        cmd.add_argument(
            "--package",
            default="pipelines/kdpipe_pipeline.yaml",
            help="compiled pipeline (default: %(default)s)",
        )
        if name != "upload":  # an upload is not a run
            cmd.add_argument("--experiment", default="kdpipe", help="KFP experiment (default: %(default)s)")
        cmd.add_argument("--namespace", default=None, help="Kubernetes namespace (multi-user deployments)")
        cmd.add_argument(
            "--image",
            default=None,
            help="the image every task runs in, by registry and digest "
            "(registry.example.com/team/kdpipe@sha256:...); default: $KDPIPE_IMAGE",
        )
        cmd.add_argument(
            "--gpu-image",
            default=None,
            help="the image of the tasks given a GPU, by registry and digest "
            "(default: $KDPIPE_GPU_IMAGE, else --image)",
        )
        if name != "upload":
            cmd.add_argument(
                "-S",
                "--set",
                dest="overrides",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="group.key=value (params.yaml key) or parameter=value (e.g. data_rev=v2); repeatable",
            )
        cmd.add_argument(
            "--force-backend-version",
            action="store_true",
            help="submit even when the backend's version is unknown or cannot be read (it must be 2.15+)",
        )
        if name != "upload":  # KFP sets a run's service account per run, not in the package
            cmd.add_argument(
                "--service-account",
                default=None,
                help="Kubernetes service account of the run's pods (default: the namespace's pipeline "
                "runner); retrain reads it from the cluster settings file",
            )
        if name == "upload":
            cmd.add_argument("--name", default="kdpipe", help="pipeline name in KFP (default: %(default)s)")
            cmd.add_argument("--version", default=None, help="version name (default: the commit's git tag)")
        elif name == "submit":
            cmd.add_argument("--run-name", default=None, help="name of the run in the KFP UI")
        else:
            cmd.add_argument(
                "--name", default="kdpipe-retrain", help="recurring run name (default: %(default)s)"
            )
            cmd.add_argument(
                "--cron", required=True, help="6-field cron, seconds first: '0 0 3 * * *' = 03:00 daily"
            )
            cmd.add_argument("--cache", action="store_true", help="allow KFP to reuse cached task results")
        cmd.set_defaults(handler=handler)


def _ingest(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kdpipe.core.atomic import write_json
    from kdpipe.data.ingest import ingest, summary_lines

    params = _load_params(args)
    root = Path(args.data_root or params.data.root)
    result = ingest(args.src, root, params.prepare, use_dvc=not args.no_dvc, lock_timeout=args.lock_timeout)
    if args.report:
        write_json(args.report, result.to_json())
    print("\n".join(summary_lines(result, root)))


def _distill_node(args: argparse.Namespace) -> int:
    from kdpipe.orchestration.trainjob import distill_node

    inputs = {"prepared": args.prepared, "augmented": args.augmented, "teacher": args.teacher}
    return distill_node(inputs, args.output, args.workdir, args.state_dir)


def _retrain(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from kdpipe.orchestration.retrain import cluster_from_env, retrain

    cluster = cluster_from_env(args.kfp_host, args.kfp_namespace)
    if cluster is None:
        sys.stdout.write(retrain(".", rev=args.rev, push=not args.no_push))
        return
    given = {  # the options win over their environment variables
        "settings_file": args.cluster,
        "pipeline_version": args.pipeline_version,
        "pipeline_name": args.pipeline_name,
        "timeout_s": args.wait_timeout,
        "poll_s": args.poll_interval,
    }
    cluster = replace(cluster, **{k: v for k, v in given.items() if v is not None})
    sys.stdout.write(_pipelines("remote").retrain_on_cluster(".", args.rev, cluster))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdpipe",
        description="Train small, fast image classifiers from a few labeled and many unlabeled images.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo-data", help="write the embedded demo data set (real MNIST digits) to DIR")
    demo.add_argument("dir", nargs="?", default="data", help="target folder (default: data)")
    demo.add_argument("--labeled-per-class", type=int, default=30)
    demo.add_argument("--test-per-class", type=int, default=50)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="write even if the folder already holds data")
    demo.set_defaults(handler=_demo_data)

    for name, (help_text, path_args) in STEPS.items():
        step = sub.add_parser(name, help=help_text, description=help_text)
        _add_params_options(step)
        for arg, (default, arg_help) in path_args.items():
            step.add_argument(f"--{arg.replace('_', '-')}", dest=arg, default=default, help=arg_help)
        step.add_argument(
            "--reports-dir",
            default=None,
            help="also copy the step's small reports (metrics, plots) to this folder",
        )
        if name != "prepare":
            step.add_argument(
                "--verify",
                action="store_true",
                help="hash every input file again (by default a file whose size, mtime and inode "
                "are unchanged since its hash last matched is trusted)",
            )
        for option, kwargs in catalog.STEPS[name].options.items():
            step.add_argument(f"--{option.replace('_', '-')}", dest=option, **kwargs)
        step.set_defaults(handler=_step(name))

    report = sub.add_parser(
        "report", help="render the DVC plots to PNG (offline) and write a one-page report"
    )
    report.add_argument("--out", default="reports/summary", help="output folder (default: reports/summary)")
    report.set_defaults(
        handler=lambda args: __import__(
            "kdpipe.orchestration.report", fromlist=["write_report"]
        ).write_report(".", args.out)
    )

    check = sub.add_parser(
        "params", help="validate params.yaml (and -S overrides); --show prints the resolved values"
    )
    _add_params_options(check)
    check.add_argument("--show", action="store_true")
    check.add_argument(
        "--write",
        action="store_true",
        help="write the -S settings into the params file (validated first; comments kept)",
    )
    check.add_argument(
        "--add-missing",
        action="store_true",
        help="add every setting the params file lacks (a new one in the schema) at its default, "
        "with its description; the rest of the file is kept",
    )
    check.set_defaults(handler=_params_check)

    pred = sub.add_parser(
        "predict",
        help="classify image files or folders with an exported ONNX model",
        description="classify image files or folders with an exported ONNX model",
    )
    pred.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    pred.add_argument(
        "--model",
        default=f"{layout.EXPORTED}/model.onnx",
        help="ONNX model; preprocess.json must sit next to it (default: %(default)s)",
    )
    pred.add_argument("--top-k", type=int, default=3, help="classes per image (default: %(default)s)")
    pred.add_argument(
        "--batch-size", type=int, default=64, help="images per onnxruntime call (default: %(default)s)"
    )
    pred.add_argument(
        "--output", default=None, help="write .csv or .json (by extension); default: CSV on stdout"
    )
    pred.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider")
    pred.set_defaults(handler=_predict)
    _add_pipeline_commands(sub)
    node = sub.add_parser(
        "distill-node",
        help="one node of a multi-node distill TrainJob (Kubeflow Trainer runs it)",
        description="one node of a multi-node distill TrainJob: fetch the inputs from the object "
        "store, torchrun distill across the nodes, node 0 uploads the outputs; the "
        "params come in $KDPIPE_PARAMS_JSON",
    )
    for name in ("prepared", "augmented", "teacher"):
        node.add_argument(f"--{name}", required=True, help=f"URI of the {name} artifact")
    node.add_argument("--output", required=True, help="URI where node 0 puts the distill outputs")
    node.add_argument(
        "--workdir", default="/tmp/kdpipe-node", help="local scratch folder (default: %(default)s)"
    )
    node.add_argument(
        "--state-dir",
        default=None,
        help="the run's folder on the shared state volume: distill trains and resumes there",
    )
    node.set_defaults(handler=_distill_node)

    ing = sub.add_parser(
        "ingest",
        help="add new unlabeled images from SRC as the next batch folder data/unlabeled/batch-NNNN-<hash>",
        description="Validate the images under SRC with prepare's rules, skip exact duplicates of the data set "
        "(and within SRC), copy the rest into a new append-only batch folder and `dvc add` it. "
        "Running it twice adds nothing; concurrent runs take turns (a lock on the data root).",
    )
    ing.add_argument("src", help="folder of new images (searched recursively)")
    ing.add_argument("--data-root", default=None, help="data folder (default: params data.root)")
    _add_params_options(ing)
    ing.add_argument("--no-dvc", action="store_true", help="do not run `dvc add` on the new batch folder")
    ing.add_argument("--report", default=None, help="also write the full ingest report (JSON) to this file")
    ing.add_argument(
        "--lock-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for another ingest on the same data root (default: %(default)s)",
    )
    ing.set_defaults(handler=_ingest)

    ret = sub.add_parser(
        "retrain",
        help="dvc pull + repro + push and a metrics diff (or the same loop on Kubeflow)",
        description="Retrain on the current data: `dvc pull` (tolerated when the workspace already has the data), "
        "`dvc repro`, `dvc push`, then `dvc metrics diff REV` as Markdown on stdout and in "
        "$GITHUB_STEP_SUMMARY. With a Kubeflow endpoint (--kfp-host or $KDPIPE_KFP_HOST) the pipeline "
        "runs on the cluster instead: retrain submits it (or runs an uploaded version), waits for the "
        "run, writes its reports from MLflow ($MLFLOW_TRACKING_URI) to reports/ and diffs the metrics.",
    )
    ret.add_argument(
        "--rev", default="HEAD", help="git revision to compare the metrics with (default: %(default)s)"
    )
    ret.add_argument(
        "--kfp-host", default=None, help="Kubeflow Pipelines endpoint (default: $KDPIPE_KFP_HOST)"
    )
    ret.add_argument(
        "--kfp-namespace",
        default=None,
        help="Kubernetes namespace of a multi-user Kubeflow (default: $KDPIPE_KFP_NAMESPACE)",
    )
    ret.add_argument("--no-push", action="store_true", help="skip `dvc push`")
    ret.add_argument(
        "--cluster",
        default=None,
        metavar="FILE",
        help="Kubeflow: cluster settings to compile the pipeline with, as `pipeline compile --cluster` "
        "(default: $KDPIPE_CLUSTER_FILE; unset: the committed package)",
    )
    ret.add_argument(
        "--pipeline-version",
        default=None,
        metavar="NAME",
        help="Kubeflow: run this version uploaded with `pipeline upload` instead of sending the package "
        "(default: $KDPIPE_PIPELINE_VERSION)",
    )
    ret.add_argument(
        "--pipeline-name",
        default=None,
        metavar="NAME",
        help="Kubeflow: the uploaded pipeline of --pipeline-version (default: kdpipe)",
    )
    ret.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Kubeflow: how long to wait for the run to finish (default: 21600, six hours)",
    )
    ret.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Kubeflow: seconds between two reads of the run's state (default: 60)",
    )
    ret.set_defaults(handler=_retrain)
    return parser


def _version() -> str:
    from kdpipe import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("KDPIPE_DEBUG") == "1"
    from kdpipe.core.errors import KdpipeError

    try:
        code = args.handler(args)
    except KdpipeError as exc:
        if debug:
            raise
        print(f"kdpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return code if type(code) is int else 0  # a handler may return its exit code (distill-node)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
