"""One directory walk for every step that reads the user's folders (prepare, ingest).

Every entry is visited once, in sorted order. Symlink loops, links that leave the walk's boundary,
broken links and special files are reported (``symlink_loop``, ``visited_twice``,
``symlink_outside_root``, ``broken_symlink``, ``not_a_regular_file``), never followed or opened.
Hidden entries, OS clutter and ``*.dvc`` files are skipped. Names that are not UTF-8 are walked too:
:func:`shown` makes them readable, :func:`name_bytes` gives their exact bytes.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

from kdpipe.core.files import shown  # noqa: F401  (walk.shown: how every step prints a path)

IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})

Report = Callable[[Path, str, str], None]  # (path, reason, detail)


def name_bytes(path: str | os.PathLike) -> bytes:
    """The exact bytes of a path (what the file system stores), for hashing."""
    return os.fsencode(path)


def skipped(entry: Path) -> bool:
    """Hidden entries, OS clutter and DVC pointer files are not data."""
    return _skipped_name(entry.name, is_file=entry.is_file)


def _skipped_name(name: str, is_file: Callable[[], bool]) -> bool:
    # a name that does not start with a dot ends in ".dvc" exactly when its Path.suffix is ".dvc"
    return name.startswith(".") or name in IGNORED_NAMES or (name.endswith(".dvc") and is_file())


def real_path(entry: Path) -> Path | None:
    """The fully resolved path, or None when the link chain loops (Python raises for that)."""
    try:
        return entry.resolve(strict=False)
    except (RuntimeError, OSError):  # "Symlink loop from ..." (RuntimeError in 3.11, OSError ELOOP later)
        return None


class Entry(NamedTuple):
    """One entry of a folder listing, with its type as the listing gave it (no extra stat)."""

    name: str
    symlink: bool
    folder: bool  # a directory, or a link to one
    regular: bool  # a regular file, or a link to one


def _listed(folder: str) -> Iterator[Entry]:
    with os.scandir(folder) as it:
        for e in it:
            symlink = e.is_symlink()
            try:
                yield Entry(e.name, symlink, e.is_dir(), e.is_file())
            except OSError:  # a link that loops or cannot be followed: reported by the walk
                yield Entry(e.name, symlink, False, False)


def sorted_in_memory(entries: Iterable[Entry]) -> Iterator[Entry]:
    """A folder's entries by the bytes of their names (prepare sorts on disk instead: kdpipe.data.ledger,
    a million files in one folder would otherwise cost a list of a million entries)."""
    return iter(sorted(entries, key=lambda e: os.fsencode(e.name)))


class SeenFiles(Protocol):
    def first_visit(self, real: str, link: bool = False) -> bool:
        """Record a real path (reached through a symbolic ``link``, or not); False when it was
        recorded before."""


class SeenInMemory:
    """The real paths handed out so far, in a set (prepare keeps them on disk instead: kdpipe.data.ledger)."""

    def __init__(self) -> None:
        self._paths: set[str] = set()

    def first_visit(self, real: str, link: bool = False) -> bool:
        if real in self._paths:
            return False
        self._paths.add(real)
        return True


class Walker:
    """Walks folders under a boundary; remembers every real folder and file it has handed out."""

    def __init__(
        self,
        boundary: Path,
        report: Report,
        seen: SeenFiles | None = None,
        sort: Callable[[Iterable[Entry]], Iterator[Entry]] = sorted_in_memory,
    ):
        self.boundary = Path(boundary)
        self.boundary_real = self.boundary.resolve()
        self.report = report
        self.folders: set[Path] = set()
        self.seen = seen if seen is not None else SeenInMemory()
        self.sort = sort

    def entries(self, folder: Path) -> Iterator[Path]:
        """Sorted, non-skipped entries of ``folder``; unusable symlinks are reported, not returned."""
        return (Path(path) for path, _ in self._listing(os.fspath(folder)))

    def _listing(self, folder: str) -> Iterator[tuple[str, Entry]]:
        # os.scandir: the entry types come with the listing, so a million files cost no extra stat.
        # Paths are strings: pathlib would parse each one again and intern every file name for as
        # long as the process runs (megabytes at a million files).
        for entry in self.sort(_listed(folder)):
            path = os.path.join(folder, entry.name)
            if _skipped_name(entry.name, is_file=lambda entry=entry: entry.regular):
                continue
            if entry.symlink and not self._usable_link(Path(path)):
                continue
            yield path, entry

    def _usable_link(self, entry: Path) -> bool:
        target = real_path(entry)
        if target is None:
            self.report(entry, "symlink_loop", "the symlink chain loops back on itself")
            return False
        if not target.exists():
            self.report(entry, "broken_symlink", f"symlink target {shown(os.readlink(entry))} does not exist")
            return False
        if not target.is_relative_to(self.boundary_real):
            self.report(entry, "symlink_outside_root", "symlink points outside the data root")
            return False
        return True

    def enter(self, folder: Path) -> Path | None:
        """Claim a folder before walking it; returns its real path, or None for a folder already
        claimed (or an ancestor of one being walked: a link back up the tree), which is a loop,
        reported once and not walked again."""
        real = folder.resolve()
        if folder.is_symlink() and folder.parent.resolve().is_relative_to(real):
            self.report(folder, "symlink_loop", "links back to a folder above it; not followed")
            return None
        if real in self.folders or any(walked.is_relative_to(real) for walked in self.folders):
            self.report(
                folder, "visited_twice", "the same folder is reachable through another link; read once"
            )
            return None
        self.folders.add(real)
        return real

    def files_under(self, folder: Path) -> Iterator[Path]:
        """Every regular file under ``folder`` (any depth), each real file at most once."""
        return (Path(path) for path in self.file_paths_under(folder))

    def file_paths_under(self, folder: Path) -> Iterator[str]:
        """:meth:`files_under` as strings (``folder`` joined with the names below it): a walk of a
        million files makes no Path per file."""
        real_folder = self.enter(Path(folder))
        if real_folder is None:
            return
        real_prefix = os.fspath(real_folder)
        for path, entry in self._listing(os.fspath(folder)):
            if entry.folder:
                yield from self.file_paths_under(Path(path))
            elif entry.regular:
                # only a link needs resolving: a plain entry's real path is its real folder's plus its name
                real = os.path.realpath(path) if entry.symlink else os.path.join(real_prefix, entry.name)
                if not self.seen.first_visit(real, entry.symlink):
                    self.report(
                        Path(path),
                        "visited_twice",
                        "the same file is reachable through another link; used once",
                    )
                    continue
                yield path
            else:
                self.report(Path(path), "not_a_regular_file", "not a regular file")
