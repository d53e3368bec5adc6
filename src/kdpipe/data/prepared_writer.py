"""Writing the prepare step's output format (read by :mod:`kdpipe.data.prepared`): labels, row
records, sources.json, rejected.json (streamed, whatever the number of files), the manifest, and
the previous output as a source of decoded rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import __version__
from kdpipe.core.atomic import read_json
from kdpipe.core.errors import KdpipeError
from kdpipe.core.files import file_sha256
from kdpipe.core.params import Params
from kdpipe.data.decoding import DECODE_VERSION, DecodeSettings
from kdpipe.data.integrity import first_mismatch
from kdpipe.data.ledger import (
    OUT_UNLABELED,
    SPOOL,
    Ledger,
)
from kdpipe.data.prepared import (
    ARRAY_FILES,
    MANIFEST,
    REJECTED,
    ROWS,
    SOURCES,
    SPLITS,
    TEACHER_COPY_FILES,
    segment_names,
    segment_rows,
)
from kdpipe.data.rowio import ROW_RECORD, hard_link, read_row_records, save_column, save_rows
from kdpipe.data.segments import segment_file, segment_sizes
from kdpipe.data.walk import shown

log = logging.getLogger(__name__)


class PreviousOutput:
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
    def find(cls, out: Path, settings: DecodeSettings) -> PreviousOutput | None:
        from kdpipe.data.prepared import load_prepared

        if not (out / MANIFEST).is_file() or not (out / ROWS).is_file():
            return None
        try:
            manifest = read_json(out / MANIFEST)
            if manifest.get("decoding") != decoding_record(settings):
                log.info("prepare: %s was decoded with other settings; decoding every image", shown(out))
                return None
            data = load_prepared(out)  # the integrity check: a changed file means no reuse
            if first_mismatch(out, manifest["files"], [ROWS]) is not None:
                raise ValueError(f"{ROWS} does not match its recorded sha256")
            rows = read_row_records(out / ROWS)
            if rows.dtype != ROW_RECORD or len(rows) != sum(int(manifest["counts"][name]) for name in SPLITS):
                raise ValueError(f"{ROWS} does not list the rows of the arrays")
            return cls(out, manifest, data.train_xt is not None)
        except (KdpipeError, OSError, ValueError, KeyError) as exc:
            log.info("prepare: not reusing %s (%s); decoding every image", shown(out), exc)
            return None

    def write_rows(self, path: Path) -> None:
        """The previous rows by file sha256, in an SQLite file the decoding workers read."""
        Ledger.write_previous(
            path,
            read_row_records(self._folder / ROWS),
            [int(self._manifest["counts"][name]) for name in SPLITS],
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


def decoding_record(settings: DecodeSettings) -> dict[str, Any]:
    """What decides the decoded pixels and which files are accepted (reuse requires all equal)."""
    # the manifest names the teacher's size "teacher_size", as it has since decoding was recorded:
    # a new key would make every existing output look decoded otherwise, and be decoded again
    record = dataclasses.asdict(settings)
    return {"version": DECODE_VERSION, **{_RECORD_KEYS.get(k, k): v for k, v in record.items()}}


_RECORD_KEYS = {"teacher_image_size": "teacher_size"}


def write_labels(out: Path, ledger: Ledger) -> None:
    counts = ledger.split_counts()
    for k, name in enumerate(SPLITS):
        if name != "unlabeled":
            labels = (np.array(chunk, dtype=np.int64).reshape(-1) for chunk in ledger.out_rows(k, "label"))
            save_column(out / f"{name}_y.npy", np.dtype(np.int64), counts[k], labels)


def write_row_records(out: Path, ledger: Ledger) -> None:
    records = (
        np.array(chunk, dtype=ROW_RECORD)
        for k in range(len(SPLITS))
        for chunk in ledger.out_rows(k, "file_hash, pixel_hash, larger")
    )
    save_column(out / ROWS, ROW_RECORD, sum(ledger.split_counts()), records)


def write_sources(path: Path, ledger: Ledger) -> None:
    """sources.json: {split: [relative path of each row]}, written as it is read (as write_json lays it out)."""

    def parts() -> Iterator[str]:
        yield "{"
        for k, split in enumerate(SPLITS):
            yield f"{',' if k else ''}\n  {json.dumps(split)}: ["
            rels = (json.dumps(rel) for chunk in ledger.out_rows(k, "rel") for (rel,) in chunk)
            yield from _json_items(rels, "    ", "\n  ]")
        yield "\n}\n"

    _write_streamed(path, parts())


def write_rejected(path: Path, ledger: Ledger) -> None:
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


def file_order(name: str) -> tuple[int, int]:
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


def build_manifest(
    out: Path,
    params: Params,
    ledger: Ledger,
    teacher_image_size: int | None,
    layout: Layout,
    linked: dict[str, str],
    decoding: dict[str, Any],
) -> dict[str, Any]:
    images = [
        f[0] for kind in ("x", "xt" if teacher_image_size else None) if kind for f in layout.files(kind)
    ]
    labels = [name for name in ARRAY_FILES if name.endswith("_y.npy")]
    # a hard-linked file is the previous output's, which passed its integrity check: its hash stands
    files = {
        name: linked.get(name) or file_sha256(out / name)
        for name in sorted((*images, *labels), key=file_order) + [ROWS, SOURCES, REJECTED]
    }
    return {
        **_counts_head(params, ledger, teacher_image_size),
        "data_version": _data_version(ledger),
        "files": files,
        # rows per file of a split kept in several files (kdpipe.data.segments); absent when each split is one file
        **({"segments": layout.segments} if any(len(v) > 1 for v in layout.segments.values()) else {}),
        # workers is left out: it changes how fast, never what (the outputs are the same bytes)
        "params": {
            **params.prepare.model_dump(exclude={"workers"}),
            "teacher_image_size": params.teacher.image_size,
        },
        "decoding": decoding,  # decoding_record() of the settings used
        "kdpipe_version": __version__,
    }


def summary_manifest(params: Params, ledger: Ledger, teacher_image_size: int | None) -> dict[str, Any]:
    """The manifest's counts for ``--check`` (no files, so no hashes)."""
    return {**_counts_head(params, ledger, teacher_image_size), "check_only": True}


