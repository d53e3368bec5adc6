"""``kdpipe ingest SRC``: add new unlabeled images to the data set as an append-only batch folder.

Each run that finds something new writes ONE folder ``<data root>/unlabeled/batch-NNNN-HHHHHHHH/``
(the next number, 8 hex digits of the content hash) and, inside a DVC repository, runs ``dvc add``
on it. Files are checked with ``prepare``'s rules; escaping or broken symlinks and non-regular files
are rejected; exact duplicates (sha256) of files already in the data set are skipped. A lock on the
data root makes ingests take turns, a batch is renamed into place only when complete, and each
batch lists what was added, skipped and rejected in ``.ingest.json``.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe import __version__
from kdpipe.core.atomic import OUTPUT_ERRNOS, fsync_dir, normal_mode, write_error
from kdpipe.core.errors import DataError, KdpipeError
from kdpipe.core.files import file_sha256
from kdpipe.core.params import PrepareParams
from kdpipe.core.progress import Progress
from kdpipe.data.imaging import RejectedImage, validate_image
from kdpipe.data.walk import Walker, shown, skipped

BATCH_PATTERN = re.compile(r"^batch-(\d{4,})(?:-[0-9a-f]{8})?$")
INDEX_NAME = ".ingest.json"
LOCK_NAME = ".ingest.lock"
TMP_PREFIX = ".ingest-"
TMP_SUFFIX = ".tmp"
SPLITS = ("labeled", "test", "unlabeled")


@dataclass
class IngestResult:
    """What one ingest did. Paths are relative to SRC (``source``) or to the data root (``path``)."""

    batch: str | None = None  # "unlabeled/batch-0002-1a2b3c4d", or None when nothing was added
    added: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    tracked: list[str] = field(default_factory=list)  # batch folders given a .dvc file by this run
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "counts": {
                "added": len(self.added),
                "skipped": len(self.skipped),
                "rejected": len(self.rejected),
            },
            "added": self.added,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "tracked": self.tracked,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------- entry point


def ingest(
    src: str | os.PathLike,
    data_root: str | os.PathLike,
    cfg: PrepareParams,
    *,
    use_dvc: bool = True,
    lock_timeout: float = 600.0,
    progress: bool = True,
) -> IngestResult:
    """Add the new, valid images under ``src`` as the next batch folder of ``data_root``."""
    from filelock import FileLock, Timeout

    started = time.monotonic()
    src, root = Path(src), Path(data_root)
    _check_folders(src, root)
    unlabeled = root / "unlabeled"
    lock_path = root / LOCK_NAME
    try:
        with FileLock(str(lock_path), timeout=lock_timeout):
            unlabeled.mkdir(exist_ok=True)
            _remove_stale_temps(unlabeled)
            result = _ingest_locked(src, root, cfg, progress)
            if use_dvc:
                result.tracked = _dvc_track(root, result)
    except OSError as exc:  # a read-only or full data folder: one line, nothing half-added
        if exc.errno in OUTPUT_ERRNOS:
            raise write_error(exc.filename or unlabeled, exc) from None
        raise
    except Timeout:
        raise KdpipeError(
            f"{lock_path}: another ingest has held this lock for over {lock_timeout:.0f} s; "
            "wait for it to finish (or raise --lock-timeout)"
        ) from None
    result.seconds = time.monotonic() - started
    return result


def _check_folders(src: Path, root: Path) -> None:
    if not src.exists():
        raise DataError(f"{src}: source folder not found")
    if not src.is_dir():
        raise DataError(f"{src}: not a folder; ingest takes a folder of images (put single files in one)")
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (expected a folder with labeled/, unlabeled/, test/)")
    src_real, root_real = src.resolve(), root.resolve()
    if src_real.is_relative_to(root_real):
        raise DataError(
            f"{src}: the source folder is inside the data root {root}; its images are already there"
        )
    if root_real.is_relative_to(src_real):
        raise DataError(
            f"{src}: the source folder contains the data root {root}; choose the folder of new images"
        )


def _ingest_locked(src: Path, root: Path, cfg: PrepareParams, show_progress: bool) -> IngestResult:
    result = IngestResult()
    candidates = _scan_source(src, result)
    known, warnings = _known_hashes(root)
    result.warnings += warnings
    unlabeled = root / "unlabeled"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=unlabeled))
    try:
        files = _copy_new(src, candidates, known, tmp, cfg, result, show_progress)
        result.rejected.sort(key=lambda e: e["source"])
        if not files:
            return result  # nothing new: no batch folder at all
        name = _next_batch_name(unlabeled, files)
        result.batch = f"unlabeled/{name}"
        for entry in result.added:
            entry["path"] = f"unlabeled/{name}/{entry['source']}"
        index = {
            "batch": name,
            "source": shown(src.resolve().name),  # a name only: no machine path goes into the data set
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kdpipe_version": __version__,
            "files": files,
            "skipped": result.skipped,
            "rejected": result.rejected,
        }
        (tmp / INDEX_NAME).write_text(
            json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        os.sync()  # every copied file is on disk before the batch becomes visible under its name
        normal_mode(tmp)  # mkdtemp made it owner-only; the batch is data everyone may read
        os.replace(tmp, unlabeled / name)
        fsync_dir(unlabeled)
        return result
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the source folder


def _scan_source(src: Path, result: IngestResult) -> list[tuple[str, Path]]:
    """(relative path, file) for every candidate under ``src``, each real file once (the shared
    :class:`kdpipe.data.walk.Walker`: loops, escaping or broken links and special files are rejected).

    The relative path is the readable form (:func:`kdpipe.data.walk.shown`): a name that is not UTF-8 is
    stored in the batch under its ``\\xNN`` spelling, which every tool (DVC, git, JSON) can carry."""

    def reject(path: Path, reason: str, detail: str) -> None:
        if reason == "symlink_outside_root":
            reason, detail = (
                "escapes_source",
                f"symlink to {shown(os.readlink(path))} points outside the source folder",
            )
        result.rejected.append(
            {"source": shown(path.relative_to(src).as_posix()), "reason": reason, "detail": detail}
        )

    walker = Walker(src, reject)
    return [(shown(path.relative_to(src).as_posix()), path) for path in walker.files_under(src)]


def _copy_new(
    src: Path,
    candidates: list[tuple[str, Path]],
    known: dict[str, str],
    tmp: Path,
    cfg: PrepareParams,
    result: IngestResult,
    show_progress: bool,
) -> dict[str, dict[str, Any]]:
    """Copy each new, valid candidate into ``tmp``; returns {name in batch: {sha256, size}}."""
    files: dict[str, dict[str, Any]] = {}
    in_source: dict[str, str] = {}
    bar = Progress(len(candidates), "ingest: checking images", enabled=show_progress)
    try:
        for rel, path in candidates:
            bar.update(1)
            try:
                digest = file_sha256(path)
            except OSError as exc:
                result.rejected.append(
                    {
                        "source": rel,
                        "reason": "unreadable",
                        "detail": f"cannot read the file: {exc.strerror or exc}",
                    }
                )
                continue
            if digest in known:
                result.skipped.append(
                    {
                        "source": rel,
                        "reason": "duplicate",
                        "detail": f"same bytes as {known[digest]} (already in the data set)",
                    }
                )
                continue
            if digest in in_source:
                result.skipped.append(
                    {
                        "source": rel,
                        "reason": "duplicate",
                        "detail": f"same bytes as {in_source[digest]} (earlier in the source folder)",
                    }
                )
                continue
            copy = tmp / rel
            copy.parent.mkdir(parents=True, exist_ok=True)
            # The copy is what gets checked and hashed: the stored bytes are the validated bytes even if
            # the source file changes meanwhile.
            try:
                shutil.copyfile(path, copy)
                digest = file_sha256(copy)
                validate_image(copy, cfg)
            except RejectedImage as exc:
                copy.unlink(missing_ok=True)
                result.rejected.append({"source": rel, "reason": exc.reason, "detail": exc.detail})
                continue
            except OSError as exc:
                copy.unlink(missing_ok=True)
                if exc.errno in OUTPUT_ERRNOS and str(exc.filename) != str(path):
                    raise  # writing the copy failed (full or read-only disk): stop, add nothing
                result.rejected.append(
                    {
                        "source": rel,
                        "reason": "unreadable",
                        "detail": f"cannot read the file: {exc.strerror or exc}",
                    }
                )
                continue
            if digest in known or digest in in_source:  # the file changed while it was being read
                copy.unlink()
                result.skipped.append(
                    {"source": rel, "reason": "duplicate", "detail": "same bytes as a known file"}
                )
                continue
            in_source[digest] = rel
            files[rel] = {"sha256": digest, "size": copy.stat().st_size}
            result.added.append({"source": rel, "sha256": digest})
    finally:
        bar.close()
    return files


# ---------------------------------------------------------------- the data set


def _known_hashes(root: Path) -> tuple[dict[str, str], list[str]]:
    """{sha256: path relative to the data root} of every file already in the data set."""
    known: dict[str, str] = {}
    warnings: list[str] = []
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if skipped(entry):
                continue
            if split == "unlabeled" and entry.is_dir() and BATCH_PATTERN.match(entry.name):
                _batch_hashes(root, entry, known)
            elif entry.is_dir():
                _hash_tree(root, entry, known)
            elif entry.is_file() and not entry.name.endswith(".dvc"):
                known.setdefault(file_sha256(entry), entry.relative_to(root).as_posix())
    unlabeled = root / "unlabeled"
    if unlabeled.is_dir():
        for dvc_file in sorted(unlabeled.glob("batch-*.dvc")):
            if not dvc_file.with_suffix("").exists():
                warnings.append(
                    f"{dvc_file.with_suffix('')}: tracked by DVC but not in the workspace (run `dvc pull`); "
                    "duplicates of its images cannot be detected"
                )
    return known, warnings


def _batch_hashes(root: Path, batch: Path, known: dict[str, str]) -> None:
    """Hashes of a batch folder from its ``.ingest.json`` when the files still match it (name and
    size), else from the files themselves."""
    index_path = batch / INDEX_NAME
    files = _visible_files(batch)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))["files"]
        matches = set(index) == set(files) and all(files[n].stat().st_size == index[n]["size"] for n in index)
    except (OSError, ValueError, KeyError, TypeError):
        matches = False
    if matches:
        for name, entry in sorted(index.items()):
            known.setdefault(entry["sha256"], f"{batch.relative_to(root).as_posix()}/{name}")
    else:
        _hash_tree(root, batch, known)


def _hash_tree(root: Path, folder: Path, known: dict[str, str]) -> None:
    for _rel, path in sorted(_visible_files(folder).items()):
        try:
            known.setdefault(file_sha256(path), shown(path.relative_to(root).as_posix()))
        except OSError:
            continue  # unreadable: prepare rejects it; it cannot be matched anyway


def _visible_files(folder: Path) -> dict[str, Path]:
    """{relative path: file} under ``folder``: the files prepare reads there (the same walk, whose
    reports about links and odd files are prepare's to make, not the duplicate check's)."""
    walker = Walker(folder, report=lambda path, reason, detail: None)
    return {path.relative_to(folder).as_posix(): path for path in walker.files_under(folder)}


def _next_batch_name(unlabeled: Path, files: dict[str, dict[str, Any]]) -> str:
    """batch-NNNN-<hash> after the highest number in use, counting .dvc files whose folder was not pulled.

    The number keeps batches in order; the suffix (from the content hashes of the batch) keeps two
    branches that each ingest different images from both creating ``batch-NNNN.dvc``, so their
    merge never conflicts.
    """
    numbers = [0]
    for entry in unlabeled.iterdir():
        name = entry.name[:-4] if entry.name.endswith(".dvc") else entry.name
        if match := BATCH_PATTERN.match(name):
            numbers.append(int(match.group(1)))
    content = hashlib.sha256("\n".join(sorted(f["sha256"] for f in files.values())).encode()).hexdigest()
    return f"batch-{max(numbers) + 1:04d}-{content[:8]}"


def _remove_stale_temps(unlabeled: Path) -> None:
    """Temporary folders of killed ingests (only ever touched under the lock, so none is live)."""
    for entry in unlabeled.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry.name.endswith(TMP_SUFFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------- DVC


def find_dvc_root(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` holding a ``.dvc/`` folder, or None."""
    for folder in (path.resolve(), *path.resolve().parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_executable() -> str:
    """``dvc`` from this interpreter's environment when installed there, else from PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def _dvc_track(root: Path, result: IngestResult) -> list[str]:
    """``dvc add`` every batch folder without a .dvc file (the new one, and any a killed run left)."""
    repo = find_dvc_root(root)
    if repo is None:
        result.warnings.append(f"{root}: not inside a DVC repository; the batch is not tracked (--no-dvc)")
        return []
    unlabeled = root / "unlabeled"
    untracked = sorted(
        entry
        for entry in unlabeled.iterdir()
        if entry.is_dir()
        and BATCH_PATTERN.match(entry.name)
        and not entry.with_name(entry.name + ".dvc").exists()
    )
    if not untracked:
        return []
    rels = [os.path.relpath(p.resolve(), repo) for p in untracked]
    done = subprocess.run(
        [dvc_executable(), "add", "--quiet", *rels], cwd=repo, capture_output=True, text=True
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise KdpipeError(
            f"dvc add {' '.join(rels)} failed (the batch folder is complete; the next `kdpipe ingest` or a "
            f"manual `dvc add` tracks it): {message[-1] if message else f'exit {done.returncode}'}"
        )
    return [p.relative_to(root).as_posix() for p in untracked]


# ---------------------------------------------------------------- output


def summary_lines(result: IngestResult, root: Path, limit: int = 20) -> list[str]:
    """What the CLI prints: counts, then the added, skipped and rejected files (up to ``limit`` each)."""
    lines = []
    if result.batch:
        lines.append(f"added {len(result.added)} image(s) to {root / result.batch}")
    else:
        lines.append(f"added nothing to {root / 'unlabeled'} (no new valid image)")
    lines.append(f"skipped {len(result.skipped)} duplicate(s), rejected {len(result.rejected)} file(s)")
    for title, entries, describe in (
        ("added", result.added, lambda e: f"{e['source']} -> {e['path']}"),
        ("skipped", result.skipped, lambda e: f"{e['source']}: {e['detail']}"),
        ("rejected", result.rejected, lambda e: f"{e['source']}: {e['reason']} ({e['detail']})"),
    ):
        for entry in entries[:limit]:
            lines.append(f"  {title} {describe(entry)}")
        if len(entries) > limit:
            lines.append(f"  ... and {len(entries) - limit} more {title} (--report FILE lists them all)")
    for path in result.tracked:
        lines.append(f"dvc: tracked {root / path} ({root / path}.dvc; commit it with git)")
    lines += [f"warning: {w}" for w in result.warnings]
    return lines
