"""prepare's per-file records on disk (kdpipe.data.ledger): the outputs are the same bytes whatever the
chunk size of each pass, the JSON written as it is read is laid out exactly as ``write_json`` would,
and the data version orders paths as Python orders their names, undecodable bytes included."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import kdpipe.data.ledger
import kdpipe.data.prepared_writer
import kdpipe.data.segments
from kdpipe.core.params import Params
from kdpipe.data.prepared import REJECTED, SOURCES, load_prepared
from kdpipe.steps import prepare

SIZE = 8


def params(workers: int = 1) -> Params:
    return Params(prepare={"image_size": SIZE, "workers": workers, "val_fraction": 0.3})


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def mixed_root(tmp_path, make_image) -> Path:
    """A data root with everything prepare's bookkeeping handles: three classes, three unlabeled
    batch folders, exact copies (a duplicate, a copy under two labels, a copy of a test image),
    broken files, a name that is not UTF-8 and one whose UTF-8 bytes sort differently from it."""
    root = tmp_path / "data"
    seed = 0
    for name in ("ant", "bee", "cow"):
        for k in range(9):
            seed += 1
            make_image(root / "labeled" / name / f"{name}_{k}.png", seed=seed)
        for k in range(2):
            seed += 1
            make_image(root / "test" / name / f"t_{k}.png", seed=seed)
    for batch in ("batch-0001", "batch-0002", "batch-0003"):
        for k in range(7):
            seed += 1
            make_image(root / "unlabeled" / batch / f"u_{k}.png", seed=seed)
    shutil.copy(root / "labeled" / "ant" / "ant_0.png", root / "unlabeled" / "batch-0002" / "dup.png")
    shutil.copy(root / "labeled" / "bee" / "bee_1.png", root / "labeled" / "cow" / "conflict.png")
    shutil.copy(root / "test" / "cow" / "t_0.png", root / "labeled" / "cow" / "leak.png")
    (root / "unlabeled" / "batch-0003" / "broken.png").write_bytes(b"not a png")
    (root / "labeled" / "ant" / "notes.txt").write_text("not an image")
    # b"\xff" decodes to U+DCFF, below U+E000, although its byte is above U+E000's first byte (0xEE)
    make_image(Path(os.fsdecode(os.fsencode(root / "unlabeled" / "batch-0001") + b"/\xff.png")), seed=900)
    make_image(root / "unlabeled" / "batch-0001" / "\ue000.png", seed=901)
    return root


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Every pass of prepare over its records and pixels in chunks of 3 rows (4,096 and 16 MiB
    otherwise), and segments of 7 rows: every boundary is crossed many times."""
    monkeypatch.setattr(kdpipe.data.ledger, "CHUNK", 3)
    monkeypatch.setattr(prepare, "COPY_BYTES", 3 * SIZE * SIZE * 3)
    monkeypatch.setattr(kdpipe.data.prepared_writer, "COPY_BYTES", 3 * SIZE * SIZE * 3)
    monkeypatch.setattr(kdpipe.data.segments, "SEGMENT_MIN_BYTES", 7 * SIZE * SIZE * 3)


def test_the_outputs_do_not_depend_on_the_chunk_size(mixed_root, tmp_path, monkeypatch):
    monkeypatch.setattr(kdpipe.data.segments, "SEGMENT_MIN_BYTES", 7 * SIZE * SIZE * 3)
    prepare.run(params(), mixed_root, tmp_path / "whole")
    with monkeypatch.context() as patch:
        patch.setattr(kdpipe.data.ledger, "CHUNK", 3)
        patch.setattr(prepare, "COPY_BYTES", 3 * SIZE * SIZE * 3)
        patch.setattr(kdpipe.data.prepared_writer, "COPY_BYTES", 3 * SIZE * SIZE * 3)
        prepare.run(params(), mixed_root, tmp_path / "chunked")
    assert files_of(tmp_path / "chunked") == files_of(tmp_path / "whole")

    manifest = load_prepared(tmp_path / "chunked", verify=True).manifest
    assert len(manifest["segments"]["unlabeled"]) == 3
    reasons = {r["path"]: r["reason"] for r in json.loads((tmp_path / "chunked" / REJECTED).read_text())}
    assert reasons["unlabeled/batch-0002/dup.png"] == "duplicate"
    assert reasons["labeled/cow/conflict.png"] == reasons["labeled/bee/bee_1.png"] == "conflicting_labels"
    assert reasons["labeled/cow/leak.png"] == "leakage_with_test"
    assert reasons["unlabeled/batch-0003/broken.png"] != "duplicate"
    assert reasons["labeled/ant/notes.txt"] == "not_an_image"


def test_an_incremental_prepare_in_tiny_chunks_equals_a_full_one(
    mixed_root, tmp_path, tiny_chunks, make_image, capsys
):
    out = tmp_path / "prepared"
    prepare.run(params(workers=2), mixed_root, out)
    for k in range(5):
        make_image(mixed_root / "unlabeled" / "batch-0004" / f"new_{k}.png", seed=2000 + k)
    capsys.readouterr()
    prepare.run(params(workers=2), mixed_root, out)
    # the new images, and the two copies under different labels, which no output holds
    assert "7 decoded" in capsys.readouterr().out
    prepare.run(params(), mixed_root, tmp_path / "full", reuse=False)
    assert files_of(out) == files_of(tmp_path / "full")


