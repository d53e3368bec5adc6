"""The bad-input corpus: every case runs through the command line and ends in exactly one of

* ``error``    -- exit status 2, ``kdpipe <command>: error: <message>`` on stderr naming the file or
                  key and the problem, no traceback, and no output folder written;
* ``rejected`` -- the run succeeds and the file is listed in ``rejected.json`` with its reason;
* ``accepted`` -- the run succeeds and the file is used (converted where needed: the stored pixels
                  are checked);
* ``ignored``  -- hidden files and OS clutter (``.DS_Store``, ``Thumbs.db``), skipped by design.

Never a silent drop: after every successful ``prepare``, each input file is in ``sources.json`` or
``rejected.json``. Every input is generated here (no binary test data). ``docs/bad-inputs.md`` holds
the table of these cases; ``KDPIPE_UPDATE_DOCS=1 pytest tests/test_bad_inputs.py -k doc`` rewrites it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kdpipe.cli import main
from kdpipe.data.walk import IGNORED_NAMES, shown

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
DOC_START, DOC_END = "<!-- cases:start -->", "<!-- cases:end -->"
PREPARE = ["prepare", "--params", "{params}", "--data-root", "{data}", "--out-dir", "{out}"]
SIZE = 8  # prepare.image_size of the data cases


@dataclass
class Ctx:
    """What a case builder gets: the data root (a small valid data set), tmp_path and helpers."""

    root: Path
    tmp: Path
    params: Path
    make_image: Callable[..., Path]

    def img(self, rel: str, **kwargs) -> Path:
        return self.make_image(self.root / rel, **kwargs)

    def write(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def save(self, rel: str, img: Image.Image, **kwargs) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kwargs)
        return path


@dataclass
class Case:
    id: str
    kind: str  # "data" or "params"
    input: str  # what the input is, for the table
    outcome: str  # "error" | "rejected" | "accepted" | "ignored"
    message: str | tuple[str, ...]  # error: stderr text; rejected: detail text; else what happens
    build: Callable[[Ctx], None] = lambda ctx: None
    expect: dict[str, str] = field(default_factory=dict)  # rejected: path -> reason; accepted: path -> check
    argv: list[str] = field(default_factory=lambda: list(PREPARE))
    params: str | None = None  # params.yaml text (data cases: the default small-image params)
    needs_pipeline: bool = False  # uses the tiny prepared/augmented/teacher folders
    # root reads any file: such a case runs the CLI in a child without the capabilities that allow it
    needs_file_modes: bool = False

    @property
    def messages(self) -> tuple[str, ...]:
        return self.message if isinstance(self.message, tuple) else (self.message,)


# ---------------------------------------------------------------- pixel checks of accepted files


def _near(px, rgb, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, rgb, strict=True))


def check_cyan(arr):
    assert _near(arr[4, 4], (0, 255, 255)), arr[4, 4]


def check_gray_not_clipped(arr):
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert (
        arr[..., 0].min() <= 20 and arr[..., 0].max() >= 235
    )  # scaled: clipping would give 255 almost everywhere
    assert 80 <= arr[..., 0].mean() <= 175


def check_left_white_right_red(arr):
    assert _near(arr[4, 0], (255, 255, 255)) and _near(arr[4, 7], (255, 0, 0)), (arr[4, 0], arr[4, 7])


def check_left_white_right_blue(arr):
    assert _near(arr[4, 0], (255, 255, 255)) and _near(arr[4, 7], (0, 0, 255)), (arr[4, 0], arr[4, 7])


def check_gray(arr):
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def check_red_top_blue_bottom(arr):
    assert _near(arr[0, 4], (255, 0, 0)) and _near(arr[7, 4], (0, 0, 255)), (arr[0, 4], arr[7, 4])


def check_all_red(arr):
    assert all(_near(px, (255, 0, 0), tol=5) for px in arr.reshape(-1, 3))


def check_any(arr):
    assert arr.shape == (SIZE, SIZE, 3)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


# ---------------------------------------------------------------- builders


def _truncated(ext):
    def build(ctx: Ctx) -> None:
        path = ctx.img(f"labeled/cat/cut.{ext}", size=(64, 64), seed=1)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return build


def _corrupt_png(ctx: Ctx) -> None:
    path = ctx.img("labeled/cat/flipped.png", size=(64, 64), seed=2)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(ctx: Ctx) -> None:
    # A valid PNG header claiming 100000 x 100000 pixels (10 gigapixels) with almost no data behind it.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    ctx.write(
        "unlabeled/bomb.png",
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b""),
    )


def _cmyk(ctx: Ctx) -> None:
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    ctx.save("unlabeled/cmyk.jpg", img, quality=95)


def _png16(ctx: Ctx) -> None:
    ramp = np.tile(np.linspace(0, 65535, 16), (16, 1)).astype(np.uint16)
    ctx.save("unlabeled/deep16.png", Image.fromarray(ramp))
    assert Image.open(ctx.root / "unlabeled/deep16.png").mode in ("I;16", "I")


def _palette(ctx: Ctx) -> None:
    img = Image.new("P", (16, 16), 0)
    img.paste(1, (8, 0, 16, 16))
    img.putpalette([10, 200, 10, 255, 0, 0] + [0] * 762)  # index 0 green (transparent), 1 red
    ctx.save("unlabeled/palette.png", img, transparency=0)


def _rgba(ctx: Ctx) -> None:
    img = Image.new("RGBA", (16, 16), (0, 255, 0, 0))  # fully transparent green...
    img.paste((0, 0, 255, 255), (8, 0, 16, 16))  # ...left of opaque blue
    ctx.save("unlabeled/alpha.png", img)


def _exif(ctx: Ctx) -> None:
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :16] = (255, 0, 0)  # left half red
    arr[:, 16:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise, so left becomes top
    ctx.save("unlabeled/rotated.jpg", Image.fromarray(arr), exif=exif.tobytes(), quality=95)


def _animated(ctx: Ctx) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = ctx.root / "unlabeled/anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _other_formats(ctx: Ctx) -> None:
    for k, ext in enumerate(("bmp", "gif", "tif", "webp")):
        ctx.img(f"unlabeled/format.{ext}", seed=40 + k, **({"lossless": True} if ext == "webp" else {}))


def _png_named_jpg(ctx: Ctx) -> None:
    ctx.img("unlabeled/really_a_png.jpg", seed=5, format="PNG")


def _symlink_outside(ctx: Ctx) -> None:
    outside = ctx.make_image(ctx.tmp / "elsewhere" / "private.png", seed=6)
    os.symlink(outside, ctx.root / "labeled/cat/link.png")


def _symlink_loop(ctx: Ctx) -> None:
    os.symlink(".", ctx.root / "labeled/cat/loop")  # labeled/cat/loop/loop/loop/... forever


def _file_link_loop(ctx: Ctx) -> None:
    os.symlink("b.png", ctx.root / "labeled/cat/a.png")
    os.symlink("a.png", ctx.root / "labeled/cat/b.png")


def _non_utf8_class(ctx: Ctx) -> None:
    for k in range(2):
        ctx.img(os.fsdecode(b"labeled/bird\xff/b%d.png" % k), seed=40 + k)


def _fifo(ctx: Ctx) -> None:
    os.mkfifo(ctx.root / "unlabeled/pipe.png")


def _unreadable(ctx: Ctx) -> None:
    ctx.img("unlabeled/locked.png", seed=7).chmod(0)


def _clutter(ctx: Ctx) -> None:
    ctx.write("labeled/cat/.DS_Store", b"\0\0\0\1Bud1")
    ctx.write("labeled/cat/Thumbs.db", b"\xd0\xcf\x11\xe0")
    ctx.img("unlabeled/.hidden.png", seed=8)
    ctx.img("unlabeled/.cache/x.png", seed=9)


def _copy(src: str, dst: str):
    def build(ctx: Ctx) -> None:
        (ctx.root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ctx.root / src, ctx.root / dst)

    return build


def _near_copy(dst: str, quality: int | None = None):
    """A photo-like JPEG in test/cat/ and, at ``dst``, its decoded pixels saved again (as JPEG at
    ``quality``, or losslessly): not the same pixels, the same photo."""
    from test_nearcopies import smooth_photo

    def build(ctx: Ctx) -> None:
        ctx.save("test/cat/photo.jpg", Image.fromarray(smooth_photo(96)), quality=90)
        decoded = Image.open(ctx.root / "test/cat/photo.jpg").convert("RGB")
        ctx.save(dst, decoded, **({} if quality is None else {"quality": quality}))

    return build


def _only_bad_files(ctx: Ctx) -> None:
    ctx.write("labeled/bird/a.png", b"")
    ctx.write("labeled/bird/b.jpg", b"not a picture\n")


def _single_class(ctx: Ctx) -> None:
    shutil.rmtree(ctx.root / "labeled/dog")
    shutil.rmtree(ctx.root / "test/dog")


def _params_text(text: str):
    def build(ctx: Ctx) -> None:
        ctx.params.write_text(text, encoding="utf-8")

    return build


# ---------------------------------------------------------------- the cases


def _evil_pickle(path: Path, marker: Path) -> None:
    """A .pth whose unpickling calls exec(), which would write ``marker``: kdpipe must refuse it unrun."""
    import torch

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    torch.save({"conv.weight": Payload()}, path)


CASES: list[Case] = [
    # ----- files that are not usable images: listed in rejected.json
    Case(
        "truncated-jpeg",
        "data",
        "JPEG cut to half its length",
        "rejected",
        "the file ends before the image data does",
        _truncated("jpg"),
        {"labeled/cat/cut.jpg": "truncated"},
    ),
    Case(
        "truncated-png",
        "data",
        "PNG cut to half its length",
        "rejected",
        "the file ends before the image data does",
        _truncated("png"),
        {"labeled/cat/cut.png": "truncated"},
    ),
    Case(
        "corrupt-jpeg",
        "data",
        "JPEG start-of-image marker followed by garbage",
        "rejected",
        "cannot read the image header",
        lambda ctx: ctx.write("labeled/cat/garbage.jpg", b"\xff\xd8\xff\xe0" + b"garbage" * 20),
        {"labeled/cat/garbage.jpg": "corrupt"},
    ),
    Case(
        "corrupt-png",
        "data",
        "PNG with 40 bytes of its compressed data flipped",
        "rejected",
        "cannot decode the image data",
        _corrupt_png,
        {"labeled/cat/flipped.png": "corrupt"},
    ),
    Case(
        "zero-byte",
        "data",
        "empty file `empty.png`",
        "rejected",
        "the file is empty (0 bytes)",
        lambda ctx: ctx.write("labeled/cat/empty.png", b""),
        {"labeled/cat/empty.png": "zero_byte"},
    ),
    Case(
        "text-named-jpg",
        "data",
        "text file named `notes.jpg`",
        "rejected",
        "not a recognised image format",
        lambda ctx: ctx.write("labeled/dog/notes.jpg", b"this is not a picture\n"),
        {"labeled/dog/notes.jpg": "not_an_image"},
    ),
    Case(
        "other-extension",
        "data",
        "`readme.txt` among the images",
        "rejected",
        "extension '.txt' is not one of",
        lambda ctx: ctx.write("unlabeled/readme.txt", b"hello\n"),
        {"unlabeled/readme.txt": "not_an_image"},
    ),
    Case(
        "no-extension",
        "data",
        "a real PNG saved without extension",
        "rejected",
        "extension '(none)' is not one of",
        lambda ctx: ctx.img("unlabeled/IMG_0001", seed=3, format="PNG"),
        {"unlabeled/IMG_0001": "not_an_image"},
    ),
    Case(
        "decompression-bomb",
        "data",
        "PNG header claiming 100000 x 100000 pixels",
        "rejected",
        "could be decompression bomb",
        _bomb,
        {"unlabeled/bomb.png": "decompression_bomb"},
    ),
    Case(
        "one-pixel",
        "data",
        "1x1 image",
        "rejected",
        "1x1: a side is below min_side=2",
        lambda ctx: ctx.img("unlabeled/dot.png", size=(1, 1), seed=4),
        {"unlabeled/dot.png": "too_small"},
    ),
    Case(
        "huge-aspect",
        "data",
        "200x4 image (aspect ratio 50)",
        "rejected",
        "200x4: aspect ratio 50.0 exceeds max_aspect_ratio=20.0",
        lambda ctx: ctx.img("unlabeled/strip.png", size=(200, 4), seed=4),
        {"unlabeled/strip.png": "bad_aspect_ratio"},
    ),
    Case(
        "symlink-outside",
        "data",
        "symlink to an image outside the data folder",
        "rejected",
        "symlink points outside the data root",
        _symlink_outside,
        {"labeled/cat/link.png": "symlink_outside_root"},
    ),
    Case(
        "broken-symlink",
        "data",
        "symlink to a file that does not exist",
        "rejected",
        "does not exist",
        lambda ctx: os.symlink("gone.png", ctx.root / "unlabeled/dangling.png"),
        {"unlabeled/dangling.png": "broken_symlink"},
    ),
    Case(
        "fifo",
        "data",
        "named pipe `pipe.png` (reading it would block forever)",
        "rejected",
        "not a regular file",
        _fifo,
        {"unlabeled/pipe.png": "not_a_regular_file"},
    ),
    Case(
        "unreadable",
        "data",
        "image without read permission (as root: the CLI runs without CAP_DAC_OVERRIDE)",
        "rejected",
        "cannot read the file",
        _unreadable,
        {"unlabeled/locked.png": "unreadable"},
        needs_file_modes=True,
    ),
    Case(
        "stray-file",
        "data",
        "image directly in `labeled/`, not in a class folder",
        "rejected",
        "files must be in labeled/<class>/",
        lambda ctx: ctx.img("labeled/stray.png", seed=10),
        {"labeled/stray.png": "outside_class_folder"},
    ),
    # ----- duplicates and leakage
    Case(
        "duplicate",
        "data",
        "same pixels twice in one class (PNG and BMP)",
        "rejected",
        "the same image as labeled/cat/cat_000.png (kept)",
        lambda ctx: ctx.img("labeled/cat/copy.bmp", seed=1001),
        {"labeled/cat/copy.bmp": "duplicate"},
    ),
    Case(
        "labeled-and-unlabeled",
        "data",
        "a labeled image copied into `unlabeled/`",
        "rejected",
        "the same image as labeled/dog/dog_000.png (kept)",
        _copy("labeled/dog/dog_000.png", "unlabeled/again.png"),
        {"unlabeled/again.png": "duplicate"},
    ),
    Case(
        "labeled-and-test",
        "data",
        "the same image in `labeled/` and `test/`",
        "rejected",
        "the same image is in the test split: test/cat/cat_000.png",
        _copy("test/cat/cat_000.png", "labeled/cat/leak.png"),
        {"labeled/cat/leak.png": "leakage_with_test"},
    ),
    Case(
        "near-copy-jpeg",
        "data",
        "a test photo (JPEG) re-encoded at JPEG quality 70 in `unlabeled/`",
        "rejected",
        "a near-copy of a test image: test/cat/photo.jpg",
        _near_copy("unlabeled/photo-q70.jpg", quality=70),
        {"unlabeled/photo-q70.jpg": "leakage_with_test"},
    ),
    Case(
        "near-copy-png",
        "data",
        "a lossless PNG copy of a test JPEG in `labeled/`",
        "rejected",
        "test/cat/photo.jpg",
        _near_copy("labeled/cat/photo.png"),
        {"labeled/cat/photo.png": "leakage_with_test"},
    ),
    Case(
        "two-labels",
        "data",
        "the same image under two classes",
        "rejected",
        "the same image has different labels: labeled/cat/cat_000.png (cat), labeled/dog/which.png (dog)",
        _copy("labeled/cat/cat_000.png", "labeled/dog/which.png"),
        {"labeled/cat/cat_000.png": "conflicting_labels", "labeled/dog/which.png": "conflicting_labels"},
    ),
    # ----- usable images that need converting: accepted
    Case(
        "cmyk-jpeg",
        "data",
        "CMYK JPEG (pure cyan ink)",
        "accepted",
        "converted to RGB (cyan stays cyan)",
        _cmyk,
        {"unlabeled/cmyk.jpg": "check_cyan"},
    ),
    Case(
        "png-16bit",
        "data",
        "16-bit grayscale PNG, ramp 0..65535",
        "accepted",
        "scaled to 8 bits (not clipped), grey RGB",
        _png16,
        {"unlabeled/deep16.png": "check_gray_not_clipped"},
    ),
    Case(
        "palette-transparency",
        "data",
        "palette PNG whose index 0 is transparent",
        "accepted",
        "transparent pixels composited over white",
        _palette,
        {"unlabeled/palette.png": "check_left_white_right_red"},
    ),
    Case(
        "rgba",
        "data",
        "RGBA PNG, left half fully transparent",
        "accepted",
        "alpha composited over white (a transparent colour does not leak)",
        _rgba,
        {"unlabeled/alpha.png": "check_left_white_right_blue"},
    ),
    Case(
        "grayscale",
        "data",
        "8-bit grayscale (mode L) PNG",
        "accepted",
        "expanded to grey RGB",
        lambda ctx: ctx.img("unlabeled/gray.png", seed=11, mode="L"),
        {"unlabeled/gray.png": "check_gray"},
    ),
    Case(
        "exif-rotated",
        "data",
        "JPEG with EXIF orientation 6 (rotate 90 degrees)",
        "accepted",
        "EXIF orientation applied (left half ends up on top)",
        _exif,
        {"unlabeled/rotated.jpg": "check_red_top_blue_bottom"},
    ),
    Case(
        "animated-gif",
        "data",
        "animated GIF (red frame, then blue)",
        "accepted",
        "first frame used",
        _animated,
        {"unlabeled/anim.gif": "check_all_red"},
    ),
    Case(
        "other-formats",
        "data",
        "BMP, GIF, TIFF and WebP files",
        "accepted",
        "decoded like PNG/JPEG",
        _other_formats,
        {f"unlabeled/format.{ext}": "check_any" for ext in ("bmp", "gif", "tif", "webp")},
    ),
    Case(
        "png-named-jpg",
        "data",
        "PNG data in a file named `.jpg`",
        "accepted",
        "the format is read from the content",
        _png_named_jpg,
        {"unlabeled/really_a_png.jpg": "check_any"},
    ),
    Case(
        "uppercase-extension",
        "data",
        "`PHOTO.JPG`",
        "accepted",
        "extensions match case-insensitively",
        lambda ctx: ctx.img("labeled/dog/PHOTO.JPG", seed=12),
        {"labeled/dog/PHOTO.JPG": "check_any"},
    ),
    Case(
        "unicode-name",
        "data",
        "file `été 猫 ü.png`",
        "accepted",
        "used; the name is kept as is in sources.json",
        lambda ctx: ctx.img("labeled/cat/été 猫 ü.png", seed=13),
        {"labeled/cat/été 猫 ü.png": "check_any"},
    ),
    Case(
        "space-name",
        "data",
        "file `chat noir.png` in folder `my photos/`",
        "accepted",
        "used; the name is kept as is in sources.json",
        lambda ctx: ctx.img("unlabeled/my photos/chat noir.png", seed=14),
        {"unlabeled/my photos/chat noir.png": "check_any"},
    ),
    Case(
        "symlink-loop",
        "data",
        "folder symlink pointing at its own folder (`labeled/cat/loop -> .`)",
        "rejected",
        "links back to a folder above it; not followed",
        _symlink_loop,
        {"labeled/cat/loop": "symlink_loop"},
    ),
    Case(
        "class-link-to-labeled",
        "data",
        "a folder in a class linking back to `labeled/`",
        "rejected",
        "links back to a folder above it; not followed",
        lambda ctx: os.symlink("..", ctx.root / "labeled/cat/all"),
        {"labeled/cat/all": "symlink_loop"},
    ),
    Case(
        "symlink-file-loop",
        "data",
        "file links in a cycle (`a.png -> b.png -> a.png`)",
        "rejected",
        "the symlink chain loops back on itself",
        _file_link_loop,
        {"labeled/cat/a.png": "symlink_loop", "labeled/cat/b.png": "symlink_loop"},
    ),
    Case(
        "file-linked-twice",
        "data",
        "a second link to an image already in the class",
        "rejected",
        "the same file is reachable through another link; used once",
        lambda ctx: os.symlink("cat_000.png", ctx.root / "labeled/cat/zz_link.png"),
        {"labeled/cat/zz_link.png": "visited_twice"},
    ),
    Case(
        "non-utf8-file-name",
        "data",
        "an image whose name holds the byte `\\xff` (not UTF-8)",
        "accepted",
        "used; reported with the byte escaped (`labeled/cat/photo\\xff.png`)",
        lambda ctx: ctx.img(os.fsdecode(b"labeled/cat/photo\xff.png"), seed=31),
        {"labeled/cat/photo\\xff.png": "check_any"},
    ),
    Case(
        "non-utf8-class-folder",
        "data",
        "a class folder whose name holds the byte `\\xff`",
        "accepted",
        "a class named `bird\\xff` (the byte escaped)",
        _non_utf8_class,
        {"labeled/bird\\xff/b0.png": "check_any", "labeled/bird\\xff/b1.png": "check_any"},
    ),
    Case(
        "hidden-and-clutter",
        "data",
        "`.DS_Store`, `Thumbs.db`, `.hidden.png`, `.cache/`",
        "ignored",
        "skipped by design (hidden names and OS clutter); never listed",
        _clutter,
    ),
    # ----- unusable folder layouts: clear errors
    Case(
        "empty-class-folder",
        "data",
        "class folder `labeled/bird/` with no files",
        "error",
        "{data}/labeled/bird: no valid image for class 'bird' (0 file(s) rejected)",
        lambda ctx: (ctx.root / "labeled/bird").mkdir(),
    ),
    Case(
        "class-of-bad-files",
        "data",
        "class folder whose every file is rejected",
        "error",
        (
            "{data}/labeled/bird: no valid image for class 'bird' (2 file(s) rejected)",
            "labeled/bird/a.png: zero_byte (the file is empty (0 bytes))",
        ),
        _only_bad_files,
    ),
    Case(
        "single-class",
        "data",
        "only `labeled/cat/`",
        "error",
        "{data}/labeled: found 1 class folder ('cat'); a classifier needs at least 2 classes",
        _single_class,
    ),
    Case(
        "class-only-in-test",
        "data",
        "`test/fox/` with no `labeled/fox/`",
        "error",
        "{data}/test/fox: test class 'fox' has no folder in {data}/labeled (labeled classes: cat, dog)",
        lambda ctx: ctx.img("test/fox/fox_000.png", seed=15),
    ),
    Case(
        "no-labeled-folder",
        "data",
        "data folder without `labeled/`",
        "error",
        "{data}/labeled: folder not found; labeled images go in {data}/labeled/<class>/",
        lambda ctx: shutil.rmtree(ctx.root / "labeled"),
    ),
    Case(
        "no-class-folders",
        "data",
        "`labeled/` holding no folder",
        "error",
        "{data}/labeled: no class folders; put the images of each class in {data}/labeled/<class>/",
        lambda ctx: [shutil.rmtree(ctx.root / "labeled"), (ctx.root / "labeled").mkdir()],
    ),
    Case(
        "data-root-missing",
        "data",
        "`--data-root` that does not exist",
        "error",
        "{data}: data root not found (expected a folder with labeled/, unlabeled/, test/)",
        lambda ctx: shutil.rmtree(ctx.root),
    ),
    Case(
        "out-dir-is-data",
        "data",
        "`--out-dir` equal to the data folder",
        "error",
        "{data}: the output folder is (or contains) the data root {data}; prepare replaces its output folder "
        "as a whole, which would delete the data",
        argv=["prepare", "--params", "{params}", "--data-root", "{data}", "--out-dir", "{data}"],
    ),
    Case(
        "out-dir-inside-input",
        "data",
        "`--out-dir` inside `unlabeled/`",
        "error",
        "{data}/unlabeled/prepared: the output folder is inside {data}/unlabeled; its files would be read back",
        argv=[
            "prepare",
            "--params",
            "{params}",
            "--data-root",
            "{data}",
            "--out-dir",
            "{data}/unlabeled/prepared",
        ],
    ),
    # ----- params.yaml and -S overrides
    Case(
        "unknown-key",
        "params",
        "`train.batchsize: 8`",
        "error",
        "{params}: unknown key 'train.batchsize'; did you mean 'train.batch_size'?",
        params="train:\n  batchsize: 8\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "unknown-group",
        "params",
        "`trian:` group",
        "error",
        "{params}: unknown key 'trian'; did you mean 'train'?",
        params="trian:\n  lr: 0.1\n",
        argv=["teacher", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "wrong-type",
        "params",
        "`train.batch_size: lots`",
        "error",
        "{params}: invalid value for 'train.batch_size': Input should be a valid integer, unable to parse "
        "string as an integer (got 'lots'; expected int >= 1)",
        params="train:\n  batch_size: lots\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "negative-lr",
        "params",
        "`train.lr: -0.1`",
        "error",
        "{params}: invalid value for 'train.lr': Input should be greater than 0 (got -0.1; expected float > 0.0 "
        "and <= 10.0)",
        params="train:\n  lr: -0.1\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "nan-lr",
        "params",
        "`train.lr: .nan`",
        "error",
        "{params}: invalid value for 'train.lr'",
        params="train:\n  lr: .nan\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "null-value",
        "params",
        "`train.batch_size: null`",
        "error",
        "{params}: invalid value for 'train.batch_size': Input should be a valid integer (got None; expected int >= 1)",
        params="train:\n  batch_size: null\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "out-of-range",
        "params",
        "`prepare.val_fraction: 1.5`",
        "error",
        "{params}: invalid value for 'prepare.val_fraction': Input should be less than 1 (got 1.5; expected float "
        ">= 0.0 and < 1.0)",
        params="prepare:\n  val_fraction: 1.5\n",
    ),
    Case(
        "unknown-recipe",
        "params",
        "`train.recipe: magic`",
        "error",
        "{params}: invalid value for 'train.recipe': Input should be 'supervised', 'kd', 'cotrain', 'adaptive', "
        "'consistency' or 'full'",
        params="train:\n  recipe: magic\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "views-1-consistency",
        "params",
        "`views: 1` with `recipe: consistency`",
        "error",
        "{params}: train.views: the 'consistency' recipe compares views, so it needs views >= 2 (got 1)",
        params="train:\n  recipe: consistency\n  views: 1\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "mu-0-cotrain",
        "params",
        "`mu: 0` with `recipe: cotrain` (a recipe that trains on unlabeled data)",
        "error",
        "{params}: train.mu: the 'cotrain' recipe trains on unlabeled data, so mu must be > 0 (got 0)",
        params="train:\n  recipe: cotrain\n  mu: 0\n",
        argv=["distill", "--params", "{params}", "--out-dir", "{out}"],
    ),
    Case(
        "views-above-stored",
        "params",
        "`train.views: 3` with `augment.views: 2` (consistency recipe)",
        "error",
        "train.views=3 but the augment step stored only 2 views (set augment.views >= 3)",
        argv=[
            "distill",
            "--params",
            "{params}",
            "-S",
            "train.recipe=consistency",
            "-S",
            "train.views=3",
            "--prepared-dir",
            "{prepared}",
            "--augmented-dir",
            "{augmented}",
            "--teacher-dir",
            "{teacher}",
            "--out-dir",
            "{out}",
        ],
        needs_pipeline=True,
    ),
    Case(
        "teacher-below-student-size",
        "params",
        "`teacher.image_size: 16` with `prepare.image_size: 32`",
        "error",
        "{params}: teacher.image_size (16) is smaller than prepare.image_size (32): the teacher would see fewer "
        "pixels than its student",
        params="prepare:\n  image_size: 32\nteacher:\n  image_size: 16\n",
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "malicious-weights",
        "params",
        "`teacher.weights` naming a pickle that runs `exec` when loaded",
        "error",
        "{data}/evil.pth: not a safe weights file: it holds pickled Python objects (GLOBAL exec), which could run "
        "code when loaded, and kdpipe loads tensors only; re-save its tensors as .safetensors",
        lambda ctx: _evil_pickle(ctx.root / "evil.pth", ctx.tmp / "pwned"),
        argv=[
            "teacher",
            "--params",
            "{params}",
            "-S",
            "teacher.arch=resnet18",
            "-S",
            "teacher.weights={data}/evil.pth",
            "--prepared-dir",
            "{prepared}",
            "--out-dir",
            "{out}",
        ],
        needs_pipeline=True,
    ),
    Case(
        "invalid-yaml",
        "params",
        "`train: [unclosed`",
        "error",
        "{params}: not valid YAML",
        params="train: [unclosed\n",
    ),
    Case(
        "top-level-list",
        "params",
        "a YAML list instead of groups",
        "error",
        "{params}: expected a mapping of step groups at the top level, got list",
        params="- a\n- b\n",
    ),
    Case(
        "group-not-mapping",
        "params",
        "`train: 5`",
        "error",
        "{params}: invalid value for 'train': Input should be a valid dictionary",
        params="train: 5\n",
    ),
    Case(
        "params-missing",
        "params",
        "`--params` naming a file that does not exist",
        "error",
        "{params}: params file not found",
        params=None,
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "params-is-folder",
        "params",
        "`--params` naming a folder",
        "error",
        "{params}: is a folder, expected a params YAML file",
        lambda ctx: ctx.params.mkdir(),
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "params-not-utf8",
        "params",
        "binary (non UTF-8) params file",
        "error",
        "{params}: not a UTF-8 text file",
        lambda ctx: ctx.params.write_bytes(b"train:\n  lr: \xff\xfe\n"),
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "override-without-value",
        "params",
        "`-S train.lr`",
        "error",
        "override 'train.lr': expected group.key=value",
        argv=["params", "-S", "train.lr"],
    ),
    Case(
        "override-wrong-type",
        "params",
        "`-S train.max_iterations=abc`",
        "error",
        "invalid value for 'train.max_iterations': Input should be a valid integer",
        argv=["params", "-S", "train.max_iterations=abc"],
    ),
    Case(
        "params-empty",
        "params",
        "an empty params.yaml",
        "error",
        "{params}: holds no settings (empty or only comments)",
        params="",
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "params-only-comments",
        "params",
        "a params.yaml with comments only",
        "error",
        "{params}: holds no settings (empty or only comments)",
        params="# all defaults, please\n",
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "duplicate-key",
        "params",
        "`train.lr` written twice",
        "error",
        "{params}: line 3: key 'lr' appears twice (first on line 2)",
        params="train:\n  lr: 0.1\n  lr: 0.2\n",
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "yaml-alias-bomb",
        "params",
        "a 400-byte YAML alias bomb in a valid key",
        "error",
        "{params}: line 2: YAML anchors and aliases (&name, *name) are not allowed in params",
        params="evaluate:\n  providers: &a ["
        + ", ".join(["CPUExecutionProvider"] * 4)
        + "]\n"
        + "".join(
            f"  x{i}: &a{i} [*a{'' if i == 0 else i - 1}, *a{'' if i == 0 else i - 1}]\n" for i in range(9)
        ),
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "boolean-as-number",
        "params",
        "`train.batch_size: true`",
        "error",
        "{params}: train.batch_size: expected a number, got the boolean True",
        params="train:\n  batch_size: true\n",
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "empty-provider-list",
        "params",
        "`evaluate.providers: []`",
        "error",
        "{params}: invalid value for 'evaluate.providers': List should have at least 1 item",
        params="evaluate:\n  providers: []\n",
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "unknown-provider",
        "params",
        "`evaluate.providers: [cpu]`",
        "error",
        "{params}: evaluate.providers: 'cpu' is not an onnxruntime execution provider name",
        params="evaluate:\n  providers: [cpu]\n",
        argv=["params", "--params", "{params}"],
    ),
    Case(
        "override-invalid-yaml",
        "params",
        "`-S 'evaluate.providers=[a'`",
        "error",
        "override 'evaluate.providers=[a': not valid YAML",
        argv=["params", "-S", "evaluate.providers=[a"],
    ),
]

DATA_PARAMS = f"prepare:\n  image_size: {SIZE}\n"


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _input_files(root: Path) -> set[str]:
    """Every entry prepare must account for: files, special files and symlinks under labeled/,
    unlabeled/ and test/ (not hidden, not OS clutter; symlinked folders inside the root excluded:
    their files are accounted for at their real place)."""
    found: set[str] = set()
    for split in ("labeled", "unlabeled", "test"):
        for dirpath, dirnames, filenames in os.walk(root / split):
            base = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not (d.startswith(".") or d in IGNORED_NAMES)]
            for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
                path = base / name
                if name.startswith(".") or name in IGNORED_NAMES:
                    continue
                if path.is_symlink() and path.is_dir() and path.resolve().is_relative_to(root.resolve()):
                    continue
                found.add(shown(path.relative_to(root).as_posix()))
    return found


def _run_obeying_file_modes(argv: list[str]) -> tuple[int, str, str]:
    """The CLI in a child process that, although root, obeys file modes like any user."""
    import subprocess

    from conftest import without_read_anything_capabilities

    done = subprocess.run(
        [sys.executable, "-m", "kdpipe.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=without_read_anything_capabilities,
        env={**os.environ, "KDPIPE_TRACKING": "0"},
    )
    return done.returncode, done.stdout, done.stderr


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - an escaped exception is what this corpus must never see
        pytest.fail(f"uncaught {type(exc).__name__} (the CLI would print a traceback): {exc}")
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def _keep_torch_threads():
    """A CLI step sets torch's thread count (train.threads); later tests must not inherit it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, tmp_path, image_dataset, make_image, capsys, request, monkeypatch, _keep_torch_threads
):
    monkeypatch.chdir(tmp_path)  # nothing may depend on (or land in) the working directory
    monkeypatch.delenv("KDPIPE_PARAMS", raising=False)
    root = image_dataset(classes={"cat": 3, "dog": 3}, unlabeled=2, test={"cat": 1, "dog": 1})
    params = tmp_path / "params.yaml"
    out = tmp_path / "out"
    text = case.params if case.kind == "params" else DATA_PARAMS
    values = {"data": str(root), "params": str(params), "out": str(out)}
    if case.needs_pipeline:
        dirs = request.getfixturevalue("tiny_pipeline_dirs")
        text = yaml.safe_dump(dirs["params"].model_dump(mode="json"))
        values.update({k: str(dirs[k]) for k in ("prepared", "augmented", "teacher")})
    if text is not None:
        params.write_text(text, encoding="utf-8")
    ctx = Ctx(root=root, tmp=tmp_path, params=params, make_image=make_image)
    case.build(ctx)

    argv = [_fill(a, values) for a in case.argv]
    if case.needs_file_modes and os.geteuid() == 0:
        code, _, err = _run_obeying_file_modes(argv)
    else:
        code, _, err = _run(argv, capsys)
    assert "Traceback" not in err

    if case.outcome == "error":
        command = case.argv[0]
        assert code == 2, err
        assert f"kdpipe {command}: error: " in err
        assert not (tmp_path / "pwned").exists()  # nothing a case planted ever ran
        for message in case.messages:
            assert _fill(message, values) in err
        assert not out.exists(), "a failed step must not write its output"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], (
            "temporary output left behind"
        )
        return

    assert code == 0, err
    sources = json.loads((out / "sources.json").read_text(encoding="utf-8"))
    rejected = {r["path"]: r for r in json.loads((out / "rejected.json").read_text(encoding="utf-8"))}
    used = {path: (split, row) for split, paths in sources.items() for row, path in enumerate(paths)}
    # never a silent drop: every input file is either used or listed with its reason
    missing = sorted(_input_files(root) - used.keys() - rejected.keys())
    assert missing == []
    for path in used.keys() & rejected.keys():
        pytest.fail(f"{path} is both used and rejected")

    if case.outcome == "rejected":
        for path, reason in case.expect.items():
            assert path in rejected, f"{path} not in rejected.json: {sorted(rejected)}"
            assert rejected[path]["reason"] == reason
            assert case.messages[0] in rejected[path]["detail"]
            assert path not in used
    elif case.outcome == "accepted":
        for path, check in case.expect.items():
            assert path in used, f"{path} not in sources.json: {sorted(rejected)}"
            split, row = used[path]
            CHECKS[check](np.load(out / f"{split}_x.npy")[row])
        if case.id.startswith("non-utf8"):
            assert all(p.isprintable() for p in used)  # escaped, not lone surrogates
    if case.id in ("symlink-loop", "class-link-to-labeled"):
        assert len(used) == 10  # every image read once, under its own class
    elif case.outcome == "ignored":
        listed = used.keys() | rejected.keys()
        assert not [p for p in listed if "DS_Store" in p or "Thumbs" in p or "/." in p]
        assert len(used) == 10 and rejected == {}


