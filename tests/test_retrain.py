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
import sys
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


def test_with_a_kubeflow_endpoint_retrain_submits_the_pipeline_instead(tmp_path):
    steps = plan(kfp_host="https://kfp.example.com")
    assert [s.argv for s in steps] == [
        [sys.executable, "-m", "kdpipe.cli", "pipeline", "submit", "--host", "https://kfp.example.com"]
    ]
    env = repo_env()
    repo = init_repo(tmp_path / "repo", env)
    (repo / "f").write_text("x")
    commit(repo, env, "one")
    run(["git", "remote", "add", "origin", "https://git.example.com/team/data.git"], repo, env)
    data = kfp_data_arguments(repo)
    head = run(["git", "rev-parse", "HEAD"], repo, env).strip()
    assert data == {
        "data_repo": "https://git.example.com/team/data.git",
        "data_rev": head,
        "data_version": head,
    }
    assert plan(kfp_host="https://kfp.example.com", data=data)[0].argv[-6:] == [
        "-S",
        f"data_repo={data['data_repo']}",
        "-S",
        f"data_rev={head}",
        "-S",
        f"data_version={head}",
    ]
    local = plan(dvc="dvc")
    assert [s.argv for s in local] == [["dvc", "pull"], ["dvc", "repro"], ["dvc", "push"]]
    assert [s.tolerate_failure for s in local] == [True, False, False]
    assert [s.argv for s in plan(dvc="dvc", push=False)] == [["dvc", "pull"], ["dvc", "repro"]]
    # the command the KFP branch runs exists in this CLI
    from kdpipe.cli import build_parser

    args = build_parser().parse_args(plan(kfp_host="https://kfp.example.com", data=data)[0].argv[3:])
    assert args.host == "https://kfp.example.com" and args.overrides[0] == f"data_repo={data['data_repo']}"


def test_a_kubeflow_submission_carries_the_dvc_remote_namespace_and_never_credentials(tmp_path, monkeypatch):
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

    argv = plan(kfp_host="https://kfp.example.com", data=found, namespace="team-a")[0].argv
    assert argv[5:9] == ["--host", "https://kfp.example.com", "--namespace", "team-a"]
    assert "hush-9f2" not in " ".join(argv) and "AKIAEXAMPLE" not in " ".join(argv)
    # the submit command parses it into the pipeline's dvc_remote_config parameter
    from kdpipe.cli import _pipelines, build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.namespace == "team-a"
    package = Path(__file__).resolve().parents[1] / "pipelines" / "kdpipe_pipeline.yaml"
    sent = _pipelines("remote").pipeline_arguments(package, args.overrides)
    assert sent["dvc_remote_config"] == found["dvc_remote_config"]


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
