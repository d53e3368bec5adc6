"""``kdpipe ingest``: validation with prepare's rules, duplicates, idempotence, escaping symlinks,
two ingests at once, a larger load, and ``kill -9`` at random moments."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_params
from dvc_repo import DVC, KDPIPE, init_repo, repo_env, run
from zygote import KILLED, Zygote

from kdpipe.cli import main
from kdpipe.core.files import file_sha256
from kdpipe.core.params import PrepareParams
from kdpipe.data.ingest import INDEX_NAME, ingest
from kdpipe.steps import prepare


def write_source(folder: Path, make_image, seeds, size=(10, 10)) -> dict[str, str]:
    """One PNG per seed under ``folder`` (two levels, to check sub-folders); returns {rel: sha256}."""
    out = {}
    for seed in seeds:
        rel = f"part-{seed % 3}/img_{seed:05d}.png"
        out[rel] = file_sha256(make_image(folder / rel, size=size, seed=seed))
    return out


def batch_key(name: str) -> str:
    """ "batch-0002-1a2b3c4d" -> "batch-0002" (the content-hash suffix differs per content)."""
    return re.match(r"batch-\d+", name).group(0)


def batch_dir(root: Path, key: str) -> Path:
    """The one folder of batch ``key`` ("batch-0002") under ``root/unlabeled``."""
    (found,) = [p for p in (root / "unlabeled").glob(f"{key}*") if p.is_dir()]
    return found


def batch_files(root: Path) -> dict[str, list[str]]:
    """{"batch-NNNN": [sha256 of each visible file]} for every visible batch folder."""
    batches = {}
    for batch in sorted((root / "unlabeled").iterdir()):
        if batch.is_dir() and not batch.name.startswith("."):
            batches[batch_key(batch.name)] = [
                file_sha256(p)
                for p in sorted(batch.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(batch).parts)
            ]
    return batches


def test_adds_valid_new_images_and_lists_every_skip_and_rejection(
    tmp_path, image_dataset, make_image, capsys
):
    root = image_dataset()
    src = tmp_path / "incoming"
    new = write_source(src, make_image, range(1, 6))
    (src / "dup_of_labeled.png").write_bytes((root / "labeled" / "cat" / "cat_000.png").read_bytes())
    (src / "part-1" / "img_00001_copy.png").write_bytes((src / "part-1" / "img_00001.png").read_bytes())
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("not an image")
    (src / "notes.txt").write_text("hello")
    make_image(src / "bomb.png", size=(300, 300), seed=9)
    make_image(src / "thin.png", size=(60, 2), seed=10)
    make_image(tmp_path / "outside.png", seed=11)
    (src / "escape.png").symlink_to("../outside.png")
    (src / "deep").mkdir()
    (src / "deep" / "up.png").symlink_to(Path("..") / ".." / "outside.png")
    (src / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    (src / "broken.png").symlink_to("missing.png")
    (src / ".hidden.png").write_bytes((src / "part-1" / "img_00001.png").read_bytes())

    report = tmp_path / "report.json"
    code = main(
        [
            "ingest",
            str(src),
            "--data-root",
            str(root),
            "--no-dvc",
            "--report",
            str(report),
            "-S",
            "prepare.max_image_pixels=50000",
            "-S",
            "prepare.max_aspect_ratio=10",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(report.read_text())
    assert re.fullmatch(r"unlabeled/batch-0002-[0-9a-f]{8}", result["batch"]), result["batch"]
    assert f"added 5 image(s) to {root / result['batch']}" in out
    assert sorted(e["source"] for e in result["added"]) == sorted(new)
    assert {e["source"]: e["detail"] for e in result["skipped"]} == {
        "dup_of_labeled.png": "same bytes as labeled/cat/cat_000.png (already in the data set)",
        "part-1/img_00001_copy.png": "same bytes as part-1/img_00001.png (earlier in the source folder)",
    }
    reasons = {e["source"]: e["reason"] for e in result["rejected"]}
    assert reasons == {
        "empty.png": "zero_byte",
        "text.jpg": "not_an_image",
        "notes.txt": "not_an_image",
        "bomb.png": "decompression_bomb",
        "thin.png": "bad_aspect_ratio",
        "escape.png": "escapes_source",
        "deep/up.png": "escapes_source",
        "linked_dir": "escapes_source",
        "broken.png": "broken_symlink",
    }
    for entry in result["rejected"]:
        assert entry["source"] in out and entry["reason"] in out  # each rejection is printed
    # the batch holds exactly the new images, under their source paths, plus its index
    batch = root / result["batch"]
    assert {p.relative_to(batch).as_posix() for p in batch.rglob("*") if p.is_file()} == {*new, INDEX_NAME}
    index = json.loads((batch / INDEX_NAME).read_text())
    assert {n: e["sha256"] for n, e in index["files"].items()} == new
    assert not [p for p in (root / "unlabeled").iterdir() if p.name.startswith(".ingest-")]  # no temp left

    # prepare reads the new batch and ignores the hidden index
    manifest = prepare.run(tiny_params(), root, tmp_path / "prepared")
    assert manifest["counts"]["unlabeled"] == 4 + 5 and manifest["counts"]["rejected"] == 0

    # idempotent: a second run adds nothing and creates no batch folder
    second = ingest(src, root, PrepareParams(max_image_pixels=50000, max_aspect_ratio=10), use_dvc=False)
    assert second.batch is None and second.added == []
    assert len(second.skipped) == 7
    assert sorted(p.name for p in (root / "unlabeled").iterdir()) == ["batch-0001", batch.name]


def test_bad_source_or_data_root_is_a_clear_error(tmp_path, image_dataset, capsys):
    root = image_dataset()
    assert main(["ingest", str(tmp_path / "nope"), "--data-root", str(root), "--no-dvc"]) == 2
    assert "nope: source folder not found" in capsys.readouterr().err
    assert main(["ingest", str(root / "labeled"), "--data-root", str(root), "--no-dvc"]) == 2
    assert "inside the data root" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path), "--data-root", str(root), "--no-dvc"]) == 2
    assert "contains the data root" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    assert main(["ingest", str(tmp_path / "src"), "--data-root", str(tmp_path / "missing"), "--no-dvc"]) == 2
    assert "data root not found" in capsys.readouterr().err


def test_next_number_counts_batches_not_pulled_and_hashes_batches_without_index(
    tmp_path, image_dataset, make_image
):
    root = image_dataset()
    (root / "unlabeled" / "batch-0007.dvc").write_text("outs: []\n")  # tracked, not in the workspace
    src = tmp_path / "src"
    write_source(src, make_image, [50])
    (src / "again.png").write_bytes((root / "unlabeled" / "batch-0001" / "u_000.png").read_bytes())
    result = ingest(src, root, PrepareParams(), use_dvc=False)
    assert result.batch.startswith("unlabeled/batch-0008-")
    assert [e["source"] for e in result.skipped] == ["again.png"]  # batch-0001 has no index: hashed
    assert any("batch-0007" in w and "dvc pull" in w for w in result.warnings)


def test_batch_names_differ_by_content_so_parallel_branches_never_collide(
    tmp_path, image_dataset, make_image
):
    """Two clones at the same commit that each ingest different images must not both create the same
    ``batch-NNNN.dvc`` (a git add/add conflict on merge); the same images give the same name."""
    clones = [image_dataset(root=tmp_path / name) for name in ("main", "branch_a", "branch_b", "branch_c")]
    write_source(tmp_path / "src_a", make_image, [60, 61])
    write_source(tmp_path / "src_b", make_image, [62, 63])
    a = ingest(tmp_path / "src_a", clones[1], PrepareParams(), use_dvc=False).batch
    b = ingest(tmp_path / "src_b", clones[2], PrepareParams(), use_dvc=False).batch
    a_again = ingest(tmp_path / "src_a", clones[3], PrepareParams(), use_dvc=False).batch
    assert a.startswith("unlabeled/batch-0002-") and b.startswith("unlabeled/batch-0002-")
    assert a != b and a == a_again


def test_large_load_in_one_go(tmp_path, image_dataset, make_image):
    root = image_dataset()
    src = tmp_path / "src"
    new = write_source(src, make_image, range(100, 700), size=(8, 8))
    result = ingest(src, root, PrepareParams(), use_dvc=False, progress=False)
    assert len(result.added) == 600 and not result.skipped and not result.rejected
    assert sorted(batch_files(root)["batch-0002"]) == sorted(new.values())


# ---------------------------------------------------------------- with DVC, concurrently


@pytest.mark.slow
def test_two_concurrent_ingests_lose_and_duplicate_nothing(tmp_path, make_image, image_dataset):
    env = repo_env()
    repo = init_repo(tmp_path / "repo", env)
    root = image_dataset(root=repo / "data")
    run([DVC, "add", "-q", "data/labeled", "data/test", "data/unlabeled/batch-0001"], repo, env)
    a = write_source(tmp_path / "a", make_image, range(100, 400), size=(8, 8))
    b = write_source(tmp_path / "b", make_image, range(250, 550), size=(8, 8))  # 150 shared with a
    procs = [
        subprocess.Popen(
            [KDPIPE, "ingest", str(tmp_path / name), "--data-root", "data"],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    batches = batch_files(root)
    assert sorted(batches) == ["batch-0001", "batch-0002", "batch-0003"]
    ingested = batches["batch-0002"] + batches["batch-0003"]
    assert len(ingested) == len(set(ingested))  # nothing twice
    assert set(ingested) == set(a.values()) | set(b.values())  # nothing lost
    assert sorted([len(batches["batch-0002"]), len(batches["batch-0003"])]) == [150, 300]
    dvc_files = [f"data/unlabeled/{batch_dir(root, key).name}.dvc" for key in ("batch-0002", "batch-0003")]
    assert all((repo / f).is_file() for f in dvc_files)  # each batch got its own .dvc file
    status = run([DVC, "status", *dvc_files], repo, env)
    assert "up to date" in status


# ---------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"), extra_modules=("kdpipe.data.ingest",))
    yield z
    z.close()


@pytest.mark.slow
def test_kill_9_leaves_no_batch_or_a_complete_one(zygote, tmp_path, image_dataset, make_image):
    root = image_dataset()
    src = tmp_path / "src"
    new = write_source(src, make_image, range(100, 500), size=(8, 8))
    argv = ["ingest", src, "--data-root", root, "--no-dvc"]
    probe = tmp_path / "probe"
    image_dataset(root=probe)
    code, seconds, log = zygote.run([*argv[:3], probe, "--no-dvc"], tmp_path)
    assert code == 0, log

    def check() -> str:
        batches = batch_files(root)
        visible = set(batches) - {"batch-0001"}
        assert visible <= {"batch-0002"}, visible
        if visible:
            assert sorted(batches["batch-0002"]) == sorted(new.values())  # complete, never partial
            return "complete"
        return "absent"

    def reset():
        import shutil

        for entry in (root / "unlabeled").iterdir():
            if entry.name != "batch-0001":
                shutil.rmtree(entry)

    rng = random.Random(5)
    seen = []
    for _ in range(8):
        reset()
        code, log = zygote.run_killed(argv, tmp_path, delay=rng.uniform(0.0, 1.1 * seconds))
        assert code in (0, KILLED), log
        seen.append(check())
    for when in ("before", "after"):  # around the rename that publishes the batch
        reset()
        code, _, log = zygote.run(argv, tmp_path, kill_at_replace=[1, when])
        assert code == KILLED, log
        assert check() == ("absent" if when == "before" else "complete")
    assert "absent" in seen

    # the next run cleans the temporary folders of killed runs and finishes the job exactly once
    code, _, log = zygote.run(argv, tmp_path)
    assert code == 0, log
    assert check() == "complete"
    assert not [p for p in (root / "unlabeled").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_killed_before_dvc_add_is_tracked_by_the_next_ingest(zygote, tmp_path, image_dataset, make_image):
    env = repo_env()
    repo = init_repo(tmp_path / "repo", env)
    image_dataset(root=repo / "data")
    run([DVC, "add", "-q", "data/labeled", "data/test", "data/unlabeled/batch-0001"], repo, env)
    write_source(tmp_path / "src", make_image, range(10))
    argv = ["ingest", tmp_path / "src", "--data-root", "data"]
    code, _, log = zygote.run(argv, repo, kill_at_replace=[1, "after"])
    assert code == KILLED, log
    batch = batch_dir(repo / "data", "batch-0002")
    assert not batch.with_name(batch.name + ".dvc").exists()
    code, _, log = zygote.run(argv, repo)
    assert code == 0, log
    assert "added nothing" in log and "dvc: tracked" in log
    assert batch.with_name(batch.name + ".dvc").is_file()
