"""The ``prepare`` step: validate, de-duplicate, split and pack the user's images.

Input (the data root, DVC-tracked)::

    labeled/<class>/**     labeled images; the class is the top-level folder name
    unlabeled/**           unlabeled images, at any depth (e.g. unlabeled/batch-0001/...)
    test/<class>/**        held-out test images; every class must also exist in labeled/

Output (one folder, replaced atomically)::

    train_x.npy train_y.npy val_x.npy val_y.npy unlabeled_x.npy test_x.npy test_y.npy
    train_xt.npy val_xt.npy unlabeled_xt.npy test_xt.npy   (only with a teacher-resolution copy, below)
    unlabeled_x.1.npy ...  (more segments of the unlabeled split, below)
    rows.npy        per array row: the source file's sha256, the pixels' sha256 (for reuse, below)
    sources.json    {split: [source path relative to the data root, one per array row]}
    rejected.json   [{"path", "split", "reason", "detail"}] for every file not used
    manifest.json   classes, counts, data_version, sha256 of every output file, params

Teacher-resolution copy: when ``teacher.image_size`` is larger than ``prepare.image_size`` and
most source images are larger than ``prepare.image_size`` (real photos, not 32-pixel thumbnails),
every image is also kept at the teacher's size (``*_xt.npy``), so a pretrained teacher is
fine-tuned and queried on the photo's own detail instead of an upsampled thumbnail. Otherwise the
teacher upsamples the student-size arrays on the device and no copy is written.

Incremental: the previous output (DVC ``persist``) is a source of decoded rows, by file sha256, and
an input file's sha256 is remembered under its identity (:class:`kdpipe.integrity.InputHashes`), so
after ``kdpipe ingest`` only the new batch is read and decoded. The unlabeled split is kept in
segments by batch folder (:mod:`kdpipe.segments`; ``segments`` in the manifest when there are
several), and a file holding the same rows as one of the previous output is hard-linked, with its
recorded sha256: an ingest writes and hashes only the new segment.

Hidden files and folders (names starting with '.'), OS clutter (Thumbs.db...) and DVC pointer
files (``*.dvc``, e.g. ``unlabeled/batch-0001.dvc``) are ignored; every other file that is not used is listed in ``rejected.json`` with its reason. Outputs are
byte-identical for the same input and params.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..atomic import allocated_memmap, atomic_dir, read_json, write_json
from ..data import (
    ARRAY_FILES,
    MANIFEST,
    REJECTED,
    ROWS,
    SOURCES,
    SPLITS,
    TEACHER_COPY_FILES,
    file_sha256,
    segment_names,
    segment_rows,
)
from ..decoding import DECODE_VERSION, DecodeSettings, Spool, decode_files, worker_count
from ..errors import DataError, KdpipeError
from ..imaging import extension_problem
from ..integrity import InputHashes, file_identities, record_verified
from ..params import Params, PrepareParams
from ..segments import joined, segment_file, segment_sizes
from ..walk import Walker, name_bytes, shown

log = logging.getLogger(__name__)

# Preference order inside a group of identical images: a labeled copy is kept over an unlabeled one.
_SOURCE_ORDER = {"labeled": 0, "test": 1, "unlabeled": 2}
_COPY_CHUNK = 1024  # rows copied at a time from the decode spool into the output arrays


@dataclass(slots=True)  # slots: a million of these must stay small
class _Item:
    """One candidate image file."""

    split: str  # source folder: labeled / unlabeled / test
    rel: str  # path relative to the data root, '/'-separated
    path: str  # as os.fsdecode gives it (a str is a fraction of a Path's size; a million of them add up)
    label: str | None  # class name; None for unlabeled
    file_hash: str = ""
    pixel_hash: str = ""  # sha256 of the resized uint8 pixels: identical images in any format match
    # Where its pixels are: ("spool", row) when decoded now, (split, row) in the previous output when
    # reused; None when rejected.
    origin: tuple[str, int] | None = None
    larger: bool = False  # both sides of the source image exceed prepare.image_size

    def sort_key(self) -> tuple[int, str]:
        return _SOURCE_ORDER[self.split], self.rel


class _Rejects:
    """Collects rejected files; written sorted to rejected.json."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []

    def add(self, rel: str, split: str, reason: str, detail: str) -> None:
        self.entries.append({"path": rel, "split": split, "reason": reason, "detail": detail})

    def under(self, prefix: str) -> list[dict[str, str]]:
        return [e for e in self.entries if e["path"].startswith(prefix)]

    def sorted(self) -> list[dict[str, str]]:
        return sorted(self.entries, key=lambda e: (e["path"], e["reason"]))


