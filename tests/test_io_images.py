"""Still images: reading (with the pixel limit checked from the header), atomic PNGs, listing, plate matching."""
from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from bgmatte.errors import BgmatteError
from bgmatte.io.images import (
    DEFAULT_MAX_PIXELS,
    exif_orientation,
    header_size,
    icc_profile,
    image_header_size,
    list_images,
    match_by_stem,
    megapixels_above,
    natural_key,
    read_image,
    read_image_and_profile,
    read_matte,
    write_png,
)


def rgb_pattern(height=12, width=20):
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 200  # red
    image[:, width // 2 :, 2] = 150  # blue on the right
    return image


def save_with_cv2(path: Path, rgb: np.ndarray, params=()) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params))
    return path


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims a huge size; its data is a few bytes, as in a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".tif"])
def test_header_size_is_read_without_decoding(tmp_path, suffix):
    path = save_with_cv2(tmp_path / f"image{suffix}", rgb_pattern(12, 20))
    assert image_header_size(path.read_bytes()) == (20, 12)


def test_header_size_of_lossless_webp_and_gif_and_garbage(tmp_path):
    path = save_with_cv2(tmp_path / "lossless.webp", rgb_pattern(12, 20), [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert image_header_size(path.read_bytes()) == (20, 12)
    gif = b"GIF89a" + struct.pack("<HH", 33, 17) + b"\x00" * 10
    assert image_header_size(gif) == (33, 17)
    assert image_header_size(b"not an image at all") is None
    assert image_header_size(b"\x89PNG\r\n\x1a\n") is None  # cut short


def test_read_image_gives_rgb_uint8_and_float(tmp_path):
    path = save_with_cv2(tmp_path / "a.png", rgb_pattern())
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (12, 20, 3)
    assert image[0, 0].tolist() == [200, 0, 0] and image[0, -1].tolist() == [200, 0, 150]
    as_float = read_image(path, dtype="float32")
    assert as_float.dtype == np.float32 and as_float[0, -1] == pytest.approx([200 / 255, 0, 150 / 255])


def test_sixteen_bit_png_keeps_precision_as_float(tmp_path):
    deep = np.full((4, 4, 3), 1000, np.uint16)  # 1000/65535 is between two 8-bit levels
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    assert read_image(tmp_path / "deep.png", dtype="float32")[0, 0, 0] == pytest.approx(1000 / 65535, abs=1e-6)
    assert read_image(tmp_path / "deep.png").dtype == np.uint8


def test_float_and_sixteen_bit_files_are_scaled_to_8_bit(tmp_path):
    # A 32-bit float TIFF (what raw developers and HDR tools export) was refused as damaged, and a PFM was read
    # as 0 and 1 (black): OpenCV's 8-bit decoding does not scale floats. 16-bit PNG levels were cut, not rounded.
    rgb = np.array([[[0.8, 0.4, 0.04], [1.0, 0.0, 0.5]]], np.float32).repeat(3, axis=0)
    expected = np.rint(rgb * 255).astype(np.uint8)
    for name in ("float.tif", "float.pfm"):
        assert cv2.imwrite(str(tmp_path / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), name
        assert read_image(tmp_path / name).tolist() == expected.tolist(), name
        assert read_image(tmp_path / name, dtype="float32") == pytest.approx(rgb, abs=1e-6), name
    cv2.imwrite(str(tmp_path / "grey.tif"), np.full((3, 4), 0.5, np.float32))
    assert read_image(tmp_path / "grey.tif", channels=1).tolist() == [[128] * 4] * 3
    assert read_image(tmp_path / "grey.tif").tolist() == [[[128] * 3] * 4] * 3
    levels = np.array([[0x00FF, 0x01C0, 0xFF00, 0xFFFF]], np.uint16)  # 0.99, 1.74, 254.01 and 255 of 255
    cv2.imwrite(str(tmp_path / "deep.png"), np.dstack([levels] * 3))
    assert read_image(tmp_path / "deep.png")[0, :, 0].tolist() == [1, 2, 254, 255]  # the nearest (was 0, 1, 255)


def test_float_files_are_held_to_0_to_1_and_nan_is_refused(tmp_path):
    # read_image promises floats in [0, 1]: a float file's 1.5 and -0.25 came back as they were, and a NaN
    # (which poisons a training run's loss) as NaN, or as 255 in 8 bits.
    cv2.imwrite(str(tmp_path / "over.tif"), np.array([[1.5, -0.25, 0.5]], np.float32))
    assert read_image(tmp_path / "over.tif", dtype="float32", channels=1).tolist() == [[1.0, 0.0, 0.5]]
    assert read_image(tmp_path / "over.tif", channels=1).tolist() == [[255, 0, 128]]
    cv2.imwrite(str(tmp_path / "nan.tif"), np.array([[0.5, np.nan, np.inf]], np.float32))
    for dtype in ("uint8", "float32"):
        with pytest.raises(BgmatteError, match=r"nan.tif: a float image holding NaN or infinite values$"):
            read_image(tmp_path / "nan.tif", dtype=dtype)


def test_grey_and_rgba_files_become_rgb(tmp_path):
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((5, 6), 77, np.uint8))
    assert read_image(tmp_path / "grey.png")[2, 2].tolist() == [77, 77, 77]
    cv2.imwrite(str(tmp_path / "rgba.png"), np.full((5, 6, 4), (10, 20, 30, 40), np.uint8))
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [30, 20, 10]


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png", 50_000, 50_000)
    with pytest.raises(BgmatteError, match=r"bomb.png: 50000x50000 is 2500 megapixels, above the limit of 100"):
        read_image(bomb)
    small = save_with_cv2(tmp_path / "small.png", rgb_pattern(12, 20))
    with pytest.raises(BgmatteError, match="above the limit"):
        read_image(small, max_pixels=100)
    assert read_image(small, max_pixels=240).shape == (12, 20, 3)
    assert read_image(small, max_pixels=None).shape == (12, 20, 3)


def test_limit_message_is_exact_near_the_limit(tmp_path):
    # Rounded to whole megapixels, 10000x10001 would read "100 megapixels, above the limit of 100".
    bomb = bomb_png(tmp_path / "near.png", 10_000, 10_001)
    with pytest.raises(BgmatteError, match=r"10000x10001 is 100\.01 megapixels, above the limit of 100 "):
        read_image(bomb)


def test_limit_message_is_rounded_far_from_the_limit(tmp_path):
    # It read "99999x99999 is 9999.800001 megapixels": every digit of the count, however far above the limit.
    bomb = bomb_png(tmp_path / "far.png", 99_999, 99_999)
    with pytest.raises(BgmatteError) as refused:
        read_image(bomb)
    assert str(refused.value) == (f"{bomb}: 99999x99999 is 10000 megapixels, above the limit of 100 (refused as a "
                                  "possible decompression bomb)")


@pytest.mark.parametrize("pixels, limit, said", [
    (DEFAULT_MAX_PIXELS + 1, DEFAULT_MAX_PIXELS, "100.000001 megapixels, above the limit of 100"),  # one pixel over
    (10_000 * 10_001, DEFAULT_MAX_PIXELS, "100.01 megapixels, above the limit of 100"),
    (100_049_999, DEFAULT_MAX_PIXELS, "100.05 megapixels, above the limit of 100"),
    (123_456_800, 123_456_789, "123.4568 megapixels, above the limit of 123.45679"),  # a limit of many digits
    (9_999 * 10_001, 9_999 * 10_000, "100 megapixels, above the limit of 99.99"),
    (12_000 * 10_000, DEFAULT_MAX_PIXELS, "120 megapixels, above the limit of 100"),
    (64 * 96, 6_000, "0.006144 megapixels, above the limit of 0.006"),
])
def test_a_count_above_the_limit_never_reads_as_the_limit_or_below_it(pixels, limit, said):
    assert megapixels_above(pixels, limit) == said


def radiance_header(width: int, height: int) -> bytes:
    """The header of a Radiance HDR file and no pixels: what a decompression bomb in that format starts with."""
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {height} +X {width}\n".encode()


def test_formats_opencv_reads_without_a_header_parser_elsewhere_are_sized_from_their_header(tmp_path):
    for suffix in (".hdr", ".ppm", ".pam", ".pfm", ".ras"):
        ok, encoded = cv2.imencode(suffix, cv2.cvtColor(rgb_pattern(12, 20), cv2.COLOR_RGB2BGR))
        assert ok, suffix
        assert image_header_size(encoded.tobytes()) == (20, 12), suffix
    assert image_header_size(b"P5\n# made by hand\n33 17\n255\n") == (33, 17)
    assert image_header_size(radiance_header(640, 480)) == (640, 480)
    assert image_header_size(b"P6 is a word, not a header") is None


def test_a_header_only_radiance_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.hdr"
    bomb.write_bytes(radiance_header(12_000, 12_000))
    with pytest.raises(BgmatteError, match=r"bomb.hdr: 12000x12000 is 144 megapixels, above the limit of 100"):
        read_image(bomb)


def test_opencv_keeps_its_own_pixel_limit_and_a_users_limit_reads_as_ours(tmp_path):
    script = (
        "import os, sys\n"
        "import bgmatte\n"
        "from bgmatte.io.images import read_image\n"
        "print(os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS'))\n"
        "try:\n"
        "    read_image(sys.argv[1])\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    path = save_with_cv2(tmp_path / "wide.png", rgb_pattern(12, 100))  # 1200 pixels
    environment = {key: value for key, value in os.environ.items() if key != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    # Importing bgmatte leaves OpenCV's process-wide limit (2**30 pixels) alone: read_image(max_pixels=None)
    # and the caller's own cv2.imread can still open images above bgmatte's default limit.
    unset = subprocess.run([sys.executable, "-c", script, str(path)], env=environment, capture_output=True,
                           text=True, check=True)
    assert unset.stdout.splitlines() == ["None"]
    # A limit set by the user is kept, and OpenCV's refusal (here of a format bgmatte sized and let through)
    # is the usual one-line message.
    small = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                           env={**environment, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"})
    assert small.stdout.splitlines()[1] == (f"BgmatteError {path}: larger than 0.001 megapixels, the limit for "
                                            "images (refused as a possible decompression bomb)")


def test_a_format_whose_size_is_not_in_a_parsed_header_is_refused_under_the_limit(tmp_path):
    """OpenCV gives no size without decoding: an AVIF is refused while a limit is set, and read without one."""
    ok, encoded = cv2.imencode(".avif", cv2.cvtColor(rgb_pattern(12, 20), cv2.COLOR_RGB2BGR))
    if not ok:
        pytest.skip("this OpenCV build writes no AVIF")
    path = tmp_path / "picture.avif"
    path.write_bytes(encoded.tobytes())
    assert image_header_size(path.read_bytes()) is None
    with pytest.raises(BgmatteError) as caught:
        read_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: the size of this kind of image cannot be checked before decoding")
    assert "PNG, JPEG" in message and "convert it to one of them" in message and "\n" not in message
    assert read_image(path, max_pixels=None).shape == (12, 20, 3)
    # A file no decoder recognises is still named as such, limit or not.
    (tmp_path / "noise.avif").write_bytes(b"\x00\x01 not an image")
    for limit in (DEFAULT_MAX_PIXELS, None):
        with pytest.raises(BgmatteError, match=r"noise.avif: not an image file OpenCV can read$"):
            read_image(tmp_path / "noise.avif", max_pixels=limit)


def test_a_jpeg_with_stray_bytes_before_a_marker_is_still_sized(tmp_path):
    """libjpeg skips bytes that are not a marker where one should start; the header walk does the same."""
    jpeg = save_with_cv2(tmp_path / "a.jpg", rgb_pattern(12, 20)).read_bytes()
    assert image_header_size(jpeg[:2] + b"\x00\x17" + jpeg[2:]) == (20, 12)


def test_empty_and_truncated_files_are_named_as_such_without_libpng_noise(tmp_path, capfd):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BgmatteError, match=r"empty.png: empty file"):
        read_image(tmp_path / "empty.png")
    whole = save_with_cv2(tmp_path / "whole.png", rgb_pattern(40, 60)).read_bytes()
    for name, data in (("cut.png", whole[: len(whole) * 2 // 3]), ("no_end.png", whole[:-12])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BgmatteError, match=rf"{name}: damaged or truncated PNG$"):
            read_image(tmp_path / name)
    jpeg = save_with_cv2(tmp_path / "whole.jpg", rgb_pattern(40, 60)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[:200])
    with pytest.raises(BgmatteError, match=r"cut.jpg: damaged or truncated JPEG$"):
        read_image(tmp_path / "cut.jpg")
    assert "libpng" not in capfd.readouterr().err


def with_orientation(path: Path, orientation: int, padding: int = 0) -> Path:
    """Give a JPEG an EXIF block that holds an orientation tag (and `padding` bytes after it, as a thumbnail would)."""
    tiff = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x112, 3, 1, orientation, 0)
    exif = b"Exif\x00\x00" + tiff + struct.pack(">I", 0) + b"\x00" * padding
    data = path.read_bytes()
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:])
    return path


def test_header_size_reads_only_the_header_and_refuses_what_read_image_would(tmp_path, monkeypatch):
    png = save_with_cv2(tmp_path / "a.png", rgb_pattern(12, 20))
    jpeg = with_orientation(save_with_cv2(tmp_path / "a.jpg", rgb_pattern(12, 20)), 6, padding=40000)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    monkeypatch.setattr(cv2, "imdecode", None)  # nothing is decoded
    assert header_size(png) == (20, 12)
    assert header_size(jpeg) == (20, 12)  # the size as stored, found past a large EXIF block
    with pytest.raises(BgmatteError, match="bomb.png: 50000x50000 is 2500 megapixels"):
        header_size(bomb_png(tmp_path / "bomb.png", 50_000, 50_000))
    for name, message in (("empty.png", "empty file"), ("garbage.png", "damaged or truncated PNG"),
                          ("missing.png", "no such image file")):
        with pytest.raises(BgmatteError, match=rf"{name}: {message}"):
            header_size(tmp_path / name)


def test_header_size_seeks_past_large_jpeg_blocks_instead_of_reading_them(tmp_path, monkeypatch):
    jpeg = save_with_cv2(tmp_path / "a.jpg", rgb_pattern(12, 20))
    data = jpeg.read_bytes()
    blocks = b"".join(b"\xff\xe2" + struct.pack(">H", 50_002) + bytes(50_000) for _ in range(2))  # 100 KB
    jpeg.write_bytes(data[:2] + blocks + data[2:] + bytes(10_000_000))  # a camera-sized file
    with_orientation(jpeg, 6)
    read, real_open = [], Path.open
    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: _Counting(real_open(self, *args, **kwargs), read))
    assert header_size(jpeg) == (20, 12)
    assert 0 < sum(read) < 40_000
    read.clear()
    assert exif_orientation(jpeg) == 6 and sum(read) < 40_000


class _Counting:
    """A file that counts the bytes its reads return."""

    def __init__(self, file, counts: list) -> None:
        self.file, self.counts = file, counts

    def read(self, *size):
        chunk = self.file.read(*size)
        self.counts.append(len(chunk))
        return chunk

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_orientation_is_applied_unless_pixels_are_wanted_as_stored(tmp_path):
    jpeg = with_orientation(save_with_cv2(tmp_path / "a.jpg", rgb_pattern(12, 20)), 6)
    assert read_image(jpeg).shape == (20, 12, 3)
    assert read_image(jpeg, orient=False).shape == (12, 20, 3)
    cv2.imwrite(str(tmp_path / "matte.jpg"), np.full((12, 20), 128, np.uint8))
    assert read_matte(with_orientation(tmp_path / "matte.jpg", 6)).shape == (12, 20)


def test_a_matte_is_the_alpha_channel_when_it_varies_else_the_grey_level(tmp_path):
    alpha = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    cutout = np.zeros((6, 8, 4), np.uint8)
    cutout[..., 3] = alpha  # black colour: read from its colour, this matte would be 0 everywhere
    cv2.imwrite(str(tmp_path / "cutout.png"), cutout)
    assert read_matte(tmp_path / "cutout.png") == pytest.approx(alpha / 255)
    opaque = np.dstack([alpha, alpha, alpha, np.full_like(alpha, 255)])  # an unused alpha channel
    cv2.imwrite(str(tmp_path / "opaque.png"), opaque)
    assert read_matte(tmp_path / "opaque.png") == pytest.approx(alpha / 255)
    cv2.imwrite(str(tmp_path / "grey16.png"), alpha.astype(np.uint16) * 257)
    assert read_matte(tmp_path / "grey16.png") == pytest.approx(alpha / 255)
    near = np.dstack([alpha, alpha, np.clip(alpha.astype(int) + 1, 0, 255).astype(np.uint8)])  # rounding
    cv2.imwrite(str(tmp_path / "near.png"), near)
    assert read_matte(tmp_path / "near.png") == pytest.approx(alpha / 255, abs=1 / 255)


def test_colour_and_out_of_range_float_mattes_are_refused_naming_the_file(tmp_path):
    save_with_cv2(tmp_path / "colour.png", rgb_pattern())
    with pytest.raises(BgmatteError, match=r"colour.png: a colour image, not a matte"):
        read_matte(tmp_path / "colour.png")
    cv2.imwrite(str(tmp_path / "scaled.tif"), np.full((4, 4), 255.0, np.float32))
    with pytest.raises(BgmatteError, match=r"scaled.tif: a float matte must hold values from 0 to 1, but this one "
                                           r"goes from 255 to 255 \(0-255 stored as float\? divide by 255\)$"):
        read_matte(tmp_path / "scaled.tif")
    cv2.imwrite(str(tmp_path / "nan.tif"), np.full((4, 4), np.nan, np.float32))
    with pytest.raises(BgmatteError, match=r"nan.tif: a float matte holding NaN"):
        read_matte(tmp_path / "nan.tif")
    rounded = np.full((4, 4), 0.5, np.float32)
    rounded[0, 0], rounded[0, 1] = 1.0000001, -1e-7  # a writer's rounding is let through, clipped
    cv2.imwrite(str(tmp_path / "rounded.tif"), rounded)
    matte = read_matte(tmp_path / "rounded.tif")
    assert matte.dtype == np.float32 and matte.min() == 0.0 and matte.max() == 1.0


def test_missing_and_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(BgmatteError, match="nope.png: no such image file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "fake.jpg").write_text("hello")
    with pytest.raises(BgmatteError, match="fake.jpg: not an image file") as caught:
        read_image(tmp_path / "fake.jpg")
    assert "\n" not in str(caught.value)
    with pytest.raises(BgmatteError, match="is a folder"):
        read_image(tmp_path)


def fake_profile(space: bytes = b"RGB ", size: int = 700) -> bytes:
    """An ICC profile that libpng accepts: a header (size, class, colour space, 'acsp', the D50 white) and one tag,
    the white point, then padding to `size` bytes."""
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x04300000) + b"mntr" + space + b"XYZ "
              + bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", 0) + struct.pack(">III", 0xF6D6, 0x10000, 0xD32D))
    header += bytes(128 - len(header))
    tags = struct.pack(">I4sII", 1, b"wtpt", 144, 20) + b"XYZ " + bytes(4) + struct.pack(">III", 0xF6D6, 0x10000, 0xD32D)
    return header + tags + bytes(np.random.default_rng(0).integers(0, 256, size - 128 - len(tags), np.uint8))


PROFILE = fake_profile()


def with_profile(path: Path, profile: bytes, chunk: int = 300) -> Path:
    """Give a JPEG an ICC profile, split over APP2 segments of `chunk` bytes as large profiles are."""
    parts = [profile[start : start + chunk] for start in range(0, len(profile), chunk)]
    segments = b"".join(b"\xff\xe2" + struct.pack(">H", len(part) + 16) + b"ICC_PROFILE\x00" + bytes([index + 1, len(parts)])
                        + part for index, part in enumerate(parts))
    data = path.read_bytes()
    path.write_bytes(data[:2] + segments + data[2:])
    return path


@pytest.mark.skipif(not hasattr(cv2, "imdecodeWithMetadata"), reason="an OpenCV that reads no metadata")
def test_the_icc_profile_of_a_jpeg_png_or_webp_is_read_with_its_pixels_and_written_into_a_png(tmp_path, monkeypatch,
                                                                                              caplog):
    # A photo in Display P3 or Adobe RGB lost its profile: its cutout was shown as sRGB, its colours duller.
    jpeg = save_with_cv2(tmp_path / "p3.jpg", rgb_pattern())
    pixels = read_image(jpeg)
    decodings = []
    decode = cv2.imdecodeWithMetadata
    monkeypatch.setattr(cv2, "imdecodeWithMetadata", lambda *args: decodings.append(args) or decode(*args))
    image, profile = read_image_and_profile(with_profile(jpeg, PROFILE))  # three APP2 segments, joined
    assert profile == PROFILE and np.array_equal(image, pixels) and len(decodings) == 1  # one decoding for both
    assert read_image_and_profile(jpeg, dtype="float32", channels=1)[0].dtype == np.float32
    png = write_png(tmp_path / "p3.png", rgb_pattern(), icc_profile=PROFILE)
    assert icc_profile(png) == PROFILE and read_image(png)[0, 0].tolist() == [200, 0, 0]
    ok, webp = cv2.imencodeWithMetadata(".webp", np.zeros((4, 4, 3), np.uint8), [cv2.IMAGE_METADATA_ICCP],
                                        [np.frombuffer(PROFILE, np.uint8)])
    if ok and b"ICCP" in webp.tobytes():
        (tmp_path / "p3.webp").write_bytes(webp.tobytes())
        assert icc_profile(tmp_path / "p3.webp") == PROFILE
    # Untagged files give None, and write_png without a profile writes what imencode does.
    plain = write_png(tmp_path / "plain.png", rgb_pattern())
    assert plain.read_bytes() == cv2.imencode(".png", cv2.cvtColor(rgb_pattern(), cv2.COLOR_RGB2BGR))[1].tobytes()
    assert icc_profile(plain) is None and icc_profile(save_with_cv2(tmp_path / "plain.jpg", rgb_pattern())) is None
    # The pixel limit still holds before any decoding.
    decodings.clear()
    with pytest.raises(BgmatteError, match="decompression bomb"):
        read_image_and_profile(bomb_png(tmp_path / "bomb.png", 20000, 20000))
    assert decodings == []
    # OpenCV does not read a TIFF's profile (tag 34675): such a photo is read, untagged.
    with_tag = tmp_path / "p3.tif"  # a little-endian TIFF whose first directory has tag 34675 (InterColorProfile)
    stored = bytes(rgb_pattern(2, 2).ravel())
    entries = [(256, 3, 1, 2), (257, 3, 1, 2), (258, 3, 1, 8), (262, 3, 1, 2), (273, 4, 1, 8), (277, 3, 1, 3),
               (278, 3, 1, 2), (279, 4, 1, len(stored)), (34675, 7, len(PROFILE), 8 + len(stored))]
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    with_tag.write_bytes(b"II*\x00" + struct.pack("<I", 8 + len(stored) + len(PROFILE)) + stored + PROFILE
                         + directory + b"\x00" * 4)
    image, profile = read_image_and_profile(with_tag)
    assert image.shape == (2, 2, 3) and profile is None
    # A profile libpng refuses leaves the PNG untagged, with one warning naming it.
    caplog.set_level("DEBUG", "bgmatte")
    short = write_png(tmp_path / "short.png", rgb_pattern(), icc_profile=b"\x00\x00\x00\x10short")
    assert icc_profile(short) is None and np.array_equal(read_image(short), rgb_pattern())
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"{short}: written without the photo's ICC profile, which libpng refuses as damaged"]


def test_write_png_round_trips_rgb_rgba_grey_and_float(tmp_path):
    rgb = rgb_pattern()
    write_png(tmp_path / "rgb.png", rgb)
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    rgba = np.concatenate([rgb, np.full((12, 20, 1), 99, np.uint8)], axis=2)
    write_png(tmp_path / "rgba.png", rgba)
    stored = cv2.imread(str(tmp_path / "rgba.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(cv2.cvtColor(stored, cv2.COLOR_BGRA2RGBA), rgba)
    write_png(tmp_path / "grey.png", np.full((3, 4, 1), 0.5, np.float32))
    assert cv2.imread(str(tmp_path / "grey.png"), cv2.IMREAD_UNCHANGED).tolist() == [[128] * 4] * 3


def test_write_png_stores_no_colour_where_a_float_rgba_alpha_rounds_to_0(tmp_path):
    rgba = np.array([[[0.6, 0.6, 0.6, 0.001], [0.6, 0.6, 0.6, 0.003]]], np.float32)
    write_png(tmp_path / "cutout.png", rgba)
    stored = cv2.cvtColor(cv2.imread(str(tmp_path / "cutout.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    assert stored.tolist() == [[[0, 0, 0, 0], [153, 153, 153, 1]]]


def test_written_pngs_get_the_usual_permissions_not_the_temporary_files_private_ones(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = write_png(tmp_path / "out.png", rgb_pattern())
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_png_is_atomic_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    with pytest.raises(BgmatteError, match="out.png: already exists"):
        write_png(target, rgb_pattern())
    assert target.read_bytes() == b"precious"
    write_png(target, rgb_pattern(), overwrite=True)
    assert read_image(target).shape == (12, 20, 3)
    assert [path.name for path in tmp_path.iterdir()] == ["out.png"]  # no temporary left behind


def test_write_png_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(BgmatteError, match="does not exist"):
        write_png(tmp_path / "nowhere" / "out.png", rgb_pattern())


class _FailingReplace:
    """The `os` module as `bgmatte.io.files` sees it, except that renaming fails with `error`."""

    def __init__(self, error: OSError):
        self.error = error

    def replace(self, *args):
        raise self.error

    def __getattr__(self, name):
        return getattr(os, name)


def test_write_png_turns_a_full_disk_into_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    import bgmatte.io.files as files

    monkeypatch.setattr(files, "os", _FailingReplace(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(BgmatteError, match=r"out.png: cannot write the image \(No space left on device\)$"):
        write_png(tmp_path / "out.png", rgb_pattern())
    assert list(tmp_path.iterdir()) == []


def test_write_png_over_a_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "out.png").mkdir()
    with pytest.raises(BgmatteError, match="out.png: is a folder"):
        write_png(tmp_path / "out.png", rgb_pattern(), overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["out.png"] and (tmp_path / "out.png").is_dir()


def test_write_png_rejects_odd_shapes(tmp_path):
    with pytest.raises(ValueError, match="PNG pixels"):
        write_png(tmp_path / "bad.png", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        write_png(tmp_path / "bad.png", np.zeros((4, 4, 3), np.int32))
    assert list(tmp_path.iterdir()) == []


def test_natural_order():
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame2b.png"]
    assert sorted(names, key=natural_key) == ["Frame1.png", "frame2.png", "frame2b.png", "frame10.png"]


def test_list_images_is_natural_and_skips_others(tmp_path):
    for name in ["10.png", "2.jpg", "1.JPEG", "notes.txt", ".hidden.png", "9.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [path.name for path in list_images(tmp_path)] == ["1.JPEG", "2.jpg", "9.webp", "10.png"]
    with pytest.raises(BgmatteError, match="no such folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "._10.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's companion of 10.png
    assert [path.name for path in list_images(tmp_path)] == ["1.JPEG", "2.jpg", "9.webp", "10.png"]
    with pytest.raises(BgmatteError, match="is not a folder"):
        list_images(tmp_path / "notes.txt")


def test_list_images_can_search_subfolders_skipping_hidden_ones(tmp_path):
    for name in ["b/2.png", "b/10.png", "a.png", ".cache/x.png", "b/.y.png", "b/._2.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [str(path.relative_to(tmp_path)) for path in list_images(tmp_path, recursive=True)] == [
        "a.png", "b/2.png", "b/10.png"]
    assert [path.name for path in list_images(tmp_path)] == ["a.png"]


def test_plates_are_matched_by_stem():
    sources = [Path("src/a.jpg"), Path("src/B.png"), Path("src/c.png")]
    plates = [Path("bgr/c.jpg"), Path("bgr/a.png"), Path("bgr/b.png"), Path("bgr/extra.png")]
    assert match_by_stem(sources, plates) == [
        (Path("src/a.jpg"), Path("bgr/a.png")),
        (Path("src/B.png"), Path("bgr/b.png")),  # case-insensitive when unambiguous
        (Path("src/c.png"), Path("bgr/c.jpg")),
    ]


def test_missing_or_ambiguous_plates_are_errors():
    with pytest.raises(BgmatteError, match=r"no plate .* for d.png"):
        match_by_stem([Path("d.png")], [Path("bgr/a.png")])
    with pytest.raises(BgmatteError, match="share the name 'a'"):
        match_by_stem([Path("a.png")], [Path("bgr/a.png"), Path("bgr/a.jpg")])


def os2_bmp(path: Path, rgb: np.ndarray) -> Path:
    """A 24-bit BMP with the OS/2 1.x header (BITMAPCOREHEADER: 16-bit width and height), which OpenCV reads."""
    height, width = rgb.shape[:2]
    stride = (width * 3 + 3) // 4 * 4
    rows = b"".join(rgb[y, :, ::-1].tobytes().ljust(stride, b"\x00") for y in range(height - 1, -1, -1))
    header = b"BM" + struct.pack("<IHHI", 26 + len(rows), 0, 0, 26) + struct.pack("<IHHHH", 12, width, height, 1, 24)
    path.write_bytes(header + rows)
    return path


def test_an_os2_bmp_is_sized_from_its_short_header_and_read(tmp_path):
    path = os2_bmp(tmp_path / "os2.bmp", rgb_pattern(12, 20))
    assert image_header_size(path.read_bytes()) == (20, 12)
    assert read_image(path).tolist() == rgb_pattern(12, 20).tolist()


def big_tiff(path: Path, rgb: np.ndarray, size: tuple[int, int] | None = None) -> Path:
    """An uncompressed little-endian BigTIFF (version 43: 64-bit offsets, 20-byte directory entries) of `rgb`;
    `size` makes its header claim another (width, height), as a decompression bomb would."""
    height, width = rgb.shape[:2]
    width, height = size or (width, height)
    pixels = rgb.tobytes()
    entries = [(256, 16, 1, width), (257, 16, 1, height), (258, 3, 3, 8 | 8 << 16 | 8 << 32), (259, 3, 1, 1),
               (262, 3, 1, 2), (273, 16, 1, 16), (277, 3, 1, 3), (278, 16, 1, height), (279, 16, 1, len(pixels))]
    directory = struct.pack("<Q", len(entries)) + b"".join(struct.pack("<HHQQ", *entry) for entry in entries)
    path.write_bytes(b"II+\x00" + struct.pack("<HHQ", 8, 0, 16 + len(pixels)) + pixels + directory + b"\x00" * 8)
    return path


def test_a_bigtiff_is_sized_from_its_header_and_read_or_refused_as_a_bomb(tmp_path):
    path = big_tiff(tmp_path / "big.tif", rgb_pattern(12, 20))
    assert image_header_size(path.read_bytes()) == (20, 12)
    assert read_image(path).tolist() == rgb_pattern(12, 20).tolist()
    bomb = big_tiff(tmp_path / "bomb.tif", rgb_pattern(12, 20), size=(20_000, 20_000))
    with pytest.raises(BgmatteError, match=r"bomb.tif: 20000x20000 is 400 megapixels, above the limit of 100"):
        read_image(bomb)
