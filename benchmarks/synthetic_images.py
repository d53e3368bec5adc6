"""A large synthetic-but-realistic image folder in kdpipe's layout, for the data-path benchmarks.

    .venv/bin/python -m benchmarks.synthetic_images OUT --labeled 1000 --unlabeled 9000 --size 32x32
    .venv/bin/python -m benchmarks.synthetic_images OUT --labeled 300 --unlabeled 2700 --test 100 \\
        --size 500x375 --size 640x480 --size 1024x768 --seed 0
    .venv/bin/python -m benchmarks.synthetic_images OUT --add-batch 30     # a new unlabeled batch

Layout (what ``kdpipe prepare`` reads)::

    OUT/labeled/class-NN/*.jpg        OUT/unlabeled/batch-0000/*.jpg        OUT/test/class-NN/*.jpg

The pictures look like photos to a JPEG codec, not like flat colour: a smooth background of a few
blended colours (sky/ground-like gradients), a few soft-edged shapes, a mid-frequency texture and
sensor-like grain. So their file sizes and decode costs resemble those of real photos of the same
size (flat images compress 10-50x better and decode faster, which would flatter any decoder). Each
class has its own dominant colour, so a classifier can learn a little from them.

Every image comes from its own random generator, keyed by (seed, stream, index): the output is the
same bytes for the same seed whatever the number of worker processes, and every image is distinct
(kdpipe's prepare drops identical pictures as duplicates). A hidden ``OUT/.synthetic.json`` records
the settings (prepare skips hidden files), so :func:`add_unlabeled_batch` draws more images of the
same kind, as new images arriving through ``kdpipe ingest`` would.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SETTINGS_FILE = ".synthetic.json"
PHOTO_SIZES = ((500, 375), (640, 480), (1024, 768))  # the throughput benchmark's mix (4:3 photos)
THUMBNAIL_SIZES = ((32, 32), (48, 48))  # the memory benchmark's mix (prepared at 32 px)
_GRAIN_TILE = 1100  # side of the shared noise tile: covers 1024x768 photos
BATCH_NAME = re.compile(r"^batch-(\d{4,})")

# Random streams: images of different splits and batches never share a generator key.
_STREAM_LABELED, _STREAM_UNLABELED, _STREAM_TEST = 0, 1, 2
_STREAM_ADDED_BATCH = 1000  # + the batch number


@dataclass(frozen=True)
class _Task:
    """One image to draw and encode (picklable: sent to the worker processes)."""

    rel: str  # path relative to the root
    class_index: int | None  # its class's colour; None (unlabeled): a hidden class drawn at random
    key: tuple[int, int, int]  # (seed, stream, index): the image's own random generator


@dataclass
class Summary:
    """What a generation run wrote."""

    root: str
    counts: dict[str, int]
    files: int
    bytes: int
    seconds: float
    sizes: list[list[int]] = field(default_factory=list)

    def line(self) -> str:
        mib = self.bytes / 2**20
        return (
            f"{self.files} JPEGs, {mib:.1f} MiB ({mib * 1024 / max(self.files, 1):.1f} KiB each), "
            f"in {self.seconds:.1f} s ({self.files / max(self.seconds, 1e-9):.0f} images/s): "
            + ", ".join(f"{n} {split}" for split, n in self.counts.items())
        )


# ------------------------------------------------------------------------------------- drawing


def class_colour(class_index: int, classes: int) -> np.ndarray:
    """A dominant RGB colour per class: hues spread evenly around the colour wheel."""
    hue = (class_index % max(classes, 1)) / max(classes, 1)
    phases = np.array([0.0, 1 / 3, 2 / 3])
    return 128 + 100 * np.cos(2 * np.pi * (hue - phases))


def _upscaled_plane(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """A small float grid smoothly enlarged to ``(height, width)`` by bilinear interpolation (PIL
    does it in C, much faster than numpy)."""
    from PIL import Image

    plane = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR))


def _background(rng: np.random.Generator, width: int, height: int, colour: np.ndarray):
    """A few colours blended smoothly across the frame, tinted with the class colour (a PIL image)."""
    from PIL import Image

    grid = rng.uniform(0, 255, size=(rng.integers(2, 5), rng.integers(2, 5), 3))
    grid = np.clip(0.55 * grid + 0.45 * colour, 0, 255).astype(np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)


def _draw_shapes(rng: np.random.Generator, canvas, colour: np.ndarray) -> None:
    """Draw 2-6 ellipses, boxes and polygons (the "objects") on a PIL image."""
    from PIL import ImageDraw

    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        fill = tuple(int(v) for v in np.clip(0.6 * rng.uniform(0, 255, 3) + 0.4 * colour, 0, 255))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.35) * width, rng.uniform(0.05, 0.35) * height
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
        elif kind == 1:
            draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 7)))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=fill)


def _scene(rng: np.random.Generator, width: int, height: int, colour: np.ndarray) -> np.ndarray:
    """Background and shapes, drawn at half resolution and enlarged: the enlargement softens the
    shapes' edges like a lens (a blur at full size would cost 3x more). Float32 (height, width, 3)."""
    from PIL import Image

    half = (max(1, width // 2), max(1, height // 2))
    canvas = _background(rng, *half, colour)
    _draw_shapes(rng, canvas, colour)
    canvas = canvas.resize((width, height), Image.Resampling.BILINEAR)
    light = np.linspace(
        rng.uniform(1.0, 1.2), rng.uniform(0.7, 1.0), height, dtype=np.float32
    )  # lit from above
    return np.asarray(canvas, dtype=np.float32) * light[:, None, None]


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Brightness variations at two scales (foliage, fabric, walls): what makes JPEG work hard. The
    coarse scale is enlarged to the fine grid first, so only one full-size enlargement is paid."""
    fine_w, fine_h = max(2, width // 4), max(2, height // 4)
    coarse = _upscaled_plane(rng.standard_normal((max(2, height // 24), max(2, width // 24))), fine_w, fine_h)
    fine = rng.standard_normal((fine_h, fine_w), dtype=np.float32)
    return _upscaled_plane(10 * coarse + 6 * fine, width, height)


@functools.lru_cache(maxsize=1)
def _grain_tile() -> np.ndarray:
    """Unit Gaussian colour noise, drawn once per process from a fixed seed: each image adds a window
    of it at its own offset and strength (drawing fresh noise per photo would double the time)."""
    return np.random.default_rng(12345).standard_normal((_GRAIN_TILE, _GRAIN_TILE, 3), dtype=np.float32)


def _grain(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    tile = _grain_tile()
    if width > _GRAIN_TILE or height > _GRAIN_TILE:
        return rng.standard_normal((height, width, 3), dtype=np.float32)
    top, left = rng.integers(0, _GRAIN_TILE - height + 1), rng.integers(0, _GRAIN_TILE - width + 1)
    return tile[top : top + height, left : left + width]


def draw_photo(rng: np.random.Generator, width: int, height: int, colour: np.ndarray) -> np.ndarray:
    """One photo-like ``(height, width, 3)`` uint8 picture."""
    image = _scene(rng, width, height, colour)
    image += _texture(rng, width, height)[..., None]
    image += _grain(rng, width, height) * np.float32(rng.uniform(2.0, 5.0))  # sensor grain
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


@dataclass(frozen=True)
class _Style:
    """What all images of a folder share (picklable: sent to the worker processes with each chunk)."""

    root: str
    classes: int
    sizes: tuple[tuple[int, int], ...]  # (width, height): each image picks one
    quality: int  # JPEG quality


def _write_one(task: _Task, style: _Style) -> int:
    """Draw, encode and write one image; returns its size in bytes (runs in a worker process).

    Its size and hidden class come from its own generator, so they do not depend on the order
    or the process in which images are drawn."""
    from PIL import Image

    rng = np.random.default_rng(list(task.key))
    width, height = style.sizes[int(rng.integers(len(style.sizes)))]
    class_index = int(rng.integers(style.classes)) if task.class_index is None else task.class_index
    pixels = draw_photo(rng, width, height, class_colour(class_index, style.classes))
    path = Path(style.root) / task.rel
    Image.fromarray(pixels).save(path, format="JPEG", quality=style.quality)
    return path.stat().st_size


def _write_chunk(args: tuple[list[_Task], _Style]) -> int:
    tasks, style = args
    return sum(_write_one(t, style) for t in tasks)


# ------------------------------------------------------------------------------------- planning


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 640x480")
    return int(match[1]), int(match[2])


def class_names(classes: int) -> list[str]:
    return [f"class-{c:02d}" for c in range(classes)]


def _plan(labeled: int, unlabeled: int, test: int, classes: int, seed: int) -> list[_Task]:
    """Every image to write: labeled and test images round-robin over the classes."""
    names = class_names(classes)
    tasks = []
    for split, stream, count in (("labeled", _STREAM_LABELED, labeled), ("test", _STREAM_TEST, test)):
        for index in range(count):
            c = index % classes
            tasks.append(_Task(f"{split}/{names[c]}/{split[0]}-{index:07d}.jpg", c, (seed, stream, index)))
    return tasks + _unlabeled_tasks("unlabeled/batch-0000", _STREAM_UNLABELED, unlabeled, seed)


def _unlabeled_tasks(folder: str, stream: int, count: int, seed: int) -> list[_Task]:
    return [_Task(f"{folder}/u-{index:07d}.jpg", None, (seed, stream, index)) for index in range(count)]


def _run_tasks(tasks: list[_Task], style: _Style, workers: int | None) -> int:
    """Write every task's image, on a process pool when ``workers`` != 1 (0/None = every core)."""
    for folder in sorted({str(Path(t.rel).parent) for t in tasks}):
        (Path(style.root) / folder).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) < 2 * workers:  # too few to be worth starting processes
        return sum(_write_one(t, style) for t in tasks)
    # Chunks of tasks per message: pickling one tiny task at a time would cost more than drawing it.
    chunk = max(1, min(512, math.ceil(len(tasks) / (workers * 8))))
    chunks = [(tasks[i : i + chunk], style) for i in range(0, len(tasks), chunk)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return sum(pool.imap_unordered(_write_chunk, chunks))


# ------------------------------------------------------------------------------------- API


def generate(
    root: str | os.PathLike,
    labeled: int,
    unlabeled: int,
    test: int = 0,
    classes: int = 10,
    sizes: Iterable[tuple[int, int]] = THUMBNAIL_SIZES,
    seed: int = 0,
    quality: int = 90,
    workers: int | None = None,
) -> Summary:
    """Write a new image folder at ``root`` (which must not exist or be empty); return a summary.

    ``sizes``: (width, height) pairs, one picked at random per image. ``workers``: processes (0 or
    None = every core, 1 = this process). ``labeled`` and ``test`` images are spread evenly over
    ``classes`` class folders; every class needs at least one labeled image.
    """
    root = Path(root)
    sizes = tuple((int(w), int(h)) for w, h in sizes)
    if not sizes:
        raise ValueError("sizes: give at least one WIDTHxHEIGHT")
    if classes < 2 or labeled < classes:
        raise ValueError(
            f"need at least 2 classes and one labeled image per class (classes={classes}, labeled={labeled})"
        )
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not empty; generate into a new folder")
    start = time.perf_counter()
    tasks = _plan(labeled, unlabeled, test, classes, seed)
    total = _run_tasks(tasks, _Style(str(root), classes, sizes, quality), workers)
    settings = {"classes": classes, "sizes": [list(s) for s in sizes], "seed": seed, "quality": quality}
    (root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return Summary(
        str(root),
        {"labeled": labeled, "unlabeled": unlabeled, "test": test},
        len(tasks),
        total,
        round(time.perf_counter() - start, 2),
        [list(s) for s in sizes],
    )


def next_batch_number(unlabeled: Path) -> int:
    """One past the highest ``batch-NNNN`` folder (or .dvc file) under ``unlabeled/``, as ingest numbers them."""
    numbers = (
        [int(m[1]) for p in unlabeled.iterdir() if (m := BATCH_NAME.match(p.name))]
        if unlabeled.is_dir()
        else []
    )
    return max(numbers, default=-1) + 1


def add_unlabeled_batch(root: str | os.PathLike, count: int, workers: int | None = None) -> Path:
    """Add ``count`` new, distinct unlabeled images as the next ``unlabeled/batch-NNNN/`` folder.

    Like ``kdpipe ingest``, the batch is written under a hidden name (which prepare skips) and
    renamed into place when complete. The images are of the same kind as the folder's (sizes,
    classes, seed read from its ``.synthetic.json``), from a random stream of their own. Returns
    the new folder.
    """
    root = Path(root)
    settings = json.loads((root / SETTINGS_FILE).read_text())
    unlabeled = root / "unlabeled"
    unlabeled.mkdir(exist_ok=True)
    number = next_batch_number(unlabeled)
    name = f"batch-{number:04d}"
    hidden = f".tmp-{name}"
    shutil.rmtree(unlabeled / hidden, ignore_errors=True)  # left over by an interrupted run
    style = _Style(
        str(root), settings["classes"], tuple((w, h) for w, h in settings["sizes"]), settings["quality"]
    )
    tasks = _unlabeled_tasks(f"unlabeled/{hidden}", _STREAM_ADDED_BATCH + number, count, settings["seed"])
    _run_tasks(tasks, style, workers)
    (unlabeled / hidden).mkdir(exist_ok=True)  # count == 0: still an (empty) batch, as asked
    os.replace(unlabeled / hidden, unlabeled / name)
    return unlabeled / name


def image_files(root: str | os.PathLike) -> list[Path]:
    """Every visible .jpg under ``root``, sorted (what prepare will read)."""
    return sorted(p for p in Path(root).rglob("*.jpg") if not any(part.startswith(".") for part in p.parts))


# ------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="folder to create (or, with --add-batch, an existing generated folder)")
    parser.add_argument("--labeled", type=int, default=1000, help="labeled images, spread over the classes")
    parser.add_argument(
        "--unlabeled", type=int, default=9000, help="unlabeled images (unlabeled/batch-0000/)"
    )
    parser.add_argument("--test", type=int, default=0, help="test images, spread over the classes")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--size",
        action="append",
        type=parse_size,
        metavar="WxH",
        help="an image size (repeatable: each image picks one); default 32x32 and 48x48",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=0, help="processes; 0 = every core")
    parser.add_argument(
        "--add-batch",
        type=int,
        metavar="COUNT",
        help="instead: add COUNT new unlabeled images as the next batch folder of OUT",
    )
    args = parser.parse_args(argv)
    if args.add_batch is not None:
        start = time.perf_counter()
        folder = add_unlabeled_batch(args.out, args.add_batch, workers=args.workers)
        print(f"{folder}: {args.add_batch} new images in {time.perf_counter() - start:.1f} s")
        return 0
    summary = generate(
        args.out,
        args.labeled,
        args.unlabeled,
        args.test,
        args.classes,
        args.size or THUMBNAIL_SIZES,
        args.seed,
        args.quality,
        args.workers,
    )
    print(f"{args.out}: {summary.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
