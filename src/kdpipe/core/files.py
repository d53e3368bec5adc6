"""Small helpers about files that every layer uses: a path as printable text, a file's sha256."""

from __future__ import annotations

import hashlib
import os


def shown(path: str | os.PathLike) -> str:
    """A path as readable text: undecodable bytes become ``\\xNN`` (valid UTF-8, safe in JSON and logs)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks (arrays can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
