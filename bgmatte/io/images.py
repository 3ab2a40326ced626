"""Still images: reading (mattes too) with a decompression-bomb limit, atomic PNG writing, folder listing and
plate matching.

The pixel limit is checked before decoding: the file's bytes are read once, its header is parsed here
for PNG, JPEG, BMP, GIF, WebP, TIFF, Radiance HDR, the Netpbm family (PPM, PGM, PAM, PFM) and Sun raster
(width and height sit at known places in all of them), and only then are the same bytes handed to OpenCV.
OpenCV has no way to give a size without decoding, so a file whose size is not found here (AVIF, JPEG
2000, a damaged header) is refused while a limit is set; with ``max_pixels=None`` it is decoded, bounded
only by OpenCV's own limit (``OPENCV_IO_MAX_IMAGE_PIXELS``, 2**30 pixels unless the user sets it), which
bgmatte leaves alone: it is the whole process's, the caller's own ``cv2.imread`` included.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import cv2
import numpy as np

from bgmatte.errors import BgmatteError
from bgmatte.io.files import refuse_existing, write_through_temporary

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                              ".pbm", ".pgm", ".ppm", ".pnm"})
DEFAULT_MAX_PIXELS = 100_000_000
_NETPBM_KINDS = (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"F", b"f")  # the digit or letter after "P"


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _bmp_size(data: bytes) -> tuple[int, int]:
    """The size in a BMP's info header: 16-bit sides in the 12-byte one of OS/2 1.x (BITMAPCOREHEADER), 32-bit
    ones in every later one, where a negative height means rows stored top-down."""
    if struct.unpack("<I", data[14:18])[0] == 12:
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _gif_size(data: bytes) -> tuple[int, int] | None:
    return struct.unpack("<HH", data[6:10]) if data[:6] in (b"GIF87a", b"GIF89a") else None


def _sun_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[4:12])


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _is_netpbm(data: bytes) -> bool:
    return data[:1] == b"P" and data[1:2] in _NETPBM_KINDS


def _starts(*signatures: bytes):
    return lambda data: data.startswith(signatures)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG segments to the first start-of-frame marker, which holds the size."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:  # stray bytes before a marker, which libjpeg skips as well
            position = data.find(b"\xff", position)
            if position < 0:
                return None
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength (tags 256 and 257) from the first directory of a TIFF, or of a BigTIFF (version
    43, for files past 4 GB: 64-bit offsets and counts, 20-byte entries)."""
    endian = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(endian + "H", data[2:4])[0] == 43
    (offset,) = struct.unpack(endian + ("Q" if big else "I"), data[8:16] if big else data[4:8])
    start, size, value = (8, 20, 12) if big else (2, 12, 8)  # where entries start, their size, their value's place
    (count,) = struct.unpack(endian + ("Q" if big else "H"), data[offset : offset + start])
    found: dict[int, int] = {}
    for index in range(count):
        entry = data[offset + start + size * index : offset + start + size * (index + 1)]
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag in (256, 257):
            code, width = {3: ("H", 2), 16: ("Q", 8)}.get(kind, ("I", 4))  # SHORT, LONG8, else LONG
            found[tag] = struct.unpack(endian + code, entry[value : value + width])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _radiance_size(data: bytes) -> tuple[int, int] | None:
    """The resolution line after the blank line that ends a Radiance header, such as ``-Y 480 +X 640``."""
    end = data.find(b"\n\n", 0, 65536)
    if end < 0:
        return None
    tokens = data[end + 2 : end + 66].split(b"\n", 1)[0].split()
    if len(tokens) != 4:
        return None
    sides = {tokens[0][-1:]: int(tokens[1]), tokens[2][-1:]: int(tokens[3])}
    if set(sides) != {b"X", b"Y"}:
        return None
    return sides[b"X"], sides[b"Y"]


