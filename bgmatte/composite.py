"""Compositing as pure functions: over a colour, an image or a blurred source; RGBA; premultiplication.

Every function takes numpy arrays or torch tensors and returns the same kind. Layouts follow each
library's habit: numpy images are channels-last (..., H, W, C), torch tensors channels-first
(..., C, H, W). Values are floats in [0, 1]; `pha` may have one channel or none (then it is
broadcast). `parse_target_background` turns a user's `--target-bgr` text into a `TargetBackground`.
"""
from __future__ import annotations

import math
import re
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


def _check_float(x: np.ndarray | torch.Tensor, name: str) -> None:
    if not (x.dtype.is_floating_point if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"{name} must hold floats in [0, 1], not {x.dtype}")


def _alpha_like(pha: Array, fgr: Array) -> Array:
    """Give `pha` a channel axis of size 1 when it has none, so that it broadcasts over fgr's channels."""
    if pha.ndim == fgr.ndim - 1:
        return pha.unsqueeze(-3) if isinstance(pha, torch.Tensor) else pha[..., None]
    return pha


def colour_like(colour: Colour, like: Array) -> Array:
    """A float RGB colour shaped to broadcast over images like `like` (numpy (3,), torch (3, 1, 1))."""
    if isinstance(like, torch.Tensor):
        return torch.tensor(colour, dtype=like.dtype, device=like.device).view(3, 1, 1)
    return np.asarray(colour, dtype=like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)


def composite(fgr: Array, pha: Array, bgr: Array | Colour) -> Array:
    """The over operation: `fgr * pha + bgr * (1 - pha)`, with `bgr` an image or an RGB colour in [0, 1]."""
    _check_float(fgr, "fgr")
    _check_float(pha, "pha")
    pha = _alpha_like(pha, fgr)
    if isinstance(bgr, tuple | list):
        bgr = colour_like(tuple(bgr), fgr)
    else:
        _check_float(bgr, "bgr")
    return fgr * pha + bgr * (1 - pha)


def to_rgba(fgr: Array, pha: Array, *, premultiplied: bool = False) -> Array:
    """Stack foreground colour and alpha into RGBA (straight alpha unless `premultiplied`)."""
    _check_float(fgr, "fgr")
    pha = _alpha_like(pha, fgr)
    colour = fgr * pha if premultiplied else fgr
    if isinstance(fgr, torch.Tensor):
        return torch.cat([colour, pha.to(colour.dtype)], dim=-3)
    return np.concatenate([colour, pha.astype(colour.dtype, copy=False)], axis=-1)


def _split_rgba(rgba: Array) -> tuple[Array, Array]:
    axis = _channel_axis(rgba)
    if rgba.shape[axis] != 4:
        raise ValueError(f"expected 4 channels on axis {axis}, got shape {tuple(rgba.shape)}")
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
    colour, alpha = _split_rgba(rgba)
    if isinstance(rgba, torch.Tensor):
        return torch.cat([colour * alpha, alpha], dim=-3)
    return np.concatenate([colour * alpha, alpha], axis=-1)


def unpremultiply(rgba: Array, eps: float = 1e-6) -> Array:
    """Premultiplied RGBA back to straight; fully transparent pixels get black colour instead of a division by 0."""
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
    height, width = src.shape[-2:] if isinstance(src, torch.Tensor) else src.shape[-3:-1]
    sigma = default_blur_sigma(height, width) if sigma is None else float(sigma)
    if sigma <= 0:
        return src
    factor = max(1, int(sigma // 2))
    small_size = (max(1, round(height / factor)), max(1, round(width / factor)))
    small_sigma = sigma / factor
    if isinstance(src, torch.Tensor):
        return _blur_torch(src, small_size, small_sigma)
    return _blur_numpy(src, small_size, small_sigma)


def _blur_numpy(src: np.ndarray, small_size: tuple[int, int], sigma: float) -> np.ndarray:
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
    """Floats in [0, 1] to uint8 by rounding (values outside are clipped)."""
    if isinstance(x, torch.Tensor):
        return (x * 255).round_().clamp_(0, 255).to(torch.uint8) if x.dtype.is_floating_point else x.to(torch.uint8)
    if x.dtype == np.uint8:
        return x
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