def test_streamed_json_is_laid_out_as_write_json_lays_it_out(mixed_root, tmp_path, tiny_chunks):
    out = tmp_path / "prepared"
    prepare.run(params(), mixed_root, out)
    for name in (SOURCES, REJECTED):
        text = (out / name).read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=2) + "\n"
    sources = json.loads((out / SOURCES).read_text())
    assert list(sources) == ["train", "val", "unlabeled", "test"]
    assert "unlabeled/batch-0001/\\xff.png" in sources["unlabeled"]


def test_an_empty_rejected_list_and_an_empty_split(image_dataset, tmp_path):
    root = image_dataset(unlabeled=0)
    assert not (root / "unlabeled").exists()
    out = tmp_path / "prepared"
    prepare.run(params(), root, out)
    assert (out / REJECTED).read_text() == "[]\n"
    assert json.loads((out / SOURCES).read_text())["unlabeled"] == []
    assert '"unlabeled": []' in (out / SOURCES).read_text()


def test_the_data_version_sorts_paths_as_python_sorts_their_names(mixed_root, tmp_path, tiny_chunks):
    """The entries are hashed in Python's order of (source folder, path, label, file sha256): a
    name with an undecodable byte comes before one starting with U+E000, unlike their raw bytes."""
    out = tmp_path / "prepared"
    manifest = prepare.run(params(), mixed_root, out)
    sources = json.loads((out / SOURCES).read_text())
    label_of = {}
    for split in ("train", "val", "test"):
        for rel in sources[split]:
            label_of[rel] = rel.split("/")[1]
    entries = []
    for split_rows in sources.values():
        for rel in split_rows:
            # rel shows b"\xff" as the text \xff: back to the real name for this check
            raw = os.fsdecode(rel.encode().replace(b"\\xff", b"\xff"))
            path = os.fsdecode(os.fsencode(mixed_root)) + "/" + raw
            entries.append(
                (
                    rel.split("/")[0],
                    path,
                    label_of.get(rel, ""),
                    hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                )
            )
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(json.dumps(entry, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
    assert manifest["data_version"] == digest.hexdigest()
    undecodable = next(e for e in entries if e[1].endswith("\udcff.png"))
    private_use = next(e for e in entries if e[1].endswith("\ue000.png"))
    assert sorted([private_use, undecodable]) == [undecodable, private_use]
    assert os.fsencode(undecodable[1]) > os.fsencode(private_use[1])


def test_no_scratch_file_is_left_in_the_output(mixed_root, tmp_path):
    out = tmp_path / "prepared"
    prepare.run(params(), mixed_root, out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    prepare.run(params(), mixed_root, out, check=True)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_second_link_to_a_file_is_reported_once(mixed_root, tmp_path):
    """The walk's record of the files handed out is the ledger's table: a link to an image already
    walked is reported as visited twice, not used twice."""
    link = mixed_root / "unlabeled" / "batch-0003" / "again.png"
    link.symlink_to(mixed_root / "unlabeled" / "batch-0001" / "u_0.png")
    out = tmp_path / "prepared"
    prepare.run(params(), mixed_root, out)
    reasons = {r["path"]: r["reason"] for r in json.loads((out / REJECTED).read_text())}
    assert reasons["unlabeled/batch-0003/again.png"] == "visited_twice"


def test_a_damaged_store_of_input_hashes_only_means_reading_every_file(mixed_root, tmp_path, monkeypatch):
    from kdpipe.data import integrity

    out = tmp_path / "prepared"
    prepare.run(params(), mixed_root, out)
    store = integrity.input_hashes_path(mixed_root)
    assert store.is_file()
    store.write_bytes(b"not an SQLite database " * 200)
    opened = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self.name) or real_read(self))
    prepare.run(params(), mixed_root, out)
    # every image file is read again (notes.txt is rejected by its name, never opened)
    assert sorted(opened) == sorted(p.name for p in mixed_root.rglob("*.png"))
    monkeypatch.undo()
    prepare.run(params(), mixed_root, tmp_path / "full", reuse=False)
    assert files_of(out) == files_of(tmp_path / "full")


def test_the_walk_sorted_on_disk_visits_what_the_walk_sorted_in_memory_visits(
    mixed_root, tmp_path, monkeypatch
):
    """prepare's walk sorts each folder's listing in the ledger (in pages of 3 here); it hands out
    the same files, in the same order, with the same reports, as the in-memory sort ingest uses."""
    from kdpipe.data.ledger import Ledger
    from kdpipe.data.walk import Walker

    (mixed_root / "unlabeled" / "batch-0003" / "again.png").symlink_to(
        mixed_root / "unlabeled" / "batch-0001" / "u_0.png"
    )
    (mixed_root / "unlabeled" / "batch-0003" / "nowhere.png").symlink_to(tmp_path / "missing.png")
    # a link walked before the file it points to: the plain file is then the second visit
    (mixed_root / "unlabeled" / "batch-0001" / "to_later.png").symlink_to(
        mixed_root / "unlabeled" / "batch-0003" / "u_1.png"
    )
    monkeypatch.setattr(kdpipe.data.ledger, "CHUNK", 3)

    def walk(**how) -> tuple[list[str], list[tuple[str, str]]]:
        reports = []
        walker = Walker(mixed_root, lambda path, reason, detail: reports.append((path.name, reason)), **how)
        return [os.fsdecode(p) for p in walker.files_under(mixed_root)], reports

    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        on_disk = walk(seen=ledger, sort=ledger.sorted_entries)
    finally:
        ledger.close()
    in_memory = walk()
    assert on_disk == in_memory
    assert len(on_disk[0]) > 60 and ("again.png", "visited_twice") in on_disk[1]
    assert ("nowhere.png", "broken_symlink") in on_disk[1]
    assert ("u_1.png", "visited_twice") in on_disk[1]
