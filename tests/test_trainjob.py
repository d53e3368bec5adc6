"""Multi-node distill: the TrainJob manifest (checked against Kubeflow Trainer's API models), its
launch-and-wait against a fake Kubernetes API on 127.0.0.1, the object-store copies, and the node
entry point run for real (torchrun, one node)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from fake_http import serve
from test_s3_remote import s3_endpoint as s3_endpoint  # a fixture, used by name

from kdpipe.core.errors import KdpipeError
from kdpipe.orchestration import objectstore, trainjob

INPUTS = {
    "prepared": "s3://runs/r1/prepare/prepared",
    "augmented": "s3://runs/r1/augment/augmented",
    "teacher": "s3://runs/r1/teacher/teacher_model",
}
ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/team/kdpipe@sha256:" + "0" * 64


def _job(name="kdpipe-distill-run-1", nodes=2):
    return trainjob.manifest(
        name,
        "team-a",
        IMAGE,
        nodes,
        4,
        INPUTS,
        "s3://runs/r1/distill/student.trainjob",
        {"train": {"recipe": "kd"}},
        env={"KDPIPE_EXECUTION_KEY": "run-1"},
    )


def test_the_trainjob_for_two_nodes_validates_against_the_trainer_api():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    job = _job()
    # every field is one the CRD's models know: a round trip through them changes nothing
    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4 and trainer["image"] == IMAGE
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    assert trainer["command"][:2] == ["kdpipe", "distill-node"]
    args = trainer["command"]
    assert args[args.index("--prepared") + 1] == INPUTS["prepared"]
    assert args[args.index("--output") + 1] == "s3://runs/r1/distill/student.trainjob"
    env = {e["name"]: e for e in trainer["env"]}
    assert json.loads(env["KDPIPE_PARAMS_JSON"]["value"]) == {"train": {"recipe": "kd"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "kdpipe-object-store",
        "key": "AWS_SECRET_ACCESS_KEY",
        "optional": True,
    }
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "kdpipe-mlflow"
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]  # credentials by reference only
    with pytest.raises(ValueError, match="nodes > 1"):
        _job(nodes=1)


def test_job_names_are_valid_kubernetes_names_and_stable_per_run():
    name = trainjob.job_name("Run_7f3A/../x" * 10)
    assert len(name) <= 63 and name == name.lower() and name[-1].isalnum()
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert trainjob.job_name("run-1") == trainjob.job_name("run-1")


class FakeKubernetes:
    """TrainJobs in memory; each GET advances a job through ``states`` (its conditions)."""

    def __init__(self, states):
        self.jobs: dict[str, dict] = {}
        self.states = list(states)
        self.requests: list[tuple[str, str]] = []

    def handle(self, method: str, path: str, body):
        prefix = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
        self.requests.append((method, path))
        if method == "POST" and path == prefix:
            name = body["metadata"]["name"]
            if name in self.jobs:
                return 409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
            self.jobs[name] = body
            return 201, body
        if method == "DELETE" and path.startswith(prefix + "/"):
            if self.jobs.pop(path.rsplit("/", 1)[1], None) is None:
                return 404, {"kind": "Status", "code": 404}
            return 200, {"kind": "Status", "status": "Success"}
        if method == "GET" and path.startswith(prefix + "/"):
            if path.rsplit("/", 1)[1] not in self.jobs:
                return 404, {"kind": "Status", "code": 404}
            job = self.jobs[path.rsplit("/", 1)[1]]
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            if state:
                job = {
                    **job,
                    "status": {
                        "conditions": [
                            {
                                "type": state[0],
                                "status": "True",
                                "message": state[1],
                                "reason": state[0],
                                "lastTransitionTime": "2026-12-02T00:00:00Z",
                            }
                        ]
                    },
                }
            return 200, job
        return 404, {"kind": "Status", "code": 404}


@pytest.fixture
def kube():
    holder = {}
    with serve(lambda method, path, query, body, headers: holder["fake"].handle(method, path, body)) as url:

        def api(states):
            from kubernetes import client

            holder["fake"] = FakeKubernetes(states)
            return client.CustomObjectsApi(client.ApiClient(client.Configuration(host=url))), holder["fake"]

        yield api


def test_the_task_launches_the_trainjob_and_waits_until_it_completes(kube):
    api, fake = kube([None, None, ("Complete", "done")])
    sleeps = []
    done = trainjob.run_and_wait(_job(), api, poll_seconds=5, sleep=sleeps.append)
    assert done["status"]["conditions"][0]["type"] == "Complete"
    assert fake.requests[0][0] == "POST" and sleeps == [5, 5]  # polled until the condition came
    assert fake.jobs["kdpipe-distill-run-1"]["spec"]["trainer"]["numNodes"] == 2


def test_a_failed_trainjob_fails_the_task_with_its_message(kube):
    api, _ = kube([("Failed", "node 1: NCCL timeout")])
    with pytest.raises(KdpipeError, match="failed: node 1: NCCL timeout"):
        trainjob.run_and_wait(_job(), api, sleep=lambda s: None)


def test_a_retried_task_waits_for_the_trainjob_its_first_try_created(kube):
    api, fake = kube([None, ("Complete", "")])
    fake.jobs["kdpipe-distill-run-1"] = _job()
    trainjob.run_and_wait(_job(), api, sleep=lambda s: None)
    assert len(fake.jobs) == 1 and [m for m, _ in fake.requests].count("POST") == 1


def test_the_wait_is_bounded(kube):
    api, _ = kube([None])
    with pytest.raises(KdpipeError, match="did not finish in 10 s"):
        trainjob.run_and_wait(_job(), api, poll_seconds=5, timeout_seconds=10, sleep=lambda s: None)


def test_object_store_copies_a_folder_both_ways(tmp_path):
    source = tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    (source / "a.json").write_text("{}")
    (source / "sub" / "b.bin").write_bytes(b"\x00\x01")
    objectstore.put(source, str(tmp_path / "store" / "student"))
    back = objectstore.get(str(tmp_path / "store" / "student"), tmp_path / "back")
    assert (back / "a.json").read_text() == "{}" and (back / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(KdpipeError, match="not found"):
        objectstore.get(str(tmp_path / "store" / "missing"), tmp_path / "x")


@pytest.mark.slow
def test_object_store_over_a_real_s3_api(tmp_path, s3_endpoint, monkeypatch):
    import boto3
    from test_s3_remote import FAKE_CREDENTIALS

    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="runs")
    source = tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    (source / "metrics.json").write_text('{"iterations": 4}')
    (source / "sub" / "w.bin").write_bytes(os.urandom(1000))
    objectstore.put(source, "s3://runs/r1/distill/student.trainjob")
    back = objectstore.get("s3://runs/r1/distill/student.trainjob", tmp_path / "back")
    assert (back / "metrics.json").read_text() == '{"iterations": 4}'
    assert (back / "sub" / "w.bin").read_bytes() == (source / "sub" / "w.bin").read_bytes()


def test_kfp_minio_artifact_uris_are_read_as_s3_at_the_configured_endpoint(
    tmp_path, s3_endpoint, monkeypatch
):
    """KFP's default artifact URIs are minio://bucket/key, which fsspec does not know ("Protocol not
    known: minio"): they are read as S3 at $KDPIPE_MINIO_ENDPOINT (here moto on 127.0.0.1)."""
    import boto3
    from test_s3_remote import FAKE_CREDENTIALS

    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("KDPIPE_MINIO_ENDPOINT", s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="mlpipeline")
    s3.put_object(
        Bucket="mlpipeline", Key="v2/artifacts/kdpipe/run-1/prepare/prepared/manifest.json", Body=b"{}"
    )
    back = objectstore.get("minio://mlpipeline/v2/artifacts/kdpipe/run-1/prepare/prepared", tmp_path / "back")
    assert (back / "manifest.json").read_bytes() == b"{}"
    objectstore.put(back, "minio://mlpipeline/v2/artifacts/kdpipe/run-1/copy")
    assert (
        s3.get_object(Bucket="mlpipeline", Key="v2/artifacts/kdpipe/run-1/copy/manifest.json")["Body"].read()
        == b"{}"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_node_fetches_trains_with_torchrun_and_node_0_uploads(
    tiny_pipeline_dirs, tiny_params_factory, tmp_path, monkeypatch
):
    """The node entry point for real, on one node of one process: torchrun from $PET_* variables,
    inputs from the "object store" (local folders here), outputs uploaded by node 0."""
    import shutil

    d = tiny_pipeline_dirs
    store = tmp_path / "store"
    for name, folder in (
        ("prepared", d["prepared"]),
        ("augmented", d["augmented"]),
        ("teacher", d["teacher"]),
    ):
        shutil.copytree(folder, store / name)
    params = tiny_params_factory(recipe="kd", max_iterations=4, eval_every=2, checkpoint_every=2)
    monkeypatch.setenv("KDPIPE_PARAMS_JSON", json.dumps(params.model_dump(mode="json")))
    for key, value in {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    code = trainjob.distill_node(
        {name: str(store / name) for name in trainjob.INPUTS},
        str(store / "student.trainjob"),
        tmp_path / "node",
    )
    assert code == 0
    metrics = json.loads((store / "student.trainjob" / "metrics.json").read_text())
    assert metrics["iterations"] == 4 and (store / "student.trainjob" / "student.pt").is_file()


def test_a_restarted_node_resumes_from_the_state_claim(
    tiny_pipeline_dirs, tiny_params_factory, tmp_path, monkeypatch, capfd
):
    """With the run's folder on the state claim, a node that runs again (a TrainJob restarted after
    preemption, on fresh scratch space) resumes from the checkpoint there instead of starting over."""
    import shutil

    d = tiny_pipeline_dirs
    store = tmp_path / "store"
    for name in trainjob.INPUTS:
        shutil.copytree(d[name], store / name)
    params = tiny_params_factory(recipe="kd", max_iterations=4, eval_every=2, checkpoint_every=2)
    monkeypatch.setenv("KDPIPE_PARAMS_JSON", json.dumps(params.model_dump(mode="json")))
    for key, value in {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    state = tmp_path / "claim" / "run-1" / "distill"
    inputs = {name: str(store / name) for name in trainjob.INPUTS}
    for attempt in ("first", "restarted"):
        monkeypatch.setenv("PET_MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("PET_MASTER_PORT", str(_free_port()))
        code = trainjob.distill_node(inputs, str(store / "out"), tmp_path / f"scratch-{attempt}", state)
        assert code == 0
    assert (state / "last.pt").is_file() and (state / "student.pt").is_file()
    assert not (tmp_path / "scratch-first" / "student").exists()  # trained on the claim, not in scratch
    assert f"resuming from {state / 'last.pt'} at iteration 4" in capfd.readouterr().out


def test_the_nodes_mount_the_state_claim_use_the_service_account_and_train_in_the_runs_folder():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    from kdpipe.orchestration.cluster import ClusterSettings

    settings = ClusterSettings.model_validate(
        {"state_pvc": "kdpipe-state", "state_mount": "/state", "service_account": "kdpipe-nodes"}
    )
    job = trainjob.manifest(
        "kdpipe-distill-run-4",
        "team-a",
        IMAGE,
        2,
        1,
        INPUTS,
        "s3://runs/r4/out",
        {"train": {}},
        node_settings=settings.node_settings(),
        state_dir="/state/run-4/distill",
    )
    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job
    command = job["spec"]["trainer"]["command"]
    assert command[command.index("--state-dir") + 1] == "/state/run-4/distill"
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert {"name": "kdpipe-state", "persistentVolumeClaim": {"claimName": "kdpipe-state"}} in pod["volumes"]
    assert {"name": "kdpipe-state", "mountPath": "/state"} in pod["containers"][0]["volumeMounts"]
    assert pod["serviceAccountName"] == "kdpipe-nodes"
    # without a claim: nothing mounted, no state folder (the nodes train in their scratch space)
    plain = trainjob.manifest(
        "j", "ns", IMAGE, 2, 1, INPUTS, "s3://o", {}, node_settings=ClusterSettings().node_settings()
    )
    (patch,) = plain["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [v["name"] for v in node["template"]["spec"]["template"]["spec"]["volumes"]] == ["dshm"]
    assert "--state-dir" not in plain["spec"]["trainer"]["command"]


def test_the_nodes_request_the_cluster_settings_gpu_resource():
    job = trainjob.manifest(
        "kdpipe-distill-run-2",
        "team-a",
        IMAGE,
        2,
        1,
        INPUTS,
        "s3://runs/r2/out",
        {"train": {"recipe": "kd"}},
        gpu_resource="nvidia.com/mig-1g.10gb",
    )
    resources = job["spec"]["trainer"]["resourcesPerNode"]
    assert resources["limits"] == resources["requests"] == {"nvidia.com/mig-1g.10gb": "1"}


def test_a_retry_replaces_a_trainjob_that_failed_instead_of_failing_on_it(kube):
    """Every retry of the task used to find the failed TrainJob of the first try and fail at once."""
    api, fake = kube([("Failed", "node 0: preempted"), None, ("Complete", "")])
    fake.jobs["kdpipe-distill-run-1"] = {**_job(), "spec": {**_job()["spec"], "old": True}}
    trainjob.run_and_wait(_job(), api, sleep=lambda s: None)
    methods = [m for m, _ in fake.requests]
    assert methods[:4] == ["POST", "GET", "DELETE", "POST"]  # exists -> failed -> deleted -> created anew
    assert "old" not in fake.jobs["kdpipe-distill-run-1"]["spec"]


def test_a_trainjob_that_outlives_the_wait_is_deleted(kube):
    api, fake = kube([None])
    with pytest.raises(KdpipeError, match="did not finish in 10 s; it was deleted"):
        trainjob.run_and_wait(_job(), api, poll_seconds=5, timeout_seconds=10, sleep=lambda s: None)
    assert fake.jobs == {}  # its nodes no longer hold GPUs


def test_the_nodes_get_the_cluster_settings_a_deadline_and_an_owner():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    from kdpipe.orchestration.cluster import ClusterSettings

    settings = ClusterSettings.model_validate(
        {
            "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            "image_pull_secrets": ["regcred"],
            "pod_labels": {"kueue.x-k8s.io/queue-name": "team-a"},
            "tasks": {"distill": {"timeout_seconds": 7200}},
        }
    )
    job = trainjob.manifest(
        "kdpipe-distill-run-3",
        "team-a",
        IMAGE,
        2,
        4,
        INPUTS,
        "s3://runs/r3/out",
        {"train": {}},
        node_settings=settings.node_settings(),
        owner={"name": "kdpipe-abc-distill", "uid": "1234-5678"},
    )
    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job  # fields the CRD knows
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "kdpipe-abc-distill",
            "uid": "1234-5678",
            "blockOwnerDeletion": False,
        }
    ]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    resources = job["spec"]["trainer"]["resourcesPerNode"]
    assert resources["requests"] == {"nvidia.com/gpu": "4", "cpu": "8", "memory": "32Gi"}
    assert resources["limits"]["memory"] == "96Gi" and resources["limits"]["cpu"] == "16"
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]
    assert node["name"] == "node" and pod["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert pod["spec"]["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]


def test_the_shipped_role_grants_every_call_the_launcher_makes(kube):
    """docs/kubeflow-trainjob-role.yaml: the verbs the launcher's calls need (recorded from a run that
    creates, finds failed, deletes and re-creates a TrainJob), on the Trainer's group and resource."""
    import yaml

    role = next(
        d
        for d in yaml.safe_load_all((ROOT / "docs" / "kubeflow-trainjob-role.yaml").read_text())
        if d["kind"] == "Role"
    )
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [trainjob.GROUP] and rule["resources"] == [trainjob.PLURAL]
    api, fake = kube([("Failed", "x"), None, ("Complete", "")])
    fake.jobs["kdpipe-distill-run-1"] = _job()
    trainjob.run_and_wait(_job(), api, sleep=lambda s: None)
    verbs = {"POST": "create", "GET": "get", "DELETE": "delete"}
    used = {verbs[m] for m, _ in fake.requests}
    assert used == {"create", "get", "delete"} and used <= set(rule["verbs"])