def run(
    params: Params, data_root: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
    check: bool = False, reuse: bool = True,
) -> dict:
    """Run the prepare step; return the manifest (also written to ``<out_dir>/manifest.json``).

    With ``check``, everything is read, decoded, de-duplicated and split as usual and the summary
    printed, but nothing is written (``kdpipe prepare --check``: is my data usable, and how?).

    Images decoded by the previous prepare into ``out_dir`` (same decoding settings) are taken from
    there by their file's sha256 instead of being decoded again (``reuse``); the outputs are the
    same bytes either way."""
    root = Path(data_root if data_root is not None else params.data.root)
    out = Path(out_dir if out_dir is not None else params.data.prepared)
    if not reuse:
        return _run(params, root, out, check, reuse=False)
    try:
        return _run(params, root, out, check, reuse=True)
    except _DecodeEverything:
        log.info("prepare: a teacher-resolution copy is now needed; decoding every image again")
        return _run(params, root, out, check, reuse=False)


class _DecodeEverything(Exception):
    """Reused images lack the teacher-resolution copy that the new data set needs."""


def _run(params: Params, root: Path, out: Path, check: bool, reuse: bool) -> dict:
    rejects = _Rejects()
    class_names, items = _scan(root, rejects)
    if not check:
        _check_out_dir(root, out)
    cfg = params.prepare

    teacher_size = _teacher_size(params)
    previous = _Previous.find(out, _decode_settings(cfg, teacher_size)) if reuse else None
    workspace = tempfile.TemporaryDirectory(prefix="kdpipe-prepare-check-") if check else None
    with (contextlib.nullcontext(Path(workspace.name)) if check else atomic_dir(out)) as tmp:
        spool, teacher_spool = _decode_all(root, items, cfg, teacher_size, tmp, rejects, previous)
        kept = _dedupe(items, rejects)
        _require_each_class(root, class_names, kept, rejects)
        labeled = [i for i in kept if i.split == "labeled"]
        train, val = _stratified_split(labeled, class_names, cfg.val_fraction, cfg.seed)
        splits = {
            "train": train,
            "val": val,
            "unlabeled": [i for i in kept if i.split == "unlabeled"],
            "test": [i for i in kept if i.split == "test"],
        }
        copy_size = teacher_size if teacher_size and _mostly_larger(kept) else None
        if copy_size and previous is not None and not previous.has_teacher_copy:
            # The new images tipped the balance: a teacher-resolution copy is now kept, and the reused
            # images have none, so everything is decoded again (rare: once, when it happens).
            raise _DecodeEverything  # leaves atomic_dir: its temporary folder goes, the output stays
        if not check:
            layout = _Layout(splits, cfg.image_size)
            writer = _ArrayWriter(tmp, layout, previous)
            writer.write_images("x", spool, cfg.image_size)
            if copy_size:
                writer.write_images("xt", teacher_spool, copy_size)
            _write_labels(tmp, splits, class_names)
            _write_rows(tmp, splits)
        del spool, teacher_spool
        for name in (".spool.npy", ".spool_t.npy"):
            (tmp / name).unlink(missing_ok=True)
        if check:
            manifest = _summary_manifest(params, class_names, splits, rejects, copy_size)
        else:
            write_json(tmp / SOURCES, {name: [i.rel for i in split] for name, split in splits.items()})
            write_json(tmp / REJECTED, rejects.sorted())
            manifest = _manifest(tmp, params, class_names, splits, kept, rejects, copy_size, layout, writer.linked)
            write_json(tmp / MANIFEST, manifest)
    if workspace is not None:
        workspace.cleanup()
    else:
        record_verified(out, manifest["files"])  # just hashed: the next steps need not read them again
    for line in summary_lines(manifest, rejects.sorted(), None if check else out):
        print(line)
    return manifest


