"""The step catalog (kdpipe.steps.catalog) is the one declaration of the steps: the CLI is derived
from it, and dvc.yaml and the Kubeflow components must agree with it (these tests say where not)."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from kdpipe.cli import build_parser
from kdpipe.core import layout
from kdpipe.pipelines.components import step_components
from kdpipe.pipelines.components.from_catalog import catalog_component, component_source
from kdpipe.steps import catalog

REPO = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _dvc_param_groups(stage: dict) -> set[str]:
    groups = set()
    for entry in stage.get("params", []):
        keys = (
            entry if isinstance(entry, str) else next(iter(entry.values()))
        )  # "train" / "train.lr" / {file: [...]}
        for key in [keys] if isinstance(keys, str) else keys:
            groups.add(key.split(".")[0])
    return groups


def _dvc_report_files(name: str, stage: dict) -> set[str]:
    prefix = f"reports/{name}/"
    declared = set()
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            if path.startswith(prefix):
                declared.add(path.removeprefix(prefix))
    return declared


def test_every_step_is_a_dvc_stage_and_a_cli_command():
    assert list(DVC) == list(catalog.STEPS)
    for name, stage in DVC.items():
        assert stage["cmd"] == f"kdpipe {name} --reports-dir reports/{name}"
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(catalog.STEPS) <= set(commands)


@pytest.mark.parametrize("name", list(catalog.STEPS))
def test_dvc_stage_params_and_reports_match_the_catalog(name):
    step, stage = catalog.STEPS[name], DVC[name]
    assert _dvc_param_groups(stage) == set(step.param_groups), "dvc.yaml params (left) vs the catalog (right)"
    assert _dvc_report_files(name, stage) == set(step.report_files), "dvc.yaml reports (left) vs the catalog"


@pytest.mark.parametrize("name", list(catalog.STEPS))
def test_kubeflow_component_takes_the_steps_param_groups(name):
    component = step_components()[name]
    arguments = inspect.signature(component.python_func).parameters
    groups = {a.removesuffix("_params") for a in arguments if a.endswith("_params")}
    step = catalog.STEPS[name]
    expected = set(step.param_groups) - {"data"}  # data reaches Kubeflow as an artifact
    if step.logs_itself:
        assert expected <= groups  # register records every group with the model
    else:
        assert groups == expected, (
            f"kdpipe/pipelines/components/{name}.py params (left) vs the catalog (right)"
        )
    tree = ast.parse(textwrap.dedent(inspect.getsource(component.python_func)))
    calls = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) in ("run_step", "run_task")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]
    assert calls == [name] or step.logs_itself, "components must run the step through run_step"


@pytest.mark.parametrize("name", list(catalog.STEPS))
def test_kubeflow_component_reads_and_writes_the_catalogs_artifacts(name):
    """The pipeline wires a component's inputs by name to the outputs of the steps that write them."""
    step, component = catalog.STEPS[name], step_components()[name]
    spec = component.component_spec
    artifacts_in = {k for k, v in (spec.inputs or {}).items() if v.type.startswith("system.")}
    assert artifacts_in == set(step.inputs().values()), f"{name}: component inputs vs the catalog's"
    assert step.output in (spec.outputs or {}), f"{name}: no output named {step.output!r}"


def test_a_step_without_a_component_gets_one_from_its_catalog_entry():
    step = catalog.Step(
        "calibrate",
        'fit a "temperature"',
        {
            "export_dir": (layout.EXPORTED, "export output"),
            "prepared_dir": (layout.PREPARED, "prepared data"),
            "out_dir": ("artifacts/calibrate", "output folder"),
        },
        ("evaluate", "data"),
    )
    spec = catalog_component(step).component_spec
    assert {k: v.type for k, v in spec.inputs.items()} == {
        "onnx_model": "system.Artifact@0.0.1",
        "prepared": "system.Artifact@0.0.1",
        "evaluate_params": "Dict",
        "execution_key": "String",
        "git_commit": "String",
    }
    assert set(spec.outputs) == {"calibrate", "summary"}
    source = component_source(step)
    assert '{"export_dir": onnx_model.path, "prepared_dir": prepared.path}' in source
    assert '{"evaluate": evaluate_params}' in source


def test_an_input_no_step_writes_is_named():
    step = catalog.Step("orphan", "x", {"model_dir": ("artifacts/nowhere", "?"), "out_dir": ("o", "?")}, ())
    with pytest.raises(KeyError, match="artifacts/nowhere"):
        step.inputs()


def test_run_step_copies_the_reports_and_logs_the_step(
    tiny_pipeline_dirs, tiny_params_factory, tmp_path, monkeypatch
):
    """The front-end-independent part of running a step (what the CLI and every Kubeflow component
    call): the step's reports copied, and its MLflow run logged with its numbers and curves."""
    import mlflow
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KDPIPE_TRACKING", "1")
    d = tiny_pipeline_dirs
    threads = torch.get_num_threads()
    try:
        catalog.run_step(
            "distill",
            tiny_params_factory(recipe="supervised", max_iterations=10),
            reports_dir=tmp_path / "reports",
            prepared_dir=d["prepared"],
            augmented_dir=d["augmented"],
            teacher_dir=d["teacher"],
            out_dir=tmp_path / "distill",
        )
    finally:
        torch.set_num_threads(threads)
    assert {p.name for p in (tmp_path / "reports").iterdir()} == {
        "metrics.json",
        "history.json",
        "schedule.json",
    }
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`kdpipe.step` = 'distill'")
    assert len(runs) == 1 and runs["metrics.val_acc_student"].iloc[0] >= 0.0
    # the data version is the one of the prepared folder the step read, not of ./artifacts/prepared
    manifest = json.loads((Path(d["prepared"]) / "manifest.json").read_text())
    assert runs["tags.kdpipe.data_version"].iloc[0] == manifest["data_version"]
