"""The CPU image, built for real with buildah from a local Debian base, and kdpipe run inside it as
the non-root user: `kdpipe --version`, the prepare step on a tiny data set, and object storage over
a real S3 API (`dvc pull` from an s3:// remote and a KFP-style minio:// artifact read through
kdpipe's objectstore, both served by moto_server on the host's 127.0.0.1).

Builds take minutes, so this test runs only when asked: `make test-image` (pytest -m image). It needs
buildah (and debootstrap the first time, to make the local base image). With TORCH_INDEX_URL (PyTorch's
CPU wheel index) the image gets CPU-only torch, as the release builds do; without it (a machine that
reaches only the default index) the same target installs torch's default wheels, CUDA libraries
included. Measured build times and sizes: BENCHMARKS.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_s3_remote import FAKE_CREDENTIALS  # moto accepts any; given to the container as environment
from test_s3_remote import s3_endpoint as s3_endpoint  # a fixture, used by name

# The first test also pays for the image build (the module fixture), which took about 15 minutes on
# two cores: the suite-wide 900 s limit would cut it off, so these tests get the build's own bound.
pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/debian-base:bookworm"
TAG = "localhost/kdpipe-test:cpu"


def _run(cmd: list[str], timeout: float = 3600, **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, (
        f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def _local_base(tmp_path: Path) -> None:
    """Debian 12 minbase as a local image (base images cannot be pulled here)."""
    if subprocess.run(["buildah", "inspect", "--type", "image", BASE], capture_output=True).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        pytest.skip(f"no {BASE} image and no debootstrap to make it")
    rootfs = tmp_path / "rootfs"
    _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)])
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    _run(["podman", "import", "-", BASE], stdin=tar.stdout)


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory):
    if not shutil.which("buildah"):
        pytest.skip("buildah is not installed (apt-get install buildah)")
    index = os.environ.get("TORCH_INDEX_URL", "").strip()
    _local_base(tmp_path_factory.mktemp("base"))
    cmd = [
        "buildah",
        "bud",
        "--isolation=chroot",
        "--layers",
        "--target",
        "cpu",
        "--build-arg",
        f"BASE_IMAGE={BASE}",
        "--build-arg",
        f"TORCH_INDEX_URL={index}",
        "-t",
        TAG,
    ]
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():
        cmd += ["--secret", f"id=ca,src={ca}"]  # pip behind a TLS-intercepting proxy; never in a layer
    started = time.monotonic()
    _run([*cmd, "."], cwd=ROOT)
    seconds = time.monotonic() - started
    size = json.loads(_run(["buildah", "inspect", "--type", "image", TAG]))["Docker"].get("Size")
    print(f"\ncpu image built in {seconds:.0f} s")  # recorded in BENCHMARKS.md
    container = _run(["buildah", "from", TAG]).strip()
    yield {"container": container, "build_s": seconds, "size": size, "cpu_torch": bool(index)}
    subprocess.run(["buildah", "rm", container], capture_output=True)


def _inside(image, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``args`` in the image's container as its user; ``env`` is set for this command only."""
    flags = [f"--env={key}={value}" for key, value in (env or {}).items()]
    return _run(
        ["buildah", "run", "--isolation=chroot", *flags, image["container"], "--", *args], timeout=900
    )


