"""kdpipe.data.imaging: every colour mode, orientation, and every way a file can be unusable."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from kdpipe.data.imaging import IMAGE_EXTENSIONS, RejectedImage, content_hash, decode_image, resize_square

LIMITS = {"max_pixels": 40_000_000, "min_side": 1, "max_aspect_ratio": 20.0}


def decode(path, **overrides):
    return decode_image(path, **{**LIMITS, **overrides})


def rejected(path, **overrides) -> RejectedImage:
    with pytest.raises(RejectedImage) as info:
        decode(path, **overrides)
    assert info.value.detail  # every rejection explains itself
    return info.value


def save(tmp_path, name, img, **kwargs):
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# ---------------------------------------------------------------- colour modes


def test_rgb_png_is_exact(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode(save(tmp_path, "a.png", Image.fromarray(arr)))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_l(tmp_path):
    out = decode(save(tmp_path, "l.png", Image.new("L", (4, 3), 77)))
    assert out.shape == (3, 4, 3)
    assert (out == 77).all()


def test_la_composited_over_white(tmp_path):
    arr = np.array([[[0, 0], [0, 255], [0, 128]]], dtype=np.uint8)  # (L, A) pixels
    out = decode(save(tmp_path, "la.png", Image.fromarray(arr, mode="LA")), min_side=1)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not black
    assert out[0, 1].tolist() == [0, 0, 0]  # opaque black stays black
    assert 125 <= out[0, 2, 0] <= 129  # half-transparent black over white -> mid grey


def test_rgba_composited_over_white(tmp_path):
    arr = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 255, 128]]], dtype=np.uint8)
    out = decode(save(tmp_path, "rgba.png", Image.fromarray(arr, mode="RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent red is NOT red once alpha is applied
    assert out[0, 1].tolist() == [0, 0, 255]
    assert 125 <= out[0, 2, 0] <= 129 and out[0, 2, 2] == 255


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 2), 0)
    img.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    path = save(tmp_path, "p.png", img, transparency=0)
    out = decode(path)
    assert out[0, 0].tolist() == [255, 255, 255]  # the transparent index becomes white
    assert out[1, 1].tolist() == [200, 0, 0]


def test_palette_gif_without_transparency(tmp_path):
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    out = decode(save(tmp_path, "p.gif", img))
    assert (out == [0, 200, 0]).all()


def test_cmyk_converted(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = [255, 0, 0, 0]  # pure cyan
    arr[1, 1] = [0, 0, 0, 255]  # pure black
    out = decode(save(tmp_path, "cmyk.tif", Image.fromarray(arr, mode="CMYK")))
    assert out[0, 0].tolist() == [0, 255, 255]
    assert out[1, 1].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]  # no ink -> white


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000, 30000]], dtype=np.uint16)
    path = save(tmp_path, "g16.png", Image.fromarray(values))
    assert Image.open(path).mode in ("I;16", "I")
    out = decode(path, max_aspect_ratio=10)
    assert out[0, :, 0].tolist() == [0, 100, 255, 4, 117]  # clipping would give 255 for all but 0
    assert (out[..., 0] == out[..., 2]).all()


def test_32bit_int_mode_holding_16bit_data(tmp_path):
    values = np.array([[0, 65535], [257, 25700]], dtype=np.int32)
    out = decode(save(tmp_path, "i.tif", Image.fromarray(values, mode="I")))
    assert out[..., 0].tolist() == [[0, 255], [1, 100]]


def test_float_mode_in_unit_range(tmp_path):
    values = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    out = decode(save(tmp_path, "f.tif", Image.fromarray(values, mode="F")))
    assert out[..., 1].tolist() == [[0, 255], [128, 64]]


def test_bilevel_mode_1(tmp_path):
    bits = np.array([[True, False], [False, True]])
    img = Image.fromarray(bits)
    assert img.mode == "1"
    out = decode(save(tmp_path, "b.png", img))
    assert out[..., 0].tolist() == [[255, 0], [0, 255]]


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = [255, 0, 0]  # left half red
    arr[:, 10:] = [0, 0, 255]  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    path = save(tmp_path, "rot.jpg", Image.fromarray(arr), exif=exif.tobytes(), quality=95)
    out = decode(path)
    assert out.shape == (20, 10, 3)  # width and height swapped
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 60  # left (red) is now on top
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 60


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = decode(path)
    assert out.shape == (4, 4, 3)
    assert (out == [255, 0, 0]).all()


@pytest.mark.parametrize("name", ["chat noir.png", "été 猫 ü.png"])
def test_unicode_and_space_names(tmp_path, make_image, name):
    path = make_image(tmp_path / "dir with space" / name, size=(6, 5))
    assert decode(path).shape == (5, 6, 3)


# ---------------------------------------------------------------- rejections


def test_zero_byte(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert rejected(path).reason == "zero_byte"


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert rejected(path).reason == "not_an_image"


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated(tmp_path, make_image, ext):
    path = make_image(tmp_path / f"full.{ext}", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert rejected(path).reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_rejected_even_if_pillow_was_told_to_tolerate(tmp_path, make_image, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = make_image(tmp_path / "full.png", size=(64, 64))
    path.write_bytes(path.read_bytes()[:300])
    assert rejected(path).reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_corrupt_image_data(tmp_path, make_image):
    path = make_image(tmp_path / "c.png", size=(64, 64))
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert rejected(path).reason == "corrupt"


def test_corrupt_header(tmp_path):
    path = tmp_path / "h.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert rejected(path).reason == "corrupt"


def test_decompression_bomb_header_is_not_decoded(tmp_path):
    # A valid PNG header claiming 100000 x 100000 pixels with almost no data behind it.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )
    err = rejected(path)
    assert err.reason == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS != 40_000_000  # Pillow's global limit is restored afterwards


@pytest.mark.parametrize("max_pixels", [99, 30])  # 100 px: Pillow warns (> limit), Pillow raises (> 2x limit)
def test_decompression_bomb_small_limit(tmp_path, make_image, max_pixels):
    path = make_image(tmp_path / "ten.png", size=(10, 10))
    err = rejected(path, max_pixels=max_pixels)
    assert err.reason == "decompression_bomb"
    assert decode(path, max_pixels=100).shape == (10, 10, 3)  # exactly at the limit is fine


def test_too_small(tmp_path, make_image):
    path = make_image(tmp_path / "one.png", size=(1, 1))
    err = rejected(path, min_side=2)
    assert err.reason == "too_small" and "1x1" in err.detail
    assert decode(path, min_side=1).shape == (1, 1, 3)


def test_bad_aspect_ratio(tmp_path, make_image):
    path = make_image(tmp_path / "strip.png", size=(100, 2))
    err = rejected(path, max_aspect_ratio=20.0)
    assert err.reason == "bad_aspect_ratio" and "50.0" in err.detail
    assert decode(path, max_aspect_ratio=50.0).shape == (2, 100, 3)


# ---------------------------------------------------------------- helpers


def test_resize_square():
    arr = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = resize_square(arr, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(resize_square(out, 8), out)  # same size: unchanged
    flat = np.full((9, 13, 3), 123, dtype=np.uint8)
    assert (resize_square(flat, 16) == 123).all()


def test_content_hash_of_file_and_bytes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    expected = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert content_hash(path) == content_hash(b"hello") == content_hash(str(path)) == expected


def test_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS
