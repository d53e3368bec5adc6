"""The ``data`` step: materialize one DVC revision of the data folder into a plain folder.

The first task of the Kubeflow pipeline: it reads ``labeled/``, ``unlabeled/`` and ``test/`` of the
data folder at git revision ``rev`` of the DVC project ``repo`` (URL or path) through DVC's
filesystem, from the DVC remote ``remote`` with ``remote_config`` overrides, writes them atomically
under ``out_dir`` and returns the resolved commit and file count. Credentials come only from the
environment (``$KDPIPE_GIT_TOKEN`` for a private git repository); printed URLs are redacted.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

from kdpipe.core.atomic import atomic_dir
from kdpipe.core.errors import DataError, KdpipeError

SPLITS = ("labeled", "unlabeled", "test")
GIT_TOKEN_ENV = "KDPIPE_GIT_TOKEN"
GIT_USER_ENV = "KDPIPE_GIT_USERNAME"


def with_git_credentials(repo: str) -> str:
    """``repo`` with the token of ``$KDPIPE_GIT_TOKEN`` for an HTTPS URL that carries none."""
    import urllib.parse

    token = os.environ.get(GIT_TOKEN_ENV, "").strip()
    parts = urllib.parse.urlsplit(repo)
    if not token or parts.scheme not in ("https", "http") or "@" in parts.netloc:
        return repo
    user = os.environ.get(GIT_USER_ENV, "").strip() or "oauth2"
    userinfo = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(token, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


def run(
    params,
    out_dir: str | os.PathLike,
    repo: str,
    rev: str = "HEAD",
    remote: str | None = None,
    remote_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from dvc.api import DVCFileSystem

    from kdpipe.orchestration.tracking import is_secret_key, redact

    remote_config = dict(remote_config or {})
    secret = sorted(k for k in remote_config if is_secret_key(k) or "password" in k.lower())
    if secret:
        raise KdpipeError(
            f"DVC remote settings {secret}: credentials are read from the environment "
            "(a Kubernetes secret), never from pipeline parameters"
        )
    if not repo:
        raise KdpipeError(
            "data: no repository given (the git URL or path of the DVC project holding the data)"
        )
    if remote_config and not remote:
        remote = "kdpipe"  # DVC needs a remote name to attach settings to
    root = PurePosixPath(params.data.root).as_posix().strip("/") or "."
    try:
        fs = DVCFileSystem(
            with_git_credentials(repo),
            rev=rev or None,
            remote=remote or None,
            remote_config=remote_config or None,
        )
        commit = fs.repo.scm.get_rev()
        present = [s for s in SPLITS if fs.isdir(f"{root}/{s}")]
        if "labeled" not in present:
            raise DataError(f"{redact(repo)}@{rev}: no {root}/labeled folder at this revision")
        with atomic_dir(out_dir) as tmp:
            for split in present:
                fs.get(f"{root}/{split}", os.fspath(tmp / split), recursive=True)
            files = sum(len(names) for _, _, names in os.walk(tmp))
    except KdpipeError:
        raise
    except Exception as exc:  # dvc/scmrepo raise many types; name the source, hide URL credentials
        raise KdpipeError(
            f"data: cannot read {root} of {redact(repo)} at {rev!r}: {redact(str(exc))}"
        ) from None
    print(f"data: {files} files of {root}/ at {redact(repo)}@{rev} ({commit[:12]}) -> {out_dir}")
    return {"repo": redact(repo), "rev": rev, "commit": commit, "files": files, "splits": present}