def _counts_head(params: Params, ledger: Ledger, teacher_image_size: int | None) -> dict[str, Any]:
    """The manifest's first keys, in order: classes, counts, image sizes (--check prints these too)."""
    return {
        "class_names": ledger.class_names,
        "counts": _counts(ledger),
        "per_class": {name: ledger.class_counts(SPLITS.index(name)) for name in ("train", "val", "test")},
        "image_size": params.prepare.image_size,
        # the size of the *_xt.npy copies; null when the teacher upsamples the student-size arrays
        "teacher_image_size": teacher_image_size,
    }


COPY_BYTES = 4 << 20  # pixels copied at a time from the decode spool into the output arrays


class Layout:
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


class ArrayWriter:
    """Writes the image arrays, hard-linking any file of the previous output that holds exactly the
    same rows (an ingest changes only the last unlabeled segment): no copy and no new hash for it."""

    def __init__(self, out: Path, layout: Layout, ledger: Ledger, previous: PreviousOutput | None):
        self.out, self.layout, self.ledger, self.previous = out, layout, ledger, previous
        self.linked: dict[str, str] = {}  # file name -> sha256 recorded by the previous output

    def write_images(self, kind: str, spool: Path, size: int) -> None:
        sources = {SPOOL: [spool], **(self.previous.array_files(kind) if self.previous else {})}
        chunk = max(1, COPY_BYTES // (size * size * 3))
        for name, split, start, count in self.layout.files(kind):
            held = None
            if self.previous is not None:
                held = self.previous.file_holding(self.ledger.single_origin(split, start, count), count, kind)
            if held is not None and hard_link(held[0], self.out / name):
                self.linked[name] = held[1]
            else:
                origins = self.ledger.out_rows(split, "origin, origin_row", start, start + count, chunk=chunk)
                save_rows(self.out / name, sources, origins, count, size)
