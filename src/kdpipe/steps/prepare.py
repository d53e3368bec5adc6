"""The ``prepare`` step: validate, de-duplicate, split and pack the user's images (the rules).

Reads ``labeled/<class>/``, ``unlabeled/`` (any depth) and ``test/<class>/`` under the data root;
writes one folder, replaced atomically, in the format :mod:`kdpipe.data.prepared` reads (written by
:mod:`kdpipe.data.prepared_writer`). What lives here: which files count, de-duplication, leakage
with the test split, the stratified split, whether a teacher-resolution copy is kept, and reuse of
the previous output's decoded rows (only new images are decoded after ``kdpipe ingest``). The
scanning, decoding, per-file ledger and row I/O are in :mod:`kdpipe.data`.

Design notes (output layout, teacher copy, incremental runs, memory): docs/data-path.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdpipe.core.atomic import atomic_dir, write_json
from kdpipe.core.errors import DataError
from kdpipe.core.layout import PREPARED
from kdpipe.core.params import Params, PrepareParams
from kdpipe.data.decoding import DecodeSettings, Spool, decode_files, worker_count
from kdpipe.data.integrity import input_hashes_path, record_verified
from kdpipe.data.ledger import (
    DECODED,
    PENDING,
    REUSED,
    SPOOL,
    Ledger,
    Member,
)
from kdpipe.data.ledger import (
    SOURCES as SOURCE_FOLDERS,  # the source folders, in the order their files are listed
)
from kdpipe.data.nearcopies import MAX_RMS, THUMBNAIL, ReferenceThumbnails, thumbnails
from kdpipe.data.prepared import (
    MANIFEST,
    REJECTED,
    SOURCES,
    TEACHER_INPUTS,
    teacher_inputs,
)
from kdpipe.data.prepared_writer import (
    COPY_BYTES,
    ArrayWriter,
    Layout,
    PreviousOutput,
    build_manifest,
    decoding_record,
    summary_manifest,
    write_labels,
    write_rejected,
    write_row_records,
    write_sources,
)
from kdpipe.data.rowio import gather_origins
from kdpipe.data.scan import scan
from kdpipe.data.walk import shown

log = logging.getLogger(__name__)

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
    settings = _decode_settings(
        cfg, params.teacher_image_size() if params.teacher_sees_more_pixels() else None
    )
    previous = PreviousOutput.find(out, settings) if reuse else None
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
    previous: PreviousOutput | None,
    check: bool,
) -> dict[str, Any]:
    """Scan, decode, de-duplicate, split and (unless ``check``) write the outputs into ``tmp``."""
    cfg = params.prepare
    scan(root, ledger)
    spool, teacher_spool = _decode_all(root, ledger, settings, cfg.workers, tmp, previous)
    _dedupe(ledger)
    pixels = {SPOOL: [spool], **(previous.array_files("x") if previous else {})}
    _drop_near_copies_of_test(ledger, pixels, settings.image_size)
    _require_each_class(root, ledger)
    ledger.assign_splits(cfg.val_fraction, cfg.seed)
    # the copy is kept only when most images are larger than the student's: upsampled pixels add nothing
    teacher_copy_size = (
        settings.teacher_image_size if settings.teacher_image_size and ledger.mostly_larger() else None
    )
    if teacher_copy_size and previous is not None and not previous.has_teacher_copy:
        # The new images tipped the balance: a teacher-resolution copy is now kept, and the reused
        # images have none, so everything is decoded again (rare: once, when it happens).
        raise _DecodeEverything  # leaves atomic_dir: its temporary folder goes, the output stays
    if check:
        return summary_manifest(params, ledger, teacher_copy_size)
    layout = Layout(ledger, cfg.image_size)
    writer = ArrayWriter(tmp, layout, ledger, previous)
    writer.write_images("x", spool, cfg.image_size)
    if teacher_copy_size:
        writer.write_images("xt", teacher_spool, teacher_copy_size)
    write_labels(tmp, ledger)
    write_row_records(tmp, ledger)
    write_sources(tmp / SOURCES, ledger)
    write_rejected(tmp / REJECTED, ledger)
    manifest = build_manifest(
        tmp, params, ledger, teacher_copy_size, layout, writer.linked, decoding_record(settings)
    )
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


# ---------------------------------------------------------------- decoding


def _decode_settings(cfg: PrepareParams, teacher_image_size: int | None) -> DecodeSettings:
    return DecodeSettings(
        image_size=cfg.image_size,
        teacher_image_size=teacher_image_size,
        max_image_pixels=cfg.max_image_pixels,
        min_side=cfg.min_side,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )


def _decode_all(
    root: Path,
    ledger: Ledger,
    settings: DecodeSettings,
    workers: int,
    tmp: Path,
    previous: PreviousOutput | None,
) -> tuple[Path, Path | None]:
    """Decode and resize every candidate into disk-backed spools (bounded memory, every core); reject
    failures. Files the previous output already holds are only hashed (their rows are copied later),
    or not even read while their remembered hash can be trusted (:func:`input_hashes_path`).

    The second spool (teacher resolution) exists only when a teacher-resolution copy may be needed."""
    total = ledger.count()
    spool = Spool.create(tmp / ".spool.npy", total, settings.image_size)
    teacher_spool = (
        Spool.create(tmp / ".spool_t.npy", total, settings.teacher_image_size)
        if settings.teacher_image_size
        else None
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
    pending = ledger.count(PENDING)
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
        reused, decoded = ledger.count(REUSED), ledger.count(DECODED)
        print(f"prepare: {reused} image(s) reused from the previous output, {decoded} decoded")
    return Path(spool.path), Path(teacher_spool.path) if teacher_spool else None


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
    piece = max(1, 8 * COPY_BYTES // (size * size * 3))  # rows read at a time: memory stays flat
    for chunk in chunks:
        for start in range(0, len(chunk), piece):
            yield thumbnails(
                gather_origins(pixels, [item[3:5] for item in chunk[start : start + piece]], size)
            )


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
