"""The retraining loop with the real DVC in throw-away git + DVC repositories:

* acceptance: after ``kdpipe ingest`` of new unlabeled images, ``dvc status`` reports ``prepare``
  stale, ``dvc repro`` re-runs it and its downstream stage, and the manifest's data version changes;
  ingesting the same files again changes nothing;
* ``kdpipe retrain``: pull, repro, push and a Markdown metrics diff in ``$GITHUB_STEP_SUMMARY``;
  a failing pull is tolerated only while the workspace holds the data; with a Kubeflow endpoint it
  plans ``kdpipe pipeline submit --host HOST`` instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_tiny_dataset
from dvc_repo import DVC, KDPIPE, commit, init_repo, repo_env, run

from kdpipe.orchestration.retrain import kfp_data_arguments, plan

PROJECT_GITIGNORE = Path(__file__).resolve().parents[1] / ".gitignore"

pytestmark = pytest.mark.slow

DVC_YAML = """
stages:
  prepare:
    cmd: kdpipe prepare --reports-dir reports/prepare
    deps: [data/labeled, data/unlabeled, data/test]
    params: [prepare]
    outs: [artifacts/prepared]
    metrics:
      - reports/prepare/manifest.json:
          cache: false
  augment:
    cmd: kdpipe augment --reports-dir reports/augment
    deps: [artifacts/prepared]
    params: [augment]
    outs: [artifacts/augmented]
    metrics:
      - reports/augment/policy.json:
          cache: false
"""
PARAMS = "prepare:\n  image_size: 16\naugment:\n  views: 2\n  preview_samples: 2\n  pad: 2\n"


def make_project(path: Path, env) -> Path:
    """A repo shaped like kdpipe's: data/ with a first unlabeled batch, each folder its own .dvc file."""
    repo = init_repo(path, env)
    write_tiny_dataset(repo / "data", labeled_per_class=6, unlabeled=20, test_per_class=2, seed=0)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text(PARAMS)
    shutil.copyfile(PROJECT_GITIGNORE, repo / ".gitignore")  # the real one: what users get
    run([DVC, "add", "-q", "data/labeled", "data/test", "data/unlabeled/batch-0001"], repo, env)
    run([DVC, "repro", "-q"], repo, env)
    commit(repo, env, "baseline")
    return repo


def new_images(folder: Path, count: int, seed: int) -> Path:
    write_tiny_dataset(folder, labeled_per_class=0, unlabeled=count, test_per_class=0, seed=seed)
    return folder / "unlabeled" / "batch-0001"


def manifest(repo: Path) -> dict:
    return json.loads((repo / "reports" / "prepare" / "manifest.json").read_text())


def test_ingest_makes_the_pipeline_stale_and_a_second_ingest_changes_nothing(tmp_path):
    env = repo_env()
    repo = make_project(tmp_path / "repo", env)
    assert "up to date" in run([DVC, "status"], repo, env)
    before = manifest(repo)

    src = new_images(tmp_path / "incoming", 10, seed=7)
    out = run([KDPIPE, "ingest", src, "--data-root", "data"], repo, env)
    assert "added 10 image(s)" in out
    (new_dvc,) = [p.name for p in (repo / "data/unlabeled").glob("batch-0002-*.dvc")]
    status = json.loads(run([DVC, "status", "--json"], repo, env))
    assert "prepare" in status  # data/unlabeled changed
    assert f"data/unlabeled/{new_dvc}" not in status  # the new batch itself is tracked and clean

    log = run([DVC, "repro"], repo, env)
    assert "Running stage 'prepare'" in log and "Running stage 'augment'" in log
    after = manifest(repo)
    assert after["data_version"] != before["data_version"]
    assert after["counts"]["unlabeled"] == before["counts"]["unlabeled"] + 10
    assert "up to date" in run([DVC, "status"], repo, env)
    commit(repo, env, "batch-0002")

    out = run([KDPIPE, "ingest", src, "--data-root", "data"], repo, env)  # the same files again
    assert "added nothing" in out and "skipped 10 duplicate(s)" in out
    assert "up to date" in run([DVC, "status"], repo, env)
    assert run(["git", "status", "--porcelain"], repo, env) == ""
    assert sorted(p.name for p in (repo / "data/unlabeled").iterdir() if not p.name.startswith(".")) == [
        "batch-0001",
        "batch-0001.dvc",
        new_dvc[:-4],
        new_dvc,
    ]


