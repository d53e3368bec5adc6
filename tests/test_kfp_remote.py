"""``kdpipe pipeline submit`` and ``schedule`` against a small fake of the Kubeflow Pipelines REST API.

The fake serves the v2beta1 endpoints ``kfp.Client`` calls for these two commands (healthz,
experiments, runs, recurring runs) on 127.0.0.1, records every request, and is shut down at the
end of each test. The real ``kfp.Client`` and its generated API client build the requests.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from pathlib import Path

import pytest
import yaml
from fake_http import serve

from kdpipe import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines" / "kdpipe_pipeline.yaml"
API = "/apis/v2beta1"
TOKEN = "test-token-5f2c9a"
IMAGE = "registry.example.com/team/kdpipe@sha256:" + "0123456789abcdef" * 4


class FakeKfp:
    """In-memory experiments, runs and recurring runs; ``requests`` lists (method, path, query, body, headers)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, dict | None, dict]] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self.lock = threading.Lock()
        self.backend_version = "2.15.0"  # what the v1beta1 health endpoint reports
        self.fail_create = False  # POST recurringruns answers 500
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        # what successive reads of one run report, the last one from then on: a run moves on
        # by one state per read, so a waiting client sees every transition, deterministically
        self.run_states = ["RUNNING", "SUCCEEDED"]
        self.reads: dict[str, int] = {}
        self.read_errors = 0  # the next N reads of a run answer 503 (a gateway restarting)
        # called with a new run's id before the create call answers: what "the cluster" does with it
        self.on_run_created = None

    def _add_version(self, pipeline_id: str, name: str, package: str) -> dict:
        version = {
            "pipeline_version_id": self.new_id("ver"),
            "pipeline_id": pipeline_id,
            "display_name": name,
            "package": package,
        }
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _read_run(self, run_id: str) -> tuple[int, dict]:
        if run_id not in self.runs:
            return 404, {"error": f"no run {run_id}"}
        if self.read_errors:
            self.read_errors -= 1
            return 503, {"error": "upstream connect error"}
        seen = self.reads[run_id] = self.reads.get(run_id, 0) + 1
        self.runs[run_id]["state"] = self.run_states[min(seen, len(self.run_states)) - 1]
        return 200, self.runs[run_id]

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    @staticmethod
    def _named(items, query) -> list[dict]:
        names = [
            p["stringValue"]
            for p in json.loads(query.get("filter", ['{"predicates": []}'])[0])["predicates"]
            if p.get("key") == "display_name"
        ]
        return [i for i in items if not names or i["display_name"] in names]

    def handle(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        with self.lock:
            if (method, path) == ("GET", f"{API}/healthz"):
                return 200, {"multi_user": False}
            if (method, path) == ("GET", "/apis/v1beta1/healthz"):
                return 200, {"commit_sha": "abc", "tag_name": self.backend_version, "multi_user": False}
            if (method, path) == ("GET", f"{API}/experiments"):
                found = self._named(self.experiments.values(), query)
                return 200, {"experiments": found, "total_size": len(found)}
            if (method, path) == ("POST", f"{API}/experiments"):
                exp = {**body, "experiment_id": self.new_id("exp")}
                self.experiments[exp["experiment_id"]] = exp
                return 200, exp
            if (method, path) == ("POST", f"{API}/runs"):
                run = {**body, "run_id": self.new_id("run"), "state": "PENDING"}
                self.runs[run["run_id"]] = run
                if self.on_run_created:
                    self.on_run_created(run["run_id"])
                return 200, run
            if method == "GET" and path.startswith(f"{API}/runs/"):
                return self._read_run(path.rsplit("/", 1)[1])
            if (method, path) == ("GET", f"{API}/recurringruns"):
                found = self._named(self.recurring.values(), query)
                if "experiment_id" in query:
                    found = [r for r in found if r["experiment_id"] == query["experiment_id"][0]]
                return 200, {"recurringRuns": found, "total_size": len(found)}
            if (method, path) == ("POST", f"{API}/recurringruns"):
                if self.fail_create:
                    return 500, {"error": "the scheduled workflow controller is unavailable"}
                rec = {**body, "recurring_run_id": self.new_id("rec")}
                self.recurring[rec["recurring_run_id"]] = rec
                return 200, rec
            if (method, path) == ("GET", f"{API}/pipelines"):
                found = self._named(self.pipelines.values(), query)
                return 200, {"pipelines": found or None, "total_size": len(found)}
            if (method, path) == ("POST", f"{API}/pipelines/upload"):
                pipeline = {"pipeline_id": self.new_id("pipe"), "display_name": query["name"][0]}
                self.pipelines[pipeline["pipeline_id"]] = pipeline
                self._add_version(
                    pipeline["pipeline_id"], query["name"][0], body["uploadfile"]
                )  # as KFP does
                return 200, pipeline
            if method == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
                pipeline_id = path.split("/")[-2]
                found = self._named(
                    [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id], query
                )
                return 200, {"pipeline_versions": found or None, "total_size": len(found)}
            if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
                pipeline_id = query["pipelineid"][0]
                if pipeline_id not in self.pipelines:
                    return 404, {"error": f"no pipeline {pipeline_id}"}
                return 200, self._add_version(pipeline_id, query["name"][0], body["uploadfile"])
            if method == "DELETE" and path.startswith(f"{API}/recurringruns/"):
                rec_id = path.rsplit("/", 1)[1]
                if self.recurring.pop(rec_id, None) is None:
                    return 404, {"error": f"no recurring run {rec_id}"}
                return 200, {}
            return 404, {"error": f"not implemented: {method} {path}"}


@contextlib.contextmanager
def serving(fake: FakeKfp):
    """``fake`` answering on 127.0.0.1 (its ``url``), every request recorded in ``fake.requests``."""

    def handle(method, path, query, body, headers):
        fake.requests.append((method, path, query, body, headers))
        return fake.handle(method, path, query, body)

    with serve(handle) as url:
        fake.url = url
        yield fake


@pytest.fixture
def kfp_server():
    with serving(FakeKfp()) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _kfp_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    monkeypatch.setenv("KDPIPE_IMAGE", IMAGE)  # what the release workflow exports: registry + digest
    monkeypatch.chdir(ROOT)  # --package defaults to pipelines/kdpipe_pipeline.yaml


def compiled_package() -> dict:
    """What the client sends for the package: the pipeline IR and the kfp-kubernetes platform spec,
    every task on the image given (IMAGE)."""
    from kdpipe.pipelines.remote import with_image

    spec, platform = with_image(list(yaml.safe_load_all(PACKAGE.read_text(encoding="utf-8"))), IMAGE)
    return {"pipeline_spec": spec, "platform_spec": platform}


def without_caching_options(node):
    if isinstance(node, dict):
        return {k: without_caching_options(v) for k, v in node.items() if k != "cachingOptions"}
    if isinstance(node, list):
        return [without_caching_options(v) for v in node]
    return node


def calls(fake: FakeKfp, method: str, path: str) -> list[dict]:
    return [body for m, p, _, body, _ in fake.requests if (m, p) == (method, path)]


def test_submit_sends_the_compiled_pipeline_and_parameters(kfp_server, capsys):
    code = cli.main(
        [
            "pipeline",
            "submit",
            "--host",
            kfp_server.url,
            "--experiment",
            "kd-exp",
            "--run-name",
            "try-1",
            "-S",
            "train.lr=0.1",
            "-S",
            "train.recipe=cotrain",
            "-S",
            "register.min_accuracy=0.6",
            "-S",
            "data_rev=v2",
            "-S",
            "data_version=2024-06",
            "-S",
            "data_repo=https://git.example.com/d.git",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [b["display_name"] for b in calls(kfp_server, "POST", f"{API}/experiments")] == ["kd-exp"]
    (run,) = calls(kfp_server, "POST", f"{API}/runs")
    assert run["display_name"] == "try-1"
    assert run["experiment_id"] == next(iter(kfp_server.experiments))
    assert run["pipeline_spec"] == compiled_package()  # the whole compiled pipeline travels in the request
    assert run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]  # GPU nodes, shm, secrets
    params = run["runtime_config"]["parameters"]
    assert params["train_params"]["lr"] == 0.1 and params["train_params"]["recipe"] == "cotrain"
    assert params["train_params"]["student_arch"] == "cnn_tiny"  # untouched keys keep params.yaml's values
    assert params["min_accuracy"] == 0.6
    assert (params["data_rev"], params["data_version"]) == ("v2", "2024-06")
    assert params["data_repo"] == "https://git.example.com/d.git"
    # the commit it was submitted from, recorded by every task in MLflow
    import subprocess

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert params["git_commit"] == head
    executors = run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    # the token is sent as a bearer token, and never printed
    auth = {h.get("authorization") or h.get("Authorization") for *_, h in kfp_server.requests}
    assert auth == {f"Bearer {TOKEN}"}
    assert TOKEN not in out + err
    assert "run-" in out


def test_submit_rejects_bad_params_before_sending(kfp_server, capsys):
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url, "-S", "train.recipie=full"]) == 2
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url, "-S", "train.lr=-1"]) == 2
    assert "train.recipie" in capsys.readouterr().err
    assert not calls(kfp_server, "POST", f"{API}/runs")


