"""The compiled Kubeflow pipeline: the committed YAML is current, and its IR carries the GPU,
kfp-kubernetes, caching and quality-gate settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe.orchestration import kubeflow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines" / "kdpipe_pipeline.yaml"
STEPS = ("data", "prepare", "teacher", "augment", "distill", "select", "export", "evaluate", "register")


def compile_to(
    out: Path, env: dict[str, str] | None = None, extra_args: list[str] | None = None
) -> list[dict]:
    """Compile in a fresh interpreter (KDPIPE_IMAGE is read at import time) from the project root."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdpipe.cli",
            "pipeline",
            "compile",
            "--out",
            str(out),
            "--components-dir",
            str(out.parent / "components"),
            *(extra_args or []),
        ],
        cwd=ROOT,
        env={**os.environ, "KDPIPE_IMAGE": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
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
        PACKAGE.read_text(encoding="utf-8")
    ), (
        "pipelines/kdpipe_pipeline.yaml is stale: run `kdpipe pipeline compile` (or `make pipeline`) and commit it"
    )


def test_committed_component_files_are_up_to_date(compiled):
    """components/<name>.yaml (one per step, for users' own pipelines) are compiled with the package."""
    out, _, _ = compiled
    fresh = {
        p.name: without_sdk_version(p.read_text(encoding="utf-8"))
        for p in (out.parent / "components").glob("*.yaml")
    }
    committed = {
        p.name: without_sdk_version(p.read_text(encoding="utf-8"))
        for p in (ROOT / "components").glob("*.yaml")
    }
    assert set(fresh) == {f"{name}.yaml" for name in STEPS} | {"quality_gate_failed.yaml"}
    assert fresh == committed, "components/*.yaml are stale: run `make pipeline` and commit them"


def test_staleness_check_still_sees_real_changes():
    committed = PACKAGE.read_text(encoding="utf-8")
    bumped = re.sub(r"(?m)^sdkVersion: kfp-\S+$", "sdkVersion: kfp-9.9.9", committed)
    assert without_sdk_version(bumped) == without_sdk_version(committed)
    assert without_sdk_version(committed.replace("nvidia.com/gpu", "amd.com/gpu")) != without_sdk_version(
        committed
    )


def test_dag_order_and_quality_gate(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEPS[:-1]) | {"condition-branches-1"}
    needs = {
        "data": set(),
        "prepare": {"data"},
        "teacher": {"prepare"},
        "augment": {"prepare", "teacher"},
        "distill": {"prepare", "augment", "teacher"},
        "select": {"distill", "prepare", "teacher"},
        "export": {"select", "prepare"},
        "evaluate": {"export", "prepare"},
        "condition-branches-1": {"evaluate", "export", "prepare"},
    }
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == needs
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    passed, failed = branches["condition-2"], branches["condition-3"]
    assert (
        passed["taskInfo"]["name"] == "quality-gate" and failed["taskInfo"]["name"] == "quality-gate-failed"
    )
    condition = passed["triggerPolicy"]["condition"]
    assert "pipelinechannel--evaluate-Output" in condition and ">=" in condition
    assert "pipelinechannel--min_accuracy" in condition
    assert failed["triggerPolicy"]["condition"] == f"!({condition})"  # exactly the other case
    inner = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert list(inner) == ["register"]
    assert inner["register"]["cachingOptions"] == {}  # caching disabled: it changes the registry
    assert list(spec["components"]["comp-condition-3"]["dag"]["tasks"]) == ["quality-gate-failed"]


def test_a_model_below_the_gate_fails_the_run():
    """The failing branch's component raises: the run ends failed, with the reason in one line."""
    from kdpipe.core.errors import KdpipeError
    from kdpipe.pipelines.components.gate import quality_gate_failed

    with pytest.raises(KdpipeError, match=r"test accuracy 0.4200 is below min_accuracy 0.9000"):
        quality_gate_failed.python_func(accuracy=0.42, min_accuracy=0.9)


