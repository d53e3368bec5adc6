"""prepare's per-file bookkeeping, kept on disk (SQLite) instead of in Python objects.

A million input files cost prepare about a kilobyte each when every one is a Python object (paths,
two sha256, where its pixels are, which split it went to): about a gigabyte of RAM before a single
pixel is handled, growing with the data set. The :class:`Ledger` keeps those records in a scratch
SQLite database inside prepare's temporary output folder, with a small, fixed page cache. The work
on them (sorting, grouping identical images, choosing the validation images, numbering output rows)
is SQL that SQLite runs with spill-to-disk sorts, and every pass in Python reads a bounded chunk at a
time. prepare's memory then stays the same whatever the number of files.

Tables:

- ``listing``: each folder's entries, sorted by name here (a folder may hold a million files);
- ``seen``: the real path of every file the walk handed out (a second link to it is reported);
- ``scanned`` (during the walk) then ``items``: one row per candidate image file, ``row`` being its
  place in prepare's order (source folder, then relative path) and its row in the decode spools;
- ``rejects``: every file not used, with its reason.

The previous output's rows (by file sha256) live in a second file, :meth:`Ledger.write_previous`,
that the decoding workers open read-only to skip files whose pixels are already there. The input
files' remembered sha256 (:func:`kdpipe.data.integrity.input_hashes_path`) is a third SQLite file, in
kdpipe's cache folder.

Paths are stored as their exact bytes (BLOB): a file name that is not UTF-8 cannot be a TEXT value.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.data.integrity import FINE_RACY_SECONDS, RACY_SECONDS, full_verification_requested
from kdpipe.data.mapped import release
from kdpipe.data.walk import Entry, sorted_in_memory

if TYPE_CHECKING:
    from kdpipe.data.decoding import Outcome

# Source folders, in the order prepare lists their files (a labeled copy of an image is kept over
# an unlabeled one, see prepare's de-duplication).
SOURCES = ("labeled", "test", "unlabeled")
LABELED, TEST, UNLABELED = range(3)
# Output splits: kdpipe.data.prepared.SPLITS order (train, val, unlabeled, test).
TRAIN, VAL, OUT_UNLABELED, OUT_TEST = range(4)
SPOOL = -1  # origin of a row decoded by this prepare (else the previous output's split index)

PENDING, DECODED, REUSED, REJECTED, DUPLICATE = range(5)
_USED = f"state IN ({DECODED}, {REUSED})"
CHUNK = 4096  # rows per read or write between Python and the database
CACHE_KIB = 2048  # SQLite's page cache per connection (its default size): the bound on its memory

_SCHEMA = """
CREATE TABLE seen (real BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE listing (id INT, name BLOB, symlink INT, folder INT, regular INT, PRIMARY KEY (id, name)) WITHOUT ROWID;
CREATE TABLE scanned (source INT, label INT, rel TEXT, path BLOB);
CREATE TABLE rejects (path TEXT, split TEXT, reason TEXT, detail BLOB);
CREATE TABLE items (
    row INTEGER PRIMARY KEY,  -- prepare's order; the row in the decode spools
    source INT, label INT, rel TEXT, path BLOB,
    dev INT, ino INT, size INT, mtime INT, ctime INT,  -- identity, to remember its sha256
    trusted TEXT,  -- sha256 remembered from an earlier prepare for that identity
    state INT DEFAULT 0,
    file_hash TEXT, pixel_hash TEXT, larger INT DEFAULT 0,
    origin INT, origin_row INT,  -- where its pixels are: SPOOL and row, or a previous output split and row
    out INT, out_row INT  -- output split and row there; NULL when not used
);
"""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    # A scratch database in a temporary folder: a crash discards the folder, so no journal and no
    # fsync; sorts larger than the cache spill to temporary files.
    for pragma in (
        "journal_mode = OFF",
        "synchronous = OFF",
        f"cache_size = -{CACHE_KIB}",
        "temp_store = FILE",
        "mmap_size = 0",
    ):
        db.execute(f"PRAGMA {pragma}")
    return db


def _signed(value: int) -> int:
    """An unsigned 64-bit stat field (an inode number can use the top bit) as SQLite's signed INTEGER."""
    return value - (1 << 64) if value >= 1 << 63 else value


def path_order(path: bytes) -> bytes:
    """A sort key for raw path bytes that orders like Python's ``str`` order of ``os.fsdecode(path)``
    (code points; an undecodable byte is a surrogate)."""
    return os.fsdecode(path).encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class Member:
    """One copy in a group of identical images (prepare's de-duplication)."""

    row: int
    split: str  # source folder
    rel: str
    label: str | None


class Ledger:
    """The records of one prepare run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = _connect(self.path)
        self.db.executescript(_SCHEMA)
        self.db.create_function("path_order", 1, path_order, deterministic=True)
        self.class_names: list[str] = []  # set by the scan
        self._scanned: list[tuple] = []
        self._listings = 0
        self._plain: list[tuple[bytes]] = []  # plain files handed out, not yet in ``seen``
        self._met_links = False
        self.chunk = CHUNK  # read when used: tests make it small to cross chunk boundaries

    def close(self) -> None:
        self.db.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    # ------------------------------------------------------------ scan

    def first_visit(self, real: str, link: bool = False) -> bool:
        """Record a real path handed out by the walk; False when it was handed out before.

        Two plain entries never share a real path (each real folder is walked once), so a plain
        file can only meet a link's target: plain files are recorded in batches, and looked up one
        by one only once the walk has met a link."""
        key = os.fsencode(real)
        if not link:
            if self._met_links and self.db.execute("SELECT 1 FROM seen WHERE real = ?", (key,)).fetchone():
                return False
            self._plain.append((key,))
            if len(self._plain) >= self.chunk:
                self._flush_plain()
            return True
        self._flush_plain()
        self._met_links = True
        return self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (key,)).rowcount == 1

    def _flush_plain(self) -> None:
        self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", self._plain)
        self._plain.clear()

    def sorted_entries(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        """A folder's entries by the bytes of their names (the walk's ``sort``): in memory up to a
        chunk of entries, sorted on disk beyond (a folder may hold a million files)."""
        entries = iter(entries)
        first = list(itertools.islice(entries, self.chunk + 1))
        if len(first) <= self.chunk:
            yield from sorted_in_memory(first)
            return
        self._listings += 1
        listing = self._listings
        batch = first
        while batch:
            rows = sorted((os.fsencode(e.name), e.symlink, e.folder, e.regular) for e in batch)
            self.db.executemany(f"INSERT INTO listing VALUES ({listing}, ?, ?, ?, ?)", rows)
            batch = list(itertools.islice(entries, self.chunk))
        last = b""
        # a page at a time, no cursor left open: the walk adds the listings of sub-folders meanwhile
        while rows := self.db.execute(
            "SELECT name, symlink, folder, regular FROM listing WHERE id = ? AND name > ? "
            "ORDER BY name LIMIT ?",
            (listing, last, self.chunk),
        ).fetchall():
            for name, symlink, folder, regular in rows:
                yield Entry(os.fsdecode(name), bool(symlink), bool(folder), bool(regular))
            last = rows[-1][0]

    def add_candidate(self, source: int, label: int | None, rel: str, path: str) -> None:
        self._scanned.append((source, label, rel, os.fsencode(path)))
        if len(self._scanned) >= self.chunk:
            self._flush_scanned()

    def _flush_scanned(self) -> None:
        self.db.executemany("INSERT INTO scanned VALUES (?, ?, ?, ?)", self._scanned)
        self._scanned.clear()

    def reject(self, rel: str, split: str, reason: str, detail: str) -> None:
        self.db.execute(
            "INSERT INTO rejects VALUES (?, ?, ?, ?)",
            (rel, split, reason, detail.encode("utf-8", "surrogatepass")),
        )

    def number_candidates(self) -> None:
        """Put the scanned files in prepare's order (source folder, relative path; ties in walk order)."""
        self._flush_scanned()
        self.db.execute(
            "INSERT INTO items (row, source, label, rel, path) SELECT "
            "row_number() OVER (ORDER BY source, rel, rowid) - 1, source, label, rel, path FROM scanned"
        )
        for table in ("scanned", "seen", "listing"):
            self.db.execute(f"DROP TABLE {table}")
        self.db.commit()

    def count(self, state: int | None = None) -> int:
        """Files recorded, or those in ``state`` (PENDING, DECODED, REUSED...)."""
        return self._count("1") if state is None else self._count("state = ?", state)

    def _count(self, where: str, *args) -> int:
        # the SQL stays in this class: callers ask typed questions (count, class_counts...)
        return self.db.execute(f"SELECT count(*) FROM items WHERE {where}", args).fetchone()[0]

    # ------------------------------------------------------------ input identities and hashes

    def record_identities(self) -> None:
        """(device, inode, size, mtime, ctime) of every candidate; zeros for one that cannot be stat'ed."""
        for rows in self._row_chunks("row, path"):
            updates = []
            for row, path in rows:
                try:
                    st = os.stat(path)
                    identity = (
                        _signed(st.st_dev),
                        _signed(st.st_ino),
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                    )
                except OSError:  # gone or unreadable: the decoder reports it
                    identity = (0, 0, 0, 0, 0)
                updates.append((*identity, row))
            self.db.executemany(
                "UPDATE items SET dev = ?, ino = ?, size = ?, mtime = ?, ctime = ? WHERE row = ?", updates
            )
        self.db.commit()

    def recall_input_hashes(self, store: Path) -> None:
        """Take each file's sha256 from ``store`` while its identity is unchanged and the record is not
        racy (taken within the clock's granularity of the file's last change); ``KDPIPE_VERIFY``
        trusts nothing. A missing or unreadable store only means every file is read."""
        if full_verification_requested() or not store.is_file():
            return
        self.db.commit()
        try:
            self.db.execute("ATTACH DATABASE ? AS remembered", (os.fsdecode(store),))
        except sqlite3.Error:
            return
        try:
            self.db.execute(f"""
                UPDATE items SET trusted = (
                    SELECT h.sha256 FROM remembered.hashes h
                    WHERE h.dev = items.dev AND h.ino = items.ino AND h.size = items.size
                      AND h.mtime = items.mtime AND h.ctime = items.ctime
                      AND h.stamped - max(h.mtime, h.ctime) >= (CASE WHEN h.ctime % 1000000000 = 0
                          THEN {int(RACY_SECONDS * 1e9)} ELSE {int(FINE_RACY_SECONDS * 1e9)} END)
                    LIMIT 1)
                WHERE ino != 0""")
            self.db.commit()
        except sqlite3.DatabaseError:  # not a store of this version, or damaged: read every file
            self.db.rollback()
            self.db.execute("UPDATE items SET trusted = NULL")
            self.db.commit()
        finally:
            self.db.execute("DETACH DATABASE remembered")

    def remember_input_hashes(self, store: Path) -> None:
        """Write this run's files' sha256 under their identities to ``store`` (replaced as a whole;
        best effort: a failure only means reading them next time). Rejected files have none."""
        temporary = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            temporary.unlink(missing_ok=True)
            self.db.commit()
            self.db.execute("ATTACH DATABASE ? AS remembered", (os.fsdecode(temporary),))
            try:
                self.db.execute(
                    "CREATE TABLE remembered.hashes (dev INT, ino INT, size INT, mtime INT, ctime INT, "
                    "stamped INT, sha256 TEXT)"
                )
                self.db.execute(
                    "INSERT INTO remembered.hashes SELECT dev, ino, size, mtime, ctime, ?, file_hash "
                    "FROM items WHERE file_hash IS NOT NULL AND ino != 0",
                    (time.time_ns(),),
                )
                self.db.execute("CREATE INDEX remembered.hashes_identity ON hashes (dev, ino)")
                self.db.commit()
            finally:
                self.db.execute("DETACH DATABASE remembered")
            os.replace(temporary, store)
        except (OSError, sqlite3.Error):
            temporary.unlink(missing_ok=True)

    # ------------------------------------------------------------ the previous output

    @staticmethod
    def write_previous(path: Path, rows: np.ndarray, split_sizes: list[int]) -> None:
        """The previous output's rows (``rows.npy``, read a chunk at a time), by file sha256, in a
        database of their own: the decoding workers read it to skip files already decoded there."""
        db = _connect(path)
        db.execute("CREATE TABLE rows (file TEXT, split INT, row INT, pixel TEXT, larger INT)")
        starts = np.cumsum([0, *split_sizes])
        for begin in range(0, len(rows), CHUNK):
            chunk = rows[begin : begin + CHUNK]
            positions = np.arange(begin, begin + len(chunk))
            splits = np.searchsorted(starts, positions, side="right") - 1
            db.executemany(
                "INSERT INTO rows VALUES (?, ?, ?, ?, ?)",
                zip(
                    (h.decode() for h in chunk["file"]),
                    splits.tolist(),
                    (positions - starts[splits]).tolist(),
                    (h.decode() for h in chunk["pixel"]),
                    chunk["larger"].astype(int).tolist(),
                    strict=True,
                ),
            )
            release(rows)  # about 130 bytes a row: 26 MB resident at 200k rows otherwise
        db.execute("CREATE INDEX rows_file ON rows (file)")  # built by one sort, not row by row
        db.commit()
        db.close()

    def attach_previous(self, path: Path) -> None:
        self.db.commit()
        self.db.execute("ATTACH DATABASE ? AS previous", (os.fsdecode(path),))

    def reuse_trusted(self) -> int:
        """Files whose remembered sha256 the previous output holds are reused without being read."""
        cursor = self.db.execute(
            f"UPDATE items SET state = {REUSED}, file_hash = trusted WHERE trusted IS NOT NULL "
            "AND EXISTS (SELECT 1 FROM previous.rows p WHERE p.file = items.trusted)"
        )
        self.db.commit()
        return cursor.rowcount

    def place_reused(self) -> None:
        """A reused file's pixels are where the previous output has them (first copy there)."""
        self.db.execute(f"""
            UPDATE items SET (origin, origin_row, pixel_hash, larger) = (
                SELECT p.split, p.row, p.pixel, p.larger FROM previous.rows p
                WHERE p.file = items.file_hash ORDER BY p.rowid LIMIT 1)
            WHERE state = {REUSED}""")
        self.db.commit()

    # ------------------------------------------------------------ decoding

    def pending(self) -> Iterator[tuple[int, str]]:
        """(row, path) of every file still to read, in order, a chunk at a time."""
        for rows in self._row_chunks("row, path", f"state = {PENDING}"):
            yield from ((row, os.fsdecode(path)) for row, path in rows)

    def record_outcomes(self, outcomes: Iterable[tuple[int, Outcome]]) -> None:
        """Store decoding outcomes (:class:`kdpipe.data.decoding.Outcome`), a chunk per transaction."""
        decoded, reused, rejected = [], [], []
        for row, outcome in outcomes:
            if outcome.rejected:
                rejected.append((row, outcome.reason, outcome.detail))
            elif outcome.reused:
                reused.append((outcome.file_hash, row))
            else:
                decoded.append((outcome.file_hash, outcome.pixel_hash, int(outcome.larger), row, row))
        self.db.executemany(
            f"UPDATE items SET state = {DECODED}, file_hash = ?, pixel_hash = ?, larger = ?, "
            f"origin = {SPOOL}, origin_row = ? WHERE row = ?",
            decoded,
        )
        self.db.executemany(f"UPDATE items SET state = {REUSED}, file_hash = ? WHERE row = ?", reused)
        for row, reason, detail in rejected:
            rel, source = self.db.execute("SELECT rel, source FROM items WHERE row = ?", (row,)).fetchone()
            self.reject(rel, SOURCES[source], reason, detail)
            self.db.execute(f"UPDATE items SET state = {REJECTED} WHERE row = ?", (row,))
        self.db.commit()

    # ------------------------------------------------------------ de-duplication and split

    def duplicate_groups(self) -> Iterator[list[Member]]:
        """Every group of two or more used files with the same pixels, members in prepare's order."""
        self.db.execute("CREATE INDEX items_pixel ON items (pixel_hash)")
        last = ""
        while True:
            hashes = [
                h
                for (h,) in self.db.execute(
                    f"SELECT pixel_hash FROM items WHERE {_USED} AND pixel_hash > ? GROUP BY pixel_hash "
                    "HAVING count(*) > 1 ORDER BY pixel_hash LIMIT ?",
                    (last, self.chunk),
                )
            ]
            if not hashes:
                return
            for pixel_hash in hashes:
                yield [
                    Member(row, SOURCES[source], rel, self._label_name(label))
                    for row, source, rel, label in self.db.execute(
                        f"SELECT row, source, rel, label FROM items WHERE pixel_hash = ? AND {_USED} "
                        "ORDER BY row",
                        (pixel_hash,),
                    )
                ]
            last = hashes[-1]

    def used_chunks(self, test: bool) -> Iterator[list[tuple[int, str, str, int, int]]]:
        """(row, split folder, rel, origin, origin_row) of the used test images (``test``) or of every
        other used image, in prepare's order, a chunk at a time (the caller may drop rows between
        chunks)."""
        where = f"{_USED} AND source {'=' if test else '!='} {TEST}"
        for chunk in self._row_chunks("row, source, rel, origin, origin_row", where):
            yield [
                (row, SOURCES[source], rel, origin, origin_row)
                for row, source, rel, origin, origin_row in chunk
            ]

    def drop(self, row: int) -> None:
        self.db.execute(f"UPDATE items SET state = {DUPLICATE} WHERE row = ?", (row,))

    def labeled_classes_present(self) -> set[str]:
        return {
            self.class_names[label]
            for (label,) in self.db.execute(
                f"SELECT DISTINCT label FROM items WHERE {_USED} AND source = {LABELED}"
            )
        }

    def assign_splits(self, val_fraction: float, seed: int) -> None:
        """Per class, round(n * val_fraction) labeled images (at least 1, at most n - 1; none when
        ``val_fraction`` is 0, which trains on every label) go to
        validation: the first by a seeded hash of their source file's sha256 (independent of names and
        order, adding images moves few existing ones, and the same photo stays on the same side
        whatever ``prepare.image_size`` is, so runs at two resolutions compare on the same split); the
        rest to train. Then number every split's rows."""
        self.db.commit()
        self.db.create_function(
            "val_rank",
            1,
            lambda digest: hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest(),
            deterministic=True,
        )
        self.db.execute(
            f"UPDATE items SET out = CASE source WHEN {UNLABELED} THEN {OUT_UNLABELED} "
            f"ELSE {OUT_TEST} END WHERE {_USED} AND source != {LABELED}"
        )
        for label in range(len(self.class_names)):
            n = self._count(f"{_USED} AND source = {LABELED} AND label = ?", label)
            n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, int(n * val_fraction + 0.5)))
            self.db.execute(
                f"UPDATE items SET out = {VAL} WHERE row IN (SELECT row FROM items WHERE {_USED} "
                f"AND source = {LABELED} AND label = ? ORDER BY val_rank(file_hash) LIMIT ?)",
                (label, n_val),
            )
        self.db.execute(
            f"UPDATE items SET out = {TRAIN} WHERE {_USED} AND source = {LABELED} AND out IS NULL"
        )
        self.db.execute(
            "UPDATE items SET out_row = numbered.r FROM (SELECT row, row_number() OVER "
            "(PARTITION BY out ORDER BY row) - 1 AS r FROM items WHERE out IS NOT NULL) AS numbered "
            "WHERE items.row = numbered.row"
        )
        self.db.execute("CREATE INDEX items_out ON items (out, out_row)")
        self.db.commit()

    # ------------------------------------------------------------ reading the results

    def split_counts(self) -> list[int]:
        counts = dict(self.db.execute("SELECT out, count(*) FROM items WHERE out IS NOT NULL GROUP BY out"))
        return [counts.get(k, 0) for k in range(4)]

    def class_counts(self, out: int) -> dict[str, int]:
        found = dict(
            self.db.execute("SELECT label, count(*) FROM items WHERE out = ? GROUP BY label", (out,))
        )
        return {name: found.get(k, 0) for k, name in enumerate(self.class_names)}

    def mostly_larger(self) -> bool:
        """At least half of the images used are larger than the student's size."""
        used, larger = self.db.execute(
            "SELECT count(*), total(larger) FROM items WHERE out IS NOT NULL"
        ).fetchone()
        return used > 0 and 2 * larger >= used

    def out_rows(
        self, out: int, columns: str, start: int = 0, stop: int | None = None, chunk: int | None = None
    ) -> Iterator[list[tuple]]:
        """``columns`` of rows ``start:stop`` of output split ``out``, in order, ``chunk`` rows at a time."""
        chunk = chunk or self.chunk
        stop = self.split_counts()[out] if stop is None else stop
        for begin in range(start, stop, chunk):
            yield self.db.execute(
                f"SELECT {columns} FROM items WHERE out = ? AND out_row >= ? AND out_row < ? "
                "ORDER BY out_row",
                (out, begin, min(begin + chunk, stop)),
            ).fetchall()

    def single_origin(self, out: int, start: int, count: int) -> tuple[int, int] | None:
        """(previous split, first row) when rows ``start:start+count`` of ``out`` are consecutive rows of
        one split of the previous output, in order; else None."""
        found = self.db.execute(
            "SELECT count(*), min(origin), max(origin), min(origin_row - out_row), max(origin_row - out_row) "
            "FROM items WHERE out = ? AND out_row >= ? AND out_row < ?",
            (out, start, start + count),
        ).fetchone()
        n, low, high, shift_low, shift_high = found
        if n != count or n == 0 or low != high or low == SPOOL or shift_low != shift_high:
            return None
        return low, start + shift_low

    def used_in_data_version_order(self) -> Iterator[tuple[str, str, str, str]]:
        """(source folder, path, label or "", file sha256) of every file used, sorted as Python sorts
        those tuples (the data version hashes them in that order)."""
        cursor = self.db.execute(
            "SELECT source, path, label, file_hash FROM items WHERE out IS NOT NULL "
            "ORDER BY source, path_order(path), label, file_hash"
        )
        while rows := cursor.fetchmany(self.chunk):
            for source, path, label, file_hash in rows:
                yield SOURCES[source], os.fsdecode(path), self._label_name(label) or "", file_hash

    def rejected_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM rejects").fetchone()[0]

    def rejected_sorted(self, limit: int | None = None) -> Iterator[dict[str, str]]:
        """Rejected files sorted by (path, reason), as rejected.json lists them (the first ``limit``)."""
        return self._rejected_sorted("1", limit=limit)

    def _rejected_sorted(self, where: str, *args, limit: int | None = None) -> Iterator[dict[str, str]]:
        cursor = self.db.execute(
            f"SELECT path, split, reason, detail FROM rejects WHERE {where} "
            f"ORDER BY path, reason, rowid LIMIT ?",
            (*args, -1 if limit is None else limit),
        )
        while rows := cursor.fetchmany(self.chunk):
            for path, split, reason, detail in rows:
                yield {
                    "path": path,
                    "split": split,
                    "reason": reason,
                    "detail": detail.decode("utf-8", "surrogatepass"),
                }

    def rejected_under(self, prefix: str, limit: int) -> tuple[int, list[dict[str, str]]]:
        """How many rejected files are under ``prefix``, and the first ``limit`` of them."""
        where = "substr(path, 1, ?) = ?"
        total = self.db.execute(
            f"SELECT count(*) FROM rejects WHERE {where}", (len(prefix), prefix)
        ).fetchone()[0]
        return total, list(self._rejected_sorted(where, len(prefix), prefix, limit=limit))

    def reject_reasons(self) -> list[tuple[str, int]]:
        """(reason, count), most frequent first; ties in the order rejected.json first shows them."""
        return [
            (reason, n)
            for reason, n, _ in self.db.execute(
                "SELECT reason, count(*) AS n, min(path) AS first FROM rejects GROUP BY reason "
                "ORDER BY n DESC, first, reason"
            )
        ]

    # ------------------------------------------------------------ helpers

    def _label_name(self, label: int | None) -> str | None:
        return None if label is None else self.class_names[label]

    def _row_chunks(self, columns: str, where: str = "1") -> Iterator[list[tuple]]:
        """Rows of ``items`` in order, a fully read chunk at a time (so the caller may update the table
        between chunks)."""
        last = -1
        while rows := self.db.execute(
            f"SELECT {columns} FROM items WHERE row > ? AND {where} ORDER BY row LIMIT ?", (last, self.chunk)
        ).fetchall():
            yield rows
            last = rows[-1][0]