def test_schedule_twice_replaces_the_recurring_run(kfp_server, capsys):
    base = [
        "pipeline",
        "schedule",
        "--host",
        kfp_server.url,
        "--name",
        "nightly",
        "-S",
        "data_version=rolling",
    ]
    assert cli.main([*base, "--cron", "0 0 3 * * *"]) == 0
    assert cli.main([*base, "--cron", "0 30 4 * * *", "-S", "train.max_iterations=50"]) == 0
    out = capsys.readouterr().out
    assert "replaced 1" in out and TOKEN not in out

    created = calls(kfp_server, "POST", f"{API}/recurringruns")
    assert len(created) == 2
    for body, cron in zip(created, ("0 0 3 * * *", "0 30 4 * * *"), strict=True):
        assert body["display_name"] == "nightly"
        assert body["trigger"]["cron_schedule"]["cron"] == cron
        assert len(body["trigger"]["cron_schedule"]["cron"].split()) == 6
        assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
        assert body["mode"] == "ENABLE"
        # the compiled pipeline, with caching switched off so every scheduled run reads the data anew
        assert without_caching_options(body["pipeline_spec"]) == without_caching_options(compiled_package())
        tasks = body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
        assert not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())
        assert body["runtime_config"]["parameters"]["data_version"] == "rolling"
    assert created[1]["runtime_config"]["parameters"]["train_params"]["max_iterations"] == 50
    # the first one was deleted: exactly one recurring run of that name is left, the new one
    deleted = [p for m, p, *_ in kfp_server.requests if m == "DELETE"]
    assert len(deleted) == 1
    (left,) = kfp_server.recurring.values()
    assert left["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"
    assert len(kfp_server.experiments) == 1  # the experiment is reused, not created twice


def test_schedule_needs_a_six_field_cron(kfp_server, capsys):
    assert cli.main(["pipeline", "schedule", "--host", kfp_server.url, "--cron", "0 3 * * *"]) == 2
    assert "6 fields" in capsys.readouterr().err
    assert kfp_server.requests == []


@pytest.mark.parametrize(
    "image, reason",
    [
        ("kdpipe:0.1.0", "names no registry"),
        ("registry.example.com/team/kdpipe:latest", "not pinned by digest"),
    ],
)
def test_submit_refuses_an_image_a_cluster_cannot_pull_or_cache_safely(
    kfp_server, capsys, monkeypatch, image, reason
):
    monkeypatch.delenv("KDPIPE_IMAGE")
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url, "--image", image]) == 2
    assert reason in capsys.readouterr().err
    assert not calls(kfp_server, "POST", f"{API}/runs")
    # the committed package alone names the local default image: refused too
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url]) == 2
    assert "names no registry" in capsys.readouterr().err


