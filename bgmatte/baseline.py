"""A classical peer to measure the model against: closed-form matting on a trimap drawn from the plate difference.

This is what a careful user could do without a learned model: call every pixel that differs
clearly from the plate foreground, every pixel that matches it background, leave a band around
the boundary unknown, and solve closed-form matting (Levin et al. 2008, through pymatting) there.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from bgmatte.errors import BgmatteError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrimapOptions:
    """How the plate difference becomes a trimap (thresholds on the largest channel difference, in [0, 1])."""

    foreground_above: float = 0.2
    background_below: float = 0.06
    band: int = 5  # pixels of unknown kept on each side of the boundary
    min_region: int = 64  # foreground specks smaller than this (pixels) are dropped, a sure background topped up


def plate_difference_trimap(src: np.ndarray, bgr: np.ndarray, options: TrimapOptions = TrimapOptions()) -> np.ndarray:
    """A uint8 trimap (0 background, 128 unknown, 255 foreground) from float RGB ``src`` and plate ``bgr``.

    Closed-form matting with one kind of constraint alone has a constant solution (all 1 or all 0), so a trimap with
    unknown pixels gets both kinds where the frame allows, with a warning: when fewer than `min_region` pixels match
    the plate within `background_below` (an exposure or white-balance change shifts them all), the half of the
    pixels away from the subject that differ least are background too; when the subject is narrower than the band,
    the band narrows to the widest that leaves some of it sure. A frame in which nothing differs clearly from the
    plate keeps no sure foreground: its matte is all background.
    """
    difference = np.abs(src.astype(np.float32) - bgr.astype(np.float32)).max(axis=2)
    difference = cv2.GaussianBlur(difference, (0, 0), 1.0)
    foreground = (difference > options.foreground_above).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < options.min_region)
    foreground[np.isin(labels, small[small > 0])] = 0
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    background = (difference < options.background_below).astype(np.uint8)
    kernel = _disc(options.band)
    sure_foreground = cv2.erode(foreground, kernel)
    sure_background = cv2.erode(background, kernel) & (1 - cv2.dilate(foreground, kernel))
    unknown = not (sure_foreground | sure_background).all()
    if unknown and sure_background.sum() < options.min_region:  # a speck of background constrains no better
        least = _least_different(difference, foreground, kernel)
        if least.any():
            sure_background |= least
            logger.warning("closed-form baseline: fewer than %d pixels of a frame match its plate within %.2g (an "
                           "exposure change?); the pixels that differ least are taken as background",
                           options.min_region, options.background_below)
    if unknown and not sure_foreground.any() and foreground.any():
        # Erosion removed the subject whole: the band narrows on both sides of its boundary, so that the unknown
        # pixels beside it stay few enough for the background constraints to reach them.
        band = next(width for width in range(options.band - 1, -1, -1) if cv2.erode(foreground, _disc(width)).any())
        narrow = _disc(band)
        sure_foreground = cv2.erode(foreground, narrow)
        sure_background |= cv2.erode(background, narrow) & (1 - cv2.dilate(foreground, narrow))
        logger.warning("closed-form baseline: a frame's subject is too thin for the %d-pixel band of the trimap; "
                       "the band is narrowed to %d pixels in that frame", options.band, band)
    trimap = np.full(difference.shape, 128, np.uint8)
    trimap[sure_background.astype(bool)] = 0
    trimap[sure_foreground.astype(bool)] = 255
    return trimap


def _least_different(difference: np.ndarray, foreground: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sure background for a frame where (almost) nothing matches the plate within the threshold (a change of
    exposure or white balance shifts every pixel): the half of the pixels away from the subject that differ least
    from the plate. Away means outside the band around the foreground, or outside the foreground itself where the
    band covers all."""
    outside = 1 - cv2.dilate(foreground, kernel)
    if not outside.any():
        outside = 1 - foreground
    values = difference[outside.astype(bool)]
    if values.size == 0:
        return np.zeros_like(foreground)
    return outside & (difference <= np.median(values)).astype(np.uint8)


def _disc(radius: int) -> np.ndarray:
    """The structuring element that keeps a band of `radius` pixels (a single pixel for 0)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _pymatting():
    """The pymatting module, or a one-line refusal naming the extra that brings it."""
    try:
        import pymatting
    except ImportError:
        raise BgmatteError('the closed-form baseline needs pymatting: pip install "bgmatte[eval]"') from None
    return pymatting


def closed_form_alpha(src: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """Closed-form matting of float RGB ``src`` in the trimap's unknown region (pymatting, the ``[eval]`` extra)."""
    estimate_alpha_cf = _pymatting().estimate_alpha_cf
    if not (trimap == 128).any():
        return (trimap == 255).astype(np.float64)
    if not (trimap == 255).any():
        return np.zeros(trimap.shape, np.float64)
    if not (trimap == 0).any():
        return np.ones(trimap.shape, np.float64)
    with contextlib.redirect_stdout(io.StringIO()):  # pymatting prints solver warnings to stdout
        alpha = estimate_alpha_cf(src.astype(np.float64), trimap.astype(np.float64) / 255.0)
    return np.clip(alpha, 0.0, 1.0)


class ClosedFormBaseline(torch.nn.Module):
    """The peer as a model: ``(src, bgr)`` tensors in, ``(pha, fgr)`` out, so ``bgmatte eval`` can score it.

    The foreground colour is the frame itself: closed-form matting estimates alpha only.
    """

    def __init__(self, options: TrimapOptions = TrimapOptions()) -> None:
        super().__init__()
        _pymatting()  # missing, refused now: not once the predictions' folders are made and the first frame read
        self.options = options

    def forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor]:
        alphas = []
        for frame, plate in zip(src, bgr):
            frame_np = frame.permute(1, 2, 0).float().cpu().numpy()
            plate_np = plate.permute(1, 2, 0).float().cpu().numpy()
            trimap = plate_difference_trimap(frame_np, plate_np, self.options)
            alphas.append(torch.from_numpy(closed_form_alpha(frame_np, trimap)).float())
        pha = torch.stack(alphas)[:, None].to(src.device)
        return pha, src.clone()
