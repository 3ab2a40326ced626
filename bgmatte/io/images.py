"""Still images: reading with a decompression-bomb limit, atomic PNG writing, folder listing and plate matching.

The pixel limit is checked before decoding: the file's bytes are read once, its header is parsed here
for PNG, JPEG, BMP, GIF, WebP and TIFF (width and height sit at known places in all of them), and only
then are the same bytes handed to OpenCV. A format whose header is not understood is decoded first and
checked after; OpenCV's own limit (``OPENCV_IO_MAX_IMAGE_PIXELS``, 2**30 by default) still bounds that
decode.
"""
from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from bgmatte.errors import BgmatteError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_MAX_PIXELS = 100_000_000


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, BMP, GIF, WebP or TIFF file's bytes; None if unknown."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG segments to the first start-of-frame marker, which holds the size."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
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
    endian = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(endian + "I", data[4:8])
    (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
    found: dict[int, int] = {}
    for index in range(count):
        entry = data[offset + 2 + 12 * index : offset + 14 + 12 * index]
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag in (256, 257):
            found[tag] = struct.unpack(endian + ("H" if kind == 3 else "I"), entry[8 : 10 if kind == 3 else 12])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def read_image(path: str | os.PathLike, *, dtype: str = "uint8", channels: int = 3,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as upright (H, W, 3) RGB, or (H, W) grey with channels=1, uint8 or float32 in [0, 1];
    refuse files above `max_pixels`.

    EXIF orientation is applied, grey images become three channels (colour ones grey with channels=1),
    alpha is dropped, and with dtype="float32" 16-bit files keep their precision.
    """
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"dtype must be 'uint8' or 'float32', not {dtype!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    path = Path(path)
    data = _read_bytes(path, "image")
    size = image_header_size(data)
    if size is not None:
        _check_pixels(path, size, max_pixels)
    flags = (cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE) | (cv2.IMREAD_ANYDEPTH if dtype == "float32" else 0)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        raise BgmatteError(f"{path}: cannot decode this image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise BgmatteError(f"{path}: not an image file OpenCV can read")
    if size is None:
        _check_pixels(path, (image.shape[1], image.shape[0]), max_pixels)
    if channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if dtype == "uint8":
        return image
    scale = 65535.0 if image.dtype == np.uint16 else 255.0 if image.dtype == np.uint8 else 1.0
    return (image.astype(np.float32) / scale).clip(0.0, 1.0) if scale != 1.0 else image.astype(np.float32)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BgmatteError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise BgmatteError(f"{path}: is a folder, not an {what} file") from None
    except PermissionError:
        raise BgmatteError(f"{path}: permission denied") from None
    except OSError as exc:
        raise BgmatteError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BgmatteError(
            f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.0f} (refused as a possible decompression bomb)"
        )
    if width == 0 or height == 0:
        raise BgmatteError(f"{path}: the image is empty ({width}x{height})")


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread writes
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_umask()


def default_file_mode() -> int:
    """The permissions a newly created file gets under the umask (0o644 under the usual 022): temporary files
    are created private, and outputs renamed from them should not stay that way."""
    return _FILE_MODE


def write_png(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write an 8-bit PNG (grey, RGB or RGBA; uint8, or float in [0, 1]) to a temporary name, then rename it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BgmatteError(f"{path}: already exists (pass overwrite=True, or --overwrite, to replace it)")
    pixels = _png_pixels(image)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise BgmatteError(f"{path}: PNG encoding failed")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.png", dir=folder)
    except FileNotFoundError:
        raise BgmatteError(f"{path}: the folder {folder} does not exist") from None
    except PermissionError:
        raise BgmatteError(f"{path}: cannot write in {folder} (permission denied)") from None
    try:
        os.fchmod(handle, default_file_mode())
        with os.fdopen(handle, "wb") as file:
            file.write(encoded.tobytes())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _png_pixels(image: np.ndarray) -> np.ndarray:
    """The array OpenCV's PNG encoder wants: uint8, BGR(A) channel order."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"PNG pixels must be uint8 or float in [0, 1], not {image.dtype}")
        image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
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


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder` (by extension, hidden files skipped), in natural order."""
    folder = Path(folder)
    if not folder.exists():
        raise BgmatteError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise BgmatteError(f"{folder}: is not a folder")
    files = [
        entry
        for entry in folder.iterdir()
        if entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.name.startswith(".") and entry.is_file()
    ]
    return sorted(files, key=lambda entry: natural_key(entry.name))


def match_by_stem(sources: Sequence[Path], plates: Iterable[Path]) -> list[tuple[Path, Path]]:
    """Pair each source with the plate of the same file stem (case-insensitive if no exact match)."""
    plates = [Path(plate) for plate in plates]
    by_stem: dict[str, Path] = {}
    by_folded: dict[str, list[Path]] = {}
    for plate in plates:
        if plate.stem in by_stem:
            raise BgmatteError(f"{plate}: two plates share the name {plate.stem!r} ({by_stem[plate.stem].name} and {plate.name})")
        by_stem[plate.stem] = plate
        by_folded.setdefault(plate.stem.casefold(), []).append(plate)
    pairs: list[tuple[Path, Path]] = []
    missing: list[str] = []
    for source in sources:
        source = Path(source)
        plate = by_stem.get(source.stem)
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
