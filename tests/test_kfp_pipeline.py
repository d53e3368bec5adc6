"""The compiled Kubeflow pipeline: the committed YAML is current, and its IR carries the GPU,
kfp-kubernetes, caching and quality-gate settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe import kubeflow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines" / "kdpipe_pipeline.yaml"
STEPS = ("data", "prepare", "teacher", "augment", "distill", "select", "export", "evaluate", "register")


def compile_to(out: Path, env: dict[str, str] | None = None) -> list[dict]:
    """Compile in a fresh interpreter (KDPIPE_IMAGE is read at import time) from the project root."""
    done = subprocess.run([sys.executable, "-m", "kdpipe.cli", "pipeline", "compile", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(out.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    spec, platform = compile_to(out, {"KDPIPE_IMAGE": ""})
    return out, spec, platform


def without_sdk_version(text: str) -> str:
    """The compiler stamps its own version (``sdkVersion: kfp-2.17.3``); a kfp patch release that
    pip picks up must not make the committed pipeline "stale" when nothing else in it changed."""
    return re.sub(r"(?m)^sdkVersion: kfp-\S+$", "sdkVersion: kfp-<version>", text)


def test_committed_yaml_is_up_to_date(compiled):
    out, _, _ = compiled
    assert without_sdk_version(out.read_text(encoding="utf-8")) == without_sdk_version(
        PACKAGE.read_text(encoding="utf-8")), (
        "pipelines/kdpipe_pipeline.yaml is stale: run `kdpipe pipeline compile` (or `make pipeline`) and commit it")


def test_staleness_check_still_sees_real_changes():
    committed = PACKAGE.read_text(encoding="utf-8")
    bumped = re.sub(r"(?m)^sdkVersion: kfp-\S+$", "sdkVersion: kfp-9.9.9", committed)
    assert without_sdk_version(bumped) == without_sdk_version(committed)
    assert without_sdk_version(committed.replace("nvidia.com/gpu", "amd.com/gpu")) != without_sdk_version(committed)


def test_dag_order_and_quality_gate(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEPS[:-1]) | {"condition-1"}
    needs = {"data": set(), "prepare": {"data"}, "teacher": {"prepare"}, "augment": {"prepare", "teacher"},
             "distill": {"prepare", "augment", "teacher"}, "select": {"distill", "prepare"},
             "export": {"select", "prepare"}, "evaluate": {"export", "prepare"},
             "condition-1": {"evaluate", "export", "prepare"}}
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == needs
    gate = tasks["condition-1"]
    assert gate["taskInfo"]["name"] == "quality-gate"
    condition = gate["triggerPolicy"]["condition"]
    assert "pipelinechannel--evaluate-Output" in condition and ">=" in condition
    assert "pipelinechannel--min_accuracy" in condition
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert list(inner) == ["register"]
    assert inner["register"]["cachingOptions"] == {}  # caching disabled: it changes the registry


def test_training_tasks_request_gpus(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    teacher = executors["exec-teacher"]["container"]["resources"]["accelerator"]
    assert teacher["resourceType"] == "nvidia.com/gpu" and teacher["resourceCount"] == "1"
    distill = executors["exec-distill"]["container"]["resources"]["accelerator"]
    assert distill["resourceType"] == "nvidia.com/gpu"
    assert distill["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
    # the distill component itself knows the GPU count (torchrun --nproc_per_node when > 1)
    assert spec["root"]["dag"]["tasks"]["distill"]["inputs"]["parameters"]["gpus"] == {"componentInputParameter": "gpus"}
    for name in ("exec-data", "exec-prepare", "exec-evaluate", "exec-register"):
        assert "accelerator" not in executors[name]["container"].get("resources", {})


def test_kubernetes_platform_settings(compiled):
    _, _, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-teacher", "exec-distill"):
        cfg = executors[name]
        assert cfg["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert cfg["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert cfg["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi",
                                          "volumeName": "dshm"}]
    secrets = {name: {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in cfg.get("secretAsEnv", [])}
               for name, cfg in executors.items()}
    assert secrets["exec-data"] == {"kdpipe-dvc-remote": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}}
    for name in ("exec-select", "exec-register"):
        assert secrets[name]["kdpipe-mlflow"] == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                                 "MLFLOW_TRACKING_PASSWORD"}


def test_data_version_and_rev_key_the_cache(compiled):
    """KFP's cache key is built from a task's inputs: the data task takes repo, rev and data version."""
    _, spec, _ = compiled
    data = spec["root"]["dag"]["tasks"]["data"]
    assert data["cachingOptions"] == {"enableCache": True}
    params = data["inputs"]["parameters"]
    for name, pipeline_param in (("data_version", "data_version"), ("rev", "data_rev"), ("repo", "data_repo")):
        assert params[name] == {"componentInputParameter": pipeline_param}
    declared = spec["components"]["comp-data"]["inputDefinitions"]["parameters"]
    assert {"data_version", "rev", "repo"} <= set(declared)
    # every later step consumes the data task's artifact, so it is keyed on it too
    prepare_in = spec["root"]["dag"]["tasks"]["prepare"]["inputs"]["artifacts"]["raw_data"]
    assert prepare_in["taskOutputArtifact"] == {"outputArtifactKey": "raw_data", "producerTask": "data"}


def test_pipeline_parameters_mirror_params_yaml(compiled):
    from kdpipe.params import load_params

    _, spec, _ = compiled
    params = load_params(ROOT / "params.yaml").model_dump(mode="json")
    declared = spec["root"]["inputDefinitions"]["parameters"]
    for group in ("prepare", "augment", "teacher", "train", "select", "export", "evaluate", "register"):
        default = declared[f"{group}_params"]["defaultValue"]
        # unset values travel as "null" (KFP stores no None) and come back as None in the components
        expected = {k: "null" if v is None else v for k, v in params[group].items()
                    if (group, k) != ("register", "min_accuracy")}
        assert default == expected, group
        assert kubeflow.params_from(**{group: default}).model_dump(mode="json")[group] == params[group]
    assert declared["min_accuracy"]["defaultValue"] == params["register"]["min_accuracy"]
    assert declared["data_root"]["defaultValue"] == params["data"]["root"]


def test_image_comes_from_one_setting(tmp_path):
    from kdpipe.kubeflow import DEFAULT_IMAGE

    spec, _ = compile_to(tmp_path / "p.yaml", {"KDPIPE_IMAGE": "registry.example.com/kdpipe:1.2"})
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/kdpipe:1.2"}
    committed = next(yaml.safe_load_all(PACKAGE.read_text()))
    assert {e["container"]["image"] for e in committed["deploymentSpec"]["executors"].values()} == {DEFAULT_IMAGE}
    # components run the installed kdpipe: nothing is pip-installed at run time
    assert "pip install" not in PACKAGE.read_text()