def test_dvc_sees_every_unlabeled_batch_and_pull_restores_them(tmp_path):
    """With the project's .gitignore, every batch .dvc file is a DVC stage: push, pull and checkout
    include the unlabeled data, and no per-batch .gitignore lines appear (merges stay conflict-free)."""
    env = repo_env()
    repo = make_project(tmp_path / "repo", env)
    run([KDPIPE, "ingest", new_images(tmp_path / "incoming", 5, seed=3), "--data-root", "data"], repo, env)
    commit(repo, env, "new unlabeled batch")
    (new_dvc,) = [p.name for p in (repo / "data/unlabeled").glob("batch-0002-*.dvc")]
    stages = run([DVC, "stage", "list", "--all", "--name-only"], repo, env).split()
    assert "data/unlabeled/batch-0001.dvc" in stages and f"data/unlabeled/{new_dvc}" in stages
    assert not (repo / "data/unlabeled/.gitignore").exists()
    assert run(["git", "status", "--porcelain"], repo, env) == ""

    run([DVC, "remote", "add", "-d", "store", str(tmp_path / "remote")], repo, env)
    run([DVC, "push", "-q"], repo, env)
    batches = [repo / "data/unlabeled/batch-0001", repo / "data/unlabeled" / new_dvc[:-4]]
    before = {b.name: sorted(f.read_bytes() for f in b.rglob("*") if f.is_file()) for b in batches}
    for folder in [*batches, repo / ".dvc" / "cache"]:
        shutil.rmtree(folder)
    run([DVC, "pull", "-q"], repo, env)
    assert {b.name: sorted(f.read_bytes() for f in b.rglob("*") if f.is_file()) for b in batches} == before


