"""The CPU image, built for real with buildah from a local Debian base, and kdpipe run inside it as
the non-root user: `kdpipe --version` and the prepare step on a tiny data set.

Builds take minutes, so this test runs only when asked: `make test-image` (pytest -m image). It needs
buildah (and debootstrap the first time, to make the local base image). With TORCH_INDEX_URL (PyTorch's
CPU wheel index) the image gets CPU-only torch, as the release builds do; without it (a machine that
reaches only the default index) the same target installs torch's default wheels, CUDA libraries
included. Measured build times and sizes: BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.image

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


def _inside(image, *args: str) -> str:
    return _run(["buildah", "run", "--isolation=chroot", image["container"], "--", *args], timeout=900)


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
