"""Decoding untrusted image files into RGB arrays.

Every image the pipeline uses goes through :func:`decode_image` exactly once (in the ``prepare``
step). A file that cannot be used raises :class:`RejectedImage` with a short machine-readable
``reason`` and a human ``detail``; the caller records it in ``rejected.json`` instead of failing.

What is checked, in order: empty file, readable header, pixel count (decompression bombs, checked
from the header before any pixel is decoded), smallest side, aspect ratio, full decode (truncated
or corrupt data fails, never silently padded), EXIF orientation, colour-mode conversion to RGB.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Modes whose alpha (or palette/colour-key transparency) is composited over white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# 16-bit integer modes (values 0..65535).
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# Pillow's limits are process-wide globals; decoding holds this lock while it changes them.
_PILLOW_LOCK = threading.RLock()


class RejectedImage(Exception):
    """A file that is not a usable image; ``reason`` is a short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def _pillow_limits(max_pixels: int) -> Iterator[None]:
    """Scope Pillow's global limits to ours for one decode, and make the bomb warning an error.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises above twice that; with the limit set to
    ``max_pixels`` both fire exactly where ours does (we also check explicitly). Truncated files
    must fail to load, so ``LOAD_TRUNCATED_IMAGES`` is forced off even if another library set it.
    """
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def decode_image(
    path: str | os.PathLike,
    *,
    max_pixels: int,
    min_side: int,
    max_aspect_ratio: float,
    data: bytes | None = None,
    draft_size: int | None = None,
) -> np.ndarray:
    """Decode one image file to an ``HxWx3`` uint8 RGB array, or raise :class:`RejectedImage`.

    Animated images give their first frame; EXIF orientation is applied; transparency is
    composited over a white background; 16-bit and float images are scaled (not clipped) to 8 bits.

    ``data``: the file's bytes when the caller has already read them (prepare hashes and decodes
    one read). ``draft_size``: the image will be resized to this square size, so a JPEG may be
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several times faster) as long as both
    sides stay at least this large; other formats decode in full. The geometry checks always use
    the file's real size.
    """
    path = Path(path)
    size = len(data) if data is not None else path.stat().st_size
    if size == 0:
        raise RejectedImage("zero_byte", "the file is empty (0 bytes)")
    with _pillow_limits(max_pixels):
        with _open(path if data is None else io.BytesIO(data)) as img:
            _check_geometry(img.size, max_pixels, min_side, max_aspect_ratio)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            _load(img)
            img = _exif_transpose(img)
            return _to_rgb(img)


@contextlib.contextmanager
def _open(path: Path | io.BytesIO) -> Iterator[Image.Image]:
    try:
        img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage("decompression_bomb", str(exc)) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the file itself is unreadable: the caller reports that, it is not an image problem
    except UnidentifiedImageError:
        raise RejectedImage("not_an_image", "not a recognised image format") from None
    except Exception as exc:
        # Broken headers surface as OSError, SyntaxError, ValueError, struct.error, IndexError...
        raise RejectedImage("corrupt", f"cannot read the image header: {exc}") from None
    with img:
        yield img