def test_submit_and_schedule_refuse_an_older_backend(kfp_server, capsys):
    kfp_server.backend_version = "2.14.0"
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url]) == 2
    assert cli.main(["pipeline", "schedule", "--host", kfp_server.url, "--cron", "0 0 3 * * *"]) == 2
    err = capsys.readouterr().err
    assert err.count("older than 2.15.0") == 2 and "Traceback" not in err
    assert not calls(kfp_server, "POST", f"{API}/runs") and not calls(
        kfp_server, "POST", f"{API}/recurringruns"
    )


def test_gpu_tasks_get_the_gpu_image_and_the_others_the_slim_one(kfp_server, capsys):
    gpu = "registry.example.com/team/kdpipe-gpu@sha256:" + "fedcba9876543210" * 4
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url, "--gpu-image", gpu]) == 0, (
        capsys.readouterr().err
    )
    (run,) = calls(kfp_server, "POST", f"{API}/runs")
    executors = run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    images = {name.removeprefix("exec-"): e["container"]["image"] for name, e in executors.items()}
    assert {name for name, image in images.items() if image == gpu} == {"teacher", "augment", "distill"}
    assert {image for name, image in images.items() if image != gpu} == {IMAGE}
    # what each task records in MLflow is the image it really runs in
    for name, executor in executors.items():
        ref = {v["name"]: v["value"] for v in executor["container"]["env"]}["KDPIPE_IMAGE_REF"]
        assert ref == executor["container"]["image"], name


