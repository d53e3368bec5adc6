"""A DVC remote over a real S3 API: ``moto_server`` on 127.0.0.1 (started and stopped here, by PID),
``dvc push`` from one repository, ``dvc pull`` into a fresh clone, pulled bytes checked by sha256.

Credentials come from the environment only (fake ones: moto accepts any); nothing secret is written
to the DVC config, which keeps just the bucket URL and the endpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_tiny_dataset
from dvc_repo import DVC, commit, init_repo, repo_env, run

from kdpipe.core.files import file_sha256

pytestmark = pytest.mark.slow

MOTO = Path(sys.executable).parent / "moto_server"
BUCKET = "kdpipe-test"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_endpoint(tmp_path):
    """URL of a moto S3 server on 127.0.0.1; killed (by its PID) when the test ends."""
    if not MOTO.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **FAKE_CREDENTIALS},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start: {(tmp_path / 'moto.log').read_text()}")
                time.sleep(0.2)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_push_and_pull_through_s3_with_hash_check(tmp_path, s3_endpoint):
    import boto3

    env = repo_env(**FAKE_CREDENTIALS)
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)

    origin = init_repo(tmp_path / "origin", env)
    write_tiny_dataset(origin / "data", labeled_per_class=4, unlabeled=30, test_per_class=2, seed=3)
    run([DVC, "add", "-q", "data/labeled", "data/test", "data/unlabeled/batch-0001"], origin, env)
    run([DVC, "remote", "add", "-d", "s3", f"s3://{BUCKET}/dvc-store"], origin, env)
    run([DVC, "remote", "modify", "s3", "endpointurl", s3_endpoint], origin, env)
    config = (origin / ".dvc" / "config").read_text()
    assert "testing-secret-key" not in config and "testing-key-id" not in config
    commit(origin, env, "data")
    run([DVC, "push"], origin, env)
    expected = _tree_hashes(origin / "data")
    assert sum(name.endswith(".png") for name in expected) == 3 * 4 + 3 * 2 + 30

    # the objects really are in the bucket
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    assert len(keys) >= 3 * 4 + 3 * 2 + 30

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "data" / "labeled").exists()
    run([DVC, "pull"], clone, env)
    assert _tree_hashes(clone / "data") == expected
