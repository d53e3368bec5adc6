"""The WHOLE Kubeflow pipeline run with ``kfp.local`` (SubprocessRunner, no venv, no cluster) on tiny data.

The data comes the way it does on a cluster: a throw-away git + DVC project whose data folder is
pushed to a local DVC remote, with the DVC cache deleted, so the data task has to fetch the bytes
of the requested revision from the remote. Every task's output artifact is then checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_params, write_tiny_dataset

from kdpipe import cli

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TASKS = ("data", "prepare", "augment", "teacher", "distill", "select", "export", "evaluate", "register")


def _git_env() -> dict[str, str]:
    return {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }


def _run(cmd, cwd) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_git_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout.strip()


def dvc_project(base: Path) -> tuple[Path, Path]:
    """A git + DVC project with tiny data pushed to a local remote and no local cache; returns
    (project, remote)."""
    repo, remote = base / "project", base / "remote"
    repo.mkdir()
    write_tiny_dataset(repo / "data", labeled_per_class=10, unlabeled=24, test_per_class=4)
    dvc = str(BIN / "dvc")
    _run(["git", "init", "-q"], repo)
    _run([dvc, "init", "-q"], repo)
    _run([dvc, "config", "core.analytics", "false"], repo)
    _run([dvc, "remote", "add", "-d", "store", str(remote)], repo)
    _run([dvc, "add", "-q", "data/labeled", "data/unlabeled", "data/test"], repo)
    _run([dvc, "push", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "data v1"], repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "labeled")  # the working tree must not be what the pipeline reads
    return repo, remote


def pipeline_params(path: Path) -> Path:
    """The tiny settings of the other integration tests, plus fast select/export/evaluate."""
    raw = tiny_params(max_iterations=10).model_dump(mode="json")
    raw["teacher"]["max_iterations"] = 10
    raw["select"]["latency_runs"] = 3
    raw["export"].update(int8=False, parity_samples=16)
    raw["evaluate"].update(latency_runs=3, throughput_batch=8)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def task_outputs(run: Path, task: str) -> dict:
    """A task's returned value(s) and its output artifacts' metadata (metrics, confusion matrix...)."""
    done = json.loads((run / task / "executor_output.json").read_text())
    found = dict(done.get("parameterValues", {}))
    for name, entry in done.get("artifacts", {}).items():
        found[name] = entry["artifacts"][0].get("metadata", {})
    return found


def test_whole_pipeline_runs_locally_and_every_artifact_checks_out(tmp_path, monkeypatch, capsys):
    import onnxruntime as ort

    repo, _ = dvc_project(tmp_path)
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    tracking_db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_db}")
    monkeypatch.setenv("KDPIPE_TRACKING", "1")  # every task logs its step (the store is in tmp_path)
    monkeypatch.chdir(tmp_path)  # nothing may be written to the project's working tree
    params = pipeline_params(tmp_path / "params.yaml")
    root = tmp_path / "kfp"

    code = cli.main(
        [
            "pipeline",
            "run-local",
            "--params",
            str(params),
            "--data-repo",
            str(repo),
            "--pipeline-root",
            str(root),
            "-S",
            "register.model_name=kfp-test",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    runs = list(root.glob("kdpipe-*"))
    assert len(runs) == 1
    run = runs[0]
    assert {p.name for p in run.iterdir()} >= set(TASKS)

    # data: the requested revision, fetched from the DVC remote
    raw = run / "data" / "raw_data"
    assert sorted(p.name for p in raw.iterdir()) == ["labeled", "test", "unlabeled"]
    assert len(list((raw / "labeled").rglob("*.png"))) == 30
    assert f"({commit[:12]})" in out

    # prepare: packed arrays whose manifest names the data version
    manifest = json.loads((run / "prepare" / "prepared" / "manifest.json").read_text())
    assert manifest["class_names"] == ["blue", "green", "red"] and manifest["counts"]["test"] == 12
    assert (run / "augment" / "augmented" / "policy.json").is_file()

    # teacher / distill / select: checkpoints
    assert (run / "teacher" / "teacher_model" / "teacher.pt").is_file()
    student = run / "distill" / "student"
    assert (student / "student.pt").is_file()
    assert json.loads((student / "metrics.json").read_text())["iterations"] == 10
    assert (run / "select" / "selected" / "model.pt").is_file()

    # export: the ONNX model loads and classifies
    onnx_path = run / "export" / "onnx_model" / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.full((2, 3, 16, 16), 0.5, np.float32)})[0]
    assert logits.shape == (2, 3)

    # evaluate: metrics, a well-formed confusion matrix, the report
    evaluation = run / "evaluate" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    outputs = task_outputs(run, "evaluate")
    assert outputs["Output"] == pytest.approx(metrics["accuracy"])  # what the quality gate compares
    assert outputs["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert outputs["metrics"]["latency_ms_p50"] > 0
    cm = outputs["confusion"]["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == ["blue", "green", "red"]
    matrix = [r["row"] for r in cm["rows"]]
    assert len(matrix) == 3 and all(len(r) == 3 for r in matrix) and sum(map(sum, matrix)) == 12
    assert sum(matrix[k][k] for k in range(3)) / 12 == pytest.approx(metrics["accuracy"])
    assert "accuracy" in (run / "evaluate" / "report").read_text()
    assert task_outputs(run, "distill")["summary"]["iterations"] == 10
    assert task_outputs(run, "prepare")["summary"]["images.test"] == 12
    assert task_outputs(run, "export")["parity"]["fp32.top1_agreement"] >= 0.99
    assert task_outputs(run, "data")["raw_data"]["commit"] == commit

    # register: a decision was taken and the model version exists in the MLflow registry
    decision = json.loads((run / "register" / "decision" / "decision.json").read_text())
    assert decision["registered"] is True and decision["model_name"] == "kfp-test"
    assert decision["accuracy"] == pytest.approx(metrics["accuracy"])
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tracking_db}")
    version = client.get_model_version("kfp-test", decision["version"])
    assert version.tags["data_version"] == manifest["data_version"]
    assert str(client.get_model_version_by_alias("kfp-test", "champion").version) == decision["version"]

    # every step of this pipeline run logged under ONE parent run, tagged with the run's id
    experiments = [e.experiment_id for e in client.search_experiments()]
    steps = client.search_runs(experiments, filter_string="tags.`kdpipe.step` != ''")
    assert {r.data.tags["kdpipe.step"] for r in steps} >= {
        "prepare",
        "teacher",
        "augment",
        "distill",
        "select",
        "export",
        "evaluate",
    }
    parents = {r.data.tags["mlflow.parentRunId"] for r in steps}
    assert len(parents) == 1
    assert client.get_run(parents.pop()).data.tags["kdpipe.execution"]
    # the commit the pipeline came from and the image every task ran in, recorded for every step
    code_commit = _run(["git", "rev-parse", "HEAD"], Path(__file__).resolve().parents[1])
    assert {r.data.tags["kdpipe.git_commit"] for r in steps} == {code_commit}
    assert {r.data.tags["kdpipe.image"] for r in steps} == {"kdpipe:0.1.0"}


def test_a_model_below_the_quality_gate_fails_the_local_run(tmp_path, monkeypatch, capfd):
    """The gate's other branch runs and fails: the run ends failed, with the reason, and nothing is
    registered."""
    repo, _ = dvc_project(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = pipeline_params(tmp_path / "params.yaml")
    root = tmp_path / "kfp"
    code = cli.main(
        [
            "pipeline",
            "run-local",
            "--params",
            str(params),
            "--data-repo",
            str(repo),
            "--pipeline-root",
            str(root),
            "-S",
            "register.min_accuracy=1.0",
            "-S",
            "train.max_iterations=1",
            "-S",
            "teacher.max_iterations=1",
            "-S",
            "register.model_name=kfp-gate",
        ]
    )
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert code != 0
    assert "quality gate: test accuracy" in text and "below min_accuracy 1.0000" in text
    (run,) = root.glob("kdpipe-*")
    assert not (run / "register").exists()  # nothing was registered
    assert (run / "evaluate" / "evaluation" / "metrics.json").is_file()  # evaluate did run