def _check_out_dir(root: Path, out: Path) -> None:
    """The output folder is replaced as a whole, so it must not hold the data, nor sit inside an input folder."""
    root_real, out_real = root.resolve(), out.resolve()
    if root_real.is_relative_to(out_real):
        raise DataError(
            f"{out}: the output folder is (or contains) the data root {root}; prepare replaces its output "
            "folder as a whole, which would delete the data; choose another --out-dir"
        )
    for split in _SOURCE_ORDER:
        if out_real.is_relative_to(root_real / split):
            raise DataError(
                f"{out}: the output folder is inside {root / split}; its files would be read back as input "
                "images; choose another --out-dir"
            )


# ---------------------------------------------------------------- scanning


def _scan(root: Path, rejects: _Rejects) -> tuple[list[str], list[_Item]]:
    """Find every candidate file; raise DataError for an unusable folder layout."""
    if not root.is_dir():
        raise DataError(f"{shown(root)}: data root not found (expected a folder with labeled/, unlabeled/, test/)")
    labeled_dir = root / "labeled"
    if not labeled_dir.is_dir():
        raise DataError(f"{shown(labeled_dir)}: folder not found; labeled images go in {shown(labeled_dir)}/<class>/")

    def report(path: Path, reason: str, detail: str) -> None:
        rel = _rel(root, path)
        rejects.add(rel, rel.split("/", 1)[0], reason, detail)

    walker = Walker(root, report)
    class_dirs = _class_dirs(root, walker, labeled_dir, rejects)
    class_names = sorted(class_dirs)
    if not class_names:
        raise DataError(
            f"{shown(labeled_dir)}: no class folders; put the images of each class in {shown(labeled_dir)}/<class>/"
        )
    if len(class_names) < 2:
        raise DataError(
            f"{shown(labeled_dir)}: found 1 class folder ({class_names[0]!r}); a classifier needs at least 2 classes"
        )

    items: list[_Item] = []
    for name in class_names:
        items += _files(root, walker, class_dirs[name], "labeled", name, rejects)
    items += _optional_unlabeled(root, walker, rejects)
    items += _optional_test(root, walker, class_names, rejects)
    items.sort(key=_Item.sort_key)
    return class_names, items


def _class_dirs(root: Path, walker: Walker, parent: Path, rejects: _Rejects) -> dict[str, Path]:
    """Class folders directly under ``parent`` (named as shown: readable even when not UTF-8); stray
    files there are rejected."""
    split = parent.name
    walker.enter(parent)  # a class folder linking back to ``parent`` is then a loop, never read
    dirs = {}
    for entry in walker.entries(parent):
        if entry.is_dir():
            dirs[shown(entry.name)] = entry
        else:
            rejects.add(_rel(root, entry), split, "outside_class_folder", f"files must be in {split}/<class>/")
    return dirs


def _optional_unlabeled(root: Path, walker: Walker, rejects: _Rejects) -> list[_Item]:
    folder = root / "unlabeled"
    if not folder.is_dir():
        log.warning("%s: folder not found; continuing without unlabeled images", shown(folder))
        return []
    return _files(root, walker, folder, "unlabeled", None, rejects)


def _optional_test(root: Path, walker: Walker, class_names: list[str], rejects: _Rejects) -> list[_Item]:
    folder = root / "test"
    if not folder.is_dir():
        log.warning("%s: folder not found; continuing without a test split", shown(folder))
        return []
    items = []
    for name, path in sorted(_class_dirs(root, walker, folder, rejects).items()):
        if name not in class_names:
            raise DataError(
                f"{shown(path)}: test class {name!r} has no folder in {shown(root / 'labeled')} "
                f"(labeled classes: {', '.join(class_names)})"
            )
        items += _files(root, walker, path, "test", name, rejects)
    return items