def test_kdpipe_runs_in_the_image_as_the_non_root_user(cpu_image):
    assert _inside(cpu_image, "id", "-u").strip() == "10001"
    assert _inside(cpu_image, "kdpipe", "--version").strip().endswith("0.1.0")
    versions = _inside(
        cpu_image,
        "python",
        "-c",
        "import torch, onnxruntime; print(torch.__version__, torch.version.cuda, onnxruntime.__version__)",
    )
    torch_version, cuda, ort = versions.split()
    assert torch_version.startswith("2.14.1")
    if cpu_image["cpu_torch"]:
        assert cuda == "None"  # CPU-only torch: no CUDA libraries
    pins = dict(
        line.split("==")
        for line in (ROOT / "docker" / "requirements-cpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert ort == pins["onnxruntime"]  # installed as pinned


def test_the_prepare_step_runs_in_the_image_on_tiny_data(cpu_image, tmp_path):
    from conftest import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data", labeled_per_class=4, unlabeled=6, test_per_class=2, seed=5)
    (tmp_path / "params.yaml").write_text("prepare:\n  image_size: 16\n")
    _run(
        [
            "buildah",
            "copy",
            "--chown",
            "10001:10001",
            cpu_image["container"],
            str(tmp_path),
            "/home/kdpipe/work/tiny",
        ]
    )
    _inside(
        cpu_image,
        "sh",
        "-c",
        "cd /home/kdpipe/work/tiny && kdpipe prepare --params params.yaml --reports-dir reports",
    )
    manifest = json.loads(
        _inside(cpu_image, "cat", "/home/kdpipe/work/tiny/artifacts/prepared/manifest.json")
    )
    assert manifest["class_names"] == ["blue", "green", "red"]
    assert manifest["counts"]["unlabeled"] == 6 and manifest["counts"]["test"] == 6


# ---- object storage inside the image: moto_server on the host, reached over 127.0.0.1 ------------
# `buildah run --isolation=chroot` shares the host's network namespace, so a server the test binds
# to the host's 127.0.0.1 answers inside the container at the same address.

DVC_BUCKET = "kdpipe-dvc"
KFP_BUCKET = "mlpipeline"  # the bucket a stock Kubeflow Pipelines install writes its artifacts to
KFP_ARTIFACT = "v2/artifacts/kdpipe/run-0001/distill/model"


def _sha256s(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# prints {relative path: sha256} of every file under the folder given as argv[1], as JSON
HASH_TREE = (
    "import hashlib, json, pathlib, sys; root = pathlib.Path(sys.argv[1]); "
    "print(json.dumps({p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() "
    "for p in sorted(root.rglob('*')) if p.is_file()}))"
)


def test_dvc_pull_and_a_minio_artifact_over_s3_inside_the_image(cpu_image, s3_endpoint, tmp_path):
    """Needs the image's object-store drivers. Checked on a copy of the image with dvc-s3 and s3fs
    uninstalled, this test fails at its `buildah run` with, from `dvc pull`: "ERROR: unexpected
    error - s3 is supported, but requires 'dvc-s3' to be installed: No module named 'dvc_s3'"; and,
    with the pull skipped, from the artifact read: "KdpipeError: s3://mlpipeline/v2/artifacts/...:
    no filesystem for 's3' (Install s3fs to access S3); install its driver (pip install
    'kdpipe[cloud]')"."""
    import boto3
    from dvc_repo import DVC, commit, init_repo, repo_env, run

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket=DVC_BUCKET)
    s3.create_bucket(Bucket=KFP_BUCKET)

    # on the host: a DVC project whose remote is the moto bucket; its data pushed there
    env = repo_env(**FAKE_CREDENTIALS)
    origin = init_repo(tmp_path / "origin", env)
    data = origin / "data"
    (data / "labeled" / "red").mkdir(parents=True)
    (data / "labeled" / "red" / "a.bin").write_bytes(bytes(range(256)) * 3)
    (data / "labeled" / "red" / "b.bin").write_bytes(hashlib.sha256(b"b").digest() * 50)
    (data / "notes.txt").write_text("pulled through S3 inside the image\n")
    run([DVC, "add", "-q", "data"], origin, env)
    run([DVC, "remote", "add", "-d", "store", f"s3://{DVC_BUCKET}/dvc-store"], origin, env)
    run([DVC, "remote", "modify", "store", "endpointurl", s3_endpoint], origin, env)
    commit(origin, env, "data on an s3 remote")
    run([DVC, "push", "-q"], origin, env)
    expected_data = _sha256s(data)
    assert len(expected_data) == 3

    # a KFP output artifact (a folder), laid out under the key KFP gives it in its bucket
    artifact = {"model.onnx": bytes(range(255, -1, -1)) * 8, "meta/info.json": b'{"k": 1}'}
    for name, blob in artifact.items():
        s3.put_object(Bucket=KFP_BUCKET, Key=f"{KFP_ARTIFACT}/{name}", Body=blob)
    expected_artifact = {name: hashlib.sha256(blob).hexdigest() for name, blob in artifact.items()}

    # into the container: a fresh clone (no data, no DVC cache), owned by the image's user
    stage = tmp_path / "stage"
    stage.mkdir()
    run(["git", "clone", "-q", str(origin), str(stage / "project")], tmp_path, env)
    assert not (stage / "project" / "data").exists()
    work = "/home/kdpipe/work/s3check"
    _run(["buildah", "copy", "--chown", "10001:10001", cpu_image["container"], str(stage), work])

    inside_env = {**FAKE_CREDENTIALS, "KDPIPE_MINIO_ENDPOINT": s3_endpoint, "DVC_NO_ANALYTICS": "1"}
    _inside(cpu_image, "sh", "-c", f"cd {work}/project && dvc pull", env=inside_env)
    pulled = json.loads(_inside(cpu_image, "python", "-c", HASH_TREE, f"{work}/project/data"))
    assert pulled == expected_data

    _inside(
        cpu_image,
        "python",
        "-c",
        "import sys; from kdpipe.orchestration.objectstore import get; get(sys.argv[1], sys.argv[2])",
        f"minio://{KFP_BUCKET}/{KFP_ARTIFACT}",
        f"{work}/artifact",
        env=inside_env,
    )
    read = json.loads(_inside(cpu_image, "python", "-c", HASH_TREE, f"{work}/artifact"))
    assert read == expected_artifact
