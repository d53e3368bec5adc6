"""Copy a folder to and from object storage (S3 and S3-compatible stores, GCS, Azure, or a local
path) through fsspec: how the nodes of a multi-node TrainJob share the pipeline's artifacts.

Credentials come from the environment as each store's own library reads them (``AWS_ACCESS_KEY_ID``
...); an S3-compatible endpoint from ``AWS_ENDPOINT_URL``. KFP names its default artifact store's
objects ``minio://bucket/key``, a scheme fsspec does not know: those are read as S3 at
``$KDPIPE_MINIO_ENDPOINT`` (else ``AWS_ENDPOINT_URL``, else KFP's in-cluster MinIO service).
"""

from __future__ import annotations

import os
from pathlib import Path

from kdpipe.core.errors import KdpipeError

MINIO_ENDPOINT_ENV = "KDPIPE_MINIO_ENDPOINT"
KFP_MINIO = "http://minio-service.kubeflow:9000"  # the MinIO a stock Kubeflow Pipelines install runs
# artifact URI schemes that are S3 under another name (KFP writes minio:// for its own MinIO)
S3_ALIASES = ("minio",)


def _filesystem(uri: str):
    """The fsspec filesystem for ``uri`` and the URI as that filesystem names it."""
    import fsspec

    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if protocol in S3_ALIASES:
        endpoint = os.environ.get(MINIO_ENDPOINT_ENV, "").strip() or endpoint or KFP_MINIO
        uri, protocol = "s3://" + uri.split("://", 1)[1], "s3"
    if protocol == "s3" and endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        return fsspec.filesystem(protocol, **options), uri
    except (ImportError, ValueError) as exc:
        hint = "; install its driver (pip install 'kdpipe[cloud]')" if isinstance(exc, ImportError) else ""
        raise KdpipeError(f"{uri}: no filesystem for {protocol!r} ({exc}){hint}") from None


def get(uri: str, local_dir: str | os.PathLike) -> Path:
    """Download the folder at ``uri`` into ``local_dir`` (created); returns ``local_dir``."""
    fs, uri = _filesystem(uri)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    if not fs.exists(uri):
        raise KdpipeError(f"{uri}: not found in the object store")
    for source in fs.find(uri):
        relative = source[len(fs._strip_protocol(uri)) :].lstrip("/")
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(source, str(target))
    return local


def put(local_dir: str | os.PathLike, uri: str) -> None:
    """Upload every file under ``local_dir`` to the folder ``uri``."""
    fs, uri = _filesystem(uri)
    base = fs._strip_protocol(uri).rstrip("/")
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            target = f"{base}/{path.relative_to(local_dir).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), target)