def _files(root: Path, walker: Walker, folder: Path, split: str, label: str | None, rejects: _Rejects) -> list[_Item]:
    """Image files under ``folder`` at any depth, each real file once; non-image extensions are rejected."""
    items = []
    # the walk builds every path as root / ...: cut the prefix off instead of a pathlib call per file
    prefix = os.path.join(os.fspath(root), "")
    for path in walker.files_under(folder):
        full = os.fspath(path)
        rel = shown(full[len(prefix):]) if full.startswith(prefix) else _rel(root, path)
        if (problem := extension_problem(path)) is not None:
            rejects.add(rel, split, "not_an_image", problem)
        else:
            items.append(_Item(split=split, rel=rel, path=full, label=label))
    return items


def _rel(root: Path, path: Path) -> str:
    """The path relative to the data root, as shown in reports (readable even when not UTF-8)."""
    return shown(path.relative_to(root).as_posix())


# ---------------------------------------------------------------- decoding


def _teacher_size(params: Params) -> int | None:
    """The teacher's resolution when it is larger than the student's, else None (no copy needed)."""
    size = params.teacher.image_size
    return int(size) if size and size > params.prepare.image_size else None


def _decode_settings(cfg: PrepareParams, teacher_size: int | None) -> DecodeSettings:
    return DecodeSettings(image_size=cfg.image_size, teacher_size=teacher_size, max_image_pixels=cfg.max_image_pixels,
                          min_side=cfg.min_side, max_aspect_ratio=cfg.max_aspect_ratio)