SECRETS = ("ghp_SECRETTOKEN", "SIGSECRET", "AWSSECRET", "MLFLOWSECRET")


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_no_credential_reaches_the_kfp_server(kfp_server, capsys, command):
    """Tokens in the data repository URL, the DVC remote settings or the tracking URI are removed
    before anything is sent: KFP keeps parameters in its database, UI and Argo spec."""
    remote = {
        "url": "s3://bucket/x?X-Amz-Signature=SIGSECRET",
        "endpointurl": "https://minio:9000",
        "secret_access_key": "AWSSECRET",
    }
    args = [
        "pipeline",
        command,
        "--host",
        kfp_server.url,
        "-S",
        "data_repo=https://ci:ghp_SECRETTOKEN@github.com/o/r.git",
        "-S",
        f"dvc_remote_config={json.dumps(remote)}",
        "-S",
        "register.tracking_uri=https://kdpipe:MLFLOWSECRET@mlflow.example.com",
    ]
    if command == "schedule":
        args += ["--cron", "0 0 3 * * *"]
    assert cli.main(args) == 0, capsys.readouterr().err
    sent = json.dumps([(m, p, q, b) for m, p, q, b, *_ in kfp_server.requests])
    assert not [s for s in SECRETS if s in sent]
    assert "github.com/o/r.git" in sent and "https://minio:9000" in sent  # the rest arrives
    err = capsys.readouterr().err
    assert err.count("credentials removed") == 3 and not [s for s in SECRETS if s in err]


def test_the_compiled_package_holds_no_credential(tmp_path):
    from kdpipe.core.params import load_params
    from kdpipe.pipelines.kfp_pipeline import compile_pipeline

    params = tmp_path / "params.yaml"
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    raw["register"]["tracking_uri"] = "https://kdpipe:MLFLOWSECRET@mlflow.example.com"
    params.write_text(yaml.safe_dump(raw))
    text = compile_pipeline(tmp_path / "p.yaml", params).read_text()
    assert "MLFLOWSECRET" not in text and "https://mlflow.example.com" in text


@pytest.mark.parametrize("reported", ["unknown", None])
def test_a_backend_of_unknown_version_is_refused_unless_forced(kfp_server, capsys, reported):
    kfp_server.backend_version = reported  # KFP serves "unknown" when its TAG_NAME is unset
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url]) == 2
    err = capsys.readouterr().err
    assert (
        "needs backend 2.15.0 or newer" in err and "--force-backend-version" in err and "Traceback" not in err
    )
    assert not calls(kfp_server, "POST", f"{API}/runs")
    assert cli.main(["pipeline", "submit", "--host", kfp_server.url, "--force-backend-version"]) == 0
    assert "submitting anyway" in capsys.readouterr().err and calls(kfp_server, "POST", f"{API}/runs")