def test_corpus_is_large_and_varied():
    assert len({c.id for c in CASES}) == len(CASES) >= 25
    kinds = {(c.kind, c.outcome) for c in CASES}
    assert {("data", "error"), ("data", "rejected"), ("data", "accepted"), ("params", "error")} <= kinds
    for case in CASES:
        assert case.outcome in ("error", "rejected", "accepted", "ignored")
        if case.outcome in ("rejected", "accepted"):
            assert case.expect, case.id


# ---------------------------------------------------------------- the table in docs/


def _doc_text(text: str) -> str:
    shown = _fill(
        text,
        {
            "data": "data",
            "params": "params.yaml",
            "out": "out",
            "prepared": "artifacts/prepared",
            "augmented": "artifacts/augmented",
            "teacher": "artifacts/teacher",
        },
    )
    return shown.replace("|", "\\|")


def render_table() -> str:
    lines = ["| # | case | input | outcome | message or reason |", "| --- | --- | --- | --- | --- |"]
    for n, case in enumerate(CASES, start=1):
        if case.outcome == "rejected":
            reasons = sorted(set(case.expect.values()))
            shown = f"`{'`, `'.join(reasons)}`: `{_doc_text(case.messages[0])}`"
        elif case.outcome == "error":
            shown = " … ".join(f"`{_doc_text(m)}`" for m in case.messages)
        else:
            shown = _doc_text(case.messages[0])
        lines.append(f"| {n} | {case.id} | {_doc_text(case.input)} | {case.outcome} | {shown} |")
    return "\n".join(lines)


def test_doc_table_lists_every_case():
    table = render_table()
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(DOC_START) + len(DOC_START), text.index(DOC_END)
    if os.environ.get("KDPIPE_UPDATE_DOCS") == "1":
        DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")
        text = DOC.read_text(encoding="utf-8")
        start, end = text.index(DOC_START) + len(DOC_START), text.index(DOC_END)
    assert text[start:end].strip() == table, (
        "docs/bad-inputs.md is out of date: KDPIPE_UPDATE_DOCS=1 pytest tests/test_bad_inputs.py -k doc"
    )
    for case in CASES:
        assert f"| {case.id} |" in text
