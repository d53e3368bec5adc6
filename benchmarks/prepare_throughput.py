"""Prepare throughput: decoding a folder of photo-like JPEGs to 224 px, three ways side by side.

(a) naive loop — one process: open, convert to RGB, resize to 224x224 (bicubic, as kdpipe's
    prepare did before issue 17), write into a disk-backed numpy array, and sha256 of the file
    read a second time: kdpipe's prepare before issue 17, without its bookkeeping;
(b) torchvision — ``datasets.ImageFolder`` + ``DataLoader(num_workers=2, batch_size=64)`` with
    ``Resize((224, 224))`` + ``PILToTensor`` over the same folder (what users typically write);
(c) kdpipe prepare — the real step (``kdpipe.steps.prepare.run``, prepare.image_size=224): with
    ``prepare.workers`` = 1 and 0 (every core) when that setting exists, else its default. Each full
    prepare gets a fresh, empty ``KDPIPE_CACHE_DIR``, so no decoded image is reused.

Every measurement runs in a fresh child process (no warm imports or pools shared between them),
timed around the work only (not the interpreter's start-up); the files are read once beforehand so
all three read them from the page cache. Rounds are interleaved, the order rotated each round;
each ratio is the median of the per-round ratios to the naive loop. Goal (issue 17): kdpipe
prepare >= 1.8x the naive loop on 2 cores.

Then the incremental measurement: a full prepare (fresh cache), 1% new unlabeled images added as
the next batch folder (as ``kdpipe ingest`` would), and a second prepare with the same cache and
output folder. Goal: <= 5% of the full prepare's time. The added batch is removed afterwards.

    .venv/bin/python -m benchmarks.prepare_throughput                 # 3,000 photos, 3 rounds
    .venv/bin/python -m benchmarks.prepare_throughput --smoke         # 300 photos, 2 rounds: checks it runs
    .venv/bin/python -m benchmarks.prepare_throughput --data DIR      # a folder made by benchmarks.synthetic_images

Results: benchmarks/results/prepare_throughput.{json,md} (``--smoke``: prepare_throughput_smoke.*).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, provenance, write_results
from benchmarks.synthetic_images import PHOTO_SIZES, SETTINGS_FILE, add_unlabeled_batch, generate, image_files

REPO = Path(__file__).resolve().parents[1]
SIZE = 224
GOAL_SPEEDUP = 1.8
GOAL_INCREMENTAL = 0.05
NEW_IMAGES = 0.01  # the share of new unlabeled images in the incremental measurement


# ------------------------------------------------------------------ the three ways (child process)


def decode_naive(data: Path, scratch: Path, size: int) -> int:
    """(a) one process, one file at a time, each file read twice (pixels, then its sha256)."""
    import hashlib

    import numpy as np
    from numpy.lib.format import open_memmap
    from PIL import Image

    files = image_files(data)
    out = open_memmap(scratch / "naive.npy", mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    hashes = []
    for row, path in enumerate(files):
        with Image.open(path) as img:
            out[row] = np.asarray(
                img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
            )
        hashes.append(hashlib.sha256(path.read_bytes()).hexdigest())
    out.flush()
    return len(files)


def decode_torchvision(data: Path, size: int, workers: int = 2, batch_size: int = 64) -> int:
    """(b) ImageFolder + DataLoader: the top-level folders (labeled, unlabeled, test) act as its
    classes, so it reads every image file under the data root, like prepare."""
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    dataset = datasets.ImageFolder(str(data), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return sum(len(images) for images, _ in loader)


def has_workers_setting() -> bool:
    from kdpipe.core.params import PrepareParams

    return "workers" in PrepareParams.model_fields


def run_kdpipe_prepare(data: Path, out_dir: Path, size: int, workers: int | None) -> int:
    """(c) kdpipe's prepare step, in this process; its summary lines are not printed."""
    from kdpipe.core.params import Params
    from kdpipe.steps import prepare

    settings = {"image_size": size, **({} if workers is None else {"workers": workers})}
    with contextlib.redirect_stdout(io.StringIO()):
        manifest = prepare.run(Params(prepare=settings), data_root=data, out_dir=out_dir)
    counts = manifest["counts"]
    return sum(counts[k] for k in ("train", "val", "unlabeled", "test", "rejected"))


