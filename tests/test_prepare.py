"""The prepare step end to end on tiny generated datasets, and load_prepared."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from kdpipe.core.errors import DataError, IntegrityError
from kdpipe.core.files import file_sha256
from kdpipe.core.params import Params
from kdpipe.data.prepared import ARRAY_FILES, load_prepared
from kdpipe.steps import prepare

SIZE = 8


def make_params(**prepare_overrides) -> Params:
    return Params(prepare={"image_size": SIZE, **prepare_overrides})


def run(root, out, **overrides) -> dict:
    return prepare.run(make_params(**overrides), data_root=root, out_dir=out)


def rejects_by_path(out) -> dict[str, dict]:
    return {r["path"]: r for r in json.loads((out / "rejected.json").read_text(encoding="utf-8"))}


def sources(out) -> dict[str, list[str]]:
    return json.loads((out / "sources.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- happy path


def test_end_to_end_outputs_and_manifest(image_dataset, tmp_path):
    root = image_dataset()
    out = tmp_path / "prepared"
    manifest = run(root, out)

    assert manifest["class_names"] == ["cat", "dog"]
    assert manifest["counts"] == {"train": 8, "val": 2, "unlabeled": 4, "test": 4, "rejected": 0}
    assert manifest["per_class"] == {
        "train": {"cat": 4, "dog": 4},
        "val": {"cat": 1, "dog": 1},
        "test": {"cat": 2, "dog": 2},
    }
    assert manifest["image_size"] == SIZE
    assert manifest["params"] == {
        **make_params().prepare.model_dump(exclude={"workers"}),
        "teacher_image_size": None,
    }
    assert manifest["teacher_image_size"] is None  # no teacher-resolution copy for these small images
    assert manifest["kdpipe_version"]
    assert len(manifest["data_version"]) == 64
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert set(manifest["files"]) == {*ARRAY_FILES, "rows.npy", "sources.json", "rejected.json"}
    for name, digest in manifest["files"].items():
        assert file_sha256(out / name) == digest
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*manifest["files"], "manifest.json", "teacher_inputs.json"]
    )
    # what the teacher stage depends on: the labeled training and validation arrays, not the others
    inputs = json.loads((out / "teacher_inputs.json").read_text(encoding="utf-8"))
    assert set(inputs["files"]) == {"train_x.npy", "train_y.npy", "val_x.npy", "val_y.npy"}
    assert (
        inputs["files"]["train_x.npy"] == manifest["files"]["train_x.npy"] and not inputs["reads_unlabeled"]
    )

    train_x = np.load(out / "train_x.npy", mmap_mode="r")
    assert train_x.shape == (8, SIZE, SIZE, 3) and train_x.dtype == np.uint8
    train_y = np.load(out / "train_y.npy")
    assert train_y.dtype == np.int64 and sorted(train_y.tolist()) == [0] * 4 + [1] * 4
    assert np.load(out / "unlabeled_x.npy").shape == (4, SIZE, SIZE, 3)

    src = sources(out)
    assert {k: len(v) for k, v in src.items()} == {"train": 8, "val": 2, "unlabeled": 4, "test": 4}
    assert all(p.startswith("unlabeled/batch-0001/") for p in src["unlabeled"])  # nested folders are read
    for path, label in zip(src["train"], train_y, strict=True):  # rows line up with their sources
        assert path.split("/")[1] == manifest["class_names"][label]

    for name in ("manifest.json", "sources.json", "rejected.json"):
        assert str(tmp_path) not in (out / name).read_text(encoding="utf-8")  # no absolute paths


def test_deterministic_byte_identical(image_dataset, tmp_path):
    root = image_dataset()
    run(root, tmp_path / "a")
    run(root, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rerun_replaces_output(image_dataset, tmp_path):
    root = image_dataset()
    out = tmp_path / "prepared"
    run(root, out)
    (out / "stale.txt").write_text("old")
    run(root, out)
    assert not (out / "stale.txt").exists()


def test_data_version_tracks_content(image_dataset, make_image, tmp_path):
    root = image_dataset()
    first = run(root, tmp_path / "a")["data_version"]
    assert run(root, tmp_path / "b", seed=5)["data_version"] == first  # params are not data
    make_image(root / "labeled" / "cat" / "cat_000.png", seed=999)  # same name, new content
    assert run(root, tmp_path / "c")["data_version"] != first


# ---------------------------------------------------------------- split


def test_stratified_split(image_dataset, tmp_path):
    root = image_dataset(classes={"a": 10, "b": 5, "c": 1}, unlabeled=0, test={})
    manifest = run(root, tmp_path / "out", val_fraction=0.2)
    assert manifest["per_class"]["val"] == {"a": 2, "b": 1, "c": 0}  # a single image stays in train
    assert manifest["per_class"]["train"] == {"a": 8, "b": 4, "c": 1}
    val_y = np.load(tmp_path / "out" / "val_y.npy")
    assert sorted(val_y.tolist()) == [0, 0, 1]


def test_every_class_with_two_images_gets_a_val_image(image_dataset, tmp_path):
    root = image_dataset(classes={"a": 2, "b": 3}, unlabeled=0, test={})
    manifest = run(root, tmp_path / "out", val_fraction=0.05)
    assert manifest["per_class"]["val"] == {"a": 1, "b": 1}
    assert manifest["per_class"]["train"] == {"a": 1, "b": 2}


def test_split_is_seeded(image_dataset, tmp_path):
    root = image_dataset(classes={"a": 10, "b": 10}, unlabeled=0, test={})
    run(root, tmp_path / "s0", seed=0)
    run(root, tmp_path / "s0b", seed=0)
    assert sources(tmp_path / "s0")["val"] == sources(tmp_path / "s0b")["val"]
    others = [sources(run_dir)["val"] for run_dir in _runs(root, tmp_path, seeds=(1, 2, 3))]
    assert any(val != sources(tmp_path / "s0")["val"] for val in others)


def test_split_follows_the_source_file_not_the_resolution(image_dataset, tmp_path):
    """The validation images are the same files at every prepare.image_size: experiments at two
    resolutions compare on the same split (a hash of the resized pixels moved about half of them)."""
    root = image_dataset(classes={"a": 20, "b": 20}, unlabeled=0, test={}, size=48)
    splits = {
        size: sources(_prepared(root, tmp_path / f"px{size}", image_size=size))
        for size in (8, 12, 16, 24, 32)
    }
    assert all(len(s["val"]) == 8 for s in splits.values())
    for size in (12, 16, 24, 32):
        assert splits[size]["val"] == splits[8]["val"]
        assert splits[size]["train"] == splits[8]["train"]


def _prepared(root, out, image_size):
    prepare.run(Params(prepare={"image_size": image_size}), data_root=root, out_dir=out)
    return out


def _runs(root, tmp_path, seeds):
    for seed in seeds:
        run(root, tmp_path / f"s{seed}", seed=seed)
        yield tmp_path / f"s{seed}"


# ---------------------------------------------------------------- dedupe, conflicts, leakage


def test_duplicates_across_formats_keep_first(image_dataset, make_image, tmp_path):
    root = image_dataset()
    make_image(root / "labeled" / "cat" / "zz_copy.bmp", seed=1001)  # same pixels as cat_000.png
    make_image(root / "unlabeled" / "again.png", seed=1001)
    make_image(root / "unlabeled" / "u2.png", seed=5)
    make_image(root / "unlabeled" / "u3.tif", seed=5)
    out = tmp_path / "out"
    manifest = run(root, out)
    rej = rejects_by_path(out)
    assert rej["labeled/cat/zz_copy.bmp"]["reason"] == "duplicate"
    assert "labeled/cat/cat_000.png" in rej["labeled/cat/zz_copy.bmp"]["detail"]
    assert rej["unlabeled/again.png"]["reason"] == "duplicate"  # the labeled copy wins
    assert (
        rej["unlabeled/u3.tif"]["reason"] == "duplicate"
        and "unlabeled/u2.png" in rej["unlabeled/u3.tif"]["detail"]
    )
    assert manifest["counts"]["unlabeled"] == 5 and manifest["counts"]["rejected"] == 3


def test_conflicting_labels_reject_all_copies(image_dataset, make_image, tmp_path):
    root = image_dataset()
    make_image(root / "labeled" / "dog" / "is_it_a_cat.png", seed=1001)  # = labeled/cat/cat_000.png
    make_image(root / "unlabeled" / "same.png", seed=1001)
    out = tmp_path / "out"
    manifest = run(root, out)
    rej = rejects_by_path(out)
    for path in ("labeled/cat/cat_000.png", "labeled/dog/is_it_a_cat.png", "unlabeled/same.png"):
        assert rej[path]["reason"] == "conflicting_labels"
    assert "cat" in rej["unlabeled/same.png"]["detail"] and "dog" in rej["unlabeled/same.png"]["detail"]
    assert "labeled/cat/cat_000.png" not in sum(sources(out).values(), [])
    assert manifest["per_class"]["train"]["cat"] + manifest["per_class"]["val"]["cat"] == 4


def test_leakage_with_test_removed_from_training(image_dataset, tmp_path):
    root = image_dataset()
    test_file = root / "test" / "cat" / "cat_000.png"
    shutil.copy(test_file, root / "labeled" / "cat" / "leaked.png")
    shutil.copy(test_file, root / "unlabeled" / "leaked.png")
    out = tmp_path / "out"
    manifest = run(root, out)
    rej = rejects_by_path(out)
    for path in ("labeled/cat/leaked.png", "unlabeled/leaked.png"):
        assert rej[path]["reason"] == "leakage_with_test"
        assert "test/cat/cat_000.png" in rej[path]["detail"]
    assert "test/cat/cat_000.png" in sources(out)["test"]
    assert manifest["counts"]["test"] == 4


# ---------------------------------------------------------------- rejected files


def test_bad_files_are_listed_and_hidden_files_ignored(image_dataset, make_image, tmp_path):
    root = image_dataset()
    cat = root / "labeled" / "cat"
    (cat / "empty.png").write_bytes(b"")
    (cat / "notes.txt").write_text("hello")
    (cat / "fake.jpg").write_text("not an image")
    (cat / ".DS_Store").write_bytes(b"\0\0")
    (cat / "Thumbs.db").write_bytes(b"\0\0")
    (root / "unlabeled" / "batch-0001.dvc").write_text("outs:\n- path: batch-0001\n")  # DVC pointer file
    (root / "labeled" / ".cache").mkdir()
    (root / "labeled" / ".cache" / "x.png").write_bytes(b"")
    (root / "labeled" / "stray.png").write_bytes(b"")
    make_image(cat / "tiny.png", size=(1, 1))
    make_image(root / "unlabeled" / "deep" / "er" / "été chat.png", seed=77)
    outside = make_image(tmp_path / "elsewhere" / "secret.png", seed=78)
    os.symlink(outside, cat / "link.png")
    os.symlink(cat / "cat_001.png", root / "unlabeled" / "inside_link.png")  # inside root: allowed
    out = tmp_path / "out"
    manifest = run(root, out)
    reasons = {path: r["reason"] for path, r in rejects_by_path(out).items()}
    assert reasons == {
        "labeled/cat/empty.png": "zero_byte",
        "labeled/cat/notes.txt": "not_an_image",
        "labeled/cat/fake.jpg": "not_an_image",
        "labeled/cat/tiny.png": "too_small",
        "labeled/cat/link.png": "symlink_outside_root",
        "labeled/stray.png": "outside_class_folder",
        "unlabeled/inside_link.png": "visited_twice",  # the labeled file it points to, already read
    }
    entry = rejects_by_path(out)["labeled/cat/empty.png"]
    assert entry["split"] == "labeled" and entry["detail"]
    assert "unlabeled/deep/er/été chat.png" in sources(out)["unlabeled"]
    assert manifest["counts"]["rejected"] == 7


def test_missing_unlabeled_and_test_are_allowed(image_dataset, tmp_path, caplog):
    root = image_dataset(unlabeled=0, test={})
    shutil.rmtree(root / "unlabeled", ignore_errors=True)
    shutil.rmtree(root / "test", ignore_errors=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        manifest = run(root, out)
    assert "unlabeled" in caplog.text and "test" in caplog.text
    assert manifest["counts"]["unlabeled"] == manifest["counts"]["test"] == 0
    assert np.load(out / "unlabeled_x.npy").shape == (0, SIZE, SIZE, 3)
    assert np.load(out / "test_y.npy").shape == (0,)
    data = load_prepared(out)
    assert data.test_x.shape == (0, SIZE, SIZE, 3)


# ---------------------------------------------------------------- errors


def test_error_data_root_missing(tmp_path):
    with pytest.raises(DataError, match="nowhere: data root not found"):
        run(tmp_path / "nowhere", tmp_path / "out")


def test_error_labeled_missing(tmp_path):
    (tmp_path / "data" / "unlabeled").mkdir(parents=True)
    with pytest.raises(DataError, match=r"labeled: folder not found"):
        run(tmp_path / "data", tmp_path / "out")


def test_error_no_class_folders(tmp_path):
    (tmp_path / "data" / "labeled").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        run(tmp_path / "data", tmp_path / "out")


def test_error_single_class(image_dataset, tmp_path):
    root = image_dataset(classes={"cat": 3}, test={})
    with pytest.raises(DataError, match=r"1 class folder \('cat'\).*at least 2 classes"):
        run(root, tmp_path / "out")


def test_error_class_without_valid_image(image_dataset, tmp_path):
    root = image_dataset()
    bad = root / "labeled" / "bird"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("nope")
    root_test = root / "test"
    with pytest.raises(DataError) as info:
        run(root, tmp_path / "out")
    message = str(info.value)
    assert os.path.join("labeled", "bird") in message and "'bird'" in message
    assert "2 file(s) rejected" in message
    assert "labeled/bird/a.png: zero_byte" in message
    assert root_test.exists()


def test_error_empty_class_folder(image_dataset, tmp_path):
    root = image_dataset()
    (root / "labeled" / "bird").mkdir()
    with pytest.raises(DataError, match=r"no valid image for class 'bird' \(0 file\(s\) rejected\)"):
        run(root, tmp_path / "out")


def test_error_test_class_not_in_labeled(image_dataset, tmp_path):
    root = image_dataset(test={"cat": 1, "fox": 1})
    with pytest.raises(DataError, match=r"test class 'fox' has no folder in .*labeled"):
        run(root, tmp_path / "out")


def test_failed_run_keeps_previous_output(image_dataset, tmp_path):
    root = image_dataset()
    out = tmp_path / "out"
    run(root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(root / "labeled" / "dog")
    with pytest.raises(DataError):
        run(root, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp left


# ---------------------------------------------------------------- load_prepared


def test_load_prepared_roundtrip(image_dataset, tmp_path):
    root = image_dataset()
    out = tmp_path / "out"
    manifest = run(root, out)
    data = load_prepared(out)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.image_size == SIZE and data.manifest == manifest
    assert isinstance(data.train_x, np.memmap)
    np.testing.assert_array_equal(data.val_x, np.load(out / "val_x.npy"))
    assert not isinstance(load_prepared(out, mmap=False).train_x, np.memmap)


def test_load_prepared_detects_tampering(image_dataset, tmp_path):
    out = tmp_path / "out"
    run(image_dataset(), out)
    target = out / "train_x.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"train_x\.npy: content does not match"):
        load_prepared(out)
    assert load_prepared(out, verify=False).train_x.shape[0] == 8


def test_load_prepared_missing_files(image_dataset, tmp_path):
    out = tmp_path / "out"
    run(image_dataset(), out)
    (out / "val_y.npy").unlink()
    with pytest.raises(IntegrityError, match=r"val_y\.npy: listed in manifest\.json but missing"):
        load_prepared(out, verify=False)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json: not found"):
        load_prepared(out)


def test_per_class_counts_and_a_warning_for_classes_too_small(image_dataset, tmp_path, capsys):
    """prepare (and prepare --check) print images per class and split, and warn about a class with 1 or
    2 labeled images: with 1 there is no validation image for it at all."""
    root = image_dataset(
        classes={"big": 10, "one": 1, "two": 2}, unlabeled=0, test={"big": 1, "one": 1, "two": 1}
    )
    for check in (True, False):
        prepare.run(
            make_params(val_fraction=0.2), data_root=root, out_dir=tmp_path / f"out{check}", check=check
        )
        out = capsys.readouterr().out
        assert "prepare: images per class (train / validation / test):" in out
        assert any(line.split() == ["big", "8", "/", "2", "/", "1"] for line in out.splitlines())
        assert any(line.split() == ["one", "1", "/", "0", "/", "1"] for line in out.splitlines())
        assert (
            "warning: class 'one' has 1 labeled image(s): too few to train it, and none is left to validate it"
            in out
        )
        assert "warning: class 'two' has 2 labeled image(s): too few to train it reliably" in out
        assert "class 'big'" not in out


def test_a_class_folder_in_two_unicode_forms_is_one_class(image_dataset, make_image, tmp_path):
    """'rosé' from a Mac (decomposed, NFD) in labeled/ and from Linux (composed, NFC) in test/: one class."""
    import unicodedata

    root = image_dataset(classes={"red": 4}, unlabeled=0, test={"red": 1})
    decomposed, composed = unicodedata.normalize("NFD", "rosé"), unicodedata.normalize("NFC", "rosé")
    assert decomposed != composed
    for k in range(4):
        make_image(root / "labeled" / decomposed / f"r{k}.png", seed=500 + k)
    make_image(root / "test" / composed / "t.png", seed=600)
    manifest = run(root, tmp_path / "out")
    assert manifest["class_names"] == ["red", composed]
    assert manifest["per_class"]["test"] == {"red": 1, composed: 1}
    # the same name twice in labeled/, once in each form: two folders that cannot both be the class
    for k in range(2):
        make_image(root / "labeled" / composed / f"c{k}.png", seed=700 + k)
    with pytest.raises(DataError, match="two class folders with the same name written in two Unicode forms"):
        run(root, tmp_path / "out2")