def _decode_all(root: Path, items: list[_Item], cfg: PrepareParams, teacher_size: int | None, tmp: Path,
                rejects: _Rejects, previous: _Previous | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode and resize every candidate into disk-backed spools (bounded memory, every core); drop
    failures. Files the previous output already holds are only hashed (their rows are copied later),
    or not even read while their remembered hash can be trusted (:class:`InputHashes`).

    The second spool (teacher resolution) exists only when a teacher-resolution copy may be needed."""
    settings = _decode_settings(cfg, teacher_size)
    spool = Spool.create(tmp / ".spool.npy", len(items), cfg.image_size)
    teacher_spool = Spool.create(tmp / ".spool_t.npy", len(items), teacher_size) if teacher_size else None
    remembered = InputHashes(root)
    identities = file_identities([i.path for i in items])
    trusted = remembered.lookup(identities)
    outcomes = decode_files([i.path for i in items], settings, spool, teacher_spool,
                            previous.file_hashes() if previous else (), worker_count(cfg.workers), trusted)
    progress = tqdm(zip(items, outcomes, strict=True), total=len(items), desc="prepare: decoding", unit="img",
                    disable=not sys.stderr.isatty())
    for row, (item, outcome) in enumerate(progress):
        if outcome.rejected:
            rejects.add(item.rel, item.split, outcome.reason, outcome.detail)
            continue
        item.file_hash = outcome.file_hash
        if outcome.reused:
            item.origin, item.pixel_hash, item.larger = previous.record(outcome.file_hash)
        else:
            item.origin, item.pixel_hash, item.larger = ("spool", row), outcome.pixel_hash, outcome.larger
    remembered.save(identities, [i.file_hash for i in items])  # rejected files have none: read again
    del identities, trusted
    items[:] = [i for i in items if i.origin is not None]
    reused = sum(1 for i in items if i.origin[0] != "spool")
    if previous is not None:
        print(f"prepare: {reused} image(s) reused from the previous output, {len(items) - reused} decoded")
    return Path(spool.path), Path(teacher_spool.path) if teacher_spool else None


class _Previous:
    """The previous prepare's output, as a source of already decoded images (by file sha256).

    Used only when it was made with the same decoding settings and passes the integrity check;
    otherwise everything is decoded (and that is said in the log, not an error)."""

    def __init__(self, folder: Path, manifest: dict, has_teacher_copy: bool, rows: np.ndarray):
        self.has_teacher_copy = has_teacher_copy
        self._folder = folder
        order = np.argsort(rows["file"], kind="stable")
        self._hashes, self._rows = rows["file"][order], rows[order]
        self._position = order  # row in the concatenated splits
        counts = [int(manifest["counts"][name]) for name in SPLITS]
        self._starts = np.cumsum([0, *counts])
        self._manifest = manifest
        # (split, first row) -> (segment number, end row) of every array file
        self._file_starts = {}
        for split in SPLITS:
            bounds = np.cumsum([0, *segment_rows(manifest, split)]).tolist()
            for k in range(len(bounds) - 1):
                self._file_starts[(split, bounds[k])] = (k, bounds[k + 1])

    @classmethod
    def find(cls, out: Path, settings: DecodeSettings) -> _Previous | None:
        from ..data import load_prepared

        if not (out / MANIFEST).is_file() or not (out / ROWS).is_file():
            return None
        try:
            manifest = read_json(out / MANIFEST)
            if manifest.get("decoding") != _decoding_record(settings):
                log.info("prepare: %s was decoded with other settings; decoding every image", shown(out))
                return None
            data = load_prepared(out)  # the integrity check: a changed file means no reuse
            return cls(out, manifest, data.train_xt is not None, np.load(out / ROWS, allow_pickle=False))
        except (KdpipeError, OSError, ValueError, KeyError) as exc:
            log.info("prepare: not reusing %s (%s); decoding every image", shown(out), exc)
            return None

    def file_hashes(self) -> list[str]:
        return [h.decode() for h in self._hashes]

    def record(self, file_hash: str) -> tuple[tuple[str, int], str, bool]:
        """The image's place in the previous output, its pixel sha256 and whether it is larger."""
        at = int(np.searchsorted(self._hashes, file_hash.encode()))
        row = self._rows[at]
        position = int(self._position[at])
        k = int(np.searchsorted(self._starts, position, side="right")) - 1
        return (SPLITS[k], position - int(self._starts[k])), row["pixel"].decode(), bool(row["larger"])

    def array_files(self, kind: str) -> dict[str, list[Path]]:
        """The previous output's files of each split's ``kind`` array, in row order (its segments, if
        several); read until the new output replaces them."""
        return {split: [self._folder / f for f in segment_names(self._manifest, f"{split}_{kind}.npy")]
                for split in SPLITS}

    def file_holding(self, origins: list[tuple[str, int]], kind: str) -> tuple[Path, str] | None:
        """The previous file (and its recorded sha256) whose rows are exactly ``origins``, in order:
        such a file is hard-linked into the new output instead of being written and hashed again."""
        if not origins:
            return None
        split, start = origins[0]
        found = self._file_starts.get((split, start))
        if found is None or found[1] - start != len(origins):
            return None
        if any(o != (split, start + k) for k, o in enumerate(origins)):
            return None
        name = segment_file(split, kind, found[0])
        digest = self._manifest["files"].get(name)
        return (self._folder / name, digest) if digest else None


def _decoding_record(settings: DecodeSettings) -> dict[str, Any]:
    """What decides the decoded pixels and which files are accepted (reuse requires all equal)."""
    return {"version": DECODE_VERSION, **dataclasses.asdict(settings)}


def _mostly_larger(kept: list[_Item]) -> bool:
    """At least half of the images used are larger than the student's size: worth a teacher copy."""
    return bool(kept) and 2 * sum(i.larger for i in kept) >= len(kept)


# ---------------------------------------------------------------- de-duplication


def _dedupe(items: list[_Item], rejects: _Rejects) -> list[_Item]:
    """Keep one copy of each distinct image; resolve label conflicts and test leakage."""
    groups: dict[str, list[_Item]] = defaultdict(list)
    for item in sorted(items, key=_Item.sort_key):
        groups[item.pixel_hash].append(item)
    kept = [k for group in groups.values() if (k := _resolve_group(group, rejects)) is not None]
    return sorted(kept, key=_Item.sort_key)


def _resolve_group(group: list[_Item], rejects: _Rejects) -> _Item | None:
    """Return the copy to keep from a group of identical images (sorted by preference), or None."""
    if len(group) == 1:
        return group[0]
    labels = {i.label for i in group if i.split != "unlabeled"}
    if len(labels) > 1:
        # The same picture under two classes: no way to know which is right, so none is used.
        where = ", ".join(f"{i.rel} ({i.label})" for i in group if i.label is not None)
        for item in group:
            rejects.add(
                item.rel, item.split, "conflicting_labels", f"the same image has different labels: {where}"
            )
        return None
    tests = [i for i in group if i.split == "test"]
    keep = tests[0] if tests else group[0]
    for item in group:
        if item is keep:
            continue
        if tests and item.split != "test":
            rejects.add(
                item.rel, item.split, "leakage_with_test", f"the same image is in the test split: {keep.rel}"
            )
        else:
            rejects.add(item.rel, item.split, "duplicate", f"the same image as {keep.rel} (kept)")
    return keep


def _require_each_class(root: Path, class_names: list[str], kept: list[_Item], rejects: _Rejects) -> None:
    present = {i.label for i in kept if i.split == "labeled"}
    for name in class_names:
        if name in present:
            continue
        folder_rejects = rejects.under(f"labeled/{name}/")
        examples = "".join(f"\n  {e['path']}: {e['reason']} ({e['detail']})" for e in folder_rejects[:5])
        more = f"\n  ... and {len(folder_rejects) - 5} more" if len(folder_rejects) > 5 else ""
        raise DataError(
            f"{root / 'labeled' / name}: no valid image for class {name!r} "
            f"({len(folder_rejects)} file(s) rejected){examples}{more}"
        )


# ---------------------------------------------------------------- split


def _stratified_split(
    labeled: list[_Item], class_names: list[str], val_fraction: float, seed: int
) -> tuple[list[_Item], list[_Item]]:
    """Per class, put round(n * val_fraction) images (at least 1, at most n - 1) in validation.

    Images are ranked by a seeded hash of their pixels rather than shuffled by position, so the
    choice does not depend on file names or order, and adding images moves few existing ones.
    """
    train: list[_Item] = []
    val: list[_Item] = []
    for name in class_names:
        members = [i for i in labeled if i.label == name]
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{i.pixel_hash}".encode()).hexdigest())
        n = len(ranked)
        n_val = 0 if n < 2 else min(n - 1, max(1, int(n * val_fraction + 0.5)))
        val += ranked[:n_val]
        train += ranked[n_val:]
    return sorted(train, key=_Item.sort_key), sorted(val, key=_Item.sort_key)


# ---------------------------------------------------------------- outputs


class _Layout:
    """Which output files hold which rows: one file per split, except the unlabeled split, kept in
    segments by batch folder (see :mod:`kdpipe.segments`) so an ingest leaves earlier files alone."""

    def __init__(self, splits: dict[str, list[_Item]], size: int):
        self.splits = splits
        unlabeled = splits["unlabeled"]
        self.segments = {"unlabeled": segment_sizes([_batch_folder(i.rel) for i in unlabeled], size * size * 3)
                         or [0]}

    def files(self, kind: str) -> list[tuple[str, list[_Item]]]:
        """(file name, the rows it holds) for every ``kind`` array file, in the order they are written."""
        out = []
        for split, members in self.splits.items():
            sizes = self.segments.get(split, [len(members)])
            bounds = np.cumsum([0, *sizes]).tolist()
            out += [(segment_file(split, kind, k), members[bounds[k]:bounds[k + 1]]) for k in range(len(sizes))]
        return out


def _batch_folder(rel: str) -> str:
    """``unlabeled/batch-0002-1a2b3c4d/x.jpg`` -> ``batch-0002-1a2b3c4d``; a file directly in unlabeled/ -> ''."""
    parts = rel.split("/")
    return parts[1] if len(parts) > 2 else ""


class _ArrayWriter:
    """Writes the image arrays, hard-linking any file of the previous output that holds exactly the
    same rows (an ingest changes only the last unlabeled segment): no copy and no new hash for it."""

    def __init__(self, out: Path, layout: _Layout, previous: _Previous | None):
        self.out, self.layout, self.previous = out, layout, previous
        self.linked: dict[str, str] = {}  # file name -> sha256 recorded by the previous output

    def write_images(self, kind: str, spool: Path, size: int) -> None:
        sources = {"spool": [spool], **(self.previous.array_files(kind) if self.previous else {})}
        for name, members in self.layout.files(kind):
            origins = [i.origin for i in members]
            held = self.previous.file_holding(origins, kind) if self.previous else None
            if held is not None and _hard_link(held[0], self.out / name):
                self.linked[name] = held[1]
            else:
                _save_rows(self.out / name, sources, origins, size)


def _hard_link(source: Path, target: Path) -> bool:
    """A second name for an unchanged file (same inode: no copy, and DVC sees it unchanged); False
    where the file system cannot (another device, no hard links), and the rows are copied instead."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _write_labels(out: Path, splits: dict[str, list[_Item]], class_names: list[str]) -> None:
    index = {name: k for k, name in enumerate(class_names)}
    for name, members in splits.items():
        if name != "unlabeled":
            np.save(out / f"{name}_y.npy", np.array([index[i.label] for i in members], dtype=np.int64))


# One record per output row (splits in SPLITS order): what the next prepare needs to reuse the row.
ROW_RECORD = np.dtype([("file", "S64"), ("pixel", "S64"), ("larger", "?")])


def _write_rows(out: Path, splits: dict[str, list[_Item]]) -> None:
    # filled column by column: a list of one tuple per row would cost more than the array itself
    members = [i for name in SPLITS for i in splits[name]]
    rows = np.zeros(len(members), dtype=ROW_RECORD)
    for k, item in enumerate(members):
        rows[k] = (item.file_hash, item.pixel_hash, item.larger)
    np.save(out / ROWS, rows)


def _save_rows(path: Path, sources: dict[str, list[Path]], origins: list[tuple[str, int]], size: int) -> None:
    """Write the rows named by ``origins`` (source .npy file, row) as a standard .npy (same bytes as
    np.save), a chunk at a time. Neither the output nor the sources stay mapped: a chunk is gathered
    from freshly mapped sources into a buffer and written with ``os.pwrite``, so the resident memory
    is one chunk, not the pages of every file touched so far."""
    shape = (len(origins), size, size, 3)
    if not origins:  # np.memmap cannot map a zero-length array
        np.save(path, np.zeros(shape, dtype=np.uint8))
        return
    dest = allocated_memmap(path, np.uint8, shape)  # header written, blocks reserved (ENOSPC now, not later)
    offset, row_bytes = int(dest.offset), size * size * 3
    del dest
    fd = os.open(path, os.O_WRONLY)
    try:
        for start in range(0, len(origins), _COPY_CHUNK):
            chunk = origins[start:start + _COPY_CHUNK]
            buffer = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
            for source in {name for name, _ in chunk}:
                at = [k for k, (name, _) in enumerate(chunk) if name == source]
                mapped = joined([np.load(part, mmap_mode="r") for part in sources[source]])
                buffer[at] = mapped[[chunk[k][1] for k in at]]
                del mapped
            _write_all(fd, buffer.tobytes(), offset + start * row_bytes, path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, offset: int, path: Path) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        view, offset = view[written:], offset + written


def _file_order(name: str) -> tuple[int, int]:
    """Manifest order: the arrays as before (ARRAY_FILES, then the teacher copies), segments after their first file."""
    stem, _, rest = name.partition(".")
    base = f"{stem}.npy"
    order = (*ARRAY_FILES, *TEACHER_COPY_FILES)
    return order.index(base), int(rest[:-4]) if rest != "npy" else 0


def _data_version(kept: list[_Item]) -> str:
    """Content hash of the input actually used: (source split, path, label, file sha256) entries.

    Paths and labels enter as their exact bytes (``surrogateescape``), so a name that is not UTF-8
    neither crashes the hash nor collides with its escaped spelling."""
    digest = hashlib.sha256()
    entries = sorted((i.split, os.fsdecode(name_bytes(i.path)), i.label or "", i.file_hash) for i in kept)
    for entry in entries:
        digest.update(json.dumps(entry, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _manifest(
    out: Path,
    params: Params,
    class_names: list[str],
    splits: dict[str, list[_Item]],
    kept: list[_Item],
    rejects: _Rejects,
    teacher_copy_size: int | None,
    layout: _Layout,
    linked: dict[str, str],
) -> dict[str, Any]:
    counts = {name: len(members) for name, members in splits.items()}
    counts["rejected"] = len(rejects.entries)
    per_class = {
        name: {c: sum(1 for i in splits[name] if i.label == c) for c in class_names}
        for name in ("train", "val", "test")
    }
    images = [name for kind in ("x", "xt" if teacher_copy_size else None) if kind for name, _ in layout.files(kind)]
    labels = [name for name in ARRAY_FILES if name.endswith("_y.npy")]
    # a hard-linked file is the previous output's, which passed its integrity check: its hash stands
    files = {name: linked.get(name) or file_sha256(out / name)
             for name in sorted((*images, *labels), key=_file_order) + [ROWS, SOURCES, REJECTED]}
    return {
        "class_names": class_names,
        "counts": counts,
        "per_class": per_class,
        "image_size": params.prepare.image_size,
        # the size of the *_xt.npy copies; null when the teacher upsamples the student-size arrays
        "teacher_image_size": teacher_copy_size,
        "data_version": _data_version(kept),
        "files": files,
        # rows per file of a split kept in several files (kdpipe.segments); absent when each split is one file
        **({"segments": layout.segments} if any(len(v) > 1 for v in layout.segments.values()) else {}),
        # workers is left out: it changes how fast, never what (the outputs are the same bytes)
        "params": {**params.prepare.model_dump(exclude={"workers"}), "teacher_image_size": params.teacher.image_size},
        "decoding": _decoding_record(_decode_settings(params.prepare, _teacher_size(params))),
        "kdpipe_version": __version__,
    }


# Below this many validation images, one image is worth more than half a point of accuracy and the
# comparisons that use the split (best checkpoint, early stopping, select) are mostly noise.
SMALL_VALIDATION = 100


def summary_lines(manifest: dict[str, Any], rejected: list[dict[str, str]], out: Path | None,
                  limit: int = 8) -> list[str]:
    """What prepare prints: the classes, the images per split, what was rejected and why (with a few
    examples), and a warning when the validation split is too small to choose between models."""
    c = manifest["counts"]
    names = manifest["class_names"]
    shown_names = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    where = f" -> {shown(out)}" if out is not None else " (check only: nothing written)"
    lines = [f"prepare: {len(names)} classes: {shown_names}",
             f"prepare: {c['train']} train, {c['val']} validation, {c['unlabeled']} unlabeled, {c['test']} test "
             f"images{where}"]
    if rejected:
        reasons = Counter(r["reason"] for r in rejected)
        lines.append(f"prepare: {len(rejected)} file(s) not used: "
                     + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
                     + ("" if out is None else f" (all listed in {shown(out / REJECTED)})"))
        for r in rejected[:limit]:
            lines.append(f"  {r['path']}: {r['reason']} ({r['detail']})")
        if len(rejected) > limit:
            lines.append(f"  ... and {len(rejected) - limit} more")
    if c["val"] == 0:
        lines.append("warning: the validation split is empty (every class has a single labeled image): "
                     "nothing can pick the best checkpoint or model")
    elif c["val"] < SMALL_VALIDATION:
        half_width = 100 * 1.96 * (0.25 / c["val"]) ** 0.5
        lines.append(f"warning: the validation split holds only {c['val']} images: an accuracy measured on it is "
                     f"uncertain by up to ±{half_width:.0f} points, too coarse to choose between models reliably; "
                     "label more images or raise prepare.val_fraction")
    return lines


def _summary_manifest(params: Params, class_names: list[str], splits: dict[str, list[_Item]], rejects: _Rejects,
                      copy_size: int | None) -> dict[str, Any]:
    """The manifest's counts for ``--check`` (no files, so no hashes)."""
    counts = {name: len(members) for name, members in splits.items()}
    counts["rejected"] = len(rejects.entries)
    return {"class_names": class_names, "counts": counts, "image_size": params.prepare.image_size,
            "teacher_image_size": copy_size, "check_only": True}
