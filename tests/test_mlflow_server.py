"""Register against a real ``mlflow server`` over HTTP, then read the version back over REST."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_register import NAME, SECRET, empty_db, make_params, make_upstream, onnx_model  # noqa: F401

from kdpipe.steps import register

pytestmark = pytest.mark.slow  # starts a real MLflow server

READY_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll /health until it answers 200; fail early if the server exits, or after 60 s."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow server not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (uvicorn starts workers), kill it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, folder: Path, log_path: Path):
        self.proc, self.url, self.folder, self.log_path = proc, url, folder, log_path

    def wait_ready(self) -> str:
        _wait_ready(self.proc, self.url, self.log_path)
        return self.url


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, empty_db):  # noqa: F811
    """A real MLflow server (SQLite backend, local artifact root) on a free port.

    Module-scoped and listed before the model fixture so the server boots (~10-20 s on 2 cores)
    while torch exports the model; the test calls ``wait_ready()``.
    """
    server_dir = tmp_path_factory.mktemp("server")
    shutil.copyfile(empty_db, server_dir / "db.sqlite")  # already migrated: a faster start
    port = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--workers",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{server_dir.as_posix()}/db.sqlite",
        "--default-artifact-root",
        str(server_dir / "art"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK")}
    log_path = server_dir / "server.log"
    with open(log_path, "wb") as log:
        # A new session makes the server the leader of its own process group, so teardown can stop
        # it and its workers by this one PID.
        proc = subprocess.Popen(
            cmd, cwd=server_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", server_dir, log_path)
    finally:
        _stop(proc)


def _rest_get(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=10) as resp:
        return json.loads(resp.read())


def test_register_through_a_real_server(mlflow_server, onnx_model, tmp_path, monkeypatch, capfd):  # noqa: F811
    import mlflow

    url, server_dir = mlflow_server.wait_ready(), mlflow_server.folder
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in (
        "MLFLOW_TRACKING_URI",
        "KDPIPE_MLFLOW_RUN_ID",
        "RANK",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        # setenv first: delenv of an absent variable records nothing, and mlflow / tracking set
        # some of these during the run; this way teardown removes them again.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # Credentials in the configured URI (basic auth; this server ignores it) must stay out of
    # everything written: decision.json, the server's database and artifacts.
    host = url.removeprefix("http://")
    params = make_params(tracking_uri=f"http://kdpipe:{SECRET}@{host}")
    export_dir, evaluation_dir = make_upstream(work, onnx_model, 0.75)
    try:
        decision = register.run(
            params, export_dir, evaluation_dir, work / "artifacts" / "prepared", work / "out"
        )
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    assert decision["registered"] and decision["promoted"] and decision["version"] == "1"
    assert decision["tracking_uri"] == f"http://***@{host}"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET  # sent as basic auth, not in the URI
    assert SECRET not in "".join(capfd.readouterr())  # MLflow prints run URLs for HTTP stores

    model = _rest_get(url, "/api/2.0/mlflow/registered-models/get", name=NAME)["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {"champion": "1", "challenger": "1"}
    version = mlflow.MlflowClient(url).get_model_version(NAME, "1")
    assert version.tags["test_accuracy"] == "0.75" and version.tags["data_version"] == "dv-1"

    written = [p for root in (server_dir, work) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "model.onnx" and server_dir in p.parents for p in written)
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