# The modules each way needs: imported before the clock starts (importing torch alone takes seconds).
_MODULES = {
    "naive": ("numpy", "PIL.Image"),
    "torchvision": ("torch", "torchvision"),
    "kdpipe": ("kdpipe.core.params", "kdpipe.steps.prepare"),
}


def measure(args: argparse.Namespace) -> dict:
    """One timed measurement (the child process's whole job): the work only, not the imports."""
    import importlib

    for module in _MODULES[args.measure]:
        importlib.import_module(module)
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-scratch-") as scratch:
        start = time.perf_counter()
        if args.measure == "naive":
            images = decode_naive(data, Path(scratch), args.size)
        elif args.measure == "torchvision":
            images = decode_torchvision(data, args.size)
        else:
            out_dir = Path(args.out_dir) if args.out_dir else Path(scratch) / "prepared"
            images = run_kdpipe_prepare(data, out_dir, args.size, args.workers)
        seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds}


# ------------------------------------------------------------------ driving the children


class Measurer:
    """Runs each measurement as ``python -m benchmarks.prepare_throughput --measure ...``."""

    def __init__(self, data: Path, size: int, scratch: Path):
        self.data, self.size, self.scratch = data, size, scratch

    def run(
        self, way: str, workers: int | None = None, cache: Path | None = None, out_dir: Path | None = None
    ) -> dict:
        """``cache``: the KDPIPE_CACHE_DIR to use; None = a fresh empty one (a full prepare)."""
        fresh_cache = cache is None
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=self.scratch)) if fresh_cache else cache
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.prepare_throughput",
            "--measure",
            way,
            "--data",
            str(self.data),
            "--size",
            str(self.size),
        ]
        cmd += [] if workers is None else ["--workers", str(workers)]
        cmd += [] if out_dir is None else ["--out-dir", str(out_dir)]
        env = {**os.environ, "KDPIPE_CACHE_DIR": str(cache), "KDPIPE_TRACKING": "0"}
        try:
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        finally:
            if fresh_cache:
                shutil.rmtree(cache, ignore_errors=True)
        if done.returncode != 0:
            raise SystemExit(f"{way} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["images_per_s"] = result["images"] / result["seconds"]
        return result


def warm_page_cache(files: list[Path]) -> float:
    """Read every file once, so every way reads them from memory; returns the seconds it took."""
    start = time.perf_counter()
    for path in files:
        path.read_bytes()
    return time.perf_counter() - start


def ways(workers_setting: bool) -> list[tuple[str, str, int | None]]:
    """(label, way, prepare.workers) of every measurement in a round; the naive loop first."""
    chosen = [
        ("naive PIL loop (1 process)", "naive", None),
        ("torchvision ImageFolder + DataLoader(num_workers=2)", "torchvision", None),
    ]
    if workers_setting:
        chosen += [
            ("kdpipe prepare, workers=1", "kdpipe", 1),
            ("kdpipe prepare, workers=0 (every core)", "kdpipe", 0),
        ]
    else:
        chosen += [("kdpipe prepare (default; no prepare.workers setting yet)", "kdpipe", None)]
    return chosen


def throughput_rounds(measurer: Measurer, chosen, rounds: int) -> dict[str, list[dict]]:
    """Every way once per round, the order rotated each round; {label: [result per round]}."""
    results: dict[str, list[dict]] = {label: [] for label, _, _ in chosen}
    for r in range(rounds):
        order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
        for label, way, workers in order:
            result = measurer.run(way, workers)
            results[label].append(result)
            print(
                f"round {r + 1}/{rounds}: {label}: {result['images_per_s']:.1f} images/s "
                f"({result['seconds']:.1f} s)",
                flush=True,
            )
    return results


def summarise(results: dict[str, list[dict]], baseline: str) -> list[dict]:
    rows = []
    for label, runs in results.items():
        ratios = [
            run["images_per_s"] / base["images_per_s"]
            for run, base in zip(runs, results[baseline], strict=True)
        ]
        rows.append(
            {
                "way": label,
                "images_per_s": statistics.median(r["images_per_s"] for r in runs),
                "per_round": [round(r["images_per_s"], 1) for r in runs],
                "ratio_to_naive": statistics.median(ratios),
            }
        )
    return rows


def core_scaling(raw: dict[str, list[dict]], chosen) -> float | None:
    """kdpipe prepare on every core over kdpipe prepare in one process (median of per-round ratios)."""
    by_workers = {workers: label for label, way, workers in chosen if way == "kdpipe"}
    if 0 not in by_workers or 1 not in by_workers:
        return None
    return statistics.median(
        a["images_per_s"] / b["images_per_s"]
        for a, b in zip(raw[by_workers[0]], raw[by_workers[1]], strict=True)
    )


def incremental(measurer: Measurer, data: Path, workers: int | None, images: int, rounds: int) -> dict:
    """Full prepare with a fresh cache, then ``rounds`` times: +1% new unlabeled images as the next
    batch folder, prepare again (same cache, same output). Each share is against the one full prepare."""
    cache = Path(tempfile.mkdtemp(prefix="incremental-cache-", dir=measurer.scratch))
    out_dir = measurer.scratch / "incremental-prepared"
    full = measurer.run("kdpipe", workers, cache=cache, out_dir=out_dir)
    added = math.ceil(NEW_IMAGES * images)
    batches, seconds = [], []
    try:
        for _ in range(rounds):
            batches.append(add_unlabeled_batch(data, added))
            seconds.append(measurer.run("kdpipe", workers, cache=cache, out_dir=out_dir)["seconds"])
    finally:
        for batch in batches:
            shutil.rmtree(batch)  # leave the folder as it was generated
    median = statistics.median(seconds)
    return {
        "workers": workers,
        "full_s": full["seconds"],
        "added_images": added,
        "incremental_s": median,
        "incremental_per_round_s": seconds,
        "share_of_full": median / full["seconds"],
    }


# ------------------------------------------------------------------ report


def render(result: dict) -> str:
    smoke = result["smoke"]
    rows = [
        [
            r["way"],
            f"{r['images_per_s']:.1f}",
            " / ".join(f"{v:.1f}" for v in r["per_round"]),
            f"{r['ratio_to_naive']:.2f}x",
        ]
        for r in result["rows"]
    ]
    inc = result["incremental"]
    data = result["data"]
    best = result["best_kdpipe_ratio"]
    lines = [
        *(
            ["**SMOKE RUN (tiny scale, checks that the benchmark works; not a measurement)**", ""]
            if smoke
            else []
        ),
        f"Command: `{result['command']}`",
        f"Machine: {result['cpu']}; {result['date']}; kdpipe {result['commit']}"
        f" (prepare.workers setting: {'yes' if result['workers_setting'] else 'not yet'}).",
        f"Data: {data['images']} synthetic photo-like JPEGs ({data['sizes']}, {data['mean_kib']:.0f} KiB on "
        f"average), decoded to {result['size']}x{result['size']}; {result['rounds']} interleaved rounds, "
        "each way in a fresh process, files in the page cache.",
        "",
        markdown_table(["way", "images/s (median)", "per round", "vs naive loop"], rows),
        "",
        f"kdpipe prepare / naive loop: {best:.2f}x (goal >= {GOAL_SPEEDUP}x: "
        f"{'met' if best >= GOAL_SPEEDUP else 'not met'}); ratios are medians of per-round ratios."
        + (
            f" Scaling: workers=0 / workers=1 = {result['core_scaling']:.2f}x on {result['cpus']} cores."
            if result.get("core_scaling")
            else ""
        ),
        "",
        f"Incremental prepare (prepare.workers={inc['workers'] if inc['workers'] is not None else 'default'}): "
        f"full prepare {inc['full_s']:.1f} s; after adding {inc['added_images']} new unlabeled images "
        f"({100 * NEW_IMAGES:.0f}%) as the next batch folder, the next prepare (same KDPIPE_CACHE_DIR and "
        f"output folder) took {inc['incremental_s']:.2f} s (median of "
        f"{' / '.join(f'{v:.2f}' for v in inc.get('incremental_per_round_s', [inc['incremental_s']]))} s, "
        "one new batch each) = "
        f"{100 * inc['share_of_full']:.1f}% of the full prepare "
        f"(goal <= {100 * GOAL_INCREMENTAL:.0f}%: {'met' if inc['share_of_full'] <= GOAL_INCREMENTAL else 'not met'}).",
    ]
    return "\n".join(lines) + "\n"


def prepare_data(args: argparse.Namespace, scratch: Path) -> Path:
    if args.data:
        data = Path(args.data).resolve()
        if not (data / SETTINGS_FILE).is_file():  # the incremental part adds images of the same kind
            raise SystemExit(f"{data}: not a folder made by benchmarks.synthetic_images (no {SETTINGS_FILE})")
        return data
    data = scratch / "data"
    labeled, test = max(20, args.images // 10), max(10, args.images // 50)  # 10% labeled, 2% test, 10 classes
    summary = generate(
        data,
        labeled=labeled,
        unlabeled=args.images - labeled - test,
        test=test,
        classes=10,
        sizes=PHOTO_SIZES,
        seed=args.seed,
    )
    print(f"generated {summary.line()}", flush=True)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=3000, help="photos to generate (10%% labeled, 2%% test, 10 classes)"
    )
    parser.add_argument("--data", help="use this generated folder instead (benchmarks.synthetic_images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SIZE, help="prepare.image_size")
    parser.add_argument(
        "--smoke", action="store_true", help="300 photos, 2 rounds, results marked as a smoke run"
    )
    parser.add_argument(
        "--out", help="results path without suffix (default benchmarks/results/prepare_throughput[_smoke])"
    )
    # One measurement in this (child) process: used by the benchmark itself.
    parser.add_argument("--measure", choices=["naive", "torchvision", "kdpipe"], help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    if args.smoke:
        args.images, args.rounds = min(args.images, 300), min(args.rounds, 2)
    out = REPO / (args.out or f"benchmarks/results/prepare_throughput{'_smoke' if args.smoke else ''}")
    result: dict = {
        **provenance("benchmarks.prepare_throughput", argv),
        "cpus": os.cpu_count(),
        "smoke": args.smoke,
        "size": args.size,
        "rounds": args.rounds,
    }

    with tempfile.TemporaryDirectory(prefix="kdpipe-prepare-bench-") as tmp:
        scratch = Path(tmp)
        data = prepare_data(args, scratch)
        files = image_files(data)
        total_bytes = sum(p.stat().st_size for p in files)
        sizes = sorted({_dimensions(p) for p in files[:: max(1, len(files) // 200)]})
        result["data"] = {
            "images": len(files),
            "mean_kib": total_bytes / 1024 / max(1, len(files)),
            "sizes": ", ".join(f"{w}x{h}" for w, h in sizes),
            "generated": not args.data,
        }
        result["page_cache_warmup_s"] = round(warm_page_cache(files), 2)
        measurer = Measurer(data, args.size, scratch)
        result["workers_setting"] = has_workers_setting()
        chosen = ways(result["workers_setting"])
        raw = throughput_rounds(measurer, chosen, args.rounds)
        result["raw"] = raw
        result["rows"] = summarise(raw, chosen[0][0])
        result["best_kdpipe_ratio"] = max(
            r["ratio_to_naive"] for r in result["rows"] if r["way"].startswith("kdpipe")
        )
        result["core_scaling"] = core_scaling(raw, chosen)
        result["incremental"] = incremental(
            measurer, data, 0 if result["workers_setting"] else None, len(files), args.rounds
        )

    write_results(out, result, render(result))
    return 0


def _dimensions(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


if __name__ == "__main__":
    sys.exit(main())