def test_retrain_pulls_reproduces_pushes_and_writes_the_metrics_diff(tmp_path):
    env = repo_env()
    repo = make_project(tmp_path / "repo", env)
    run([DVC, "remote", "add", "-d", "store", str(tmp_path / "remote")], repo, env)
    commit(repo, env, "remote")
    src = new_images(tmp_path / "incoming", 12, seed=9)
    run([KDPIPE, "ingest", src, "--data-root", "data"], repo, env)
    commit(repo, env, "new unlabeled batch")  # what triggers the workflow

    summary = tmp_path / "summary.md"
    out = run([KDPIPE, "retrain"], repo, {**env, "GITHUB_STEP_SUMMARY": str(summary)})
    text = summary.read_text()
    assert out == text
    assert text.startswith("## kdpipe retrain")
    assert "reports/prepare/manifest.json" in text and "counts.unlabeled" in text
    assert "| 20 " in text and "| 32 " in text  # unlabeled images before and after
    assert "in sync" in run([DVC, "status", "--cloud"], repo, env)  # everything was pushed
    assert "up to date" in run([DVC, "status"], repo, env)

    # a remote without the data: pull fails, the workspace has it, retraining goes on
    shutil.rmtree(repo / ".dvc" / "cache")
    run([DVC, "remote", "modify", "store", "url", str(tmp_path / "empty-remote")], repo, env)
    done = subprocess.run(
        [KDPIPE, "retrain", "--no-push"], cwd=repo, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert "dvc pull failed; the workspace already holds the data" in done.stderr
    assert "`dvc pull` failed" in done.stdout

    # ... but not when the workspace lacks tracked data: a clear error naming it
    shutil.rmtree(repo / "data" / "test")
    shutil.rmtree(repo / ".dvc" / "cache")  # the run above re-cached the workspace: drop it again
    done = subprocess.run(
        [KDPIPE, "retrain", "--no-push"], cwd=repo, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 2
    assert (
        "kdpipe retrain: error: dvc pull failed and the workspace lacks DVC-tracked data: data/test"
        in done.stderr
    )


def test_the_local_plan_and_the_data_a_cluster_run_reads(tmp_path):
    local = plan(dvc="dvc")
    assert [s.argv for s in local] == [["dvc", "pull"], ["dvc", "repro"], ["dvc", "push"]]
    assert [s.tolerate_failure for s in local] == [True, False, False]
    assert [s.argv for s in plan(dvc="dvc", push=False)] == [["dvc", "pull"], ["dvc", "repro"]]
    env = repo_env()
    repo = init_repo(tmp_path / "repo", env)
    (repo / "f").write_text("x")
    commit(repo, env, "one")
    run(["git", "remote", "add", "origin", "https://git.example.com/team/data.git"], repo, env)
    head = run(["git", "rev-parse", "HEAD"], repo, env).strip()
    assert kfp_data_arguments(repo) == {
        "data_repo": "https://git.example.com/team/data.git",
        "data_rev": head,
        "data_version": head,
    }


def test_a_kubeflow_submission_reads_the_dvc_remote_and_never_its_credentials(tmp_path, monkeypatch):
    from kdpipe.core.errors import KdpipeError
    from kdpipe.orchestration.retrain import kfp_remote_arguments

    env = repo_env()
    repo = init_repo(tmp_path / "repo", env)  # git + dvc init
    monkeypatch.delenv("KDPIPE_DVC_REMOTE", raising=False)
    with pytest.raises(KdpipeError, match="no default DVC remote"):
        kfp_remote_arguments(repo)
    run([DVC, "remote", "add", "--default", "local", "../dvc-remote"], repo, env)
    with pytest.raises(KdpipeError, match="is a local folder: the cluster cannot read it"):
        kfp_remote_arguments(repo)
    run([DVC, "remote", "add", "--force", "--default", "store", "s3://bucket/kdpipe"], repo, env)
    run([DVC, "remote", "modify", "store", "endpointurl", "https://s3.example.com"], repo, env)
    run([DVC, "remote", "modify", "--local", "store", "secret_access_key", "hush-9f2"], repo, env)
    run([DVC, "remote", "modify", "--local", "store", "access_key_id", "AKIAEXAMPLE"], repo, env)
    found = kfp_remote_arguments(repo)
    assert found == {
        "dvc_remote_config": {"url": "s3://bucket/kdpipe", "endpointurl": "https://s3.example.com"}
    }
    monkeypatch.setenv("KDPIPE_DVC_REMOTE", "gs://other/kdpipe")
    assert kfp_remote_arguments(repo) == {"dvc_remote_config": {"url": "gs://other/kdpipe"}}


def test_the_metrics_diff_shows_the_numbers_that_changed_only():
    """`dvc metrics diff` lists file hashes and settings beside the metrics (43 rows, mostly hashes, in
    a real retrain): the summary keeps the numbers that changed."""
    from kdpipe.orchestration.retrain import numeric_changes

    diff = {
        "reports/prepare/manifest.json": {
            "counts.unlabeled": {"old": 20, "new": 32, "diff": 12},
            "counts.test": {"old": 6, "new": 6, "diff": 0},
            "files.unlabeled_x.npy": {"old": "a" * 64, "new": "b" * 64},
            "data_version": {"old": "c" * 64, "new": "d" * 64},
            "teacher.sha256": {"old": "e" * 64, "new": "f" * 64},
            "logits_dtype": {"old": None, "new": "float16"},
            "check_only": {"old": False, "new": True},
        },
        "reports/evaluate/metrics.json": {
            "accuracy": {"old": 0.9, "new": 0.92, "diff": 0.02},
            "int8_accuracy": {"old": None, "new": 0.91},
        },
    }
    rows = numeric_changes(diff)
    assert [(path.split("/")[1], name) for path, name, *_ in rows] == [
        ("evaluate", "accuracy"),
        ("evaluate", "int8_accuracy"),
        ("prepare", "counts.unlabeled"),
    ]
    assert rows[2][2:] == (20, 32, 12) and rows[1][2:] == (None, 0.91, None)


def test_images_marked_executable_are_not_reported_modified_on_every_pull(tmp_path):
    """Photos copied from a FAT card or a Windows share arrive with the executable bit; DVC then
    reports every one of them as "modified" on each pull of an unchanged workspace (seen as "2349
    files modified" on real photos). retrain clears the bit first (no byte changes) and says so."""
    env = repo_env()
    repo = make_project(tmp_path / "repo", env)
    run([DVC, "remote", "add", "-d", "store", str(tmp_path / "remote")], repo, env)
    run([DVC, "push", "-q"], repo, env)
    commit(repo, env, "remote")
    images = sorted(p for p in (repo / "data" / "labeled").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in images}
    for path in images:
        path.chmod(0o755)
    assert f"{len(images)} files modified" in run([DVC, "pull"], repo, env)  # DVC's own behaviour

    done = subprocess.run(
        [KDPIPE, "retrain", "--no-push"], cwd=repo, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert f"cleared the executable bit on {len(images)} data file(s)" in done.stderr
    assert "modified" not in done.stderr.split("kdpipe retrain: dvc repro")[0].split("dvc pull")[-1]
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in images)
    assert {p: p.read_bytes() for p in images} == before
    assert "Everything is up to date" in run([DVC, "pull"], repo, env)


def _real_stage_deps(name: str) -> list[str]:
    """The data dependencies (not code) the project's dvc.yaml gives stage ``name``."""
    import yaml

    stage = yaml.safe_load((PROJECT_GITIGNORE.parent / "dvc.yaml").read_text())["stages"][name]
    return [d for d in stage["deps"] if not d.startswith("${code}")]


def test_an_unlabeled_only_ingest_does_not_retrain_the_teacher(tmp_path, tiny_params_factory):
    """The teacher stage depends on prepare's teacher_inputs.json (the project's dvc.yaml wiring, read
    here), not on the whole prepared folder: new unlabeled images re-run prepare, which decodes only
    them, and leave the teacher alone -- unless its Noisy Student rounds read them."""
    import yaml

    env = repo_env()
    repo = init_repo(tmp_path / "repo", env)
    write_tiny_dataset(repo / "data", labeled_per_class=6, unlabeled=20, test_per_class=2, seed=0)
    stages = {
        "prepare": {
            "cmd": "kdpipe prepare",
            "deps": _real_stage_deps("prepare"),
            "params": ["prepare", "teacher.image_size", "teacher.unlabeled_rounds"],
            "outs": [{"artifacts/prepared": {"persist": True}}],
        },
        "teacher": {
            "cmd": "kdpipe teacher",
            "deps": _real_stage_deps("teacher"),
            "params": ["teacher"],
            "outs": ["artifacts/teacher"],
        },
    }
    assert "artifacts/prepared" not in stages["teacher"]["deps"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    params = tiny_params_factory().model_dump(mode="json")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copyfile(PROJECT_GITIGNORE, repo / ".gitignore")
    run([DVC, "add", "-q", "data/labeled", "data/test", "data/unlabeled/batch-0001"], repo, env)
    run([DVC, "repro", "-q"], repo, env)
    commit(repo, env, "baseline")

    run([KDPIPE, "ingest", new_images(tmp_path / "incoming", 10, seed=7), "--data-root", "data"], repo, env)
    log = run([DVC, "repro"], repo, env)
    assert "Running stage 'prepare'" in log and "10 decoded" in log  # the labeled images are reused
    assert "Stage 'teacher' didn't change, skipping" in log
    commit(repo, env, "batch-0002")

    params["teacher"]["unlabeled_rounds"] = 1  # now the teacher reads the unlabeled images
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run([DVC, "repro", "-q"], repo, env)
    commit(repo, env, "rounds")
    run([KDPIPE, "ingest", new_images(tmp_path / "more", 10, seed=8), "--data-root", "data"], repo, env)
    assert "Running stage 'teacher'" in run([DVC, "repro"], repo, env)


def test_a_token_in_the_git_origin_never_becomes_a_pipeline_parameter(tmp_path):
    env = repo_env()
    repo = init_repo(tmp_path / "repo", env)
    run(["git", "remote", "add", "origin", "https://ci:ghp_SECRETTOKEN@github.com/team/data.git"], repo, env)
    assert kfp_data_arguments(repo)["data_repo"] == "https://github.com/team/data.git"


# --- the loop on Kubeflow: submit, wait, pull the result back from MLflow, diff (issue 29) ---

IMAGE = "registry.example.com/team/kdpipe@sha256:" + "0123456789abcdef" * 4
GPU_IMAGE = "registry.example.com/team/kdpipe-gpu@sha256:" + "fedcba9876543210" * 4
METRIC_FILES = {
    "prepare": "manifest.json",
    "teacher": "metrics.json",
    "distill": "metrics.json",
    "evaluate": "metrics.json",
}
CLUSTER_DVC_YAML = "stages:\n" + "".join(
    f"  {step}:\n    cmd: kdpipe {step} --reports-dir reports/{step}\n"
    f"    metrics:\n      - reports/{step}/{name}:\n          cache: false\n"
    for step, name in METRIC_FILES.items()
)
# the reports of the commit retrain compares with, as `make repro` wrote them
BASE_REPORTS = {
    "prepare/manifest.json": {"data_version": "a" * 64, "counts": {"unlabeled": 20, "labeled": 18}},
    "teacher/metrics.json": {"val_acc": 0.8, "warnings": []},
    "distill/metrics.json": {"recipe": "kd", "iterations": 300, "val_acc_student": 0.85, "warnings": []},
    "evaluate/metrics.json": {"accuracy": 0.9, "num_test": 60, "models": {"model.onnx": {"accuracy": 0.9}}},
}
# what the cluster's tasks write as their report files (and log to MLflow)
CLUSTER_REPORTS = {
    "prepare": {
        "manifest.json": {"data_version": "b" * 64, "counts": {"unlabeled": 32, "labeled": 18}},
        "rejected.json": [],
    },
    "teacher": {
        "metrics.json": {"val_acc": 0.8, "warnings": []},
        "history.json": [{"iteration": 5, "val_acc": 0.7}, {"iteration": 10, "val_acc": 0.8}],
    },
    "distill": {
        "metrics.json": {
            "recipe": "kd",
            "iterations": 300,
            "val_acc_student": 0.9,
            "warnings": ["the student scores above its frozen teacher"],
        },
        "history.json": [
            {"iteration": 150, "val_acc_student": 0.8},
            {"iteration": 300, "val_acc_student": 0.9},
        ],
        "schedule.json": [{"epoch": 0, "lr": 0.1}, {"epoch": 1, "lr": 0.05}],
    },
    "evaluate": {
        "metrics.json": {"accuracy": 0.93, "num_test": 60, "models": {"model.onnx": {"accuracy": 0.93}}},
        "per_class.json": {"cat": {"f1": 0.92}, "dog": {"f1": 0.94}},
    },
}


def log_like_the_cluster(kfp_run_id: str, folder: Path) -> None:
    """What the pipeline's tasks do on the cluster: each step writes its report files and logs them
    with ``tracking.log_step`` (as ``run_step`` does) under the parent run keyed by the KFP run's
    id (``KDPIPE_EXECUTION_KEY``, which the pipeline sets from ``{{$.pipeline_job_uuid}}``)."""
    import os

    from conftest import tiny_params

    from kdpipe.core.catalog import STEPS
    from kdpipe.orchestration import tracking

    os.environ[tracking.EXECUTION_ENV] = kfp_run_id
    try:
        for step, files in CLUSTER_REPORTS.items():
            out = folder / kfp_run_id / step
            out.mkdir(parents=True)
            for name, content in files.items():
                (out / name).write_text(json.dumps(content, indent=2))
            tracking.log_step(step, tiny_params(), out, STEPS[step].report_files)
    finally:
        del os.environ[tracking.EXECUTION_ENV]
        tracking.close_pipeline_run()


def make_cluster_project(path: Path, env) -> Path:
    """A project whose last commit holds reports, a cloud DVC remote (its secret only in the
    git-ignored local config) and an origin URL with a token in it."""
    repo = init_repo(path, env)
    (repo / "dvc.yaml").write_text(CLUSTER_DVC_YAML)
    (repo / "params.yaml").write_text(PARAMS)
    (repo / "cluster.yaml").write_text("pod_labels: {kueue.x-k8s.io/queue-name: team-a}\n")
    for name, content in BASE_REPORTS.items():
        (repo / "reports" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "reports" / name).write_text(json.dumps(content, indent=2))
    run([DVC, "remote", "add", "--default", "store", "s3://bucket/kdpipe"], repo, env)
    run([DVC, "remote", "modify", "--local", "store", "secret_access_key", "hush-9f2"], repo, env)
    run(["git", "remote", "add", "origin", "https://ci:ghp_SECRETTOKEN@git.example.com/t/d.git"], repo, env)
    commit(repo, env, "baseline")
    return repo


@pytest.fixture
def kfp_cluster(monkeypatch, tmp_path):
    """The fake KFP API (tests/test_kfp_remote.py) on 127.0.0.1, an MLflow SQLite store both "the
    cluster" and retrain use, and the images by digest; stopped at the end."""
    from test_kfp_remote import TOKEN, FakeKfp, serving

    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    monkeypatch.setenv("KDPIPE_IMAGE", IMAGE)
    monkeypatch.setenv("KDPIPE_GPU_IMAGE", GPU_IMAGE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}")
    monkeypatch.setenv("KDPIPE_MLFLOW_RUN_FILE", str(tmp_path / "mlflow_run.json"))
    for name in ("KDPIPE_KFP_HOST", "KDPIPE_CLUSTER_FILE", "KDPIPE_PIPELINE_VERSION", "KDPIPE_DVC_REMOTE"):
        monkeypatch.delenv(name, raising=False)
    with serving(FakeKfp()) as fake:
        yield fake


def test_retrain_on_kubeflow_waits_pulls_the_reports_back_and_diffs_them(
    tmp_path, kfp_cluster, monkeypatch, capsys
):
    from test_kfp_remote import API, TOKEN, calls

    from kdpipe import cli

    env = repo_env()
    repo = make_cluster_project(tmp_path / "repo", env)
    head = run(["git", "rev-parse", "HEAD"], repo, env).strip()
    kfp_cluster.on_run_created = lambda run_id: log_like_the_cluster(run_id, tmp_path / "cluster")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.chdir(repo)
    argv = [
        "retrain",
        "--kfp-host",
        kfp_cluster.url,
        "--kfp-namespace",
        "team-a",
        "--cluster",
        "cluster.yaml",
    ]
    code = cli.main([*argv, "--poll-interval", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err

    # sent: the package compiled with the settings file, GPU tasks on the GPU image, this commit's data
    (sent,) = calls(kfp_cluster, "POST", f"{API}/runs")
    (run_id,) = kfp_cluster.runs
    images = {
        name.removeprefix("exec-"): e["container"]["image"]
        for name, e in sent["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"].items()
    }
    assert {name for name, image in images.items() if image == GPU_IMAGE} == {"teacher", "augment", "distill"}
    assert {image for name, image in images.items() if image != GPU_IMAGE} == {IMAGE}
    platform = sent["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]
    assert {
        e["podMetadata"]["labels"]["kueue.x-k8s.io/queue-name"] for e in platform["executors"].values()
    } == {"team-a"}
    parameters = sent["runtime_config"]["parameters"]
    assert parameters["data_repo"] == "https://git.example.com/t/d.git" and parameters["data_rev"] == head
    assert parameters["dvc_remote_config"] == {"url": "s3://bucket/kdpipe"}
    assert [e["namespace"] for e in kfp_cluster.experiments.values()] == ["team-a"]
    wire = json.dumps([(m, p, q, b) for m, p, q, b, *_ in kfp_cluster.requests])
    assert "ghp_SECRETTOKEN" not in wire and "hush-9f2" not in wire and TOKEN not in out + err

    # waited: it read the run until it reported a final state
    assert kfp_cluster.reads[run_id] == 2 and f"Kubeflow run {run_id}" in err

    # pulled back: metrics files from the MLflow metrics (their keys), marked; the rest as logged
    reports = repo / "reports"
    evaluate = json.loads((reports / "evaluate" / "metrics.json").read_text())
    source = evaluate.pop("source")
    assert source.startswith(f"Kubeflow run {run_id}, MLflow run ")
    assert evaluate == {
        "accuracy": 0.93,
        "models.model.onnx.accuracy": 0.93,
        "num_test": 60.0,
        "warnings": 0.0,
    }
    distill = json.loads((reports / "distill" / "metrics.json").read_text())
    assert set(distill) == {"iterations", "val_acc_student", "warnings", "source"}  # no curves, no text
    assert distill["warnings"] == 1.0  # MLflow holds the warnings' count
    for step, files in CLUSTER_REPORTS.items():
        for name, content in files.items():
            if name != "metrics.json":
                assert json.loads((reports / step / name).read_text()) == content, (step, name)

    # the summary: what ran, and the metrics diff against the base, as on the runner path
    assert out == summary.read_text() and out.startswith("## kdpipe retrain")
    assert f"run `{run_id}`" in out and "ended SUCCEEDED" in out and "cluster settings `cluster.yaml`" in out
    assert "| reports/evaluate/metrics.json | accuracy | 0.9 | 0.93 | +0.03 |" in out
    assert "| reports/prepare/manifest.json | counts.unlabeled | 20 | 32 | +12 |" in out
    assert "| reports/distill/metrics.json | val_acc_student | 0.85 | 0.9 | +0.05 |" in out
    # what the workflow's pull-request step commits: the reports changed, dvc.lock not
    changed = run(["git", "status", "--porcelain", "--", "reports", "dvc.lock"], repo, env)
    assert "reports/evaluate/metrics.json" in changed and "dvc.lock" not in changed


def test_retrain_on_kubeflow_fails_in_one_line_on_a_failed_run_or_a_missing_result(
    tmp_path, kfp_cluster, monkeypatch, capsys
):
    """An uploaded release version runs by reference; a run that failed, or one whose tasks logged
    nothing to MLflow, ends retrain with one line naming the run, and leaves the reports alone."""
    from test_kfp_remote import API, calls

    from kdpipe import cli

    env = repo_env()
    repo = make_cluster_project(tmp_path / "repo", env)
    monkeypatch.chdir(repo)
    package = Path(__file__).resolve().parents[1] / "pipelines" / "kdpipe_pipeline.yaml"
    upload = [
        "pipeline",
        "upload",
        "--host",
        kfp_cluster.url,
        "--package",
        str(package),
        "--version",
        "v1.2.0",
    ]
    assert cli.main(upload) == 0, capsys.readouterr().err
    capsys.readouterr()
    monkeypatch.setenv("KDPIPE_KFP_HOST", kfp_cluster.url)
    monkeypatch.setenv("KDPIPE_PIPELINE_VERSION", "v1.2.0")
    kfp_cluster.run_states = ["RUNNING", "FAILED"]
    assert cli.main(["retrain", "--poll-interval", "0"]) == 2
    out, err = capsys.readouterr()
    (run_id,) = kfp_cluster.runs
    assert f"kdpipe retrain: error: Kubeflow run {run_id} on {kfp_cluster.url} ended FAILED" in err
    assert "KDPIPE_IMAGE, KDPIPE_GPU_IMAGE not applied" in err  # the version carries its own
    (sent,) = calls(kfp_cluster, "POST", f"{API}/runs")
    assert sent["pipeline_version_reference"]["pipeline_version_id"] in kfp_cluster.versions
    assert "pipeline_spec" not in sent and out == ""

    kfp_cluster.run_states = ["SUCCEEDED"]  # ... but its tasks logged nowhere this machine reads
    assert cli.main(["retrain", "--poll-interval", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds no MLflow run tagged kdpipe.execution=" in err and "Traceback" not in err
    assert run(["git", "status", "--porcelain", "--", "reports"], repo, env) == ""


def test_retrain_on_kubeflow_needs_the_tracking_server_before_it_submits(tmp_path, kfp_cluster, monkeypatch):
    from kdpipe.core.errors import KdpipeError
    from kdpipe.orchestration.retrain import Cluster
    from kdpipe.pipelines.remote import retrain_on_cluster

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(KdpipeError, match="set MLFLOW_TRACKING_URI .* nothing was submitted"):
        retrain_on_cluster(tmp_path, "HEAD", Cluster(kfp_cluster.url))
    assert kfp_cluster.requests == []