def test_every_task_has_resources_retries_and_a_time_limit(compiled):
    from kdpipe.orchestration.cluster import ClusterSettings

    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = {
        **spec["root"]["dag"]["tasks"],
        **spec["components"]["comp-condition-2"]["dag"]["tasks"],
        **spec["components"]["comp-condition-3"]["dag"]["tasks"],
    }
    defaults = ClusterSettings()
    for name in STEPS:
        wanted = defaults.task(name)
        resources = executors[f"exec-{name}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] == wanted.cpu_request, name
        assert resources["resourceMemoryRequest"] == wanted.memory_request, name
        assert resources["resourceMemoryLimit"] == wanted.memory_limit, name
        assert resources["resourceCpuLimit"] == wanted.cpu_limit == str(2 * int(wanted.cpu_request)), (
            name
        )  # quotas
        assert int(k8s[f"exec-{name}"]["activeDeadlineSeconds"]) == wanted.timeout_seconds > 0, name
        retry = tasks[name].get("retryPolicy")
        if name == "register":  # never retried: a retry after a half-done registration registers twice
            assert retry is None
        else:
            assert retry["maxRetryCount"] == wanted.retries >= 2 and retry["backoffDuration"] == "60s", name
        # which image produced a model is recorded in MLflow
        assert {"name": "KDPIPE_IMAGE_REF", "value": kubeflow.DEFAULT_IMAGE} in executors[f"exec-{name}"][
            "container"
        ]["env"]


def test_cluster_settings_file_changes_placement_and_resources(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        yaml.safe_dump(
            {
                "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                "gpu_tolerations": [
                    {"key": "nvidia.com/gpu"},
                    {"key": "dedicated", "operator": "Equal", "value": "ml"},
                ],
                "shm_size": "16Gi",
                "image_pull_secrets": ["regcred"],
                "state_pvc": "kdpipe-state",
                "tasks": {
                    "distill": {
                        "memory_request": "64Gi",
                        "cpu_limit": "16",
                        "retries": 5,
                        "timeout_seconds": 600,
                    }
                },
            }
        )
    )
    spec, platform = compile_to(tmp_path / "p.yaml", extra_args=["--cluster", str(cluster)])
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-teacher", "exec-augment", "exec-distill"):
        assert k8s[name]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in k8s[name][
            "tolerations"
        ]
        assert k8s[name]["emptyDirMounts"][0]["sizeLimit"] == "16Gi"
    assert "nodeSelector" not in k8s["exec-prepare"]
    assert all([s["secretName"] for s in cfg["imagePullSecret"]] == ["regcred"] for cfg in k8s.values())
    distill = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]
    assert distill["resourceMemoryRequest"] == "64Gi" and distill["resourceCpuLimit"] == "16"
    assert distill["resourceMemoryLimit"] == "96Gi"  # unset keys of a task keep their defaults
    assert spec["root"]["dag"]["tasks"]["distill"]["retryPolicy"]["maxRetryCount"] == 5
    assert int(k8s["exec-distill"]["activeDeadlineSeconds"]) == 600
    # the resume state on the claim: a retried or preempted distill pod resumes from its last.pt
    (mount,) = k8s["exec-distill"]["pvcMount"]
    assert (
        mount["mountPath"] == "/kdpipe-state"
        and mount["pvcNameParameter"]["runtimeValue"]["constant"] == "kdpipe-state"
    )
    distill_in = spec["root"]["dag"]["tasks"]["distill"]["inputs"]["parameters"]
    assert distill_in["state_dir"]["runtimeValue"]["constant"] == "/kdpipe-state"
    assert "pvcMount" not in k8s["exec-teacher"]
    assert int(k8s["exec-prepare"]["activeDeadlineSeconds"]) == 12 * 3600  # other tasks: the defaults