def test_an_unreachable_backend_is_one_line(capsys):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cli.main(["pipeline", "submit", "--host", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "Traceback" not in err


def test_a_failed_schedule_update_keeps_the_old_schedule(kfp_server, capsys):
    """The replacement is created before the old one is deleted: when the create fails, the old
    schedule still runs (it used to be deleted first, leaving none)."""
    base = ["pipeline", "schedule", "--host", kfp_server.url, "--name", "nightly", "--cron", "0 0 3 * * *"]
    assert cli.main(base) == 0
    (old_id,) = kfp_server.recurring
    kfp_server.fail_create = True
    assert cli.main(base) != 0
    assert list(kfp_server.recurring) == [old_id]
    assert not calls(kfp_server, "DELETE", f"{API}/recurringruns/{old_id}")
    kfp_server.fail_create = False
    assert cli.main(base) == 0 and len(kfp_server.recurring) == 1 and old_id not in kfp_server.recurring
    capsys.readouterr()


def test_upload_keeps_every_release_as_a_version_and_never_replaces_one(kfp_server, capsys):
    base = ["pipeline", "upload", "--host", kfp_server.url, "--name", "kdpipe"]
    assert cli.main([*base, "--version", "v1.0.0"]) == 0, capsys.readouterr().err
    assert cli.main([*base, "--version", "v1.1.0"]) == 0, capsys.readouterr().err
    (pipeline,) = kfp_server.pipelines.values()  # one pipeline, its versions below it
    names = sorted(
        v["display_name"] for v in kfp_server.versions.values() if v["pipeline_id"] == pipeline["pipeline_id"]
    )
    assert {"v1.0.0", "v1.1.0"} <= set(names)
    uploaded = yaml.safe_load_all(
        next(v for v in kfp_server.versions.values() if v["display_name"] == "v1.1.0")["package"]
    )
    spec = next(uploaded)
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        IMAGE
    }  # by digest

    assert cli.main([*base, "--version", "v1.1.0"]) == 2  # the same name again
    assert "already has a version 'v1.1.0'" in capsys.readouterr().err
    assert sum(v["display_name"] == "v1.1.0" for v in kfp_server.versions.values()) == 1


def test_upload_without_a_version_or_a_tag_says_what_to_do(kfp_server, capsys, tmp_path, monkeypatch):
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    package = ROOT / "pipelines" / "kdpipe_pipeline.yaml"
    monkeypatch.chdir(tmp_path)  # a checkout whose commit has no tag
    assert cli.main(["pipeline", "upload", "--host", kfp_server.url, "--package", str(package)]) == 2
    assert "name the version (--version)" in capsys.readouterr().err
    assert not kfp_server.versions


def test_a_run_is_named_after_its_data_version_and_commit(kfp_server, capsys):
    args = [
        "pipeline",
        "submit",
        "--host",
        kfp_server.url,
        "-S",
        "data_version=2026-12-01",
        "-S",
        "git_commit=" + "ab" * 20,
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    (run,) = calls(kfp_server, "POST", f"{API}/runs")
    assert run["display_name"] == "kdpipe data 2026-12-01 code abababababab"


# --- retrain's use of the API: run an uploaded version, wait for a run (issue 29) ---


def submitted_run(fake: FakeKfp, capsys) -> str:
    assert cli.main(["pipeline", "submit", "--host", fake.url]) == 0, capsys.readouterr().err
    (run_id,) = fake.runs
    return run_id


@pytest.mark.parametrize("final", ["SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"])
def test_waiting_follows_a_run_through_its_states_to_the_final_one(kfp_server, capsys, final):
    """kfp's own wait_for_run_completion does not count CANCELED as final: a canceled run would be
    waited for until the timeout."""
    from kdpipe.pipelines.remote import wait_for_run

    run_id = submitted_run(kfp_server, capsys)
    kfp_server.run_states = ["PENDING", "RUNNING", final]
    assert wait_for_run(kfp_server.url, run_id, poll_s=0) == final
    assert kfp_server.reads[run_id] == 3  # every transition seen, then it stopped asking


def test_waiting_gives_up_at_its_timeout_with_one_line_naming_the_run(kfp_server, capsys):
    from kdpipe.core.errors import KdpipeError
    from kdpipe.pipelines.remote import wait_for_run

    run_id = submitted_run(kfp_server, capsys)
    kfp_server.run_states = ["RUNNING"]
    with pytest.raises(KdpipeError, match=rf"run {run_id} .* did not finish within 0 s \(state RUNNING\)"):
        wait_for_run(kfp_server.url, run_id, timeout_s=0, poll_s=0)
    assert kfp_server.reads[run_id] == 1  # read once before giving up: a finished run is never missed


def test_waiting_survives_a_few_server_errors_but_not_many(kfp_server, capsys):
    from kdpipe.core.errors import KdpipeError
    from kdpipe.pipelines.remote import POLL_RETRIES, wait_for_run

    run_id = submitted_run(kfp_server, capsys)
    kfp_server.read_errors = POLL_RETRIES  # a gateway restarting during hours of waiting
    assert wait_for_run(kfp_server.url, run_id, poll_s=0) == "SUCCEEDED"
    kfp_server.read_errors = POLL_RETRIES + 1
    with pytest.raises(KdpipeError, match=f"failed {POLL_RETRIES + 1} times in a row"):
        wait_for_run(kfp_server.url, run_id, poll_s=0)
    with pytest.raises(KdpipeError, match=r"reading the state of run run-999 failed: 404"):
        wait_for_run(kfp_server.url, "run-999", poll_s=0)  # not a server error: at once


def test_a_poll_without_a_connection_is_worth_another_try():
    """An ingress restarting during hours of waiting refuses connections: such a poll counts like a
    server error (retried), not a traceback."""
    from kdpipe.pipelines.remote import _run_state, client

    fake = FakeKfp()
    with serve(lambda method, path, query, body, headers: fake.handle(method, path, query, body)) as url:
        kfp_client = client(url)  # the client checks the server when it is made
    assert _run_state(kfp_client, "run-1") is None  # the server is gone now


def test_an_uploaded_version_runs_by_reference_not_as_an_inline_package(kfp_server, capsys):
    from kdpipe.core.errors import KdpipeError
    from kdpipe.pipelines.remote import run_version

    upload = ["pipeline", "upload", "--host", kfp_server.url, "--name", "kdpipe", "--version", "v1.2.0"]
    assert cli.main(upload) == 0, capsys.readouterr().err
    (version,) = [v for v in kfp_server.versions.values() if v["display_name"] == "v1.2.0"]
    arguments = {"data_rev": "abc123", "data_repo": "https://ci:ghp_SECRETTOKEN@github.com/o/r.git"}
    run_id = run_version(kfp_server.url, "kdpipe", "v1.2.0", arguments)
    (run,) = calls(kfp_server, "POST", f"{API}/runs")
    assert kfp_server.runs[run_id]["pipeline_version_reference"] == {
        "pipeline_id": version["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert "pipeline_spec" not in run  # the release's package, as uploaded, is what runs
    assert run["runtime_config"]["parameters"] == {
        "data_rev": "abc123",
        "data_repo": "https://github.com/o/r.git",  # credentials never travel
    }
    assert run["display_name"] == "kdpipe data abc123 release v1.2.0"

    with pytest.raises(KdpipeError, match=r"pipeline 'kdpipe' has no version 'v9.9.9'.*pipeline upload"):
        run_version(kfp_server.url, "kdpipe", "v9.9.9", arguments)
    assert len(calls(kfp_server, "POST", f"{API}/runs")) == 1
    capsys.readouterr()


def test_runs_and_schedules_carry_the_service_account_asked_for(kfp_server, capsys):
    """KFP sets a run's service account per run (it is not in the package): submit and schedule send it."""
    host = ["--host", kfp_server.url]
    assert cli.main(["pipeline", "submit", *host, "--service-account", "kdpipe-runner"]) == 0
    assert cli.main(["pipeline", "submit", *host]) == 0
    assert (
        cli.main(["pipeline", "schedule", *host, "--cron", "0 0 3 * * *", "--service-account", "ml-sa"]) == 0
    )
    first, second = calls(kfp_server, "POST", f"{API}/runs")
    assert first["service_account"] == "kdpipe-runner" and not second.get("service_account")
    (recurring,) = calls(kfp_server, "POST", f"{API}/recurringruns")
    assert recurring["service_account"] == "ml-sa"


def test_retrain_takes_the_service_account_from_the_cluster_settings_file(tmp_path):
    from kdpipe.pipelines.remote import _service_account

    (tmp_path / "cluster.yaml").write_text("service_account: kdpipe-runner\n")
    assert _service_account(tmp_path, "cluster.yaml") == "kdpipe-runner"
    assert _service_account(tmp_path, None) is None
