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
an input file's sha256 is remembered under its identity (:func:`kdpipe.data.integrity.input_hashes_path`),
so after ``kdpipe ingest`` only the new batch is read and decoded. The unlabeled split is kept in
segments by batch folder (:mod:`kdpipe.data.segments`; ``segments`` in the manifest when there are
several), and a file holding the same rows as one of the previous output is hard-linked, with its
recorded sha256: an ingest writes and hashes only the new segment.

Memory: the per-file records (paths, hashes, where each image's pixels are, its split) are kept on
disk in a scratch SQLite database (:mod:`kdpipe.data.ledger`), and pixels are streamed from the decode
spools to the outputs a chunk at a time, so prepare's memory does not grow with the number of files.

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
import textwrap
import unicodedata
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdpipe import __version__
from kdpipe.core.atomic import allocated_memmap, atomic_dir, read_json, write_json
from kdpipe.core.errors import DataError, KdpipeError
from kdpipe.core.files import file_sha256
from kdpipe.core.layout import PREPARED
from kdpipe.core.params import Params, PrepareParams
from kdpipe.data.decoding import DECODE_VERSION, DecodeSettings, Spool, decode_files, worker_count
from kdpipe.data.imaging import extension_problem
from kdpipe.data.integrity import first_mismatch, input_hashes_path, record_verified
from kdpipe.data.ledger import (
    DECODED,
    LABELED,
    OUT_UNLABELED,
    PENDING,
    REUSED,
    SPOOL,
    TEST,
    UNLABELED,
    Ledger,
    Member,
)
from kdpipe.data.ledger import (
    SOURCES as SOURCE_FOLDERS,  # the source folders, in the order their files are listed
)
from kdpipe.data.mapped import FileRows, release
from kdpipe.data.nearcopies import MAX_RMS, THUMBNAIL, ReferenceThumbnails, thumbnails
from kdpipe.data.prepared import (
    ARRAY_FILES,
    MANIFEST,
    REJECTED,
    ROWS,
    SOURCES,
    SPLITS,
    TEACHER_COPY_FILES,
    TEACHER_INPUTS,
    segment_names,
    segment_rows,
    teacher_inputs,
)
from kdpipe.data.segments import joined, segment_file, segment_sizes
from kdpipe.data.walk import Walker, shown

log = logging.getLogger(__name__)

_COPY_BYTES = 4 << 20  # pixels copied at a time from the decode spool into the output arrays
_SUMMARY_EXAMPLES = 8  # rejected files shown by name in prepare's summary


def run(
    params: Params,
    data_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    check: bool = False,
    reuse: bool = True,
) -> dict:
    """Run the prepare step; return the manifest (also written to ``<out_dir>/manifest.json``).

    With ``check``, everything is read, decoded, de-duplicated and split as usual and the summary
    printed, but nothing is written (``kdpipe prepare --check``: is my data usable, and how?).

    Images decoded by the previous prepare into ``out_dir`` (same decoding settings) are taken from
    there by their file's sha256 instead of being decoded again (``reuse``); the outputs are the
    same bytes either way."""
    root = Path(data_root if data_root is not None else params.data.root)
    out = Path(out_dir if out_dir is not None else PREPARED)
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
    _check_data_root(root)
    if not check:
        _check_out_dir(root, out)
    cfg = params.prepare
    teacher_size = _teacher_size(params)
    settings = _decode_settings(cfg, teacher_size)
    previous = _Previous.find(out, settings) if reuse else None
    workspace = tempfile.TemporaryDirectory(prefix="kdpipe-prepare-check-") if check else None
    with contextlib.nullcontext(Path(workspace.name)) if check else atomic_dir(out) as tmp:
        ledger = Ledger(tmp / ".ledger.sqlite")
        try:
            manifest = _prepare(params, root, tmp, ledger, settings, previous, check)
            reasons = ledger.reject_reasons()
            examples = list(ledger.rejected_sorted(limit=_SUMMARY_EXAMPLES))
        finally:
            ledger.close()  # the ledger, the spools and the previous rows are scratch: not in the output
            for name in (".spool.npy", ".spool_t.npy", ".previous.sqlite"):
                (tmp / name).unlink(missing_ok=True)
    if workspace is not None:
        workspace.cleanup()
    else:
        record_verified(out, manifest["files"])  # just hashed: the next steps need not read them again
    for line in summary_lines(manifest, reasons, examples, None if check else out, cfg.val_fraction):
        print(line)
    return manifest


def _prepare(
    params: Params,
    root: Path,
    tmp: Path,
    ledger: Ledger,
    settings: DecodeSettings,
    previous: _Previous | None,
    check: bool,
) -> dict[str, Any]:
    """Scan, decode, de-duplicate, split and (unless ``check``) write the outputs into ``tmp``."""
    cfg = params.prepare
    _scan(root, ledger)
    spool, teacher_spool = _decode_all(root, ledger, settings, cfg.workers, tmp, previous)
    _dedupe(ledger)
    pixels = {SPOOL: [spool], **(previous.array_files("x") if previous else {})}
    _drop_near_copies_of_test(ledger, pixels, settings.image_size)
    _require_each_class(root, ledger)
    ledger.assign_splits(cfg.val_fraction, cfg.seed)
    copy_size = settings.teacher_size if settings.teacher_size and ledger.mostly_larger() else None
    if copy_size and previous is not None and not previous.has_teacher_copy:
        # The new images tipped the balance: a teacher-resolution copy is now kept, and the reused
        # images have none, so everything is decoded again (rare: once, when it happens).
        raise _DecodeEverything  # leaves atomic_dir: its temporary folder goes, the output stays
    if check:
        return _summary_manifest(params, ledger, copy_size)
    layout = _Layout(ledger, cfg.image_size)
    writer = _ArrayWriter(tmp, layout, ledger, previous)
    writer.write_images("x", spool, cfg.image_size)
    if copy_size:
        writer.write_images("xt", teacher_spool, copy_size)
    _write_labels(tmp, ledger)
    _write_rows(tmp, ledger)
    _write_sources(tmp / SOURCES, ledger)
    _write_rejected(tmp / REJECTED, ledger)
    manifest = _manifest(tmp, params, ledger, copy_size, layout, writer.linked)
    write_json(tmp / MANIFEST, manifest)
    write_json(tmp / TEACHER_INPUTS, teacher_inputs(manifest, params.teacher.unlabeled_rounds > 0))
    return manifest


def _check_data_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(
            f"{shown(root)}: data root not found (expected a folder with labeled/, unlabeled/, test/)"
        )
    labeled_dir = root / "labeled"
    if not labeled_dir.is_dir():
        raise DataError(
            f"{shown(labeled_dir)}: folder not found; labeled images go in {shown(labeled_dir)}/<class>/"
        )


def _check_out_dir(root: Path, out: Path) -> None:
    """The output folder is replaced as a whole, so it must not hold the data, nor sit inside an input folder."""
    root_real, out_real = root.resolve(), out.resolve()
    if root_real.is_relative_to(out_real):
        raise DataError(
            f"{out}: the output folder is (or contains) the data root {root}; prepare replaces its output "
            "folder as a whole, which would delete the data; choose another --out-dir"
        )
    for split in SOURCE_FOLDERS:
        if out_real.is_relative_to(root_real / split):
            raise DataError(
                f"{out}: the output folder is inside {root / split}; its files would be read back as input "
                "images; choose another --out-dir"
            )


# ---------------------------------------------------------------- scanning


def _scan(root: Path, ledger: Ledger) -> None:
    """Record every candidate file in the ledger; raise DataError for an unusable folder layout."""
    labeled_dir = root / "labeled"

    def report(path: Path, reason: str, detail: str) -> None:
        rel = _rel(root, path)
        ledger.reject(rel, rel.split("/", 1)[0], reason, detail)

    walker = Walker(root, report, seen=ledger, sort=ledger.sorted_entries)
    class_dirs = _class_dirs(root, walker, labeled_dir, ledger)
    class_names = sorted(class_dirs)
    if not class_names:
        raise DataError(
            f"{shown(labeled_dir)}: no class folders; put the images of each class in {shown(labeled_dir)}/<class>/"
        )
    if len(class_names) < 2:
        raise DataError(
            f"{shown(labeled_dir)}: found 1 class folder ({class_names[0]!r}); a classifier needs at least 2 classes"
        )
    ledger.class_names = class_names
    for label, name in enumerate(class_names):
        _add_files(root, walker, class_dirs[name], LABELED, label, ledger)
    _optional_unlabeled(root, walker, ledger)
    _optional_test(root, walker, class_names, ledger)
    ledger.number_candidates()


def _class_dirs(root: Path, walker: Walker, parent: Path, ledger: Ledger) -> dict[str, Path]:
    """Class folders directly under ``parent`` (named as shown: readable even when not UTF-8; in
    Unicode's composed form NFC, so "rosé" written by a Mac (decomposed, NFD) and by Linux or Windows
    (composed) is one class); stray files there are rejected."""
    split = parent.name
    walker.enter(parent)  # a class folder linking back to ``parent`` is then a loop, never read
    dirs: dict[str, Path] = {}
    for entry in walker.entries(parent):
        if entry.is_dir():
            name = unicodedata.normalize("NFC", shown(entry.name))
            if name in dirs:
                raise DataError(
                    f"{shown(entry)} and {shown(dirs[name])}: two class folders with the same name written "
                    "in two Unicode forms (composed and decomposed accents); merge them into one"
                )
            dirs[name] = entry
        else:
            ledger.reject(
                _rel(root, entry), split, "outside_class_folder", f"files must be in {split}/<class>/"
            )
    return dirs


def _optional_unlabeled(root: Path, walker: Walker, ledger: Ledger) -> None:
    folder = root / "unlabeled"
    if not folder.is_dir():
        log.warning("%s: folder not found; continuing without unlabeled images", shown(folder))
        return
    _add_files(root, walker, folder, UNLABELED, None, ledger)


def _optional_test(root: Path, walker: Walker, class_names: list[str], ledger: Ledger) -> None:
    folder = root / "test"
    if not folder.is_dir():
        log.warning("%s: folder not found; continuing without a test split", shown(folder))
        return
    for name, path in sorted(_class_dirs(root, walker, folder, ledger).items()):
        if name not in class_names:
            raise DataError(
                f"{shown(path)}: test class {name!r} has no folder in {shown(root / 'labeled')} "
                f"(labeled classes: {', '.join(class_names)})"
            )
        _add_files(root, walker, path, TEST, class_names.index(name), ledger)


def _add_files(
    root: Path, walker: Walker, folder: Path, source: int, label: int | None, ledger: Ledger
) -> None:
    """Image files under ``folder`` at any depth, each real file once; non-image extensions are rejected."""
    split = SOURCE_FOLDERS[source]
    # the walk builds every path as root / ...: cut the prefix off instead of a pathlib call per file
    prefix = os.path.join(os.fspath(root), "")
    for full in walker.file_paths_under(folder):
        rel = shown(full[len(prefix) :]) if full.startswith(prefix) else _rel(root, Path(full))
        if (problem := extension_problem(full)) is not None:
            ledger.reject(rel, split, "not_an_image", problem)
        else:
            ledger.add_candidate(source, label, rel, full)


def _rel(root: Path, path: Path) -> str:
    """The path relative to the data root, as shown in reports (readable even when not UTF-8)."""
    return shown(path.relative_to(root).as_posix())


# ---------------------------------------------------------------- decoding


def _teacher_size(params: Params) -> int | None:
    """The teacher's resolution when it is larger than the student's, else None (no copy needed)."""
    size = params.teacher.image_size
    return int(size) if size and size > params.prepare.image_size else None


def _decode_settings(cfg: PrepareParams, teacher_size: int | None) -> DecodeSettings:
    return DecodeSettings(
        image_size=cfg.image_size,
        teacher_size=teacher_size,
        max_image_pixels=cfg.max_image_pixels,
        min_side=cfg.min_side,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )


def _decode_all(
    root: Path, ledger: Ledger, settings: DecodeSettings, workers: int, tmp: Path, previous: _Previous | None
) -> tuple[Path, Path | None]:
    """Decode and resize every candidate into disk-backed spools (bounded memory, every core); reject
    failures. Files the previous output already holds are only hashed (their rows are copied later),
    or not even read while their remembered hash can be trusted (:func:`input_hashes_path`).

    The second spool (teacher resolution) exists only when a teacher-resolution copy may be needed."""
    total = ledger.count()
    spool = Spool.create(tmp / ".spool.npy", total, settings.image_size)
    teacher_spool = (
        Spool.create(tmp / ".spool_t.npy", total, settings.teacher_size) if settings.teacher_size else None
    )
    remembered = input_hashes_path(root)
    ledger.record_identities()
    ledger.recall_input_hashes(remembered)
    known = None
    if previous is not None:
        known = tmp / ".previous.sqlite"
        previous.write_rows(known)
        ledger.attach_previous(known)
        ledger.reuse_trusted()
    pending = ledger.count(f"state = {PENDING}")
    outcomes = decode_files(
        ledger.pending(), pending, settings, spool, teacher_spool, known, worker_count(workers)
    )
    # one iterator for every batch: a new iter() per batch would close the decoding when it is dropped
    progress = iter(
        tqdm(outcomes, total=pending, desc="prepare: decoding", unit="img", disable=not sys.stderr.isatty())
    )
    while batch := list(islice(progress, ledger.chunk)):
        ledger.record_outcomes(batch)
    ledger.remember_input_hashes(remembered)  # rejected files have none: read again
    if previous is not None:
        ledger.place_reused()
        reused, decoded = ledger.count(f"state = {REUSED}"), ledger.count(f"state = {DECODED}")
        print(f"prepare: {reused} image(s) reused from the previous output, {decoded} decoded")
    return Path(spool.path), Path(teacher_spool.path) if teacher_spool else None


class _Previous:
    """The previous prepare's output, as a source of already decoded images (by file sha256).

    Used only when it was made with the same decoding settings and passes the integrity check;
    otherwise everything is decoded (and that is said in the log, not an error)."""

    def __init__(self, folder: Path, manifest: dict, has_teacher_copy: bool):
        self.has_teacher_copy = has_teacher_copy
        self._folder = folder
        self._manifest = manifest
        # (split, first row) -> (segment number, end row) of every array file
        self._file_starts = {}
        for split in SPLITS:
            bounds = np.cumsum([0, *segment_rows(manifest, split)]).tolist()
            for k in range(len(bounds) - 1):
                self._file_starts[(split, bounds[k])] = (k, bounds[k + 1])

    @classmethod
    def find(cls, out: Path, settings: DecodeSettings) -> _Previous | None:
        from kdpipe.data.prepared import load_prepared

        if not (out / MANIFEST).is_file() or not (out / ROWS).is_file():
            return None
        try:
            manifest = read_json(out / MANIFEST)
            if manifest.get("decoding") != _decoding_record(settings):
                log.info("prepare: %s was decoded with other settings; decoding every image", shown(out))
                return None
            data = load_prepared(out)  # the integrity check: a changed file means no reuse
            if first_mismatch(out, manifest["files"], [ROWS]) is not None:
                raise ValueError(f"{ROWS} does not match its recorded sha256")
            rows = _rows_file(out / ROWS)
            if rows.dtype != ROW_RECORD or len(rows) != sum(int(manifest["counts"][name]) for name in SPLITS):
                raise ValueError(f"{ROWS} does not list the rows of the arrays")
            return cls(out, manifest, data.train_xt is not None)
        except (KdpipeError, OSError, ValueError, KeyError) as exc:
            log.info("prepare: not reusing %s (%s); decoding every image", shown(out), exc)
            return None

    def write_rows(self, path: Path) -> None:
        """The previous rows by file sha256, in an SQLite file the decoding workers read."""
        Ledger.write_previous(
            path, _rows_file(self._folder / ROWS), [int(self._manifest["counts"][name]) for name in SPLITS]
        )

    def array_files(self, kind: str) -> dict[int, list[Path]]:
        """The previous output's files of each split's ``kind`` array (by split index), in row order
        (its segments, if several); read until the new output replaces them."""
        return {
            k: [self._folder / f for f in segment_names(self._manifest, f"{split}_{kind}.npy")]
            for k, split in enumerate(SPLITS)
        }

    def file_holding(self, origin: tuple[int, int] | None, count: int, kind: str) -> tuple[Path, str] | None:
        """The previous file (and its recorded sha256) that holds exactly ``count`` consecutive rows
        starting at ``origin`` (split index, row): such a file is hard-linked into the new output
        instead of being written and hashed again."""
        if origin is None or count == 0:
            return None
        split, start = SPLITS[origin[0]], origin[1]
        found = self._file_starts.get((split, start))
        if found is None or found[1] - start != count:
            return None
        name = segment_file(split, kind, found[0])
        digest = self._manifest["files"].get(name)
        return (self._folder / name, digest) if digest else None


def _rows_file(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot map an empty array
        return np.load(path, allow_pickle=False)


def _decoding_record(settings: DecodeSettings) -> dict[str, Any]:
    """What decides the decoded pixels and which files are accepted (reuse requires all equal)."""
    return {"version": DECODE_VERSION, **dataclasses.asdict(settings)}


# ---------------------------------------------------------------- de-duplication


def _dedupe(ledger: Ledger) -> None:
    """Keep one copy of each distinct image; resolve label conflicts and test leakage."""
    for group in ledger.duplicate_groups():
        keep = _resolve_group(group, ledger)
        for member in group:
            if member is not keep:
                ledger.drop(member.row)


def _resolve_group(group: list[Member], ledger: Ledger) -> Member | None:
    """Return the copy to keep from a group of identical images (sorted by preference), or None."""
    labels = {i.label for i in group if i.split != "unlabeled"}
    if len(labels) > 1:
        # The same picture under two classes: no way to know which is right, so none is used.
        where = ", ".join(f"{i.rel} ({i.label})" for i in group if i.label is not None)
        for item in group:
            ledger.reject(
                item.rel, item.split, "conflicting_labels", f"the same image has different labels: {where}"
            )
        return None
    tests = [i for i in group if i.split == "test"]
    keep = tests[0] if tests else group[0]
    for item in group:
        if item is keep:
            continue
        if tests and item.split != "test":
            ledger.reject(
                item.rel, item.split, "leakage_with_test", f"the same image is in the test split: {keep.rel}"
            )
        else:
            ledger.reject(item.rel, item.split, "duplicate", f"the same image as {keep.rel} (kept)")
    return keep


def _drop_near_copies_of_test(ledger: Ledger, pixels: dict[int, list[Path]], size: int) -> None:
    """Reject, as leakage, every training or unlabeled image that is a near-copy of a test image
    (re-encoded, re-saved in another format: :mod:`kdpipe.data.nearcopies`); exact copies are gone already."""
    test_chunks = list(ledger.used_chunks(test=True))
    tests = [item for chunk in test_chunks for item in chunk]
    if not tests:
        return
    reference = ReferenceThumbnails(np.concatenate(list(_thumbnail_chunks(test_chunks, pixels, size))))
    for chunk in ledger.used_chunks(test=False):
        for match in reference.matches(_thumbnail_chunks([chunk], pixels, size)):
            row, split, rel = chunk[match.index][:3]
            ledger.reject(
                rel,
                split,
                "leakage_with_test",
                f"a near-copy of a test image: {tests[match.test][2]} (thumbnails {THUMBNAIL} px apart "
                f"by {match.rms:.1f} of 255 RMS; {MAX_RMS:g} or less counts as a copy)",
            )
            ledger.drop(row)


def _thumbnail_chunks(
    chunks: Iterable[list[tuple]], pixels: dict[int, list[Path]], size: int
) -> Iterator[np.ndarray]:
    """The thumbnails of each chunk of (row, split, rel, origin, origin_row) items, read from where
    their pixels are (this prepare's spool or the previous output)."""
    piece = max(1, 8 * _COPY_BYTES // (size * size * 3))  # rows read at a time: memory stays flat
    for chunk in chunks:
        for start in range(0, len(chunk), piece):
            yield thumbnails(_gather_rows(pixels, [item[3:5] for item in chunk[start : start + piece]], size))


def _require_each_class(root: Path, ledger: Ledger) -> None:
    present = ledger.labeled_classes_present()
    for name in ledger.class_names:
        if name in present:
            continue
        total, folder_rejects = ledger.rejected_under(f"labeled/{name}/", 5)
        examples = "".join(f"\n  {e['path']}: {e['reason']} ({e['detail']})" for e in folder_rejects)
        more = f"\n  ... and {total - 5} more" if total > 5 else ""
        raise DataError(
            f"{root / 'labeled' / name}: no valid image for class {name!r} "
            f"({total} file(s) rejected){examples}{more}"
        )


# ---------------------------------------------------------------- outputs


class _Layout:
    """Which output files hold which rows: one file per split, except the unlabeled split, kept in
    segments by batch folder (see :mod:`kdpipe.data.segments`) so an ingest leaves earlier files alone."""

    def __init__(self, ledger: Ledger, size: int):
        counts = ledger.split_counts()
        folders = (_batch_folder(rel) for chunk in ledger.out_rows(OUT_UNLABELED, "rel") for (rel,) in chunk)
        self.segments = {"unlabeled": segment_sizes(folders, size * size * 3) or [0]}
        self._sizes = {split: self.segments.get(split, [counts[k]]) for k, split in enumerate(SPLITS)}

    def files(self, kind: str) -> list[tuple[str, int, int, int]]:
        """(file name, output split index, first row, rows) for every ``kind`` array file, in the
        order they are written."""
        out = []
        for k, split in enumerate(SPLITS):
            sizes = self._sizes[split]
            bounds = np.cumsum([0, *sizes]).tolist()
            out += [(segment_file(split, kind, s), k, bounds[s], sizes[s]) for s in range(len(sizes))]
        return out


def _batch_folder(rel: str) -> str:
    """``unlabeled/batch-0002-1a2b3c4d/x.jpg`` -> ``batch-0002-1a2b3c4d``; a file directly in unlabeled/ -> ''."""
    parts = rel.split("/")
    return parts[1] if len(parts) > 2 else ""


class _ArrayWriter:
    """Writes the image arrays, hard-linking any file of the previous output that holds exactly the
    same rows (an ingest changes only the last unlabeled segment): no copy and no new hash for it."""

    def __init__(self, out: Path, layout: _Layout, ledger: Ledger, previous: _Previous | None):
        self.out, self.layout, self.ledger, self.previous = out, layout, ledger, previous
        self.linked: dict[str, str] = {}  # file name -> sha256 recorded by the previous output

    def write_images(self, kind: str, spool: Path, size: int) -> None:
        sources = {SPOOL: [spool], **(self.previous.array_files(kind) if self.previous else {})}
        chunk = max(1, _COPY_BYTES // (size * size * 3))
        for name, split, start, count in self.layout.files(kind):
            held = None
            if self.previous is not None:
                held = self.previous.file_holding(self.ledger.single_origin(split, start, count), count, kind)
            if held is not None and _hard_link(held[0], self.out / name):
                self.linked[name] = held[1]
            else:
                origins = self.ledger.out_rows(split, "origin, origin_row", start, start + count, chunk=chunk)
                _save_rows(self.out / name, sources, origins, count, size)


def _hard_link(source: Path, target: Path) -> bool:
    """A second name for an unchanged file (same inode: no copy, and DVC sees it unchanged); False
    where the file system cannot (another device, no hard links), and the rows are copied instead."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _write_labels(out: Path, ledger: Ledger) -> None:
    counts = ledger.split_counts()
    for k, name in enumerate(SPLITS):
        if name != "unlabeled":
            labels = (np.array(chunk, dtype=np.int64).reshape(-1) for chunk in ledger.out_rows(k, "label"))
            _save_column(out / f"{name}_y.npy", np.dtype(np.int64), counts[k], labels)


# One record per output row (splits in SPLITS order): what the next prepare needs to reuse the row.
ROW_RECORD = np.dtype([("file", "S64"), ("pixel", "S64"), ("larger", "?")])


def _write_rows(out: Path, ledger: Ledger) -> None:
    records = (
        np.array(chunk, dtype=ROW_RECORD)
        for k in range(len(SPLITS))
        for chunk in ledger.out_rows(k, "file_hash, pixel_hash, larger")
    )
    _save_column(out / ROWS, ROW_RECORD, sum(ledger.split_counts()), records)


def _save_column(path: Path, dtype: np.dtype, count: int, chunks: Iterable[np.ndarray]) -> None:
    """A 1-D ``.npy`` of ``count`` elements (the same bytes as np.save), filled chunk by chunk."""
    if count == 0:  # np.memmap cannot map a zero-length array
        np.save(path, np.zeros(0, dtype=dtype))
        return
    dest = allocated_memmap(path, dtype, (count,))
    at = 0
    for chunk in chunks:
        dest[at : at + len(chunk)] = chunk
        at += len(chunk)
        release(dest)  # written pages go to the page cache, not this process's resident set
    if at != count:
        raise AssertionError(f"{path}: wrote {at} rows of {count}")
    dest.flush()
    del dest


def _save_rows(
    path: Path,
    sources: dict[int, list[Path]],
    origins: Iterable[list[tuple[int, int]]],
    count: int,
    size: int,
) -> None:
    """Write the rows named by ``origins`` (chunks of (source, row); source SPOOL or a previous
    split) as a standard .npy (same bytes as np.save). Neither the output nor the sources are
    mapped: a chunk's rows are read from the source files into a buffer (``preadv``, in file
    order) and written with ``os.pwrite``, so the resident memory is one chunk. Gathering through a
    map instead would also map up to 64 KiB around each row read (the kernel's fault-around): up
    to 85 MiB per chunk of random rows from a large spool."""
    shape = (count, size, size, 3)
    if not count:  # np.memmap cannot map a zero-length array
        np.save(path, np.zeros(shape, dtype=np.uint8))
        return
    dest = allocated_memmap(path, np.uint8, shape)  # header written, blocks reserved (ENOSPC now, not later)
    offset, row_bytes = int(dest.offset), size * size * 3
    del dest
    fd = os.open(path, os.O_WRONLY)
    try:
        at = 0
        for chunk in origins:
            buffer = _gather_rows(sources, chunk, size)
            _write_all(fd, buffer, offset + at * row_bytes, path)
            at += len(buffer)
        os.fsync(fd)
    finally:
        os.close(fd)


def _gather_rows(sources: dict[int, list[Path]], origins: list[tuple[int, int]], size: int) -> np.ndarray:
    """The images at ``origins`` ((source, row): SPOOL or a previous split), in that order, read
    source by source from their files."""
    where = np.array(origins, dtype=np.int64).reshape(-1, 2)
    buffer = np.empty((len(where), size, size, 3), dtype=np.uint8)
    for source in np.unique(where[:, 0]).tolist():
        picked = np.flatnonzero(where[:, 0] == source)
        _read_rows(
            joined([np.load(part, mmap_mode="r") for part in sources[source]]),
            where[picked, 1],
            picked,
            buffer,
        )
    return buffer


def _read_rows(source: np.ndarray, rows: np.ndarray, slots: np.ndarray, out: np.ndarray) -> None:
    """``out[slots] = source[rows]``, read from the files behind ``source`` where it can be."""
    reader = FileRows.of(source)
    if reader is None:  # no preadv on this platform: through the map, then let its pages go
        out[slots] = source[rows]
        release(source)
        return
    order = np.argsort(rows, kind="stable")  # forward through the file
    reader.read(rows[order, None], slots[order], out)


def _write_all(fd: int, data: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")  # the array's own bytes: no copy
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        view, offset = view[written:], offset + written


def _write_sources(path: Path, ledger: Ledger) -> None:
    """sources.json: {split: [relative path of each row]}, written as it is read (as write_json lays it out)."""

    def parts() -> Iterator[str]:
        yield "{"
        for k, split in enumerate(SPLITS):
            yield f"{',' if k else ''}\n  {json.dumps(split)}: ["
            rels = (json.dumps(rel) for chunk in ledger.out_rows(k, "rel") for (rel,) in chunk)
            yield from _json_items(rels, "    ", "\n  ]")
        yield "\n}\n"

    _write_streamed(path, parts())


def _write_rejected(path: Path, ledger: Ledger) -> None:
    """rejected.json: every file not used, sorted by path and reason (as write_json lays it out)."""

    def parts() -> Iterator[str]:
        yield "["
        entries = (
            textwrap.indent(json.dumps(entry, indent=2), "  ").lstrip() for entry in ledger.rejected_sorted()
        )
        yield from _json_items(entries, "  ", "\n]")
        yield "\n"

    _write_streamed(path, parts())


def _json_items(items: Iterable[str], indent: str, close: str) -> Iterator[str]:
    """The items of a JSON list as ``json.dumps(indent=2)`` writes them, then ``close`` (just ``]`` when empty)."""
    empty = True
    for item in items:
        yield f"{'' if empty else ','}\n{indent}{item}"
        empty = False
    yield "]" if empty else close


def _write_streamed(path: Path, parts: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for part in parts:
            f.write(part)
        f.flush()
        os.fsync(f.fileno())


def _file_order(name: str) -> tuple[int, int]:
    """Manifest order: the arrays as before (ARRAY_FILES, then the teacher copies), segments after their first file."""
    stem, _, rest = name.partition(".")
    base = f"{stem}.npy"
    order = (*ARRAY_FILES, *TEACHER_COPY_FILES)
    return order.index(base), int(rest[:-4]) if rest != "npy" else 0


def _data_version(ledger: Ledger) -> str:
    """Content hash of the input actually used: (source split, path, label, file sha256) entries.

    Paths and labels enter as their exact bytes (``surrogateescape``), so a name that is not UTF-8
    neither crashes the hash nor collides with its escaped spelling."""
    digest = hashlib.sha256()
    for entry in ledger.used_in_data_version_order():
        digest.update(json.dumps(entry, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _counts(ledger: Ledger) -> dict[str, int]:
    counts = dict(zip(SPLITS, ledger.split_counts(), strict=True))
    counts["rejected"] = ledger.rejected_count()
    return counts


def _manifest(
    out: Path,
    params: Params,
    ledger: Ledger,
    teacher_copy_size: int | None,
    layout: _Layout,
    linked: dict[str, str],
) -> dict[str, Any]:
    per_class = {name: ledger.class_counts(SPLITS.index(name)) for name in ("train", "val", "test")}
    images = [f[0] for kind in ("x", "xt" if teacher_copy_size else None) if kind for f in layout.files(kind)]
    labels = [name for name in ARRAY_FILES if name.endswith("_y.npy")]
    # a hard-linked file is the previous output's, which passed its integrity check: its hash stands
    files = {
        name: linked.get(name) or file_sha256(out / name)
        for name in sorted((*images, *labels), key=_file_order) + [ROWS, SOURCES, REJECTED]
    }
    return {
        "class_names": ledger.class_names,
        "counts": _counts(ledger),
        "per_class": per_class,
        "image_size": params.prepare.image_size,
        # the size of the *_xt.npy copies; null when the teacher upsamples the student-size arrays
        "teacher_image_size": teacher_copy_size,
        "data_version": _data_version(ledger),
        "files": files,
        # rows per file of a split kept in several files (kdpipe.data.segments); absent when each split is one file
        **({"segments": layout.segments} if any(len(v) > 1 for v in layout.segments.values()) else {}),
        # workers is left out: it changes how fast, never what (the outputs are the same bytes)
        "params": {
            **params.prepare.model_dump(exclude={"workers"}),
            "teacher_image_size": params.teacher.image_size,
        },
        "decoding": _decoding_record(_decode_settings(params.prepare, _teacher_size(params))),
        "kdpipe_version": __version__,
    }


# Below this many validation images, one image is worth more than half a point of accuracy and the
# comparisons that use the split (best checkpoint, early stopping, select) are mostly noise.
SMALL_VALIDATION = 100


def summary_lines(
    manifest: dict[str, Any],
    reasons: list[tuple[str, int]],
    examples: list[dict[str, str]],
    out: Path | None,
    val_fraction: float | None = None,
) -> list[str]:
    """What prepare prints: the classes, the images per split, what was rejected and why (``reasons``:
    (reason, count), most frequent first; ``examples``: the first rejected files, sorted), and a
    warning when the validation split is too small to choose between models."""
    c = manifest["counts"]
    names = manifest["class_names"]
    shown_names = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    where = f" -> {shown(out)}" if out is not None else " (check only: nothing written)"
    lines = [
        f"prepare: {len(names)} classes: {shown_names}",
        f"prepare: {c['train']} train, {c['val']} validation, {c['unlabeled']} unlabeled, {c['test']} test "
        f"images{where}",
    ]
    if c["rejected"]:
        lines.append(
            f"prepare: {c['rejected']} file(s) not used: "
            + ", ".join(f"{n} {reason}" for reason, n in reasons)
            + ("" if out is None else f" (all listed in {shown(out / REJECTED)})")
        )
        for r in examples:
            lines.append(f"  {r['path']}: {r['reason']} ({r['detail']})")
        if c["rejected"] > len(examples):
            lines.append(f"  ... and {c['rejected'] - len(examples)} more")
    lines += class_lines(manifest, val_fraction)
    if c["val"] == 0 and val_fraction == 0:
        lines.append(
            "prepare: no validation split (prepare.val_fraction 0): every label trains; the teacher is "
            "checked by cross-validation and select ranks the models by agreement with the teacher"
        )
    elif c["val"] == 0:
        lines.append(
            "warning: the validation split is empty (every class has a single labeled image): "
            "nothing can pick the best checkpoint or model"
        )
    elif c["val"] < SMALL_VALIDATION:
        half_width = 100 * 1.96 * (0.25 / c["val"]) ** 0.5
        lines.append(
            f"warning: the validation split holds only {c['val']} images: an accuracy measured on it is "
            f"uncertain by up to ±{half_width:.0f} points, too coarse to choose between models reliably; "
            "label more images, or set prepare.val_fraction=0 to train on every label and check the "
            "teacher by cross-validation instead (README, 'Few labels')"
        )
    return lines


def _summary_manifest(params: Params, ledger: Ledger, copy_size: int | None) -> dict[str, Any]:
    """The manifest's counts for ``--check`` (no files, so no hashes)."""
    per_class = {name: ledger.class_counts(SPLITS.index(name)) for name in ("train", "val", "test")}
    return {
        "class_names": ledger.class_names,
        "counts": _counts(ledger),
        "per_class": per_class,
        "image_size": params.prepare.image_size,
        "teacher_image_size": copy_size,
        "check_only": True,
    }


# A class with fewer labeled images than this gets a warning: too few to learn it from, and (with a
# validation split) at most one of them is held out to check it.
SMALL_CLASS = 3
MAX_CLASS_LINES = 40  # more classes: only the smallest are listed (the manifest has them all)


def class_lines(manifest: dict[str, Any], val_fraction: float | None) -> list[str]:
    """Images per class and split (one line per class), then one warning per class too small to train
    or to validate."""
    per_class = manifest.get("per_class") or {}
    if not per_class:
        return []
    names = manifest["class_names"]

    def labeled(name: str) -> int:
        return per_class["train"].get(name, 0) + per_class["val"].get(name, 0)

    shown_names = (
        names if len(names) <= MAX_CLASS_LINES else sorted(names, key=labeled)[: MAX_CLASS_LINES // 2]
    )
    width = max(len(name) for name in shown_names)
    lines = [
        "prepare: images per class (train / validation / test)"
        + (":" if shown_names is names else f", the {len(shown_names)} smallest of {len(names)} classes:")
    ]
    lines += [
        f"  {name:<{width}}  {per_class['train'].get(name, 0):>6} / {per_class['val'].get(name, 0):>6} / "
        f"{per_class['test'].get(name, 0):>6}"
        for name in shown_names
    ]
    for name in names:
        count, val = labeled(name), per_class["val"].get(name, 0)
        if count >= SMALL_CLASS:
            continue
        if val == 0 and val_fraction != 0:
            lines.append(
                f"warning: class '{name}' has {count} labeled image(s): too few to train it, and none is "
                "left to validate it; label a few more (the pipeline still runs)"
            )
        else:
            lines.append(
                f"warning: class '{name}' has {count} labeled image(s): too few to train it reliably; "
                "label a few more (the pipeline still runs)"
            )
    return lines