def _netpbm_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PBM, PGM, PPM or PFM header (numbers after the magic, # comments skipped),
    or from the WIDTH and HEIGHT lines of a PAM header."""
    head = data[:4096]
    if head[1:2] == b"7":
        found = {}
        for line in head.split(b"\n")[1:]:
            words = line.split()
            if words[:1] == [b"ENDHDR"]:
                break
            if len(words) == 2 and words[0] in (b"WIDTH", b"HEIGHT"):
                found[words[0]] = int(words[1])
        return (found[b"WIDTH"], found[b"HEIGHT"]) if len(found) == 2 else None
    numbers: list[int] = []
    for line in head[2:].split(b"\n"):
        for word in line.split(b"#", 1)[0].split():
            numbers.append(int(word))
            if len(numbers) == 2:
                return numbers[0], numbers[1]
    return None


# Every format whose header gives its size: the name messages use, how its first bytes are recognised, and the
# reader of its size (None where the header cannot be read). The size check and the format names share it.
_FORMATS = (
    ("PNG", _starts(b"\x89PNG"), _png_size),
    ("JPEG", _starts(b"\xff\xd8"), _jpeg_size),
    ("BMP", _starts(b"BM"), _bmp_size),
    ("GIF", _starts(b"GIF8"), _gif_size),
    ("WebP", _is_webp, _webp_size),
    ("TIFF", _starts(b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff_size),  # classic and BigTIFF
    ("Radiance HDR", _starts(b"#?RADI", b"#?RGBE"), _radiance_size),
    ("Netpbm", _is_netpbm, _netpbm_size),
    ("Sun raster", _starts(b"\x59\xa6\x6a\x95"), _sun_size),
)
_SIZED_FORMATS = ", ".join(name for name, _, _ in _FORMATS[:-1]) + f" and {_FORMATS[-1][0]}"  # for messages


def _recognise(data: bytes):
    """The entry of `_FORMATS` that the file's first bytes match, or None."""
    return next((entry for entry in _FORMATS if entry[1](data)), None)


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a file's bytes in one of `_SIZED_FORMATS`; None if unknown."""
    entry = _recognise(data)
    if entry is None:
        return None
    try:
        return entry[2](data)
    except (struct.error, IndexError, ValueError):
        return None


def _format_name(data: bytes) -> str | None:
    """The format's usual name from the file's first bytes, for messages; None if not recognised."""
    entry = _recognise(data)
    return None if entry is None else entry[0]


def read_image(path: str | os.PathLike, *, dtype: str = "uint8", channels: int = 3,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, orient: bool = True) -> np.ndarray:
    """Read an image as upright (H, W, 3) RGB, or (H, W) grey with channels=1, uint8 or float32 in [0, 1];
    refuse files above `max_pixels`, and while it is set, files whose size the header does not give.

    EXIF orientation is applied unless `orient` is False (pixels as stored: for data that must line up pixel
    for pixel with other files; `read_to_fit` picks for a photo and its matte), grey images become three channels
    (colour ones grey with channels=1), alpha is dropped, and 16-bit and float files are rounded to the nearest
    8-bit level, or keep their precision with dtype="float32"; float values past 0 and 1 (a Radiance HDR's) are
    clipped, and NaN or infinite ones refused. Mattes have their own reader, `read_matte`, which keeps an alpha
    channel. `read_image_and_profile` gives the file's ICC colour profile too, from the same decoding.
    """
    return _read_image(Path(path), dtype, channels, max_pixels, orient, profile=False)[0]


def read_image_and_profile(path: str | os.PathLike, **options) -> tuple[np.ndarray, bytes | None]:
    """`read_image`'s pixels (`options` are its own) and the ICC colour profile embedded in the file, or None: the
    colour space the pixel values are in (Display P3, Adobe RGB), which the pixels alone do not say. Both come
    from one decoding, by OpenCV's ``imdecodeWithMetadata``, after the same checks.

    OpenCV reads the profile of a PNG (iCCP), a JPEG (its APP2 segments, joined when a large profile is split
    over several) and a WebP (ICCP). It does not read a TIFF's (tag 34675) nor any other format's, so those give
    None, as does an OpenCV without ``imdecodeWithMetadata`` (an older one) and a profile the decoder drops as
    damaged."""
    return _read_image(Path(path), profile=True, **options)


def icc_profile(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes | None:
    """The ICC colour profile embedded in an image file, or None (`read_image_and_profile`, which says for which
    formats). OpenCV reads metadata only while decoding, so this decodes the image: where its pixels are
    wanted too, `read_image_and_profile` reads both at once."""
    return read_image_and_profile(path, max_pixels=max_pixels, orient=False)[1]


def _read_image(path: Path, dtype: str = "uint8", channels: int = 3, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                orient: bool = True, *, profile: bool) -> tuple[np.ndarray, bytes | None]:
    """`read_image`'s pixels, and the file's ICC profile if `profile` is asked for (else None)."""
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"dtype must be 'uint8' or 'float32', not {dtype!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    # Decoded at the file's own depth, then scaled here: OpenCV's 8-bit decoding refuses 32-bit float TIFFs, casts
    # PFM floats to 0 and 1 and cuts 16-bit PNG levels instead of rounding them.
    flags = (cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE) | cv2.IMREAD_ANYDEPTH
    image, found = _decode_with_profile(path, flags | (0 if orient else cv2.IMREAD_IGNORE_ORIENTATION), max_pixels,
                                        profile=profile)
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise BgmatteError(f"{path}: {image.dtype} pixels, which have no agreed scale (8- or 16-bit, or float "
                           "from 0 to 1, are read)")
    if image.dtype.kind == "f" and not np.isfinite(image).all():  # NaN would reach the model (or a loss) as it is
        raise BgmatteError(f"{path}: a float image holding NaN or infinite values")
    if channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)
    if dtype == "uint8":
        return _to_8_bit(image), found
    scale = 65535.0 if image.dtype == np.uint16 else 255.0 if image.dtype == np.uint8 else 1.0
    # A float file's values are clipped too: a Radiance HDR's go past 1.
    return (image.astype(np.float32) / np.float32(scale)).clip(0.0, 1.0), found


def _to_8_bit(image: np.ndarray) -> np.ndarray:
    """Decoded pixels as uint8, each level the nearest: 16-bit ones divided by 257, floats (0 to 1) times 255 and
    clipped (a Radiance HDR's brighter values included, as OpenCV's own 8-bit decoding clips them)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return cv2.convertScaleAbs(image, alpha=1 / 257)  # no level is halfway between two 8-bit ones
    return cv2.convertScaleAbs(cv2.max(image.astype(np.float32, copy=False), 0.0), alpha=255.0)


def read_as_stored(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image's pixels as the file stores them: no EXIF orientation, OpenCV's channel order (grey, BGR or
    BGRA) and the file's depth (uint8, uint16 or float); the checks and refusals of `read_image`."""
    return _decode(Path(path), cv2.IMREAD_UNCHANGED, max_pixels)


MATTE_TOLERANCE = 1e-3
"""How far a float matte may stray outside [0, 1] (rounding in the program that wrote it) before it is refused."""
GREY_TOLERANCE = 2 / 255
"""How far apart (as a fraction of full scale) the colour channels of a matte stored in colour may be and still
count as grey: two 8-bit steps, the rounding of colour conversions and JPEG, never a real colour."""


def read_matte(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an alpha matte as (H, W) float32 in [0, 1], pixels as stored.

    The matte is the file's alpha channel if it has one that is not constant (a cutout saved as RGBA), else its
    grey level; a colour file whose channels differ (by more than `GREY_TOLERANCE`) is refused, since no grey
    conversion of a colour picture is a matte. 8- and 16-bit files are scaled to [0, 1]; a float file must hold
    values in [0, 1] already (within `MATTE_TOLERANCE`) and is refused otherwise. EXIF orientation is not
    applied: a matte is data that lines up with its foreground or prediction pixel for pixel, not a photograph.
    """
    path = Path(path)
    image = read_as_stored(path, max_pixels=max_pixels)
    if image.dtype == np.uint8 or image.dtype == np.uint16:
        full = float(np.iinfo(image.dtype).max)
    elif image.dtype in (np.float32, np.float64):
        full = 1.0
    else:
        raise BgmatteError(f"{path}: a matte must be 8- or 16-bit, or float in [0, 1], not {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (2, 4) and image[:, :, -1].min() != image[:, :, -1].max():
        matte = image[:, :, -1].astype(np.float32)
    elif image.ndim == 3:
        colour = image[:, :, : max(1, image.shape[2] - 1)] if image.shape[2] in (2, 4) else image
        spread = float((colour.max(axis=2) - colour.min(axis=2)).max()) / full
        if spread > GREY_TOLERANCE:
            raise BgmatteError(f"{path}: a colour image, not a matte: its channels differ by up to "
                               f"{spread * 255:.0f}/255 (a matte is grey, or the alpha channel of an RGBA file)")
        matte = colour.mean(axis=2, dtype=np.float32)
    else:
        matte = image.astype(np.float32)
    if full != 1.0:
        return matte / np.float32(full)
    if not np.isfinite(matte).all():
        raise BgmatteError(f"{path}: a float matte holding NaN or infinite values")
    low, high = float(matte.min()), float(matte.max())
    if low < -MATTE_TOLERANCE or high > 1.0 + MATTE_TOLERANCE:
        raise BgmatteError(f"{path}: a float matte must hold values from 0 to 1, but this one goes from {low:g} "
                           f"to {high:g}" + (" (0-255 stored as float? divide by 255)" if high > 2.0 else ""))
    return matte.clip(0.0, 1.0)


_HEADER_BYTES = 16384
"""How much of a file `header_size` reads first: enough for the header of every format in `_FORMATS`, except a
JPEG whose size comes after a large EXIF or ICC block, or a TIFF whose directory is further on."""
_HEADER_BYTES_MAX = 262144
"""How much `header_size` reads at most from a file other than a JPEG before it gives up on the size."""


def header_size(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) of an image file as stored, from its header alone: the refusals `read_image` makes before
    it decodes (no such file, an empty file, over `max_pixels`, a size the header does not give).

    Only the file's first bytes are read: a JPEG's segments are followed by their lengths, reading each one's
    marker alone, to the one holding the size; any other file is read up to `_HEADER_BYTES_MAX`, and None says
    its size lies further on (decoding the file is then the way to learn it). Damage past the header is not seen.
    """
    path = Path(path)
    data = _read_bytes(path, "image", limit=_HEADER_BYTES)
    if data and image_header_size(data) is None and len(data) == _HEADER_BYTES:
        if data[:2] == b"\xff\xd8":
            size = _walk_jpeg(path)[0]
            if size is not None:
                data = b"\xff\xd8\xff\xc0\x00\x0b\x08" + struct.pack(">HH", size[1], size[0])  # that SOF alone
        else:
            data = _read_bytes(path, "image", limit=_HEADER_BYTES_MAX)
            if image_header_size(data) is None and len(data) == _HEADER_BYTES_MAX and _recognise(data) is not None:
                return None
    size, kind = _checked_header(path, data, max_pixels)
    if size is None:
        if kind == "PNG":
            raise BgmatteError(f"{path}: damaged or truncated PNG")
        _refuse_unsized(path, kind)
    return size


def exif_orientation(path: str | os.PathLike) -> int | None:
    """A JPEG's EXIF orientation (1 to 8; 1, upright, when it has none), read from its segment headers; None for
    other formats, whose orientation only decoding tells (OpenCV applies it to PNG and WebP files too)."""
    found = _jpeg_header(Path(path))
    return None if found is None else found[1]


def _jpeg_header(path: Path) -> tuple[tuple[int, int] | None, int] | None:
    """`_walk_jpeg`'s size and orientation for a JPEG file; None for any other."""
    return _walk_jpeg(path) if _read_bytes(path, "image", limit=2) == b"\xff\xd8" else None


def _walk_jpeg(path: Path) -> tuple[tuple[int, int] | None, int]:
    """The size in a JPEG's start-of-frame segment (None if the file ends first) and its EXIF orientation,
    found by seeking from segment to segment: only markers, lengths and the start of an EXIF block are read,
    never the rest of a large EXIF, ICC or thumbnail block."""
    orientation, stray = 1, 0
    try:
        with path.open("rb", buffering=0) as file:  # unbuffered: a seek past a block reads none of it
            file.seek(2)
            while True:
                byte = file.read(1)
                if not byte:
                    return None, orientation
                if byte != b"\xff":  # stray bytes before a marker, which libjpeg skips as well
                    stray += 1
                    if stray > _HEADER_BYTES:  # not a header any more
                        return None, orientation
                    continue
                marker = file.read(1)
                while marker == b"\xff":  # fill bytes
                    marker = file.read(1)
                if not marker:
                    return None, orientation
                code = marker[0]
                if code in (0xD9, 0xDA):  # the image's end, or its data, before any start-of-frame: damaged
                    return None, orientation
                if code in (0x01, *range(0xD0, 0xD9)):  # markers without a length
                    continue
                head = file.read(2)
                if len(head) < 2:
                    return None, orientation
                (length,) = struct.unpack(">H", head)
                if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
                    frame = file.read(5)
                    if len(frame) < 5:
                        return None, orientation
                    height, width = struct.unpack(">HH", frame[1:5])
                    return (width, height), orientation
                body = b""
                if code == 0xE1:  # APP1: the orientation tag sits in the first directory, near its start
                    body = file.read(min(max(length - 2, 0), 4096))
                    orientation = _exif_orientation(body) or orientation
                file.seek(length - 2 - len(body), os.SEEK_CUR)
    except OSError as exc:
        raise BgmatteError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _exif_orientation(block: bytes) -> int | None:
    """The orientation tag (0x0112) of an APP1 block's first EXIF directory, or None."""
    if block[:6] != b"Exif\x00\x00" or block[6:8] not in (b"II", b"MM"):
        return None
    tiff = block[6:]
    endian = "<" if tiff[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack(endian + "I", tiff[4:8])
        (count,) = struct.unpack(endian + "H", tiff[offset : offset + 2])
        for index in range(count):
            entry = tiff[offset + 2 + 12 * index : offset + 14 + 12 * index]
            tag, kind = struct.unpack(endian + "HH", entry[:4])
            if tag == 0x0112 and kind == 3:
                (value,) = struct.unpack(endian + "H", entry[8:10])
                return value if 1 <= value <= 8 else None
    except struct.error:
        return None
    return None


def read_to_fit(path: str | os.PathLike, size: tuple[int, int] | None, **options) -> np.ndarray:
    """`read_image`'s pixels turned upright by the file's EXIF orientation, unless only the pixels as stored
    are `size` (width, height): then those. A photo and the matte drawn for it line up either way: a matte drawn
    in an editor that honours EXIF is upright, one made from the stored pixels is not; where both fit (a square
    photo, a flip), upright wins, as every viewer shows it so. `options` are `read_image`'s, less `orient`."""
    found = _jpeg_header(Path(path)) if size is not None else None
    if found is not None and found[0] is not None:  # a JPEG's header gives both sizes: one decode
        stored, orientation = found
        upright = (stored[1], stored[0]) if orientation >= 5 else stored
        return read_image(path, orient=not (tuple(size) == stored != upright), **options)
    image = read_image(path, **options)
    if size is None or (image.shape[1], image.shape[0]) == tuple(size):
        return image
    stored = read_image(path, orient=False, **options)
    return stored if (stored.shape[1], stored.shape[0]) == tuple(size) else image


def _checked_header(path: Path, data: bytes, max_pixels: int | None) -> tuple[tuple[int, int] | None, str | None]:
    """The size the header gives (None if it gives none) and the format's name, once an empty file and one
    above `max_pixels` are refused."""
    if not data:
        raise BgmatteError(f"{path}: empty file (0 bytes), not an image")
    size = image_header_size(data)
    if size is not None:
        _check_pixels(path, size, max_pixels)
    return size, _format_name(data)


def _decode(path: Path, flags: int, max_pixels: int | None) -> np.ndarray:
    """The pixels OpenCV decodes from a file with `flags`, after the checks that need no decoding (the pixel
    limit, from the header, first); every failure is one line naming the file."""
    return _decode_with_profile(path, flags, max_pixels, profile=False)[0]


def _decode_with_profile(path: Path, flags: int, max_pixels: int | None, *,
                         profile: bool) -> tuple[np.ndarray, bytes | None]:
    """`_decode`'s pixels and, if `profile` is asked for, the ICC profile OpenCV finds while decoding them (None
    if it finds none, or is not asked)."""
    data = _read_bytes(path, "image")
    size, kind = _checked_header(path, data, max_pixels)
    if kind == "PNG" and not _png_complete(data):
        # libpng would print its own complaint on stderr before failing; say it once, here.
        raise BgmatteError(f"{path}: damaged or truncated PNG")
    if size is None and max_pixels is not None:
        _refuse_unsized(path, kind)
    said: list[str] = []
    found: list[bytes] = []
    with_metadata = profile and hasattr(cv2, "imdecodeWithMetadata")  # not in older OpenCV versions

    def decode(flags: int) -> np.ndarray | None:
        if not with_metadata:
            return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        image, kinds, metadata = cv2.imdecodeWithMetadata(np.frombuffer(data, np.uint8), flags)
        found[:] = [np.asarray(block, np.uint8).tobytes() for kind, block in zip(kinds, metadata)
                    if kind == cv2.IMAGE_METADATA_ICCP]
        return image

    try:
        with _decoder_messages(said):
            image = decode(flags)
        colour_at_any_depth = flags >= 0 and flags & cv2.IMREAD_COLOR and flags & cv2.IMREAD_ANYDEPTH
        if image is None and kind == "TIFF" and colour_at_any_depth:
            # OpenCV decodes a one-channel float TIFF only in its own channel count; `read_image` makes it RGB.
            with _decoder_messages(said):
                image = decode((flags & ~cv2.IMREAD_COLOR) | cv2.IMREAD_ANYCOLOR)
    except cv2.error as exc:
        _pass_on(path, said, logging.DEBUG)  # the error line below says what went wrong; --debug shows these
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise BgmatteError(f"{path}: larger than {_opencv_pixel_limit()}, the limit for images "
                               "(refused as a possible decompression bomb)") from None
        raise BgmatteError(f"{path}: cannot decode this image ({str(exc).strip().splitlines()[-1]})") from None
    _pass_on(path, said, logging.DEBUG if image is None else logging.WARNING)  # read: warnings about this file
    if image is None:
        if kind in ("PNG", "JPEG"):  # OpenCV's decoders for these read every ordinary file
            raise BgmatteError(f"{path}: damaged or truncated {kind}")
        if kind is not None:
            raise BgmatteError(f"{path}: cannot decode this {kind} file (damaged, truncated, or a variant "
                               "OpenCV does not read)")
        raise BgmatteError(f"{path}: not an image file OpenCV can read")
    if size is None:
        _check_pixels(path, (image.shape[1], image.shape[0]), max_pixels)
    return image, (found[0] or None) if found else None


def _pass_on(path: Path, said: list[str], level: int) -> None:
    """Log each distinct line a decoder printed (`_decoder_messages`) once, naming the file."""
    for line in dict.fromkeys(said):
        logger.log(level, "%s: %s", path, line)


_STDERR = threading.Lock()


@contextmanager
def _decoder_messages(said: list[str]) -> Iterator[None]:
    """Add to `said` the lines C code prints on stderr (file descriptor 2) meanwhile: libjpeg's and libpng's
    warnings ('Corrupt JPEG data: ...', 'libpng warning: iCCP: ...') go there unasked and name no file. Other
    threads' stderr output in those few milliseconds is held too; where fd 2 cannot be copied, nothing is held."""
    with _STDERR:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        try:
            with tempfile.TemporaryFile() as sink:
                if sys.stderr is not None:
                    sys.stderr.flush()
                os.dup2(sink.fileno(), 2)
                try:
                    yield
                finally:
                    os.dup2(saved, 2)
                    sink.seek(0)
                    said.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines()
                                if line.strip())
        finally:
            os.close(saved)


def _refuse_unsized(path: Path, kind: str | None) -> None:
    """Refuse a file whose size could not be read from its header: decoding it is the only way OpenCV offers
    to learn its size, and that would allocate the pixels of a decompression bomb before any check."""
    if kind == "JPEG":  # libjpeg cannot decode without the start-of-frame segment the header walk looks for
        raise BgmatteError(f"{path}: damaged or truncated JPEG")
    if kind is not None:
        raise BgmatteError(f"{path}: the size in its {kind} header cannot be read (damaged, or a variant "
                           "bgmatte does not parse); not decoded, so that the pixel limit holds")
    if not cv2.haveImageReader(str(path)):  # looks at the file's signature only
        raise BgmatteError(f"{path}: not an image file OpenCV can read")
    raise BgmatteError(f"{path}: the size of this kind of image cannot be checked before decoding, so it is "
                       f"refused under the pixel limit (checked: {_SIZED_FORMATS}; convert it to one of them)")


def _read_bytes(path: Path, what: str, limit: int | None = None) -> bytes:
    """The file's bytes (its first `limit` bytes if given); a file that cannot be read is one line."""
    try:
        if limit is None:
            return path.read_bytes()
        with path.open("rb") as file:
            return file.read(limit)
    except FileNotFoundError:
        raise BgmatteError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise BgmatteError(f"{path}: is a folder, not an {what} file") from None
    except PermissionError:
        raise BgmatteError(f"{path}: permission denied") from None
    except OSError as exc:
        raise BgmatteError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _png_complete(data: bytes) -> bool:
    """Whether a PNG's chunks all fit in its bytes up to an IEND chunk: a cut-off file fails this."""
    position = 8
    while position + 12 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        position += 12 + length
        if kind == b"IEND":
            return position <= len(data)
    return False


def _opencv_pixel_limit() -> str:
    """OpenCV's decoder limit as set in the environment, for a message ("100 megapixels")."""
    value = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "")
    return f"{megapixels(int(value))} megapixels" if value.isdigit() else "OpenCV's pixel limit"


def megapixels(pixels: int) -> str:
    """A pixel count in megapixels, exact ("100.01"), for a limit said alone; beside a count above it, see
    `megapixels_above`."""
    return format(Decimal(pixels).scaleb(-6).normalize(), "f")


def _megapixels_to(pixels: int, digits: int) -> str:
    """A pixel count in megapixels to ``digits`` significant digits, without trailing zeros ("10000", "0.006144")."""
    value = Decimal(pixels).scaleb(-6)
    if value:
        value = value.quantize(Decimal(1).scaleb(value.adjusted() - digits + 1), rounding=ROUND_HALF_EVEN)
    return format(value.normalize(), "f")


def megapixels_above(pixels: int, limit: int) -> str:
    """How ``pixels`` exceed ``limit``, in megapixels to 4 significant digits ("10000 megapixels, above the limit of
    100" for 99999x99999, not 9999.800001), or to as many more as it takes for the count to read above the limit
    ("100.01" for 10000x10001, which rounded would read as the limit itself). Rounding to the same digits keeps their
    order, so the count never reads below the limit either."""
    for digits in range(4, 40):
        shown, bound = _megapixels_to(pixels, digits), _megapixels_to(limit, digits)
        if Decimal(shown) > Decimal(bound):
            break
    return f"{shown} megapixels, above the limit of {bound}"


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BgmatteError(
            f"{path}: {width}x{height} is {megapixels_above(width * height, max_pixels)} (refused as a possible "
            "decompression bomb)"
        )
    if width == 0 or height == 0:
        raise BgmatteError(f"{path}: the image is empty ({width}x{height})")


def write_png(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = False,
              icc_profile: bytes | None = None) -> Path:
    """Write an 8-bit PNG (grey, RGB or straight RGBA; uint8, or float in [0, 1]) to a temporary name, then rename
    it. Float RGBA pixels whose alpha rounds to 0 are stored with colour 0. `icc_profile` (from
    `read_image_and_profile`) is stored in an iCCP chunk by OpenCV's ``imencodeWithMetadata``, so that viewers
    show the colours in the colour space they were taken in; one that libpng refuses (damaged), or an older OpenCV
    without that function, leaves the PNG untagged, with a warning. Without a profile the PNG is ``imencode``'s."""
    path = Path(path)
    refuse_existing(path, overwrite)
    pixels = _png_pixels(image)
    encoded = _png_with_profile(path, pixels, icc_profile) if icc_profile else None
    if encoded is None:
        ok, encoded = cv2.imencode(".png", pixels)
        if not ok:
            raise BgmatteError(f"{path}: PNG encoding failed")
    write_through_temporary(path, lambda temporary: temporary.write_bytes(encoded.tobytes()), "the image")
    return path


def _png_with_profile(path: Path, pixels: np.ndarray, profile: bytes) -> np.ndarray | None:
    """The PNG encoding of `pixels` with `profile` in its iCCP chunk, or None (after a warning) where it cannot be
    stored."""
    if not hasattr(cv2, "imencodeWithMetadata"):
        logger.warning("%s: written without the photo's ICC profile (OpenCV %s cannot store one)", path,
                       cv2.__version__)
        return None
    said: list[str] = []
    try:
        with _decoder_messages(said):  # libpng's "ICC profile too short" and OpenCV's error line go there
            ok, encoded = cv2.imencodeWithMetadata(".png", pixels, [cv2.IMAGE_METADATA_ICCP],
                                                   [np.frombuffer(profile, np.uint8)])
    except cv2.error:
        ok = False
    if ok:
        _pass_on(path, said, logging.WARNING)
        return encoded
    _pass_on(path, said, logging.DEBUG)
    logger.warning("%s: written without the photo's ICC profile, which libpng refuses as damaged", path)
    return None


def _png_pixels(image: np.ndarray) -> np.ndarray:
    """The array OpenCV's PNG encoder wants: uint8, BGR(A) channel order."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"PNG pixels must be uint8 or float in [0, 1], not {image.dtype}")
        image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        if image.ndim == 3 and image.shape[2] == 4:
            from bgmatte.composite import clear_transparent

            clear_transparent(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    raise ValueError(f"PNG pixels must be (H, W), (H, W, 3) or (H, W, 4), not {image.shape}")


def natural_key(name: str) -> tuple:
    """Sort key that orders digits by value, so that frame2 comes before frame10."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.casefold()) for part in re.split(r"(\d+)", name))


def list_images(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The image files directly in `folder`, or anywhere under it with `recursive` (by extension), in natural
    order. Hidden files and folders are skipped: names starting with ".", such as the "._NAME" files macOS
    leaves beside every file it copies to other disks, which are not images."""
    folder = Path(folder)
    if not folder.exists():
        raise BgmatteError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise BgmatteError(f"{folder}: is not a folder")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        entry
        for entry in found
        if entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file()
        and not any(part.startswith(".") for part in entry.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda entry: natural_key(str(entry.relative_to(folder))))


def by_stem(paths: Iterable[Path], why: str = "files are matched by name") -> dict[str, Path]:
    """The files by stem (``0001`` for ``0001.png``), refusing two of one stem, ``why`` saying why it matters."""
    found: dict[str, Path] = {}
    for path in paths:
        path = Path(path)
        if path.stem in found:
            first = found[path.stem]
            second = path.name if path.parent == first.parent else path  # the folder only where it tells them apart
            raise BgmatteError(f"{path}: two images named {path.stem!r} ({first} and {second}): {why}")
        found[path.stem] = path
    return found


def match_by_stem(sources: Sequence[Path], plates: Iterable[Path]) -> list[tuple[Path, Path]]:
    """Pair each source with the plate of the same file stem (case-insensitive if no exact match)."""
    plates = [Path(plate) for plate in plates]
    by_name: dict[str, Path] = {}
    by_folded: dict[str, list[Path]] = {}
    for plate in plates:
        if plate.stem in by_name:
            raise BgmatteError(f"{plate}: two plates share the name {plate.stem!r} ({by_name[plate.stem].name} and {plate.name})")
        by_name[plate.stem] = plate
        by_folded.setdefault(plate.stem.casefold(), []).append(plate)
    pairs: list[tuple[Path, Path]] = []
    missing: list[str] = []
    for source in sources:
        source = Path(source)
        plate = by_name.get(source.stem)
        if plate is None and len(by_folded.get(source.stem.casefold(), [])) == 1:
            plate = by_folded[source.stem.casefold()][0]
        if plate is None:
            missing.append(source.name)
        else:
            pairs.append((source, plate))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        folders = {plate.parent for plate in plates}
        where = f" in {folders.pop()}" if len(folders) == 1 else ""
        raise BgmatteError(f"no plate with the same name{where} for {shown}")
    return pairs
