"""kdpipe.orchestration.cluster and the Kubeflow task helpers: image references, backend versions, cluster
settings files, and the register task's choice of registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe.core.errors import KdpipeError
from kdpipe.core.params import RegisterParams
from kdpipe.orchestration import cluster, kubeflow

DIGEST = "sha256:" + "ab" * 32

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "ref, registry",
    [
        ("kdpipe:0.1.0", None),
        ("team/kdpipe:1", None),
        (f"ghcr.io/team/kdpipe@{DIGEST}", "ghcr.io"),
        ("registry.example.com:5000/kdpipe:1", "registry.example.com:5000"),
        ("localhost/kdpipe:1", "localhost"),
    ],
)
def test_image_registry(ref, registry):
    assert cluster.image_registry(ref) == registry


def test_a_cluster_image_needs_a_registry_and_a_digest():
    good = f"ghcr.io/team/kdpipe@{DIGEST}"
    assert cluster.check_image_for_cluster(good) == good
    with pytest.raises(KdpipeError, match="names no registry"):
        cluster.check_image_for_cluster("kdpipe:0.1.0")
    with pytest.raises(KdpipeError, match="not pinned by digest"):
        cluster.check_image_for_cluster("ghcr.io/team/kdpipe:latest")
    with pytest.raises(KdpipeError, match="not pinned by digest"):
        cluster.check_image_for_cluster("ghcr.io/team/kdpipe@sha256:abc")  # not a sha256


@pytest.mark.parametrize(
    "text, version",
    [("2.15.0", (2, 15, 0)), ("v2.14.2-rc.1", (2, 14, 2)), ("2.5", (2, 5, 0)), ("", None), ("dev", None)],
)
def test_parse_version(text, version):
    assert cluster.parse_version(text) == version


def test_an_older_backend_is_refused_in_one_line():
    assert cluster.check_backend_version("2.15.1", "https://kfp") == (2, 15, 1)
    assert cluster.check_backend_version(None, "https://kfp") is None  # the server does not say
    with pytest.raises(KdpipeError) as err:
        cluster.check_backend_version("2.14.0", "https://kfp")
    assert "older than 2.15.0" in str(err.value) and "--backend-version 2.14.0" in str(err.value)


def test_cluster_settings_merge_a_file_into_the_defaults(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("tasks:\n  distill:\n    retries: 5\n")
    settings = cluster.load_cluster_settings(path)
    assert settings.task("distill").retries == 5
    assert settings.task("distill").memory_request == cluster.ClusterSettings().task("distill").memory_request
    assert settings.task("register").retries == 0 and settings.gpu_node_selector == {}
    path.write_text("gpu_node_selektor: {a: b}\n")
    with pytest.raises(KdpipeError, match="cluster.yaml: invalid cluster settings"):
        cluster.load_cluster_settings(path)
    with pytest.raises(KdpipeError, match="cannot read"):
        cluster.load_cluster_settings(tmp_path / "missing.yaml")


def test_register_task_fails_without_a_tracking_server_when_one_is_expected(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(KdpipeError, match="kdpipe-mlflow"):
        kubeflow.registry_for_task(RegisterParams(), str(tmp_path / "decision"), require_tracking_server=True)
    assert not (tmp_path / "decision").exists()
    # kdpipe pipeline run-local: a registry in the task's own output
    local = RegisterParams()
    kubeflow.registry_for_task(local, str(tmp_path / "decision"), require_tracking_server=False)
    assert local.tracking_uri == f"sqlite:///{tmp_path / 'decision'}/mlflow.db"
    # with a server (the secret's variable, or the params) nothing changes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    served = RegisterParams()
    kubeflow.registry_for_task(served, str(tmp_path / "d2"), require_tracking_server=True)
    assert served.tracking_uri is None


def test_a_private_data_repository_gets_the_token_only_inside_the_data_step(monkeypatch):
    from kdpipe.orchestration.tracking import redact
    from kdpipe.steps.fetch import with_git_credentials

    url = "https://git.example.com/team/data.git"
    monkeypatch.delenv("KDPIPE_GIT_TOKEN", raising=False)
    assert with_git_credentials(url) == url
    monkeypatch.setenv("KDPIPE_GIT_TOKEN", "t0k/en")
    assert with_git_credentials(url) == "https://oauth2:t0k%2Fen@git.example.com/team/data.git"
    monkeypatch.setenv("KDPIPE_GIT_USERNAME", "ci-bot")
    assert with_git_credentials(url).startswith("https://ci-bot:t0k%2Fen@")
    assert "t0k" not in redact(with_git_credentials(url))
    # a URL that carries credentials, an SSH URL and a local path are left as they are
    for other in ("https://me:pw@git.example.com/d.git", "git@git.example.com:team/d.git", "/srv/data-repo"):
        assert with_git_credentials(other) == other


def test_a_task_given_a_gpu_fails_loudly_when_cuda_is_unusable(monkeypatch):
    import torch

    from kdpipe.training.devices import resolve_device

    if torch.cuda.is_available():
        pytest.skip("CUDA works here: the failure needs a machine where it does not")
    monkeypatch.delenv("KDPIPE_EXPECT_GPU", raising=False)
    assert resolve_device("auto").type == "cpu"  # no GPU expected: the CPU is fine
    monkeypatch.setenv("KDPIPE_EXPECT_GPU", "1")
    with pytest.raises(KdpipeError, match="given a GPU .* CUDA is unusable"):
        resolve_device("auto")
    assert resolve_device("cpu").type == "cpu"  # an explicit choice of the CPU is respected


def test_a_retried_distill_pod_finds_its_run_state_on_the_state_volume(tmp_path):
    volume = tmp_path / "kdpipe-state"
    first = kubeflow.resumable_dir(str(volume), "run-7f3a", "distill")
    (first / "last.pt").write_bytes(b"state at iteration 150")
    retried = kubeflow.resumable_dir(str(volume), "run-7f3a", "distill")
    assert retried == first and (retried / "last.pt").read_bytes() == b"state at iteration 150"
    assert kubeflow.resumable_dir(str(volume), "run-8b1c", "distill") != first  # another run starts afresh
    assert kubeflow.resumable_dir(str(volume), "../../etc", "distill").is_relative_to(volume)
    assert kubeflow.resumable_dir("", "run-7f3a", "distill") is None  # no volume: the pod's own folder
    with pytest.raises(ValueError, match="execution key"):
        kubeflow.resumable_dir(str(volume), "", "distill")
    out = tmp_path / "student"
    kubeflow.publish(first, str(out))
    assert (out / "last.pt").read_bytes() == b"state at iteration 150"
    kubeflow.publish(out, str(out))  # the same folder: nothing to do


@pytest.mark.parametrize("image", ["cpu", "gpu"])
def test_both_images_hold_the_object_store_drivers(image):
    """With an s3://, gs:// or azure:// DVC remote the data task failed at once ("s3 is supported, but
    requires 'dvc-s3'"): both lock files pin DVC's plugins and fsspec's drivers for the three stores."""
    pins = {
        line.split("==")[0]
        for line in (ROOT / "docker" / f"requirements-{image}.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert {"dvc-s3", "s3fs", "dvc-gs", "gcsfs", "dvc-azure", "adlfs"} <= pins
