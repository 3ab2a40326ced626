"""Re-solving alpha against the plate: the compositing equation, used where the network hesitates.

With a clean plate B, a frame I and a foreground colour F, the matte follows from I = aF + (1 - a)B by
projecting I - B on F - B. The network's own alpha is soft at edges and misses faint hair and veils;
near the subject, where the foreground colour can be borrowed from nearby solid pixels, the projection is
sharper. It is trusted in proportion to how far F is from B, and less when the frame and the plate differ
in the far background too (a drifting or misaligned plate, sensor noise), so a poor plate falls back on the
network. Pure tensor operations: it runs on any device and dtype, inside or after the model.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduced_blur(parts: List[Tensor], sigma: float) -> Tuple[Tensor, int]:
    """A separable Gaussian blur of (B, C, H, W) tensors joined along C, edges mirrored, and the factor it was
    computed at: a wide kernel runs on 4x average-pooled copies (the result is smooth, so the lower
    resolution loses nothing; the parts are joined after pooling, which is cheaper)."""
    height, width = parts[0].shape[2], parts[0].shape[3]
    factor = 4 if sigma >= 4 and min(height, width) >= 64 else 1
    if factor > 1:
        parts = [F.avg_pool2d(part, factor, ceil_mode=True) for part in parts]
    x = torch.cat(parts, dim=1)
    if factor > 1:
        sigma = math.sqrt(max(sigma ** 2 - (factor ** 2 - 1) / 12.0, 1e-6)) / factor
    radius = max(1, min(math.ceil(4 * sigma), min(x.shape[2], x.shape[3]) - 1))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x, factor


def _sample(low: Tensor, height: int, width: int, b: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """What `F.interpolate(low, (height, width), mode="bilinear")` holds at pixels (`row`, `col`) of images
    `b`, computed at those pixels alone: (N, C)."""
    low_h, low_w = low.shape[2], low.shape[3]
    y = (row.to(low.dtype) + 0.5) * (low_h / height) - 0.5
    x = (col.to(low.dtype) + 0.5) * (low_w / width) - 0.5
    y, x = y.clamp_min(0.0), x.clamp_min(0.0)
    y0, x0 = y.floor().long(), x.floor().long()
    wy, wx = (y - y0.to(y.dtype))[:, None], (x - x0.to(x.dtype))[:, None]
    y1, x1 = (y0 + 1).clamp_max(low_h - 1), (x0 + 1).clamp_max(low_w - 1)
    top = low[b, :, y0, x0] * (1 - wx) + low[b, :, y0, x1] * wx
    bottom = low[b, :, y1, x0] * (1 - wx) + low[b, :, y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def _box_sum(x: Tensor, radius: int, dim: int) -> Tensor:
    """Sums over windows of 2 * radius + 1 along `dim` (2 or 3), zero outside, from a running sum: the cost
    does not grow with the radius."""
    length = x.shape[dim]
    padding = (radius + 1, radius, 0, 0) if dim == 3 else (0, 0, radius + 1, radius)
    running = F.pad(x, padding).cumsum(dim)
    return running.narrow(dim, 2 * radius + 1, length) - running.narrow(dim, 0, length)


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Where a 0/1 mask has a 1 within a (2 * radius + 1) square."""
    return _box_sum(_box_sum(mask, radius, 3), radius, 2) > 0.5


def _at(x: Tensor, b: Tensor, p: Tensor) -> Tensor:
    """The values of (B, C, H, W) at the pixels numbered `p` (in row-major order) of images `b`: (N, C), float32."""
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])[b, :, p].float()


def solve_alpha(src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, solid: float = 0.95, sigma: float = 8.0,
                reach: int = 4, floor: float = 0.02, ceiling: float = 0.999, softness: float = 0.001,
                noise_weight: float = 16.0, background_margin: int = 7, faint: float = 0.1) -> Tensor:
    """The network's alpha `pha` (B, 1, H, W), re-solved from the frame `src`, the plate `bgr` and the
    foreground `fgr` (B, 3, H, W, in 0..1) near the subject; unchanged elsewhere. Computed in float32 and
    returned in `pha`'s dtype. The constants were chosen on our validation sets (never the held-out ones):

    - solid: pixels with alpha above this lend their foreground colour to their neighbours;
    - sigma: the reach of that borrowing, in pixels (a Gaussian's standard deviation);
    - reach: how many pixels beyond the network's matte (alpha above `floor`) may gain alpha;
    - ceiling: pixels the network calls opaque beyond this keep their alpha (their colour is their own);
    - softness: the squared colour distance |F - B|^2 (channels in 0..1, summed) at which the projection and
      the network count equally; `noise_weight` times the mean |I - B|^2 of the far background (farther
      than `background_margin` from the matte) is added to it;
    - faint: outside the network's matte, alpha that would rise to less than this stays as it was (noise from
      the camera or the codec near the subject, rather than hair).
    """
    dtype = pha.dtype
    batch, _, height, width = pha.shape
    pha = pha.float()
    in_matte = (pha > floor).float()
    near = _dilate(in_matte, reach) & (pha < ceiling)

    # The noise level of the plate: the mean |I - B|^2 far from the matte, from every 4th row and column.
    step = 4 if min(height, width) >= 64 else 1
    src_grid, bgr_grid = src[:, :, ::step, ::step].float(), bgr[:, :, ::step, ::step].float()
    far = (~_dilate(in_matte[:, :, ::step, ::step], (background_margin + step - 1) // step)).float()
    residual = ((src_grid - bgr_grid) ** 2).sum(1, keepdim=True)
    noise = (residual * far).sum((1, 2, 3)) / far.sum((1, 2, 3)).clamp_min(1.0)

    # Everything else only at the pixels where the step may act: near the matte and not opaque.
    found = near[:, 0].nonzero()
    b, row, col = found[:, 0], found[:, 1], found[:, 2]
    p = row * width + col

    solid_mask = (pha > solid).float()
    low, factor = _reduced_blur([fgr.float() * solid_mask, solid_mask], sigma)
    weight = _sample(low, height, width, b, row, col) if factor > 1 else _at(low, b, p)
    coverage = weight[:, 3]
    borrowed = torch.where(coverage[:, None] > 1e-4, weight[:, :3] / coverage[:, None].clamp_min(1e-6), _at(fgr, b, p))

    plate = _at(bgr, b, p)
    difference, spread = _at(src, b, p) - plate, borrowed - plate
    spread2 = (spread * spread).sum(1)
    projected = ((difference * spread).sum(1) / (spread2 + 1e-6)).clamp(0.0, 1.0)
    trust = spread2 / (spread2 + softness + noise_weight * noise[b])

    solved = pha.reshape(batch, height * width).clone()
    before = solved[b, p]
    blended = trust * projected + (1.0 - trust) * before
    blended = torch.where((before <= floor) & (blended < faint), before, blended)  # specks of noise, not hair
    solved[b, p] = torch.where(coverage > 0.01, blended, before)
    return solved.view(batch, 1, height, width).to(dtype)
