"""kdpipe.orchestration.tracking: URI precedence, redaction, one parent run per execution, ranks, history."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Shared with the register tests: a fresh SQLite store in tmp_path, which is also the cwd.
from test_register import SECRET, empty_db, store  # noqa: F401

from kdpipe.core.errors import KdpipeError
from kdpipe.core.params import Params
from kdpipe.orchestration import tracking

pytestmark = pytest.mark.usefixtures("store")

# ---------------------------------------------------------------- without MLflow


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = Params()
    assert tracking.tracking_uri(params) == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    params.register.tracking_uri = "http://mlflow.internal:5000"
    assert tracking.tracking_uri(params) == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_uri(params) == "sqlite:///elsewhere.db"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://user:pw@mlflow.example.com/x", "https://***@mlflow.example.com/x"),
        ("s3://AKIA:secret@bucket/key", "s3://***@bucket/key"),
        ("postgresql+psycopg2://u:p@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
        ("http://host/x?token=abc&page=2", "http://host/x?token=***&page=2"),
        ("data/labeled", "data/labeled"),
        ("user@example.com", "user@example.com"),  # not a URI: nothing to mask
    ],
)
def test_redact(value, expected):
    assert tracking.redact(value) == expected


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("aws.secret_access_key", True),
        ("db.password", True),
        ("hub.apiKey", True),
        ("auth.token", True),
        ("register.model_name", False),
        ("train.keyframes", False),
        ("data.monkey", False),
        ("train.lr", False),
    ],
)
def test_secret_keys_are_recognised_as_words(key, secret):
    assert tracking.is_secret_key(key) is secret


def test_safe_params_flattens_drops_and_redacts():
    params = Params.model_validate({"data": {"root": f"s3://u:{SECRET}@bucket/data"}})
    flat = tracking.safe_params(params)
    assert flat["train.lr"] == "0.1" and flat["data.root"] == "s3://***@bucket/data"
    assert flat["evaluate.providers"] == '["CPUExecutionProvider"]' and flat["teacher.checkpoint"] == ""
    assert "x.api_token" not in tracking.safe_params({"x": {"api_token": SECRET, "n": 1}})


def test_git_commit_outside_a_repository_is_unknown(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"


# ---------------------------------------------------------------- against MLflow


def _runs():
    import mlflow

    return mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")


def test_steps_of_one_execution_share_one_parent_run(tmp_path):
    params = Params()
    (tmp_path / "artifacts" / "prepared").mkdir(parents=True)
    (tmp_path / "artifacts" / "prepared" / "manifest.json").write_text(json.dumps({"data_version": "dv-7"}))
    ids = []
    for step in ("teacher", "distill"):  # two processes in real life: the id travels in a file
        with tracking.pipeline_run(params, run_name="exec") as parent, tracking.step_run(step) as child:
            ids.append((parent.info.run_id, child.info.run_id))
    assert ids[0][0] == ids[1][0] and ids[0][1] != ids[1][1]
    recorded = json.loads((tmp_path / "artifacts" / "mlflow_run.json").read_text())
    assert recorded["run_id"] == ids[0][0]

    by_id = {r.info.run_id: r for r in _runs()}
    assert len(by_id) == 3
    parent = by_id[ids[0][0]]
    assert (
        parent.data.tags["kdpipe.data_version"] == "dv-7"
        and parent.data.tags["kdpipe.git_commit"] == "unknown"
    )
    assert parent.data.tags["kdpipe.version"]
    children = [by_id[c] for _, c in ids]
    assert [c.data.tags["kdpipe.step"] for c in children] == ["teacher", "distill"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.data.tags["kdpipe.data_version"] == "dv-7" for c in children)

    tracking.close_pipeline_run()  # the next execution gets a new parent
    with tracking.pipeline_run(params) as again:
        assert again.info.run_id != ids[0][0]


def test_tasks_of_one_kubeflow_run_share_its_parent_by_the_execution_key(tmp_path, monkeypatch):
    """Kubeflow tasks are separate pods with no file in common: each one finds the parent run of its
    pipeline run by the execution key (the run id the pipeline passes), not by a run file."""
    from kdpipe.orchestration import kubeflow

    params = Params()
    monkeypatch.setenv(tracking.EXECUTION_ENV, "")  # tracking_for_task sets it: restored after the test

    def task(step: str, key: str, pod: str) -> tuple[str, str]:
        monkeypatch.setenv(tracking.RUN_FILE_ENV, str(tmp_path / pod / "run.json"))  # each pod its own folder
        kubeflow.tracking_for_task(key)
        with tracking.pipeline_run(params, run_name="kfp") as parent, tracking.step_run(step) as child:
            ids = parent.info.run_id, child.info.run_id
        tracking.close_pipeline_run()  # the pod ends
        return ids

    first = [task(step, "job-1", f"pod{i}") for i, step in enumerate(("prepare", "distill", "register"))]
    assert len({parent for parent, _ in first}) == 1 and len({child for _, child in first}) == 3
    other = task("prepare", "job-2", "pod9")
    assert other[0] != first[0][0]  # another pipeline run, another parent
    parent = {r.info.run_id: r for r in _runs()}[first[0][0]]
    assert parent.data.tags[tracking.TAG_EXECUTION] == "job-1"


def test_run_id_from_the_environment_wins(tmp_path, monkeypatch):
    import mlflow

    params = Params()
    tracking.configure(params)
    run_id = (
        mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("kdpipe").experiment_id).info.run_id
    )
    monkeypatch.setenv(tracking.RUN_ID_ENV, run_id)
    with tracking.pipeline_run(params) as run:
        assert run.info.run_id == run_id
    assert not (tmp_path / "artifacts" / "mlflow_run.json").exists()
    monkeypatch.setenv(tracking.RUN_ID_ENV, "0" * 32)
    with pytest.raises(KdpipeError, match="no such active run"), tracking.pipeline_run(params):
        pass


def test_stale_run_file_starts_a_new_parent(tmp_path):
    tracking.RUN_FILE.parent.mkdir(parents=True, exist_ok=True)
    tracking.RUN_FILE.write_text(
        json.dumps({"run_id": "0" * 32, "tracking_uri": tracking.tracking_uri(None)})
    )
    with tracking.pipeline_run(Params()) as run:
        assert run.info.run_id != "0" * 32


def test_log_params_flat_is_idempotent_and_never_changes_a_value(tmp_path, caplog):
    params = Params()
    with tracking.pipeline_run(params) as run:
        first = tracking.log_params_flat(params)
        assert tracking.log_params_flat(params) == {}
        params.train.lr = 0.2
        assert tracking.log_params_flat(params) == {}
    assert "train.lr" in caplog.text
    logged = _runs()[0].data.params
    assert logged == first and logged["train.lr"] == "0.1" and run.info.run_id


def test_log_history_uses_iteration_as_step(tmp_path):
    import mlflow

    rows = [
        {
            "iteration": it,
            "loss_total": 1.0 / it,
            "val_acc_student": it / 100,
            "val_acc_teacher": 0.9,
            "agreement": 0.8,
            "p1": 0.5,
            "p2": 0.5,
            "w": 1.0,
            "note": "text",
            "nan": float("nan"),
        }
        for it in (50, 100, 150)
    ]
    (tmp_path / "history.json").write_text(json.dumps(rows))
    with tracking.pipeline_run(Params()), tracking.step_run("distill") as child:
        assert (
            tracking.log_history(tmp_path / "history.json") == 3 * 7
        )  # 7 finite numeric fields per row; text and NaN are skipped
    history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "curve_val_acc_student")
    assert [(m.step, m.value) for m in history] == [(50, 0.5), (100, 1.0), (150, 1.5)]


def test_log_artifacts_files_and_folders(tmp_path):
    import mlflow

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text("r")
    with tracking.pipeline_run(Params()) as run:
        logged = tracking.log_artifacts(
            [tmp_path / "report.md", tmp_path / "plots", tmp_path / "missing.txt"]
        )
    assert logged == ["report.md", "plots"]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert names == {"report.md", "plots"}


def test_logging_outside_a_run_is_an_error(tmp_path):
    tracking.configure(Params())
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        tracking.log_params_flat(Params())


@pytest.mark.parametrize("rank", ["1", "3"])
def test_non_zero_ranks_log_nothing(tmp_path, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    (tmp_path / "history.json").write_text(json.dumps([{"iteration": 1, "loss": 1.0}]))
    db_before = (tmp_path / "mlflow.db").read_bytes()
    with tracking.pipeline_run(Params()) as parent, tracking.step_run("distill") as child:
        assert parent is None and child is None
        assert tracking.log_params_flat(Params()) == {}
        assert tracking.log_metrics_flat({"a": 1.0}) == {}
        assert tracking.log_history(tmp_path / "history.json") == 0
        assert tracking.log_artifacts([tmp_path / "history.json"]) == []
    tracking.close_pipeline_run()
    assert (tmp_path / "mlflow.db").read_bytes() == db_before
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "artifacts").exists()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["history.json", "mlflow.db"]


def test_cli_steps_log_nested_runs_with_curves_and_reports(tmp_path, monkeypatch):
    """`kdpipe <step>` records the step as a nested run of one parent: params, history curves,
    adaptive schedule and report files."""
    import json

    import mlflow

    from kdpipe.cli import REPORT_FILES
    from kdpipe.core.params import Params
    from kdpipe.orchestration.tracking import log_step

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "distill"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"val_acc_student": 0.75, "recipe": "full"}))
    (out / "history.json").write_text(
        json.dumps(
            [
                {"iteration": 10, "val_acc_student": 0.5, "loss_total": 2.0},
                {"iteration": 20, "val_acc_student": 0.75, "loss_total": 1.0},
            ]
        )
    )
    (out / "schedule.json").write_text(
        json.dumps([{"epoch": 1, "p1": 0.0, "p2": 0.4, "w": 1.0, "metric": 0.5}])
    )
    params = Params()
    import time

    started = time.time() - 120  # the step ran for two minutes before it was logged
    log_step("distill", params, out, REPORT_FILES["distill"], started_at=started)
    log_step("select", params, tmp_path / "missing-dir")

    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    steps = {r.data.tags.get("kdpipe.step"): r for r in runs if "kdpipe.step" in r.data.tags}
    parents = [r for r in runs if "kdpipe.step" not in r.data.tags]
    assert set(steps) == {"distill", "select"} and len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in steps.values())
    distill = steps["distill"]
    # the summary metric is the step's (best) figure; the curve is its own metric
    assert distill.data.metrics["val_acc_student"] == 0.75
    curve = client.get_metric_history(distill.info.run_id, "curve_val_acc_student")
    assert sorted((m.step, m.value) for m in curve) == [(10, 0.5), (20, 0.75)]
    # the step's real duration, not the time it took to log it
    assert distill.info.end_time - distill.info.start_time >= 120_000
    assert distill.info.start_time == pytest.approx(started * 1000, abs=1000)
    assert client.get_metric_history(distill.info.run_id, "schedule_p2")[0].value == 0.4
    names = {a.path for a in client.list_artifacts(distill.info.run_id)}
    assert {"metrics.json", "history.json", "schedule.json"} <= names
    assert parents[0].data.params["train.recipe"] == params.train.recipe


def test_a_step_rerun_by_hand_with_other_settings_gets_its_own_parent(tmp_path, caplog):
    """A step re-run by hand with other settings does not join the execution whose parent logged the
    first ones (MLflow would keep showing those, unused); the same settings still join it."""
    params = Params()
    with tracking.pipeline_run(params) as first:
        tracking.log_params_flat(params)
    with tracking.pipeline_run(params) as same:
        assert same.info.run_id == first.info.run_id
    changed = Params()
    changed.teacher.image_size = 128
    with tracking.pipeline_run(changed) as other:
        assert other.info.run_id != first.info.run_id
        tracking.log_params_flat(changed)
    assert "already logged" not in caplog.text
    logged = {r.info.run_id: r.data.params.get("teacher.image_size") for r in _runs()}
    assert logged == {first.info.run_id: "", other.info.run_id: "128"}  # null is logged empty


def test_an_unreachable_tracking_server_is_one_line_after_the_outputs(
    tmp_path, monkeypatch, capsys, image_dataset
):
    """A dead MLflow server: the step's outputs are written, then one error line (exit 2) instead of
    minutes of retries and chained tracebacks; MLflow's retries are bounded unless the user sets them."""
    import socket

    from kdpipe.cli import main

    with socket.socket() as sock:  # a port nothing listens on: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in tracking.HTTP_RETRIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SECRET}@127.0.0.1:{port}")
    monkeypatch.setenv("KDPIPE_TRACKING", "1")
    root = image_dataset(classes={"cat": 3, "dog": 3}, unlabeled=0, test={})
    code = main(
        [
            "prepare",
            "--data-root",
            str(root),
            "--out-dir",
            str(tmp_path / "prepared"),
            "-S",
            "prepare.image_size=8",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(
        f"kdpipe prepare: error: MLflow tracking server http://127.0.0.1:{port} is unreachable"
    )
    assert "KDPIPE_TRACKING=0" in line and SECRET not in err and "Traceback" not in err
    assert (tmp_path / "prepared" / "manifest.json").is_file()  # the step's work is kept
    assert {name: os.environ[name] for name in tracking.HTTP_RETRIES} == tracking.HTTP_RETRIES
