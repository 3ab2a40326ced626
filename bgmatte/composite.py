"""Compositing as pure functions: over a colour, an image or a blurred source; RGBA; premultiplication.

Every function takes numpy arrays or torch tensors (one kind in one call) and returns the same kind. Layouts follow
each library's habit: numpy images are channels-last (..., H, W, C), torch tensors channels-first
(..., C, H, W). Values are floats in [0, 1]; `pha` may have one channel or none (then it is
broadcast). Shapes, channel counts and dtypes are checked (a `ValueError` or `TypeError` naming the argument);
the values of images are not, since that would take a pass over every frame. `parse_target_background` turns a
user's `--target-bgr` text into a `TargetBackground`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bgmatte.errors import BgmatteError

Array = TypeVar("Array", np.ndarray, torch.Tensor)
Colour = tuple[float, float, float]

# A few names people type; "green" is the screen green (0, 255, 0), as the tool's users mean it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
}


def _channel_axis(x: np.ndarray | torch.Tensor) -> int:
    return -3 if isinstance(x, torch.Tensor) else -1


def _check_kind(x: object, name: str, fgr: np.ndarray | torch.Tensor) -> None:
    """Refuse `x` unless it is the same kind as `fgr` (both numpy arrays or both torch tensors): their layouts
    differ, so a mix cannot be composited pixel for pixel."""
    if isinstance(x, torch.Tensor) != isinstance(fgr, torch.Tensor):
        kinds = ("a torch tensor", "a numpy array")
        first, second = kinds if isinstance(x, torch.Tensor) else kinds[::-1]
        raise TypeError(f"{name} is {first} but fgr {second}: pass both as one kind")


def _check_float(x: np.ndarray | torch.Tensor, name: str) -> None:
    if not (x.dtype.is_floating_point if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"{name} must hold floats in [0, 1], not {x.dtype}")


def _layout(x: np.ndarray | torch.Tensor, channels: int | str) -> str:
    """The layout an argument should have, for messages: (..., H, W, 3) for numpy, (..., 3, H, W) for torch."""
    return f"(..., {channels}, H, W)" if isinstance(x, torch.Tensor) else f"(..., H, W, {channels})"


def _check_channels(x: np.ndarray | torch.Tensor, name: str, channels: int) -> None:
    """Refuse `x` unless it has `channels` channels on its channel axis (shape only: no cost per pixel)."""
    axis = _channel_axis(x)
    if x.ndim < -axis or x.shape[axis] != channels:
        raise ValueError(f"{name} must have {channels} channel{'s' if channels > 1 else ''}, "
                         f"{_layout(x, channels)}, not shape {tuple(x.shape)}")


def _check_fits(x: np.ndarray | torch.Tensor, name: str, fgr: np.ndarray | torch.Tensor, expected: str,
                channels: int | None = None) -> None:
    """Refuse `x` (`expected` saying what it should be) unless it broadcasts to fgr's shape (its size, or 1 on an
    axis) without enlarging it, and has `channels` channels when given."""
    try:
        fits = tuple(np.broadcast_shapes(tuple(x.shape), tuple(fgr.shape))) == tuple(fgr.shape)
    except ValueError:
        fits = False
    if channels is not None and (x.ndim < fgr.ndim or x.shape[_channel_axis(fgr)] != channels):
        fits = False
    if not fits:
        raise ValueError(f"{name} must be {expected}, not shape {tuple(x.shape)}")


def _alpha_like(pha: Array, fgr: Array) -> Array:
    """Give `pha` a channel axis of size 1 when it has none, so that it broadcasts over fgr's channels; refuse a
    `pha` with more than one channel or of another size than `fgr`, which would not composite pixel for pixel."""
    _check_channels(fgr, "fgr", 3)
    _check_kind(pha, "pha", fgr)
    if pha.ndim == fgr.ndim - 1:
        pha = pha.unsqueeze(-3) if isinstance(pha, torch.Tensor) else pha[..., None]
    _check_fits(pha, "pha", fgr, f"{_layout(fgr, 1)} (or without the channel axis) with the H and W of fgr's "
                f"shape {tuple(fgr.shape)}", channels=1)
    return pha


def colour_like(colour: Colour, like: Array) -> Array:
    """A float RGB colour shaped to broadcast over images like `like` (numpy (3,), torch (3, 1, 1)); a colour that is
    not three numbers in [0, 1] is refused (0-255 values are the likely mistake)."""
    _check_colour(colour, "colour")
    if isinstance(like, torch.Tensor):
        dtype = like.dtype if like.dtype.is_floating_point else torch.float32
        return torch.tensor(colour, dtype=dtype, device=like.device).view(3, 1, 1)
    return np.asarray(colour, dtype=like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)


def _check_colour(colour: Sequence[float], name: str) -> None:
    """Refuse a colour that is not three numbers in [0, 1]."""
    if len(colour) != 3 or not all(0.0 <= value <= 1.0 for value in colour):
        hint = " (for 0-255 values, divide by 255)" if len(colour) == 3 and max(colour) > 1 else ""
        raise ValueError(f"{name} must be an RGB colour of 3 floats in [0, 1], not {tuple(colour)}{hint}")


def composite(fgr: Array, pha: Array, bgr: Array | Colour) -> Array:
    """The over operation: `fgr * pha + bgr * (1 - pha)`, with `bgr` an image of fgr's size (or one that
    broadcasts to it, such as a single backdrop for a batch) or an RGB colour in [0, 1]."""
    _check_float(fgr, "fgr")
    _check_float(pha, "pha")
    pha = _alpha_like(pha, fgr)
    if isinstance(bgr, tuple | list):
        _check_colour(bgr, "bgr")
        bgr = colour_like(tuple(bgr), fgr)
    else:
        _check_kind(bgr, "bgr", fgr)
        _check_float(bgr, "bgr")
        _check_fits(bgr, "bgr", fgr, f"an image of fgr's shape {tuple(fgr.shape)} (or one that broadcasts to it)")
    return fgr * pha + bgr * (1 - pha)


def to_rgba(fgr: Array, pha: Array, *, premultiplied: bool = False) -> Array:
    """Stack foreground colour and alpha into RGBA (straight alpha unless `premultiplied`)."""
    _check_float(fgr, "fgr")
    _check_float(pha, "pha")
    pha = _alpha_like(pha, fgr)
    colour = fgr * pha if premultiplied else fgr
    if isinstance(fgr, torch.Tensor):
        return torch.cat([colour, pha.to(colour.dtype)], dim=-3)
    return np.concatenate([colour, pha.astype(colour.dtype, copy=False)], axis=-1)


def _split_rgba(rgba: Array) -> tuple[Array, Array]:
    _check_channels(rgba, "rgba", 4)
    if isinstance(rgba, torch.Tensor):
        return rgba[..., :3, :, :], rgba[..., 3:, :, :]
    return rgba[..., :3], rgba[..., 3:]


def clear_transparent(rgba: Array) -> Array:
    """Set to 0, in place, the colour of straight RGBA pixels whose stored alpha is 0, and return `rgba`. Those
    pixels are invisible and would only carry (and leak) the colour of what was there; apply it once alpha is
    quantised (`to_uint8`), since an alpha above 0 may round to 0."""
    colour, alpha = _split_rgba(rgba)
    if isinstance(rgba, torch.Tensor):
        colour.masked_fill_(alpha == 0, 0)
    else:
        np.copyto(colour, 0, where=alpha == 0)
    return rgba


def premultiply(rgba: Array) -> Array:
    """Straight RGBA to premultiplied: colour times alpha."""
    _check_float(rgba, "rgba")
    colour, alpha = _split_rgba(rgba)
    if isinstance(rgba, torch.Tensor):
        return torch.cat([colour * alpha, alpha], dim=-3)
    return np.concatenate([colour * alpha, alpha], axis=-1)


def unpremultiply(rgba: Array, eps: float = 1e-6) -> Array:
    """Premultiplied RGBA back to straight; fully transparent pixels get black colour instead of a division by 0."""
    _check_float(rgba, "rgba")
    colour, alpha = _split_rgba(rgba)
    if isinstance(rgba, torch.Tensor):
        straight = torch.where(alpha > eps, colour / alpha.clamp_min(eps), torch.zeros_like(colour)).clamp(0, 1)
        return torch.cat([straight, alpha], dim=-3)
    with np.errstate(divide="ignore", invalid="ignore"):
        straight = np.where(alpha > eps, colour / np.maximum(alpha, eps), 0).clip(0, 1).astype(colour.dtype)
    return np.concatenate([straight, alpha], axis=-1)


def default_blur_sigma(height: int, width: int) -> float:
    """A background blur that reads as 'out of focus' at any resolution: 2% of the longer side."""
    return 0.02 * max(height, width)


def blur(src: Array, sigma: float | None = None) -> Array:
    """A strong Gaussian blur of `src` (sigma in pixels, default `default_blur_sigma`), for a 'blur' background.

    Large blurs are computed at reduced resolution and scaled back, which looks the same and keeps
    the cost small at any sigma.
    """
    _check_float(src, "src")
    if src.ndim < 3:
        raise ValueError(f"src must be an image, {_layout(src, 'C')}, not shape {tuple(src.shape)}")
    height, width = src.shape[-2:] if isinstance(src, torch.Tensor) else src.shape[-3:-1]
    sigma = default_blur_sigma(height, width) if sigma is None else float(sigma)
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number of pixels, not {sigma}")
    if sigma <= 0 or height == 0 or width == 0:
        return src
    factor = max(1, int(sigma // 2))
    small_size = (max(1, round(height / factor)), max(1, round(width / factor)))
    small_sigma = sigma / factor
    if isinstance(src, torch.Tensor):
        return _blur_torch(src, small_size, small_sigma)
    return _blur_numpy(src, small_size, small_sigma)


def _blur_numpy(src: np.ndarray, small_size: tuple[int, int], sigma: float) -> np.ndarray:
    if src.dtype == np.float16:  # OpenCV's Gaussian blur takes 32- and 64-bit floats only
        return _blur_numpy(src.astype(np.float32), small_size, sigma).astype(np.float16)
    if src.ndim != 3:
        return np.stack([_blur_numpy(image, small_size, sigma) for image in src])
    height, width = src.shape[:2]
    small = cv2.resize(src, (small_size[1], small_size[0]), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR).reshape(src.shape)


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur_torch(src: torch.Tensor, small_size: tuple[int, int], sigma: float) -> torch.Tensor:
    shape = src.shape
    images = src.reshape(-1, *shape[-3:])
    small = F.interpolate(images, size=small_size, mode="area") if small_size != tuple(shape[-2:]) else images
    kernel = _gaussian_kernel(sigma, src.dtype, src.device)
    radius = kernel.numel() // 2
    channels = small.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    mode = "reflect" if min(small.shape[-2:]) > radius else "replicate"
    small = F.conv2d(F.pad(small, (radius, radius, 0, 0), mode=mode), horizontal, groups=channels)
    small = F.conv2d(F.pad(small, (0, 0, radius, radius), mode=mode), vertical, groups=channels)
    out = F.interpolate(small, size=shape[-2:], mode="bilinear", align_corners=False) if small_size != tuple(shape[-2:]) else small
    return out.reshape(shape)


def to_uint8(x: Array) -> Array:
    """Floats in [0, 1] to uint8 by rounding (values outside are clipped); uint8 is returned as it is, and booleans
    are 0 or 255. Other integers are refused: whether they mean 0-255 or 0-1 cannot be told."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.uint8:
            return x
        if x.dtype == torch.bool:
            return x.to(torch.uint8) * 255
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must hold floats in [0, 1] or be uint8, not {x.dtype}")
        return (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        raise TypeError(f"x must hold floats in [0, 1] or be uint8, not {x.dtype}")
    return np.rint(np.clip(x * 255.0, 0, 255)).astype(np.uint8)


@dataclass(frozen=True)
class TargetBackground:
    """What to composite onto: a colour (0-255 RGB), the blurred source, transparency, an image or a video."""

    kind: Literal["colour", "blur", "transparent", "image", "video"]
    colour: tuple[int, int, int] | None = None
    path: Path | None = None

    @property
    def rgb(self) -> Colour:
        """The colour as floats in [0, 1] (only for kind 'colour')."""
        if self.colour is None:
            raise ValueError(f"a {self.kind} background has no colour")
        return (self.colour[0] / 255.0, self.colour[1] / 255.0, self.colour[2] / 255.0)


_HEX = re.compile(r"#?(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


def parse_target_background(spec: str) -> TargetBackground:
    """Read a target background: a colour name, #RRGGBB, #RGB or R,G,B; 'blur'; 'transparent'; an image or video path.

    A path is classified by its extension, and must exist. Bare hex (00ff00) is accepted because the
    shell treats an unquoted # as a comment.
    """
    from bgmatte.io.images import IMAGE_EXTENSIONS
    from bgmatte.io.video import VIDEO_EXTENSIONS

    text = spec.strip()
    word = text.lower()
    if word == "blur":
        return TargetBackground("blur")
    if word in ("transparent", "none", "alpha"):
        return TargetBackground("transparent")
    if word in COLOURS:
        return TargetBackground("colour", colour=COLOURS[word])
    path = Path(text).expanduser()
    if _HEX.fullmatch(text) and (text.startswith("#") or not path.exists()):
        digits = text.lstrip("#")
        if len(digits) == 3:
            digits = "".join(digit * 2 for digit in digits)
        return TargetBackground("colour", colour=(int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)))
    triple = re.fullmatch(r"\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*", text)
    if triple:
        values = tuple(int(value) for value in triple.groups())
        if max(values) > 255:
            raise BgmatteError(f"target background {spec!r}: colour values go from 0 to 255")
        return TargetBackground("colour", colour=values)  # type: ignore[arg-type]
    if not path.exists() and re.fullmatch(r"\s*[-+]?[\d.]+(?:\s*,\s*[-+]?[\d.]+)+\s*", text):
        # Numbers and commas alone mean a colour, not a file name: say how one is written rather than "no such file".
        raise BgmatteError(f"target background {spec!r}: a colour is R,G,B, three whole numbers from 0 to 255")
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in IMAGE_EXTENSIONS:
            return TargetBackground("image", path=path)
        if suffix in VIDEO_EXTENSIONS:
            return TargetBackground("video", path=path)
        raise BgmatteError(f"{path}: cannot tell from the extension whether this background is an image or a video")
    if path.is_dir():
        raise BgmatteError(f"{path}: a target background must be a file, not a folder")
    if suffix or "/" in text or "\\" in text:
        raise BgmatteError(f"{path}: no such file (for the target background)")
    raise BgmatteError(
        f"target background {spec!r} is not a colour name ({', '.join(sorted(COLOURS))}), a hex colour "
        "(#RRGGBB), 'blur', 'transparent' or an image or video file"
    )
