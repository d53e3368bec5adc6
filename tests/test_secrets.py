"""Credentials set in the environment never reach an output file, a report, MLflow or a log.

The whole pipeline (prepare -> augment -> teacher -> distill -> select -> export -> evaluate ->
register, plus ``kdpipe params --show``) runs through the CLI on tiny data, one child process per
command, with step tracking on (MLflow, SQLite store in the run folder), logging at DEBUG, and
secrets in the environment: AWS/DVC remote keys, MLflow credentials, an Azure key and a Kubeflow
token file. ``params.yaml`` also holds a tracking URI and a data URI with ``user:password@`` (the
redaction path; the env SQLite URI wins, so no server is contacted). Afterwards every byte under
the run folder (artifacts, reports, mlruns, the SQLite db) and every captured log is searched.
"""

from __future__ import annotations

import os
import shutil

import pytest
import yaml
from zygote import Zygote

pytestmark = pytest.mark.slow

ENV_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAKDPIPELEAKTEST01",  # DVC S3 remote
    "AWS_SECRET_ACCESS_KEY": "kdpipeAwsSecretLeakTest0123456789abcdef",
    "AWS_SESSION_TOKEN": "kdpipeAwsSessionTokenLeakTest987654321",
    "AZURE_STORAGE_KEY": "kdpipeAzureKeyLeakTest5551234",  # DVC Azure remote
    "MLFLOW_TRACKING_PASSWORD": "kdpipeMlflowPasswordLeakTest42",
    "MLFLOW_TRACKING_TOKEN": "kdpipeMlflowTokenLeakTest42",
}
KFP_TOKEN = "kdpipeKfpServiceAccountTokenLeakTest77"  # read by kfp from KF_PIPELINES_SA_TOKEN_PATH
URI_SECRET = "kdpipeUriPasswordLeakTest31337"
# Not a secret: MLflow records the tracking user name as the runs' user (the audit trail), on purpose.
MLFLOW_USER = "kdpipe-ci-user"
STEPS = ["prepare", "augment", "teacher", "distill", "select", "export", "evaluate", "register"]


def _scan(folder, secrets) -> list[str]:
    hits = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [
                f"{path.relative_to(folder)}: {name}"
                for name, value in secrets.items()
                if value.encode() in data
            ]
    return hits


def test_no_secret_reaches_outputs_logs_or_mlflow(tmp_path, tiny_params_factory):
    from conftest import write_tiny_dataset

    inputs, run, logs = tmp_path / "inputs", tmp_path / "run", tmp_path / "logs"
    for folder in (inputs, run, logs):
        folder.mkdir()
    token_file = inputs / "kfp-token"
    token_file.write_text(KFP_TOKEN)
    raw = tiny_params_factory(max_iterations=10).model_dump(mode="json")
    raw["data"]["root"] = f"s3://kdpipe:{URI_SECRET}@bucket/data"
    raw["select"].update(latency_runs=3)
    raw["export"].update(calibration_samples=16, parity_samples=32)
    raw["evaluate"].update(latency_runs=3, throughput_batch=8)
    raw["register"].update(
        model_name="kdpipe-secret-test", tracking_uri=f"http://kdpipe:{URI_SECRET}@127.0.0.1:9"
    )
    params = inputs / "params.yaml"
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    write_tiny_dataset(run / "data", labeled_per_class=6, unlabeled=12, test_per_class=2)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KDPIPE_"))}
    env.update(
        ENV_SECRETS,
        MLFLOW_TRACKING_USERNAME=MLFLOW_USER,
        KF_PIPELINES_SA_TOKEN_PATH=str(token_file),
        KDPIPE_TRACKING="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{run.as_posix()}/mlflow.db",
    )
    zygote = Zygote(logs, extra_modules=("mlflow", "mlflow.onnx", "sqlalchemy", "alembic"), env=env)
    try:
        for step in STEPS:
            extra = ["--data-root", "data"] if step == "prepare" else []
            code, _, output = zygote.run(
                [step, "--params", params, *extra, "--reports-dir", f"reports/{step}"],
                run,
                log=logs / f"{step}.log",
                log_level="DEBUG",
            )
            assert code == 0, f"kdpipe {step} failed:\n{output[-4000:]}"
        code, _, output = zygote.run(
            ["params", "--show", "--params", params], run, log=logs / "params-show.log"
        )
        assert code == 0, output
    finally:
        zygote.close()

    secrets = {**ENV_SECRETS, "KFP token": KFP_TOKEN, "URI password": URI_SECRET}
    assert _scan(run, secrets) == []
    assert _scan(logs, secrets) == []

    # the search is meaningful: it finds what it looks for, the store was written, the URIs were logged masked
    assert _scan(inputs, secrets) == ["kfp-token: KFP token", "params.yaml: URI password"]
    db = (run / "mlflow.db").read_bytes()
    assert b"kdpipe-secret-test" in db and b"train.recipe" in db
    assert b"http://***@127.0.0.1:9" in db and b"s3://***@bucket/data" in db
    assert any((run / "mlruns").rglob("model.onnx"))
    assert (run / "artifacts" / "register" / "decision.json").is_file()
    assert "DEBUG" in (logs / "register.log").read_text(errors="replace")
    assert "***@127.0.0.1:9" in (logs / "params-show.log").read_text()
    shutil.rmtree(run / "data")  # large, and not an output
