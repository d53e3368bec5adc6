"""Ingest under load: 10,000 small images in one ``kdpipe ingest``, then two ingests at once.

    .venv/bin/python -m benchmarks.ingest_load              # 10,000 images; 2 x 5,000 (2,500 shared)
    .venv/bin/python -m benchmarks.ingest_load --count 2000 # smaller

Runs the real CLI (with ``dvc add`` of each new batch) in a throw-away git + DVC repository under a
temporary folder, and checks that nothing is lost or duplicated: every distinct source image ends
up in exactly one batch folder. Results go to benchmarks/results/ingest_load.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_results

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _write_pngs(folder: Path, seeds: range, size: int = 16) -> dict[str, str]:
    """One distinct noise PNG per seed (100 per sub-folder); returns {sha256: relative path}."""
    from PIL import Image

    out = {}
    for seed in seeds:
        pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        path = folder / f"part-{seed // 100:04d}" / f"img-{seed:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        out[hashlib.sha256(path.read_bytes()).hexdigest()] = path.relative_to(folder).as_posix()
    return out


def _batch_hashes(unlabeled: Path) -> dict[str, list[str]]:
    batches = {}
    for batch in sorted(p for p in unlabeled.iterdir() if p.is_dir() and not p.name.startswith(".")):
        batches[batch.name] = [
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(batch.rglob("*.png"))
        ]
    return batches


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-2000:]}")


def _ingest_cmd(src: Path, use_dvc: bool) -> list[str]:
    return [
        str(BIN / "kdpipe"),
        "ingest",
        str(src),
        "--data-root",
        "data",
        *([] if use_dvc else ["--no-dvc"]),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000, help="images in the one-go ingest")
    parser.add_argument("--no-dvc", action="store_true", help="skip `dvc add` of the new batches")
    parser.add_argument("--out", default="benchmarks/results/ingest_load")
    args = parser.parse_args(argv)
    use_dvc = not args.no_dvc
    env = {**os.environ, "KDPIPE_TRACKING": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result: dict[str, object] = {"count": args.count, "dvc_add": use_dvc, "cpus": os.cpu_count()}

    with tempfile.TemporaryDirectory(prefix="kdpipe-ingest-bench-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        (repo / "data" / "unlabeled").mkdir(parents=True)
        _run(["git", "init", "-q"], repo, env)
        _run([str(BIN / "dvc"), "init", "-q"], repo, env)
        _write_pngs(repo / "data" / "labeled" / "a", range(10_000_000, 10_000_010))
        _write_pngs(repo / "data" / "labeled" / "b", range(10_000_010, 10_000_020))

        # 1) one ingest of `count` new images
        start = time.perf_counter()
        one_go = _write_pngs(work / "one-go", range(args.count))
        result["generate_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        _run(_ingest_cmd(work / "one-go", use_dvc), repo, env)
        seconds = time.perf_counter() - start
        batches = _batch_hashes(repo / "data" / "unlabeled")
        added = batches.get("batch-0001", [])
        result["one_go"] = {
            "images": args.count,
            "added": len(added),
            "seconds": round(seconds, 2),
            "images_per_s": round(args.count / seconds, 1),
            "lost": len(set(one_go) - set(added)),
            "duplicated": len(added) - len(set(added)),
        }

        # 2) the same folder again: everything is a duplicate, nothing is added
        start = time.perf_counter()
        _run(_ingest_cmd(work / "one-go", use_dvc), repo, env)
        result["repeat_same_folder"] = {
            "seconds": round(time.perf_counter() - start, 2),
            "new_batches": len(_batch_hashes(repo / "data" / "unlabeled")) - 1,
        }

        # 3) two ingests at once: half the images each, a quarter of the total shared between them
        half, quarter = args.count // 2, args.count // 4
        base = 1_000_000
        a = _write_pngs(work / "a", range(base, base + half))
        b = _write_pngs(work / "b", range(base + half - quarter, base + 2 * half - quarter))
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                _ingest_cmd(work / name, use_dvc),
                cwd=repo,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name in ("a", "b")
        ]
        outputs = [p.communicate()[0] for p in procs]
        seconds = time.perf_counter() - start
        if any(p.returncode for p in procs):
            raise SystemExit("concurrent ingest failed:\n" + "\n".join(o[-2000:] for o in outputs))
        batches = _batch_hashes(repo / "data" / "unlabeled")
        new = [h for name, hashes in batches.items() if name != "batch-0001" for h in hashes]
        distinct = set(a) | set(b)
        result["concurrent"] = {
            "ingests": 2,
            "images_each": half,
            "shared": quarter,
            "distinct": len(distinct),
            "added": len(new),
            "seconds": round(seconds, 2),
            "batches": {k: len(v) for k, v in batches.items()},
            "lost": len(distinct - set(new)),
            "duplicated": len(new) - len(set(new)),
            "dvc_files": sorted(p.name for p in (repo / "data" / "unlabeled").glob("*.dvc")),
        }

    ok = all(result[k]["lost"] == 0 and result[k]["duplicated"] == 0 for k in ("one_go", "concurrent"))
    ok = ok and result["repeat_same_folder"]["new_batches"] == 0
    result["ok"] = ok
    one, rep, con = result["one_go"], result["repeat_same_folder"], result["concurrent"]
    lines = [
        f"Ingest load ({'with' if use_dvc else 'without'} `dvc add`, {result['cpus']} CPUs, 16x16 PNGs):",
        "",
        "| run | images | added | lost | duplicated | seconds | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| one go | {one['images']} | {one['added']} | {one['lost']} | {one['duplicated']} | {one['seconds']} "
        f"| {one['images_per_s']} |",
        f"| same folder again | {one['images']} | 0 (new batches: {rep['new_batches']}) | - | - | {rep['seconds']} | - |",
        f"| two at once | 2 x {con['images_each']} ({con['shared']} shared, {con['distinct']} distinct) | "
        f"{con['added']} | {con['lost']} | {con['duplicated']} | {con['seconds']} "
        f"| {round(con['distinct'] / con['seconds'], 1)} |",
    ]
    write_results(REPO / args.out, result, "\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
