"""Reading the data folder into the ledger: the class folders of labeled/ and test/, every file
of unlabeled/, and what is not data (hidden files, DVC pointers) left out."""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

from kdpipe.core.errors import DataError
from kdpipe.data.imaging import extension_problem
from kdpipe.data.ledger import (
    LABELED,
    TEST,
    UNLABELED,
    Ledger,
)
from kdpipe.data.ledger import (
    SOURCES as SOURCE_FOLDERS,  # the source folders, in the order their files are listed
)
from kdpipe.data.walk import Walker, shown

log = logging.getLogger(__name__)


def scan(root: Path, ledger: Ledger) -> None:
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