def test_a_bad_cluster_settings_file_is_one_clear_error(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("tasks:\n  distil:\n    retries: 2\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdpipe.cli",
            "pipeline",
            "compile",
            "--out",
            str(tmp_path / "p.yaml"),
            "--cluster",
            str(cluster),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "cluster.yaml" in done.stderr and "distil" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "p.yaml").exists()


def test_old_backends_get_a_pipeline_without_optional_secrets(tmp_path, compiled):
    _, _, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(s.get("optional") is True for cfg in k8s.values() for s in cfg.get("secretAsEnv", []))
    _, old = compile_to(tmp_path / "p.yaml", extra_args=["--backend-version", "2.14.0"])
    old_k8s = old["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = [s for cfg in old_k8s.values() for s in cfg.get("secretAsEnv", [])]
    assert secrets and not any(s.get("optional") for s in secrets)


def test_training_tasks_request_gpus(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    teacher = executors["exec-teacher"]["container"]["resources"]["accelerator"]
    assert teacher["resourceType"] == "nvidia.com/gpu" and teacher["resourceCount"] == "1"
    distill = executors["exec-distill"]["container"]["resources"]["accelerator"]
    assert distill["resourceType"] == "nvidia.com/gpu"
    assert distill["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
    # the distill component itself knows the GPU count (torchrun --nproc_per_node when > 1)
    assert spec["root"]["dag"]["tasks"]["distill"]["inputs"]["parameters"]["gpus"] == {
        "componentInputParameter": "gpus"
    }
    for name in ("exec-data", "exec-prepare", "exec-evaluate", "exec-register"):
        assert "accelerator" not in executors[name]["container"].get("resources", {})
    # a task holding a GPU fails when CUDA is unusable instead of training on the CPU
    for name in ("exec-teacher", "exec-augment", "exec-distill"):
        assert {"name": "KDPIPE_EXPECT_GPU", "value": "1"} in executors[name]["container"]["env"]
    assert not any(v["name"] == "KDPIPE_EXPECT_GPU" for v in executors["exec-prepare"]["container"]["env"])


def test_kubernetes_platform_settings(compiled):
    _, _, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-teacher", "exec-augment", "exec-distill"):
        cfg = executors[name]
        # no node selector by default: the GPU request places the pod, whatever the cluster's labels
        assert "nodeSelector" not in cfg
        assert cfg["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert cfg["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi", "volumeName": "dshm"}
        ]
    secrets = {
        name: {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in cfg.get("secretAsEnv", [])}
        for name, cfg in executors.items()
    }
    assert secrets["exec-data"] == {
        "kdpipe-dvc-remote": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
        "kdpipe-git": {"KDPIPE_GIT_USERNAME", "KDPIPE_GIT_TOKEN"},
    }
    for step in STEPS[1:]:  # every step logs to MLflow when the secret exists
        assert secrets[f"exec-{step}"]["kdpipe-mlflow"] == {
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        }, step


def test_data_version_and_rev_key_the_cache(compiled):
    """KFP's cache key is built from a task's inputs: the data task takes repo, rev and data version."""
    _, spec, _ = compiled
    data = spec["root"]["dag"]["tasks"]["data"]
    assert data["cachingOptions"] == {"enableCache": True}
    params = data["inputs"]["parameters"]
    for name, pipeline_param in (
        ("data_version", "data_version"),
        ("rev", "data_rev"),
        ("repo", "data_repo"),
    ):
        assert params[name] == {"componentInputParameter": pipeline_param}
    declared = spec["components"]["comp-data"]["inputDefinitions"]["parameters"]
    assert {"data_version", "rev", "repo"} <= set(declared)
    # every later step consumes the data task's artifact, so it is keyed on it too
    prepare_in = spec["root"]["dag"]["tasks"]["prepare"]["inputs"]["artifacts"]["raw_data"]
    assert prepare_in["taskOutputArtifact"] == {"outputArtifactKey": "raw_data", "producerTask": "data"}


def test_pipeline_parameters_mirror_params_yaml(compiled):
    from kdpipe.core.params import load_params

    _, spec, _ = compiled
    params = load_params(ROOT / "params.yaml").model_dump(mode="json")
    declared = spec["root"]["inputDefinitions"]["parameters"]
    for group in ("prepare", "augment", "teacher", "train", "select", "export", "evaluate", "register"):
        default = declared[f"{group}_params"]["defaultValue"]
        # unset values travel as "null" (KFP stores no None) and come back as None in the components
        expected = {
            k: "null" if v is None else v
            for k, v in params[group].items()
            if (group, k) != ("register", "min_accuracy")
        }
        assert default == expected, group
        assert kubeflow.params_from(**{group: default}).model_dump(mode="json")[group] == params[group]
    assert declared["min_accuracy"]["defaultValue"] == params["register"]["min_accuracy"]
    assert declared["data_root"]["defaultValue"] == params["data"]["root"]


def test_image_comes_from_one_setting(tmp_path):
    from kdpipe.orchestration.kubeflow import DEFAULT_IMAGE

    spec, _ = compile_to(tmp_path / "p.yaml", {"KDPIPE_IMAGE": "registry.example.com/kdpipe:1.2"})
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/kdpipe:1.2"}
    committed = next(yaml.safe_load_all(PACKAGE.read_text()))
    assert {e["container"]["image"] for e in committed["deploymentSpec"]["executors"].values()} == {
        DEFAULT_IMAGE
    }
    # components run the installed kdpipe: nothing is pip-installed at run time
    assert "pip install" not in PACKAGE.read_text()


def test_multi_node_distill_is_a_cpu_task_that_launches_a_trainjob(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("distill_nodes: 2\n")
    spec, platform = compile_to(tmp_path / "p.yaml", extra_args=["--cluster", str(cluster)])
    distill = spec["root"]["dag"]["tasks"]["distill"]["inputs"]["parameters"]
    assert distill["nodes"]["runtimeValue"]["constant"] == 2
    assert distill["gpus"] == {"componentInputParameter": "gpus"}  # GPUs per node of the TrainJob
    # the launching task holds no GPU: the TrainJob's pods do
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]
    assert (
        "tolerations"
        not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]
    )


def test_tenancy_settings_reach_every_pod_and_gpu_task(tmp_path):
    """Pod labels (a Kueue queue, cost labels) and annotations on every task, the GPU resource a MIG
    slice, and CPU limits by default (a ResourceQuota on limits.cpu rejects pods without one)."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        yaml.safe_dump(
            {
                "pod_labels": {"kueue.x-k8s.io/queue-name": "team-a", "cost-center": "ml"},
                "pod_annotations": {"example.com/owner": "ml-platform"},
                "gpu_resource": "nvidia.com/mig-1g.10gb",
                "distill_nodes": 2,
            }
        )
    )
    spec, platform = compile_to(tmp_path / "p.yaml", extra_args=["--cluster", str(cluster)])
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors = spec["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)  # every task has its platform settings
    for name, config in k8s.items():
        assert config["podMetadata"]["labels"] == {
            "kueue.x-k8s.io/queue-name": "team-a",
            "cost-center": "ml",
        }, name
        assert config["podMetadata"]["annotations"] == {"example.com/owner": "ml-platform"}, name
    for name in ("exec-teacher", "exec-augment"):
        assert (
            executors[name]["container"]["resources"]["accelerator"]["resourceType"]
            == "nvidia.com/mig-1g.10gb"
        )
    env = {e["name"]: e["value"] for e in executors["exec-distill"]["container"]["env"]}
    assert env["KDPIPE_GPU_RESOURCE"] == "nvidia.com/mig-1g.10gb"  # the multi-node TrainJob's nodes
    # the multi-node launcher stages artifacts itself: it, and no other task, gets the store's secret
    stores = {
        n
        for n, cfg in k8s.items()
        for s in cfg.get("secretAsEnv", [])
        if s["secretName"] == "kdpipe-object-store"
    }
    assert stores == {"exec-distill"}
    # the TrainJob's nodes get the same placement and labels, and the launcher pod owns the TrainJob
    from kdpipe.orchestration.cluster import load_cluster_settings

    assert json.loads(env["KDPIPE_NODE_SETTINGS"]) == load_cluster_settings(cluster).node_settings()
    assert {f["name"]: f["fieldPath"] for f in k8s["exec-distill"]["fieldPathAsEnv"]} == {
        "KDPIPE_POD_NAME": "metadata.name",
        "KDPIPE_POD_UID": "metadata.uid",
    }
    assert all(
        float(e["container"]["resources"]["cpuLimit"]) >= float(e["container"]["resources"]["cpuRequest"])
        for e in executors.values()
    )


def test_a_label_kubernetes_would_refuse_is_one_clear_error(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"pod_labels": {"team": "ML platform!"}}))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdpipe.cli",
            "pipeline",
            "compile",
            "--out",
            str(tmp_path / "p.yaml"),
            "--cluster",
            str(cluster),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode != 0 and "is not a Kubernetes label" in done.stderr and "Traceback" not in done.stderr
    )
