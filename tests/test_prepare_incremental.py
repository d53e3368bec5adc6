"""prepare at scale: decoding on a process pool, reuse of an earlier output after new images arrive,
and the cheap integrity check that trusts a file only while it is unchanged."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdpipe.core.errors import IntegrityError
from kdpipe.core.params import Params
from kdpipe.data import integrity
from kdpipe.data.decoding import SERIAL_BELOW
from kdpipe.data.prepared import load_prepared
from kdpipe.steps import prepare

SIZE = 16

# the first unlabeled batch: enough files to be decoded by the pool, and more than 20 rows (one
# segment of its own under small_segments)
FIRST_BATCH = 2 * SERIAL_BELOW


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth, photo-like image (JPEG-friendly), distinct per seed."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = (
        rng.uniform(0, 255, 3)
        + rng.uniform(-120, 120, 3) * xx[..., None]
        + rng.uniform(-120, 120, 3) * yy[..., None]
    )
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, first_seed: int, size=(72, 56), fmt="JPEG") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        ext = "jpg" if fmt == "JPEG" else "png"
        photo(first_seed + k, size).save(folder / f"img_{first_seed + k:05d}.{ext}", format=fmt, quality=90)


@pytest.fixture
def photo_root(tmp_path) -> Path:
    """Enough JPEG and PNG photos (larger than SIZE, so JPEG draft decoding applies) to use the pool."""
    root = tmp_path / "data"
    write_images(root / "labeled" / "a", 12, 0)
    write_images(root / "labeled" / "b", 12, 100, fmt="PNG")
    write_images(root / "unlabeled" / "batch-0000", FIRST_BATCH, 1000)
    write_images(root / "test" / "a", 3, 5000)
    write_images(root / "test" / "b", 3, 5100)
    return root


def params(workers: int = 1, teacher_size: int | None = None, **prepare_settings) -> Params:
    return Params(
        prepare={"image_size": SIZE, "workers": workers, **prepare_settings},
        teacher={"image_size": teacher_size},
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pool_gives_the_same_bytes_as_one_process(photo_root, tmp_path):
    prepare.run(params(workers=1), photo_root, tmp_path / "serial")
    prepare.run(params(workers=2), photo_root, tmp_path / "pool")
    assert files_of(tmp_path / "serial") == files_of(tmp_path / "pool")
    assert load_prepared(tmp_path / "pool").manifest["counts"]["unlabeled"] == FIRST_BATCH


def add_batch(root: Path, count: int) -> Path:
    """A new unlabeled batch as `kdpipe ingest` adds it: new photos, one exact copy of an existing
    image and one broken file."""
    batch = root / "unlabeled" / "batch-0001"
    write_images(batch, count, 9000)
    existing = sorted((root / "labeled" / "a").iterdir())[0]
    shutil.copy(existing, batch / "copy_of_labeled.jpg")
    (batch / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return batch


@pytest.mark.parametrize("teacher_size", [None, 32])
def test_incremental_prepare_equals_a_full_prepare_bit_for_bit(photo_root, tmp_path, capsys, teacher_size):
    out = tmp_path / "prepared"
    prepare.run(params(workers=2, teacher_size=teacher_size), photo_root, out)
    capsys.readouterr()
    add_batch(photo_root, 5)

    prepare.run(params(workers=2, teacher_size=teacher_size), photo_root, out)
    said = capsys.readouterr().out
    full = tmp_path / "full"
    prepare.run(params(workers=1, teacher_size=teacher_size), photo_root, full)

    previous_images = 24 + FIRST_BATCH + 6
    # only the 5 new photos are decoded; the exact copy has a known file hash (reused, then rejected as
    # a duplicate as before); the broken file is rejected
    assert f"prepare: {previous_images + 1} image(s) reused from the previous output, 5 decoded" in said
    assert files_of(out) == files_of(full)
    manifest = load_prepared(out).manifest
    assert manifest["counts"]["unlabeled"] == FIRST_BATCH + 5
    assert (manifest["teacher_image_size"] == 32) == (teacher_size == 32)


def test_other_decoding_settings_decode_everything(photo_root, tmp_path, capsys):
    out = tmp_path / "prepared"
    prepare.run(params(), photo_root, out)
    capsys.readouterr()
    prepare.run(params(image_size=12), photo_root, out)
    assert "reused" not in capsys.readouterr().out
    prepare.run(params(image_size=12), photo_root, tmp_path / "full")
    assert files_of(out) == files_of(tmp_path / "full")


def test_a_tampered_previous_output_is_not_reused(photo_root, tmp_path, capsys):
    out = tmp_path / "prepared"
    prepare.run(params(), photo_root, out)
    array = np.load(out / "unlabeled_x.npy", mmap_mode="r+")
    array[0] = 255 - array[0]  # same size, other pixels
    array.flush()
    del array
    capsys.readouterr()
    prepare.run(params(), photo_root, out)
    assert "reused" not in capsys.readouterr().out
    prepare.run(params(), photo_root, tmp_path / "full")
    assert files_of(out) == files_of(tmp_path / "full")


def test_teacher_copy_needed_after_new_images_decodes_everything_once(tmp_path, capsys):
    """Small images first (no teacher-resolution copy), then mostly large ones: the reused rows have
    no copy, so prepare decodes everything again instead of mixing."""
    root = tmp_path / "data"
    for name, seed in (("a", 0), ("b", 100)):
        write_images(root / "labeled" / name, 4, seed, size=(SIZE, SIZE), fmt="PNG")
    out = tmp_path / "prepared"
    prepare.run(params(teacher_size=32), root, out)
    assert load_prepared(out).teacher_image_size is None
    write_images(root / "unlabeled" / "batch-0001", 20, 7000, size=(80, 64))
    prepare.run(params(teacher_size=32), root, out)
    assert load_prepared(out).teacher_image_size == 32
    prepare.run(params(teacher_size=32), root, tmp_path / "full")
    assert files_of(out) == files_of(tmp_path / "full")


# ---------------------------------------------------------------- verify once, then trust unchanged files


def hashed_files(monkeypatch) -> list[str]:
    """Record which files the integrity check reads in full."""
    import kdpipe.core.files

    seen: list[str] = []
    original = kdpipe.core.files.file_sha256

    def counting(path, *args, **kwargs):
        seen.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(kdpipe.core.files, "file_sha256", counting)
    return seen


def test_an_unchanged_file_is_hashed_once_and_a_changed_one_again(photo_root, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare.run(params(), photo_root, out)
    seen = hashed_files(monkeypatch)
    # as if the file system's clock were coarser than the time since prepare stamped its files: the
    # stamps are racy, so the files are hashed once more (no sleeping or timing in tests)
    monkeypatch.setattr(integrity, "RACY_SECONDS", 1e9)
    monkeypatch.setattr(integrity, "FINE_RACY_SECONDS", 1e9)
    load_prepared(out)
    assert "train_x.npy" in seen
    seen.clear()
    # as if the files had been written long ago: no stamp is racy any more
    monkeypatch.setattr(integrity, "RACY_SECONDS", 0.0)
    monkeypatch.setattr(integrity, "FINE_RACY_SECONDS", 0.0)
    load_prepared(out)
    seen.clear()
    load_prepared(out)
    assert seen == []  # unchanged since their hash matched: trusted without reading them
    load_prepared(out, verify=True)
    assert "train_x.npy" in seen  # --verify reads everything
    seen.clear()
    monkeypatch.setenv("KDPIPE_VERIFY", "1")
    load_prepared(out, splits=("val",))
    assert sorted(set(seen)) == ["val_x.npy", "val_y.npy"]  # only the arrays asked for
    monkeypatch.delenv("KDPIPE_VERIFY")

    array = np.load(out / "train_x.npy", mmap_mode="r+")
    array[0, 0, 0, 0] ^= 0xFF  # same size; the mtime moves on
    array.flush()
    del array
    with pytest.raises(IntegrityError, match="train_x.npy: content does not match"):
        load_prepared(out)


def test_a_stamp_from_the_racy_window_is_not_trusted(tmp_path):
    """A file changed within the clock's granularity after its stamp keeps its mtime: a stamp taken
    right after a write is therefore checked again next time."""
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"one")
    digest = __import__("hashlib").sha256(b"one").hexdigest()
    integrity.record_verified(folder, {"a.bin": digest})
    st = (folder / "a.bin").stat()
    (folder / "a.bin").write_bytes(b"two")  # same size
    os.utime(folder / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # the same mtime, as a coarse clock gives
    assert integrity.first_mismatch(folder, {"a.bin": digest}, ["a.bin"]) == "a.bin"


def test_stamps_stay_out_of_the_data_folder(photo_root, tmp_path):
    out = tmp_path / "prepared"
    prepare.run(params(), photo_root, out)
    before = sorted(p.name for p in out.iterdir())
    load_prepared(out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert any((integrity.cache_dir() / "verified").iterdir())


def test_predict_decodes_a_jpeg_exactly_like_prepare(tmp_path):
    """prepare decodes large JPEGs at a reduced scale (draft); predict must get the same pixels."""
    from kdpipe.steps.export import jpeg_draft_size
    from kdpipe.steps.predict import _decode

    root = tmp_path / "data"
    for name, seed in (("a", 0), ("b", 100)):
        write_images(root / "labeled" / name, 3, seed, size=(240, 180))
    write_images(root / "test" / "a", 1, 500, size=(240, 180))
    out = tmp_path / "prepared"
    prepare.run(params(teacher_size=32), root, out)
    data = load_prepared(out)
    spec = {"image_size": SIZE, "jpeg_draft_size": jpeg_draft_size(data.manifest)}
    assert spec["jpeg_draft_size"] == 32
    test_file = next((root / "test" / "a").iterdir())
    assert np.array_equal(_decode(test_file, spec), data.test_x[0])
    # the draft matters: a full decode gives other pixels, so the match above is not trivial
    assert not np.array_equal(_decode(test_file, {**spec, "jpeg_draft_size": None}), data.test_x[0])


def test_worker_count_follows_the_setting_the_cores_and_a_container_quota(tmp_path, monkeypatch):
    from kdpipe.data import decoding

    assert decoding.worker_count(3) == 3
    monkeypatch.setattr(decoding.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(decoding, "_cgroup_cpu_quota", lambda: None)
    assert decoding.worker_count(0) == 8
    monkeypatch.setattr(decoding, "_cgroup_cpu_quota", lambda: 2)
    assert decoding.worker_count(0) == 2
    monkeypatch.undo()
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")
    assert decoding._cgroup_cpu_quota(str(cpu_max)) == 3  # 2.5 CPUs: 3 processes
    cpu_max.write_text("max 100000\n")
    assert decoding._cgroup_cpu_quota(str(cpu_max)) is None


def test_a_few_new_files_are_shared_between_the_workers():
    from kdpipe.data import decoding

    # an ingest of 30 files on 2 workers: 15 each, not 16 and 14 in two calls that could land on one
    assert decoding._tasks_per_call(30, 2) == 15
    assert decoding._tasks_per_call(40, 4) == 10
    assert decoding._tasks_per_call(10_000, 2) == decoding._TASKS_PER_CALL
    assert decoding._tasks_per_call(1, 8) == 1


# ---------------------------------------------------------------- the unlabeled split in segments


@pytest.fixture
def small_segments(monkeypatch):
    """Segments close at 20 rows of SIZE pixels (the real threshold is 64 MiB)."""
    import kdpipe.data.segments

    monkeypatch.setattr(kdpipe.data.segments, "SEGMENT_MIN_BYTES", 20 * SIZE * SIZE * 3)


def test_an_ingest_leaves_earlier_segments_as_they_were(photo_root, tmp_path, capsys, small_segments):
    out = tmp_path / "prepared"
    prepare.run(params(workers=2), photo_root, out)
    first = load_prepared(out).manifest
    # batch-0000 holds FIRST_BATCH (32) images, one folder: one segment however large
    assert first.get("segments") is None
    inode = (out / "unlabeled_x.npy").stat().st_ino
    add_batch(photo_root, 25)
    capsys.readouterr()

    prepare.run(params(workers=2), photo_root, out)
    assert "25 decoded" in capsys.readouterr().out
    manifest = load_prepared(out).manifest
    assert manifest["segments"] == {"unlabeled": [FIRST_BATCH, 25]}
    # the earlier batch's file is the same file: not copied, its recorded hash reused
    assert (out / "unlabeled_x.npy").stat().st_ino == inode
    assert manifest["files"]["unlabeled_x.npy"] == first["files"]["unlabeled_x.npy"]
    # ...and so are the unchanged labeled splits
    assert manifest["files"]["train_x.npy"] == first["files"]["train_x.npy"]

    full = tmp_path / "full"
    prepare.run(params(workers=1), photo_root, full)
    assert files_of(out) == files_of(full)  # bit for bit, segments included
    load_prepared(out, verify=True)  # every recorded hash matches its file

    # the same rows as one file would hold them
    data = load_prepared(out)
    from kdpipe.data.segments import RowSegments

    assert isinstance(data.unlabeled_x, RowSegments)
    whole = np.concatenate([np.load(out / "unlabeled_x.npy"), np.load(out / "unlabeled_x.1.npy")])
    assert np.array_equal(np.asarray(data.unlabeled_x), whole)
    assert data.unlabeled_x.shape == whole.shape


def test_a_changed_segment_is_caught_and_rewritten(photo_root, tmp_path, capsys, small_segments):
    add_batch(photo_root, 25)
    out = tmp_path / "prepared"
    prepare.run(params(workers=2), photo_root, out)
    array = np.load(out / "unlabeled_x.1.npy", mmap_mode="r+")
    array[0] = 255 - array[0]
    array.flush()
    del array
    with pytest.raises(IntegrityError, match=r"unlabeled_x\.1\.npy: content does not match"):
        load_prepared(out)
    prepare.run(params(workers=2), photo_root, out)  # not reused: decoded again, and right
    prepare.run(params(workers=1), photo_root, tmp_path / "full")
    assert files_of(out) == files_of(tmp_path / "full")


def test_input_files_are_not_read_again_while_unchanged(photo_root, tmp_path, capsys, monkeypatch):
    """The second prepare trusts the remembered sha256 of unchanged input files: none is opened,
    except a file changed in between, which is hashed (and decoded) again."""
    out = tmp_path / "prepared"
    prepare.run(params(), photo_root, out)
    monkeypatch.setattr(integrity, "FINE_RACY_SECONDS", 0.0)  # as if the files were written long ago
    monkeypatch.setattr(integrity, "RACY_SECONDS", 0.0)
    prepare.run(params(), photo_root, out)  # remembers the inputs' hashes (now not racy)
    changed = sorted((photo_root / "unlabeled" / "batch-0000").iterdir())[3]
    write_images(changed.parent, 1, 777)  # a new picture...
    os.replace(changed.parent / "img_00777.jpg", changed)  # ...under an existing name

    opened = []
    real_read = Path.read_bytes

    def read_bytes(self):
        opened.append(self.name)
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    capsys.readouterr()
    prepare.run(params(), photo_root, out)
    assert opened == [changed.name]
    assert "1 decoded" in capsys.readouterr().out
    monkeypatch.undo()
    prepare.run(params(), photo_root, tmp_path / "full")
    assert files_of(out) == files_of(tmp_path / "full")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_decode_workers_die_with_a_killed_prepare(tmp_path):
    """kill -9 of prepare while its pool decodes: the workers exit too, instead of waiting forever."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "data"
    write_images(root / "labeled" / "a", 2, 0)
    write_images(root / "labeled" / "b", 2, 100)
    one = root / "unlabeled" / "batch-0000"
    write_images(one, 1, 1000)
    picture = (one / "img_01000.jpg").read_bytes()
    for k in range(3000):  # many files to decode (duplicates are only known once decoded)
        (one / f"copy_{k:05d}.jpg").write_bytes(picture)
    script = (
        "import sys; from kdpipe.core.params import Params; from kdpipe.steps import prepare; "
        "prepare.run(Params(prepare={'image_size': 256, 'workers': 2}), sys.argv[1], sys.argv[2])"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(root), str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        workers: set[int] = set()
        while not workers and child.poll() is None:  # synchronise on the pool's processes appearing
            workers = _children(child.pid)
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, "prepare ended before it could be killed while decoding"
        assert len(workers) >= 1
        deadline = time.monotonic() + 60  # a bound on a hang, not a timing assumption: they exit at once
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [w for w in workers if _alive(w)]
        for worker in left:  # leave no orphan behind, then fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        assert not left, "decode workers outlived the killed prepare"
    finally:
        child.kill()
        child.wait()