def _check_geometry(size: tuple[int, int], max_pixels: int, min_side: int, max_aspect_ratio: float) -> None:
    """Header-only checks, done before decoding so a bomb never allocates its pixels."""
    width, height = size
    if width * height > max_pixels:
        raise RejectedImage(
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels exceeds max_image_pixels={max_pixels}",
        )
    if min(width, height) < min_side:
        raise RejectedImage("too_small", f"{width}x{height}: a side is below min_side={min_side}")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise RejectedImage(
            "bad_aspect_ratio",
            f"{width}x{height}: aspect ratio {ratio:.1f} exceeds max_aspect_ratio={max_aspect_ratio}",
        )


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage("decompression_bomb", str(exc)) from None
    except Exception as exc:  # malformed data raises many types (OSError, SyntaxError, struct.error...)
        message = str(exc)
        # Pillow's wording for data that ends early ("image file is truncated", "Truncated File Read").
        if "truncated" in message.lower():
            raise RejectedImage("truncated", f"the file ends before the image data does: {message}") from None
        raise RejectedImage("corrupt", f"cannot decode the image data: {message}") from None


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF blocks raise a variety of errors
        raise RejectedImage("corrupt", f"unreadable EXIF orientation: {exc}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in _UINT16_MODES:
        return _gray_to_rgb(_scale_uint16(np.asarray(img)))
    if mode == "I":
        return _gray_to_rgb(_scale_int32(np.asarray(img)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(img)))
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            # P / L / RGB with a transparent colour key become RGBA first, then go over white.
            return _over_white(img.convert("RGBA"))
        if mode != "RGB":
            img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr...
    except (ValueError, OSError) as exc:
        raise RejectedImage("unsupported_mode", f"cannot convert mode {mode!r} to RGB: {exc}") from None
    return np.array(img, dtype=np.uint8).reshape(img.height, img.width, 3)


def _over_white(rgba: Image.Image) -> np.ndarray:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _scale_uint16(values: np.ndarray) -> np.ndarray:
    # 65535 / 257 == 255 exactly: the full 16-bit range maps onto the full 8-bit range.
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def _scale_int32(values: np.ndarray) -> np.ndarray:
    """Mode "I" (32-bit int) mostly holds 16-bit data (16-bit PNG/TIFF); anything else is min-max scaled."""
    if values.size and values.min() >= 0 and values.max() <= 65535:
        return _scale_uint16(values)
    return _minmax(values.astype(np.float64))


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Mode "F": values in [0, 1] are taken as intensities, any other range is min-max scaled."""
    values = np.nan_to_num(values.astype(np.float64))
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    return _minmax(values)


def _minmax(values: np.ndarray) -> np.ndarray:
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize a whole ``HxWx3`` uint8 image to ``size x size`` (no crop: the aspect ratio is not kept).

    Bicubic with Pillow's antialiasing; ``reducing_gap`` first shrinks very large images by an
    integer factor (box filter), which is faster and visually equivalent.
    """
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8).copy()


def content_hash(path_or_bytes: str | os.PathLike | bytes) -> str:
    """sha256 hex digest of raw bytes, or of a file's bytes (read in chunks)."""
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return hashlib.sha256(path_or_bytes).hexdigest()
    from kdpipe.core.files import file_sha256

    return file_sha256(path_or_bytes)


def extension_problem(path: str | os.PathLike) -> str | None:
    extension = suffix(os.path.basename(path))
    if extension.lower() in IMAGE_EXTENSIONS:
        return None
    return f"extension {extension or '(none)'!r} is not one of: {' '.join(sorted(IMAGE_EXTENSIONS))}"


def suffix(name: str) -> str:
    """A file name's extension as ``Path(name).suffix`` gives it (``""`` for ``.hidden`` and for
    ``name.``), for a walk that makes no Path per file."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def validate_image(path: Path, cfg, data: bytes | None = None, draft_size: int | None = None) -> np.ndarray:
    """Decode one candidate file with prepare's rules; raise :class:`RejectedImage` if it is unusable.

    ``cfg`` is ``params.prepare``. The one place the acceptance rules live (``prepare`` and
    ``kdpipe ingest`` both call it): an image extension,
    then every check of :func:`kdpipe.data.imaging.decode_image`; an unreadable file (permissions, I/O
    errors) is rejected as ``unreadable``. ``data`` and ``draft_size``: see :func:`decode_image`.
    """
    path = Path(path)
    if (problem := extension_problem(path)) is not None:
        raise RejectedImage("not_an_image", problem)
    try:
        return decode_image(
            path,
            max_pixels=cfg.max_image_pixels,
            min_side=cfg.min_side,
            max_aspect_ratio=cfg.max_aspect_ratio,
            data=data,
            draft_size=draft_size,
        )
    except OSError as exc:  # permissions, I/O errors
        raise RejectedImage("unreadable", f"cannot read the file: {exc.strerror or exc}") from None
