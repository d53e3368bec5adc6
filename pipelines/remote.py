"""Submit the compiled pipeline to a Kubeflow Pipelines server, or schedule it.

Arguments start from the defaults compiled into the package (which mirror params.yaml) and take
``-S`` overrides: ``-S train.lr=0.1`` edits the ``train_params`` dict, ``-S register.min_accuracy=0.9``
sets the quality gate, ``-S data_rev=v2`` sets a top-level pipeline parameter. Every group is
validated with kdpipe's params schema before anything is sent.

The API token comes only from ``$KFP_TOKEN`` (sent as a bearer token) and is never printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

TOKEN_ENV = "KFP_TOKEN"


def package_defaults(package: str | os.PathLike) -> dict[str, Any]:
    """Root parameters of a compiled pipeline and their default values."""
    with open(package, encoding="utf-8") as fh:
        spec = next(iter(yaml.safe_load_all(fh)))
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {name: p.get("defaultValue") for name, p in params.items()}


def pipeline_arguments(package: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """All pipeline arguments: the package's defaults with ``-S`` overrides applied, validated."""
    from kdpipe.errors import ParamsError
    from kdpipe.kubeflow import NULL, params_from

    from .kdpipe_pipeline import SEPARATE

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
            args[f"{group}_params"] = {**(args[f"{group}_params"] or {}), field: NULL if value is None else value}
        elif not field and key in args:
            args[key] = value
        else:
            raise ParamsError(f"override {item!r}: no such pipeline parameter or params group "
                              f"(parameters: {', '.join(sorted(args))})")
    groups = {name.removesuffix("_params"): value for name, value in args.items() if name.endswith("_params")}
    params_from(**groups)  # raises ParamsError naming the bad key
    return {k: v for k, v in args.items() if v is not None}


def client(host: str, namespace: str | None = None):
    import kfp

    token = os.environ.get(TOKEN_ENV) or None
    kwargs = {"namespace": namespace} if namespace else {}
    return kfp.Client(host=host, existing_token=token, **kwargs)


def submit(host: str, package: str | os.PathLike, arguments: dict[str, Any], experiment: str = "kdpipe",
           run_name: str | None = None, namespace: str | None = None) -> str:
    """Create one run of the package; returns the run id."""
    result = client(host, namespace).create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace)
    return result.run_id


def check_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != 6:
        raise ValueError(f"--cron {cron!r}: KFP needs 6 fields (seconds minutes hours day-of-month month "
                         "day-of-week), e.g. '0 0 3 * * *' for 03:00 every day")
    return " ".join(fields)


def schedule(host: str, package: str | os.PathLike, arguments: dict[str, Any], name: str, cron: str,
             experiment: str = "kdpipe", namespace: str | None = None, enable_caching: bool = False) -> dict[str, Any]:
    """Create the recurring run ``name``, replacing any recurring run of that name in the experiment
    (KFP has no update call: the old one is deleted, then the new one created).
    One run at a time, no catch-up. Caching is off by default, so each run reads the data anew."""
    cron = check_cron(cron)
    kfp_client = client(host, namespace)
    experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
    by_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    listed = kfp_client.list_recurring_runs(experiment_id=experiment_id, filter=by_name, page_size=100)
    replaced = [r.recurring_run_id for r in (listed.recurring_runs or []) if r.display_name == name]
    for recurring_run_id in replaced:
        kfp_client.delete_recurring_run(recurring_run_id)
    created = kfp_client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=cron, max_concurrency=1, no_catchup=True,
        pipeline_package_path=str(Path(package)), params=arguments, enable_caching=enable_caching)
    return {"recurring_run_id": created.recurring_run_id, "replaced": replaced, "cron": cron}
