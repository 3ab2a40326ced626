"""Plates (the background without the subject): alignment to handheld frames, exposure matching, and a
clean plate estimated from the clip itself for users who have none.

All functions take (H, W, 3) RGB arrays, uint8 or float in [0, 1], and return the plate's dtype.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from bgmatte.errors import BgmatteError

logger = logging.getLogger(__name__)


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32, copy=False)


def _like(result: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float [0, 1] pixels back to the caller's dtype."""
    if dtype == np.uint8:
        return np.rint(np.clip(result, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.clip(result, 0.0, 1.0).astype(dtype, copy=False)


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


# ------------------------------------------------------------------------------------------ alignment


@dataclass(frozen=True)
class AlignOptions:
    """Feature matching settings for plate alignment."""

    max_features: int = 2000  # ORB keypoints per image
    working_size: int | None = 720  # longer side for feature detection; None = full resolution
    # A smaller image is enlarged to this longer side for detection: ORB leaves out a border of 31 pixels (its
    # patch), which is most of a frame of 100 pixels or so.
    min_working_size: int = 480
    ratio: float = 0.75  # Lowe's ratio test between the best and second-best match
    min_inliers: int = 15  # fewer RANSAC inliers than this counts as no homography
    ransac_threshold: float = 3.0  # pixels, at full resolution
    max_scale_change: float = 2.0  # a homography that scales the plate more than this is rejected
    # Matches whose convex hull covers less of the frame than this give a similarity, not a homography.
    min_spread: float = 0.3
    # Refine the feature homography by intensity (ECC) on the pixels where plate and frame already agree, at half
    # the working size: ORB's keypoints, many found at coarse pyramid levels, leave it up to 2.5 pixels off.
    refine: bool = True


def _working_scale(image: np.ndarray, options: AlignOptions) -> float:
    """The scale features are detected at: down to `working_size`, or up to `min_working_size`, on the longer side."""
    longest = max(image.shape[:2])
    floor = min(options.min_working_size, options.working_size or options.min_working_size)  # never above the size
    if longest < floor:
        return floor / longest
    if options.working_size is None or longest <= options.working_size:
        return 1.0
    return options.working_size / longest


def _scaled(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=interpolation)


class PlateAligner:
    """Align one plate to many frames: the plate's ORB features are computed once, each frame's per call.

    Arguments:
        plate: the clean background, (H, W, 3) RGB.
        options: feature and RANSAC settings (`AlignOptions`).
        name: the file the plate is aligned to (a photo), which the warnings name: among many, the one concerned.
        warn: False to leave the too-little-texture warning to the caller (`register_frames`).

    `align(frame)` returns the plate warped onto the frame and whether that worked; on failure the
    plate comes back unaligned (resized to the frame if needed) and a warning is logged (the first
    time; later failures are counted in `failures`).
    """

    def __init__(self, plate: np.ndarray, options: AlignOptions = AlignOptions(), *,
                 name: str | os.PathLike | None = None, warn: bool = True):
        self.options = options
        self._named = f"{name}: " if name else ""
        self.failures = 0
        self.attempts = 0
        self._warned_texture = not warn  # warn=False: the caller tells of failures (`estimate` gives the reason)
        self._orb = cv2.ORB_create(nfeatures=options.max_features)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self.set_plate(plate)

    def set_plate(self, plate: np.ndarray) -> None:
        """Align another plate from now on (the next frame of a plate video): its features are computed, the
        failure count and the warnings already given carry over, so a plate video warns once, not every frame."""
        self.plate = plate
        self._small_plate: np.ndarray | None = None  # for the refinement, made when first needed
        self._plate_scale = _working_scale(plate, self.options)
        keypoints, descriptors = self._orb.detectAndCompute(_scaled(_grey_uint8(plate), self._plate_scale), None)
        self._plate_points = np.float32([point.pt for point in keypoints]).reshape(-1, 2) / self._plate_scale
        self._plate_descriptors = descriptors
        self.textured = descriptors is not None and len(keypoints) >= self.options.min_inliers
        if not self.textured and not self._warned_texture:
            self._warned_texture = True
            logger.warning("%sthe plate has too little texture to align (%d features); it is used unaligned",
                           self._named, len(keypoints))

    def estimate(self, frame: np.ndarray) -> tuple[np.ndarray | None, str]:
        """The 3x3 homography taking plate pixels to frame pixels, or None and the reason it failed."""
        if not self.textured:
            return None, "the plate has too little texture"
        scale = _working_scale(frame, self.options)
        keypoints, descriptors = self._orb.detectAndCompute(_scaled(_grey_uint8(frame), scale), None)
        if descriptors is None or len(keypoints) < self.options.min_inliers:
            return None, f"only {len(keypoints)} features in the frame"
        pairs = self._matcher.knnMatch(descriptors, self._plate_descriptors, k=2)
        good = [pair[0] for pair in pairs if len(pair) == 2 and pair[0].distance < self.options.ratio * pair[1].distance]
        if len(good) < self.options.min_inliers:
            return None, f"only {len(good)} distinctive matches"
        frame_points = np.float32([keypoints[match.queryIdx].pt for match in good]) / scale
        plate_points = self._plate_points[[match.trainIdx for match in good]]
        homography, inliers = cv2.findHomography(
            plate_points, frame_points, cv2.RANSAC, self.options.ransac_threshold, maxIters=2000, confidence=0.995
        )
        if homography is None or inliers is None:
            return None, "no consistent homography"
        count = int(inliers.sum())
        if count < self.options.min_inliers:
            return None, f"only {count} matches agree on a homography"
        agreeing = inliers.ravel().astype(bool)
        spread = cv2.contourArea(cv2.convexHull(frame_points[agreeing])) / (frame.shape[0] * frame.shape[1])
        if spread < self.options.min_spread:
            # Matches in a corner or a strip of the frame (a subject filling the rest, a plate at a wider zoom, a
            # few landmarks among repeating tiles) leave the homography's perspective a guess beyond them: it went
            # tens of pixels wrong at the far side of the frame. A similarity (shift, roll, zoom) extrapolates.
            similarity, agree = cv2.estimateAffinePartial2D(plate_points[agreeing], frame_points[agreeing], method=cv2.RANSAC,
                                                            ransacReprojThreshold=self.options.ransac_threshold)
            if similarity is None or int(agree.sum()) < self.options.min_inliers:
                return None, f"the matches cover only {spread:.0%} of the frame, and no similarity fits them"
            homography = np.vstack([similarity, [0.0, 0.0, 1.0]])
        problem = self._implausible(homography)
        if problem:
            return None, problem
        if self.options.refine:
            homography = self._refined(homography, frame, scale)
        return homography, ""

    def _refined(self, homography: np.ndarray, frame: np.ndarray, frame_scale: float) -> np.ndarray:
        """`homography` refined by ECC at half the working scale, on the pixels where the warped plate already
        matches the frame (the subject left out); kept as it was if ECC fails, if it matches those pixels worse,
        or if it moves a corner by more than 4 RANSAC thresholds (a refinement, not a new estimate)."""
        frame_to_small = np.diag([frame_scale / 2, frame_scale / 2, 1.0])
        plate_to_small = np.diag([self._plate_scale / 2, self._plate_scale / 2, 1.0])
        if self._small_plate is None:
            self._small_plate = _scaled(_grey_uint8(self.plate), self._plate_scale / 2)
        small_frame = _scaled(_grey_uint8(frame), frame_scale / 2)
        small = frame_to_small @ homography @ np.linalg.inv(plate_to_small)  # small plate to small frame
        warped = cv2.warpPerspective(self._small_plate, small, small_frame.shape[::-1], borderMode=cv2.BORDER_REPLICATE)
        # Plate and frame compared in like exposure: a frame darker or brighter than the plate (its exposure drifted)
        # would otherwise differ from it nearly everywhere, and the refinement be skipped or judged on the drift.
        gain, offset = _grey_exposure(warped, small_frame)
        warped = cv2.convertScaleAbs(warped, alpha=gain, beta=offset)
        agree = cv2.erode((cv2.absdiff(warped, small_frame) < 40).astype(np.uint8), np.ones((5, 5), np.uint8))
        if agree.mean() < 0.2:
            return homography
        inverse = np.linalg.inv(small)  # ECC warps the frame's pixels (the template) into the plate
        inverse = (inverse / inverse[2, 2]).astype(np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 1e-5)
        try:
            _, inverse = cv2.findTransformECC(small_frame, self._small_plate, inverse, cv2.MOTION_HOMOGRAPHY,
                                              criteria, agree, 3)
        except cv2.error:  # no convergence: the features' estimate stands
            return homography
        refined = np.linalg.inv(frame_to_small) @ np.linalg.inv(inverse.astype(np.float64)) @ plate_to_small
        if not np.all(np.isfinite(refined)):
            return homography
        height, width = self.plate.shape[:2]
        corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]]).reshape(-1, 1, 2)
        moved = np.abs(cv2.perspectiveTransform(corners, refined) - cv2.perspectiveTransform(corners, homography))
        after = cv2.warpPerspective(self._small_plate, frame_to_small @ refined @ np.linalg.inv(plate_to_small),
                                    small_frame.shape[::-1], borderMode=cv2.BORDER_REPLICATE)
        after = cv2.convertScaleAbs(after, alpha=gain, beta=offset)
        mask = agree.astype(bool)
        before_error = cv2.absdiff(warped, small_frame)[mask].mean()
        after_error = cv2.absdiff(after, small_frame)[mask].mean()
        if moved.max() > 4 * self.options.ransac_threshold or after_error > before_error:
            return homography
        return refined / refined[2, 2]

    def _implausible(self, homography: np.ndarray) -> str:
        """Reject homographies that fold, flip or blow up the plate: RANSAC can fit those to bad matches."""
        if not np.all(np.isfinite(homography)) or abs(homography[2, 2]) < 1e-12:
            return "a degenerate homography"
        height, width = self.plate.shape[:2]
        corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]]).reshape(-1, 1, 2)
        warped = cv2.perspectiveTransform(corners, homography).reshape(-1, 2)
        if not cv2.isContourConvex(warped.astype(np.float32)):
            return "a homography that folds the plate"
        area = abs(cv2.contourArea(warped.astype(np.float32)))
        ratio = area / float(width * height)
        limit = self.options.max_scale_change**2
        if not (1.0 / limit <= ratio <= limit):
            return f"a homography that scales the plate's area by {ratio:.2f}"
        # Orientation must be kept (no mirror image): the corners still go round the same way.
        edge1, edge2 = warped[1] - warped[0], warped[3] - warped[0]
        if edge1[0] * edge2[1] - edge1[1] * edge2[0] <= 0:
            return "a homography that mirrors the plate"
        return ""

    def align(self, frame: np.ndarray) -> tuple[np.ndarray, bool]:
        """The plate warped onto `frame` (edges replicated where it does not reach) and whether alignment worked."""
        self.attempts += 1
        height, width = frame.shape[:2]
        homography, reason = self.estimate(frame)
        if homography is None:
            self.failures += 1
            log = logger.warning if self.failures == 1 and self.textured else logger.debug  # else said when made
            log("%splate alignment failed (%s); using the unaligned plate", self._named, reason)
            plate = self.plate
            if plate.shape[:2] != (height, width):
                plate = cv2.resize(plate, (width, height), interpolation=cv2.INTER_AREA)
            return plate, False
        warped = cv2.warpPerspective(
            self.plate, homography, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        return warped, True


def _grey_exposure(plate: np.ndarray, frame: np.ndarray, iterations: int = 4) -> tuple[float, float]:
    """Gain and offset taking grey `plate` levels to `frame`'s, fitted robustly (a subject in the frame is an
    outlier); (1, 0) when too little is left to fit on or the fit is implausible."""
    step = max(1, int(np.sqrt(plate.size / 40_000)))
    x, y = plate[::step, ::step].ravel().astype(np.float64), frame[::step, ::step].ravel().astype(np.float64)
    keep = (x > 2) & (x < 253) & (y > 2) & (y < 253)
    gain, offset = 1.0, 0.0
    for _ in range(iterations):
        if keep.sum() < 200 or np.ptp(x[keep]) < 8:
            return 1.0, 0.0
        gain, offset = np.polyfit(x[keep], y[keep], 1)
        residual = np.abs(gain * x + offset - y)
        keep &= residual <= np.median(residual[keep]) + max(3.0 * 1.4826 * np.median(residual[keep]), 2.0)
    if not (np.isfinite(gain) and 0.2 <= gain <= 5.0 and np.isfinite(offset)):
        return 1.0, 0.0
    return float(gain), float(offset)


def align_plate(plate: np.ndarray, frame: np.ndarray, options: AlignOptions = AlignOptions()) -> tuple[np.ndarray, bool]:
    """Warp `plate` onto `frame` by ORB matching and a RANSAC homography; the unaligned plate if that fails.

    For video, build one `PlateAligner` and call `align` per frame, so the plate's features are found once.
    """
    return PlateAligner(plate, options).align(frame)


def grey_against_colour(plate: np.ndarray, frame: np.ndarray) -> bool:
    """Whether `plate` is a greyscale picture (neutral, its grey levels varying: not a flat card) while `frame` has
    colour over most of the picture: every coloured pixel of the background then differs from its plate, and
    mattes as foreground. Most of the picture rather than any of it, so that a grey wall behind a coloured
    subject is no mismatch."""
    def sampled(image: np.ndarray) -> np.ndarray:
        return _as_float(image[:: max(1, image.shape[0] // 128), :: max(1, image.shape[1] // 128)])

    plate, frame = sampled(plate), sampled(frame)
    neutral = (plate.max(axis=2) - plate.min(axis=2) <= 2 / 255).mean() > 0.99
    coloured = (frame.max(axis=2) - frame.min(axis=2) > 12 / 255).mean() > 0.5
    return bool(neutral and coloured and plate.std() > 4 / 255)


# ----------------------------------------------------------------------------------- exposure matching


# Channel values from here up count as clipped: the fit leaves them out, and a fitted change keeps them.
_CLIPPED = 253 / 255


@dataclass(frozen=True)
class ExposureOptions:
    """How to fit the colour change between plate and frame."""

    model: Literal["gain_offset", "affine"] = "gain_offset"  # per channel, or a full 3x3 matrix plus offset
    background_below: float = 0.05  # pha below this counts as background
    max_samples: int = 50_000  # pixels used for the fit (an even subsample)
    iterations: int = 4  # robust refits, each dropping outliers found by the last
    min_pixels: int = 200  # with fewer usable pixels the plate is left as it is


@dataclass(frozen=True)
class ExposureFit:
    """frame ≈ plate @ matrix.T + offset, in float [0, 1] RGB."""

    matrix: np.ndarray  # (3, 3)
    offset: np.ndarray  # (3,)
    pixels: int  # pixels the final fit used
    skipped: str = ""  # why no change was fitted (the fit is then the identity), or ""

    def apply(self, plate: np.ndarray) -> np.ndarray:
        """The plate with the fitted colour change, in the plate's dtype. Channels clipped in the plate stay
        clipped: the fit never saw them, and a highlight bright enough to clip mostly stays clipped, where
        scaling each channel on its own would tint it (a white window turning pink)."""
        if plate.dtype == np.uint8:  # OpenCV applies it in 8 bits directly, rounding and saturating
            result = cv2.transform(plate, np.hstack([self.matrix, 255.0 * self.offset[:, None]]))
            # The clipped values alone (the rest zeroed), then a maximum: about as cheap as the transform.
            clipped = cv2.threshold(plate, round(_CLIPPED * 255) - 1, 0, cv2.THRESH_TOZERO)[1]
            return cv2.max(result, clipped, dst=result)
        transform = np.hstack([self.matrix, self.offset[:, None]]).astype(np.float32)
        result = _like(cv2.transform(plate.astype(np.float32, copy=False), transform), plate.dtype)
        np.maximum(result, plate, out=result, where=plate >= _CLIPPED)
        return result


IDENTITY_FIT = ExposureFit(np.eye(3), np.zeros(3), 0)


def fit_exposure(
    plate: np.ndarray, frame: np.ndarray, pha_or_mask: np.ndarray | None = None, options: ExposureOptions = ExposureOptions(),
    *, warn: bool = True,
) -> ExposureFit:
    """Fit the colour transform from plate to frame on confident background pixels, robust to outliers.

    `pha_or_mask`: a float alpha matte (background where below `background_below`) or a boolean
    foreground mask (background where False); None uses every pixel and relies on the outlier
    rejection to drop the subject. Saturated pixels are left out, since clipping hides their change.
    When no change can be fitted, the identity comes back with the reason in `skipped`, warned about unless
    `warn` is False (a video's frames, whose caller says it once, naming the clip).
    """
    if plate.shape[:2] != frame.shape[:2]:
        raise ValueError(f"plate {plate.shape[:2]} and frame {frame.shape[:2]} differ in size")
    # A regular grid of at most about 4 * max_samples pixels is plenty, and keeps video frames cheap.
    stride = max(1, int(np.sqrt(plate.shape[0] * plate.shape[1] / (4 * options.max_samples))))
    grid = (slice(None, None, stride), slice(None, None, stride))
    source, target = _as_float(plate[grid]).reshape(-1, 3), _as_float(frame[grid]).reshape(-1, 3)
    usable = np.all((source > 2 / 255) & (source < _CLIPPED) & (target > 2 / 255) & (target < _CLIPPED), axis=1)
    if pha_or_mask is not None:
        matte = np.asarray(pha_or_mask)[grid].reshape(-1)
        foreground = matte if matte.dtype == bool else _as_float(matte) >= options.background_below
        usable &= ~foreground
    indices = np.flatnonzero(usable)
    if len(indices) > options.max_samples:
        indices = indices[np.linspace(0, len(indices) - 1, options.max_samples).astype(np.int64)]
    if len(indices) < options.min_pixels:
        return _skipped(f"only {len(indices)} background pixels to fit on", warn)
    x, y = source[indices].astype(np.float64), target[indices].astype(np.float64)
    keep = np.ones(len(x), bool) if pha_or_mask is not None else _consensus(x, y, options.min_pixels)
    matrix, offset = np.eye(3), np.zeros(3)
    for _ in range(options.iterations):
        if keep.sum() < options.min_pixels:
            break
        matrix, offset = _least_squares(x[keep], y[keep], options.model)
        residual = np.abs(x @ matrix.T + offset - y).max(axis=1)
        spread = 1.4826 * np.median(np.abs(residual[keep] - np.median(residual[keep])))
        keep = residual <= np.median(residual[keep]) + max(3.0 * spread, 2.0 / 255)
    gains = np.diag(matrix) if options.model == "gain_offset" else np.linalg.svd(matrix, compute_uv=False)
    if not np.all(np.isfinite(matrix)) or gains.min() < 0.2 or gains.max() > 5.0:
        return _skipped(f"the fitted change is implausible (gains {np.round(gains, 2)})", warn)
    return ExposureFit(matrix, offset, int(keep.sum()))


def _consensus(x: np.ndarray, y: np.ndarray, min_pixels: int, trials: int = 200,
               tolerance: float = 8 / 255) -> np.ndarray:
    """The pixels that agree, within `tolerance`, with the best of `trials` gain-and-offset changes each fitted
    to two random pixels: where to start the refits when nothing says where the subject is. A least-squares start
    on every pixel belongs to the subject once it covers half the picture or more, and the refits then keep it.
    Changes outside the plausible gains are not tried (a flat-coloured subject agrees with a gain near 0).
    Every pixel when no change finds `min_pixels` and a twentieth of the picture in agreement: a few hundred
    pixels of a textured subject agree with some change by chance."""
    rng = np.random.default_rng(0)  # the same fit for the same pictures
    scored = np.linspace(0, len(x) - 1, min(len(x), 4000)).astype(np.int64)
    best, best_count = None, max(min_pixels * len(scored) / len(x), 0.05 * len(scored))
    for _ in range(trials):
        first, second = rng.choice(len(x), 2, replace=False)
        run = x[second] - x[first]
        if np.abs(run).min() < 0.1:  # too close in some channel to tell its gain
            continue
        gain = (y[second] - y[first]) / run
        if gain.min() < 0.2 or gain.max() > 5.0:
            continue
        offset = y[first] - gain * x[first]
        count = int((np.abs(x[scored] * gain + offset - y[scored]).max(axis=1) <= tolerance).sum())
        if count > best_count:
            best, best_count = (gain, offset), count
    if best is None:
        return np.ones(len(x), bool)
    gain, offset = best
    return np.abs(x * gain + offset - y).max(axis=1) <= tolerance


def _skipped(reason: str, warn: bool) -> ExposureFit:
    if warn:
        logger.warning("exposure matching skipped: %s", reason)
    return ExposureFit(IDENTITY_FIT.matrix, IDENTITY_FIT.offset, 0, reason)


def _least_squares(x: np.ndarray, y: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
    if model == "gain_offset":
        matrix, offset = np.zeros((3, 3)), np.zeros(3)
        for channel in range(3):
            design = np.stack([x[:, channel], np.ones(len(x))], axis=1)
            (gain, shift), *_ = np.linalg.lstsq(design, y[:, channel], rcond=None)
            matrix[channel, channel], offset[channel] = gain, shift
        return matrix, offset
    if model == "affine":
        design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        solution, *_ = np.linalg.lstsq(design, y, rcond=None)
        return solution[:3].T, solution[3]
    raise ValueError(f"unknown exposure model {model!r}; use 'gain_offset' or 'affine'")


def match_exposure(
    plate: np.ndarray, frame: np.ndarray, pha_or_mask: np.ndarray | None = None, options: ExposureOptions = ExposureOptions()
) -> np.ndarray:
    """The plate with its exposure and white balance brought to the frame's (see `fit_exposure`)."""
    return fit_exposure(plate, frame, pha_or_mask, options).apply(plate)


# ------------------------------------------------------------------------------------ automatic plate


@dataclass(frozen=True)
class PlateEstimateOptions:
    """Settings for estimating a clean plate from the clip."""

    threshold: float | None = None  # how far (0-1, largest channel) a sample may stray from a cluster's
    # reference and still belong to it; None derives it from the clip's noise
    min_threshold: float = 0.06
    min_area: int = 9  # differences in a sample smaller than this many pixels are noise
    smoothing: float = 3.0  # Gaussian sigma (pixels) of the neighbourhood that predicts the background
    inpaint_radius: int = 5


def sample_frames(frames: Iterable[np.ndarray], count: int = 30) -> list[np.ndarray]:
    """Keep about `count` frames spread evenly over an iterable of unknown length, holding at most 2 * count."""
    if count < 1:
        raise ValueError("count must be at least 1")
    kept: list[np.ndarray] = []
    stride = 1
    for index, frame in enumerate(frames):
        if index % stride:
            continue
        kept.append(frame)
        if len(kept) >= 2 * count:
            kept = kept[::2]
            stride *= 2
    if len(kept) > count:
        kept = [kept[i] for i in np.linspace(0, len(kept) - 1, count).round().astype(int)]
    return kept


def register_frames(frames: Sequence[np.ndarray], options: AlignOptions = AlignOptions()) -> tuple[list[np.ndarray], int]:
    """The frames of a handheld clip warped onto their middle one, for `estimate_plate`: unregistered, a shake of a
    few pixels smears or doubles every texture edge of the plate. Returns those registered (the middle one among
    them, where a warped frame does not reach it shows through) and how many could not be, which are left out."""
    middle = len(frames) // 2
    reference = frames[middle]
    aligner = PlateAligner(reference, options, warn=False)  # its features are found once, for every frame
    height, width = reference.shape[:2]
    registered, failed = [], 0
    for index, frame in enumerate(frames):
        if index == middle:
            registered.append(frame)
            continue
        homography, _ = aligner.estimate(frame)
        if homography is None:
            failed += 1
            continue
        # The homography takes the middle frame's pixels to this one's: its inverse map brings this one back.
        registered.append(cv2.warpPerspective(frame, homography, (width, height), dst=reference.copy(),
                                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                              borderMode=cv2.BORDER_TRANSPARENT))
    return registered, failed


def estimate_plate(frames: Sequence[np.ndarray] | np.ndarray, options: PlateEstimateOptions = PlateEstimateOptions(),
                   *, name: str | os.PathLike | None = None, match_exposure: bool = False) -> np.ndarray:
    """A clean plate from sampled frames of the clip itself: a temporal median, corrected where the subject stayed.

    The per-pixel median is right wherever the subject covered a pixel in fewer than half the
    samples. Where samples disagree, each pixel's samples are split into up to three clusters of
    like colour (say: the background, a subject that stayed, another that passed); the more often
    seen cluster is favoured unless the evidence says another one continues the background around it.
    That evidence is of two kinds. Each frame's regions that differ from the median sample are
    judged whole, along their entire edge: a frame that continues its surroundings seamlessly there
    shows background the median hid, one with a seam shows a subject in front. And pixels are decided
    inward from the area that never changed, each predicted from the background decided next to it,
    a prediction counting only as much as the decisions it rests on were sure, so that one wrong
    guess at a texture edge cannot spread its colour ring after ring. So a subject that kept still
    for most of the clip, then moved, is replaced by what it uncovered, while one that passed by is
    left out. Unchanged islands enclosed by such a region, which the subject never uncovered, are
    inpainted. A subject that never moved at all cannot be told from the background and stays. The camera must
    stand still; for a handheld clip, register the frames first (`register_frames`). Samples that do not share
    one background (a cut, a change of light) are warned about, naming `name` (the clip): no plate fits them all.
    Samples exposed otherwise than the one of median brightness (a light turned on, auto-exposure) are first brought
    to its exposure, so that the plate is one picture in one exposure, not a per-pixel mix; that the exposure changed is
    warned about unless `match_exposure` says the frames will have the plate's exposure fitted to theirs.
    """
    frames = list(frames) if not isinstance(frames, np.ndarray) else frames
    if len(frames) < 3:
        raise BgmatteError(f"an automatic plate needs at least 3 frames; got {len(frames)}")
    dtype = frames[0].dtype
    stack = np.stack([frame if frame.dtype == np.uint8 else _like(_as_float(frame), np.dtype(np.uint8)) for frame in frames])
    count, height, width, _ = stack.shape
    drift, changed = _to_common_exposure(stack)
    if changed >= max(2, 0.1 * count):  # not one flash
        (logger.info if match_exposure else logger.warning)(
            "%sthe exposure changes during the clip (%d of %d samples, by up to %d grey levels on average): the "
            "automatic plate has that of its sample of median brightness%s", f"{name}: " if name else "", changed,
            count, round(drift),
            ", fitted to each frame's" if match_exposure else "; frames exposed otherwise matte poorly unless the "
            "plate's exposure is matched to each (--match-exposure)")
    median, reference = _temporal_median(stack)

    def deviation(index: int, rows: slice = slice(None), columns: slice = slice(None)) -> np.ndarray:
        difference = np.abs(stack[index, rows, columns].astype(np.int16) - reference[rows, columns].astype(np.int16))
        return np.maximum(np.maximum(difference[..., 0], difference[..., 1]), difference[..., 2]) / 255.0

    threshold = options.threshold
    if threshold is None:  # from the typical deviation on a pixel grid: mostly background, so mostly noise
        grid = (slice(None, None, max(1, height // 64)), slice(None, None, max(1, width // 64)))
        noise = float(np.median([deviation(index, *grid) for index in range(count)]))
        threshold = max(options.min_threshold, 5.0 * noise)
    differs = np.empty((count, height, width), bool)
    for index in range(count):
        differs[index] = _without_specks((deviation(index) > threshold).astype(np.uint8), options.min_area)
    changing = differs.any(axis=0)
    if not changing.any():
        result = np.clip(np.rint(median), 0, 255).astype(np.uint8)
        _warn_if_background_changes(stack, result, name)
        return _like(median / 255.0, dtype)

    rows, columns = np.nonzero(changing)
    # Unchanged islands enclosed by change may be a subject that never moved there, so only the
    # unchanged area outside every changing region is trusted as background.
    enclosed = _fill_holes(changing)
    penalty = _continuation_penalty(median, ~enclosed, options.smoothing)
    verdicts = np.empty((count, len(rows)), np.float16)  # one per sample of a changing pixel: half precision will do
    for index in range(count):
        verdicts[index] = _seam_verdicts(
            stack[index], reference, differs[index], rows, columns, penalty, options.smoothing
        )
    candidates = np.empty((3, len(rows), 3), np.float32)
    members = np.empty((3, len(rows)), np.int32)
    evidence = np.empty((3, len(rows)), np.float32)
    for start in range(0, len(rows), 65536):  # in pixel chunks, to bound the temporary memory
        part = slice(start, start + 65536)
        candidates[:, part], members[:, part], evidence[:, part] = _clusters(
            stack[:, rows[part], columns[part]].astype(np.float32),
            differs[:, rows[part], columns[part]],
            threshold,
            verdicts[:, part].astype(np.float32),
        )
    del differs, verdicts
    chosen = _choose_from_surroundings(
        median, enclosed, rows, columns, candidates, members / count, evidence, penalty, options.smoothing
    )
    plate = median.copy()
    plate[rows, columns] = candidates[chosen, np.arange(len(rows))]

    # An island whose surroundings mostly turned away from the reference cluster was held by the
    # subject through every sample: nothing there was ever seen, so inpaint it.
    turned = np.zeros((height, width), bool)
    turned[rows, columns] = chosen != 0
    holes = _islands_to_inpaint(enclosed & ~changing, changing, turned)
    result = np.clip(np.rint(plate), 0, 255).astype(np.uint8)
    if holes.any():
        result = cv2.inpaint(result, holes.astype(np.uint8), options.inpaint_radius, cv2.INPAINT_TELEA)
    _warn_if_background_changes(stack, result, name)
    if dtype == np.uint8:
        return result
    return (result.astype(np.float32) / 255.0).astype(dtype)


def _to_common_exposure(stack: np.ndarray) -> tuple[float, int]:
    """Bring each sample of `stack` (uint8, in place) to the exposure of the one of median brightness (not one
    chosen by its place, which may be a flash), where a change is fitted (a frame too dark or too unlike it, such
    as a cut, is left as it is). Changes below 2 grey levels at black and at white are noise, and left undone.
    Returns the largest mean change made to a sample, in grey levels, and how many samples changed by 4 or more."""
    brightness = [float(sample[:: max(1, sample.shape[0] // 64), :: max(1, sample.shape[1] // 64)].mean())
                  for sample in stack]
    middle = stack[int(np.argsort(brightness)[len(stack) // 2])].copy()
    options = ExposureOptions(max_samples=10_000)  # a few thousand pixels fit a gain and an offset
    largest, count = 0.0, 0
    for index in range(len(stack)):
        fit = fit_exposure(stack[index], middle, options=options, warn=False)
        if fit.skipped:
            continue
        gain, offset = np.diag(fit.matrix), fit.offset
        if max(np.abs(offset).max(), np.abs(gain + offset - 1.0).max()) < 2 / 255:
            continue
        changed = fit.apply(stack[index])
        # A change that leaves the sample unlike the middle one over most of the picture was fitted to another view
        # (a cut): it is no exposure change, and the warning on changing backgrounds says what it is.
        if _agreement(changed, middle) < max(1 / 3, _agreement(stack[index], middle)):
            continue
        change = float(cv2.absdiff(changed, stack[index]).mean())
        largest, count = max(largest, change), count + (change >= 4)
        stack[index] = changed
    return largest, count


def _agreement(image: np.ndarray, other: np.ndarray, levels: int = 10) -> float:
    """The share of pixels (on a grid) where two uint8 images differ by at most `levels` in every channel."""
    grid = (slice(None, None, max(1, image.shape[0] // 90)), slice(None, None, max(1, image.shape[1] // 160)))
    return float((cv2.absdiff(image[grid], other[grid]).max(axis=2) <= levels).mean())


def _warn_if_background_changes(stack: np.ndarray, plate: np.ndarray, name: object, threshold: float = 0.1) -> None:
    """Warn when the samples do not share one background, which no plate can then fit: when the plate differs
    (by more than `threshold` in a channel) from at least half the samples over half the picture, or from two
    of them over three quarters of it. A subject, even a large one that moves, leaves most of the picture to
    the background in most samples; a cut or a change of light does not. The threshold is fixed, well above
    noise: the clip's own, derived from the samples, is inflated by the very change looked for here."""
    differs = np.empty(stack.shape[:3], bool)
    for index in range(len(stack)):
        difference = cv2.absdiff(stack[index], plate)
        differs[index] = difference.max(axis=2) > threshold * 255.0
    share = differs.mean(axis=(1, 2))
    if (differs.mean(axis=0) >= 0.5).mean() > 0.5 or (share > 0.75).sum() >= 2:
        logger.warning("%sthe background changes during the clip: %d of %d sampled frames differ from the automatic "
                       "plate over most of the picture (a cut, a change of light, a moving camera?), so it fits only "
                       "part of the clip; give a plate, or matte each shot on its own", f"{name}: " if name else "",
                       int((share > 0.5).sum()), len(stack))


def _without_specks(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop connected specks below `min_area` pixels (noise), keeping thin but long shapes (edges that moved)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    large = stats[:, cv2.CC_STAT_AREA] >= min_area
    large[0] = False  # the label of the unmasked area
    return large[labels]


def _temporal_median(stack: np.ndarray, rows_per_chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel median over samples, and the sample of median brightness (a real colour, never a blend).

    The plain median averages the two middle values when samples split evenly between subject and
    background; the reference sample picks one side, so the other still stands out as different.
    Row chunks bound the temporary memory.
    """
    count = stack.shape[0]
    median = np.empty(stack.shape[1:], np.float32)
    reference = np.empty(stack.shape[1:], np.uint8)
    middle = (count - 1) // 2
    for start in range(0, stack.shape[1], rows_per_chunk):
        chunk = stack[:, start : start + rows_per_chunk]
        median[start : start + rows_per_chunk] = np.median(chunk, axis=0)
        brightness = chunk.astype(np.uint16).sum(axis=3)
        pick = np.argpartition(brightness, middle, axis=0)[middle]
        reference[start : start + rows_per_chunk] = np.take_along_axis(chunk, pick[None, :, :, None], axis=0)[0]
    return median, reference


def _clusters(
    samples: np.ndarray, outside: np.ndarray, threshold: float, verdicts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each pixel's samples (T, N, 3) into up to three clusters; their medians (3, N, 3), sizes (3, N)
    and evidence (3, N): the mean seam verdict (`_seam_verdicts`, (T, N)) of the frames each cluster holds.

    Cluster 0 holds the samples near the reference (those not `outside`); cluster 1 those near the
    median-brightness sample of the rest; cluster 2 whatever remains. Empty clusters get cluster 0's
    colour. Cluster 0's evidence is zero: the verdicts already weigh the other clusters against it.
    """
    first = _masked_median(samples, ~outside, fallback=None)
    second_reference = _median_brightness_sample(samples, outside)
    difference = np.abs(samples - second_reference[None])
    near_second = outside & (np.maximum(np.maximum(difference[..., 0], difference[..., 1]), difference[..., 2]) <= threshold * 255.0)
    third = outside & ~near_second
    first = np.where(np.isnan(first), second_reference, first)
    colours = np.stack(
        [first, _masked_median(samples, near_second, fallback=first), _masked_median(samples, third, fallback=first)]
    )
    sizes = np.stack([(~outside).sum(axis=0), near_second.sum(axis=0), third.sum(axis=0)]).astype(np.int32)
    evidence = np.zeros(sizes.shape, np.float32)
    for cluster, member in ((1, near_second), (2, third)):
        evidence[cluster] = np.where(member, verdicts, 0.0).sum(axis=0) / np.maximum(sizes[cluster], 1)
    return colours, sizes, evidence


def _median_brightness_sample(samples: np.ndarray, include: np.ndarray) -> np.ndarray:
    """For each pixel, the included sample of median brightness (any sample where none is included)."""
    brightness = np.where(include, samples.sum(axis=2), np.inf)
    order = np.argsort(brightness, axis=0)
    middle = np.maximum(include.sum(axis=0) - 1, 0) // 2
    pick = np.take_along_axis(order, middle[None], axis=0)[0]
    return samples[pick, np.arange(samples.shape[1])]


def _masked_median(samples: np.ndarray, include: np.ndarray, fallback: np.ndarray | None) -> np.ndarray:
    """Median over the included samples of each pixel; `fallback` (or NaN) where none is included.

    Excluded samples are pushed to the end by sorting them as +inf; the median then sits at the
    middle of each pixel's included count.
    """
    values = np.where(include[:, :, None], samples, np.inf).astype(np.float32)
    values.sort(axis=0)
    included = include.sum(axis=0)
    low = np.maximum(included - 1, 0) // 2
    high = np.minimum(included // 2, len(values) - 1)
    shape = (1, values.shape[1], values.shape[2])
    low_values = np.take_along_axis(values, np.broadcast_to(low[None, :, None], shape), axis=0)[0]
    high_values = np.take_along_axis(values, np.broadcast_to(high[None, :, None], shape), axis=0)[0]
    middle = (low_values + np.where(np.isfinite(high_values), high_values, low_values)) / 2
    empty = np.full_like(middle, np.nan) if fallback is None else fallback
    return np.where((included > 0)[:, None], middle, empty).astype(np.float32)


def _choose_from_surroundings(
    median: np.ndarray,
    enclosed: np.ndarray,
    rows: np.ndarray,
    columns: np.ndarray,
    candidates: np.ndarray,
    shares: np.ndarray,
    evidence: np.ndarray,
    penalty: np.ndarray,
    smoothing: float,
) -> np.ndarray:
    """For each changing pixel, the index of the candidate colour that best continues the background.

    Pixels are decided in rings of growing distance from the trusted area (unchanged and not
    enclosed). Each ring is predicted by a Gaussian-weighted average of the background decided
    so far. A candidate's cost is the penalty for its departure from that prediction (how rare such
    a miss is on this background), minus the log of its share of the samples, minus its seam
    evidence. The penalty is scaled by the support behind the prediction: 1 next to the trusted
    area; for a decided pixel, its neighbours' support times the probability its choice had among
    the candidates. A choice that barely won thus lends little weight further in, and a wrong one
    made at a texture edge fades instead of feeding on itself ring after ring, while a clear one
    (a subject that stayed, against the background it hid) carries inward.
    """
    trusted = (~enclosed).astype(np.float32)[:, :, None]
    # Per pixel: the colour decided so far (0 where undecided), 1 where decided, and how sure that
    # decision was; kept as one array so that a ring needs one blur.
    layers = np.concatenate([median * trusted, trusted, trusted], axis=2)
    distance = cv2.distanceTransform(enclosed.astype(np.uint8), cv2.DIST_L2, 3)
    distance = np.minimum(distance, sum(enclosed.shape))  # finite when nothing is trusted (the whole frame changed)
    ring_of_pixel = np.ceil(distance[rows, columns]).astype(np.int64)
    chosen = np.zeros(len(rows), np.int64)
    reach = max(1, int(np.ceil(3 * smoothing)))
    for ring in np.unique(ring_of_pixel):
        members = np.flatnonzero(ring_of_pixel == ring)
        r, c = rows[members], columns[members]
        top, bottom = max(0, r.min() - reach), min(median.shape[0], r.max() + reach + 1)
        left, right = max(0, c.min() - reach), min(median.shape[1], c.max() + reach + 1)
        blurred = cv2.GaussianBlur(layers[top:bottom, left:right], (0, 0), smoothing, borderType=cv2.BORDER_CONSTANT)
        blurred = blurred[r - top, c - left]
        local_weight = np.maximum(blurred[:, 3], 1e-6)
        predicted = blurred[:, :3] / local_weight[:, None]
        support = np.minimum(blurred[:, 4] / local_weight, 1.0)
        error = np.abs(candidates[:, members] - predicted[None]).sum(axis=2)
        with np.errstate(divide="ignore"):
            cost = support[None] * _penalise(penalty, error) - np.log(shares[:, members]) - evidence[:, members]
        pick = np.argmin(cost, axis=0)
        # The winner's probability under a softmax of the costs: near 1 when no rival comes close.
        confidence = 1.0 / np.exp(cost[pick, np.arange(len(members))][None] - cost).sum(axis=0)
        isolated = local_weight < 1e-3  # nothing decided nearby yet: keep the reference cluster
        pick[isolated], confidence[isolated] = 0, 0.0
        chosen[members] = pick
        layers[r, c, :3] = candidates[pick, members]
        layers[r, c, 3] = 1.0
        layers[r, c, 4] = support * confidence
    return chosen


def _penalise(penalty: np.ndarray, error: np.ndarray) -> np.ndarray:
    """The penalty table (`_continuation_penalty`) looked up at L1 errors, rounded to whole levels."""
    return penalty[np.minimum(np.rint(error), len(penalty) - 1).astype(np.intp)]


def _continuation_penalty(image: np.ndarray, trusted: np.ndarray, smoothing: float) -> np.ndarray:
    """Penalty (in nats) for missing a prediction by each L1 error of 0..765 levels: minus the log of the
    share of trusted pixels whose prediction from one side misses by at least that much.

    The rings are predicted from the side already decided, so the trusted pixels are predicted from
    the half of a Gaussian neighbourhood to their left, right, top or bottom. On a busy background,
    texture edges make large misses common, so a large miss is weak evidence there; on a smooth one
    it is strong. The penalty is at most a nat per 3 levels of miss, so noise is not over-weighted,
    and a nat per 30 levels when too little is trusted to measure.
    """
    levels = np.arange(766, dtype=np.float32)
    radius = max(1, int(np.ceil(3 * smoothing)))
    kernel = cv2.getGaussianKernel(2 * radius + 1, smoothing).astype(np.float32)
    before = kernel.copy()
    before[radius:] = 0.0  # the taps on one side, without the centre
    after = before[::-1].copy()
    full_half = float(before.sum())
    mask = trusted.astype(np.float32)
    masked = image * mask[:, :, None]
    counts = np.zeros(len(levels), np.int64)
    for along_x, along_y in ((before, kernel), (after, kernel), (kernel, before), (kernel, after)):
        weight = cv2.sepFilter2D(mask, -1, along_x, along_y, borderType=cv2.BORDER_CONSTANT)
        total = cv2.sepFilter2D(masked, -1, along_x, along_y, borderType=cv2.BORDER_CONSTANT)
        usable = trusted & (weight > 0.9 * full_half)
        error = np.abs(total[usable] / weight[usable][:, None] - image[usable]).sum(axis=1)
        counts += np.bincount(np.minimum(np.rint(error), len(levels) - 1).astype(np.intp), minlength=len(levels))
    samples = int(counts.sum())
    if samples < 16:
        return levels / 30.0
    at_least = np.cumsum(counts[::-1])[::-1] / samples
    return np.minimum(-np.log(np.maximum(at_least, 0.5 / samples)), levels / 3.0).astype(np.float32)


def _seam_verdicts(
    frame: np.ndarray,
    reference: np.ndarray,
    differs: np.ndarray,
    rows: np.ndarray,
    columns: np.ndarray,
    penalty: np.ndarray,
    smoothing: float,
) -> np.ndarray:
    """At the pixels (rows, columns): the verdict on the region of `differs` (one frame's difference
    from the reference) that each lies in, or 0 outside every region.

    Along a region's edge the reference just outside predicts what continues it. The verdict is the
    mean, over that edge band, of how much more the reference departs from the prediction than the
    frame does (penalty nats): positive where the frame continues its surroundings and the reference
    has a seam (background the reference hid), negative where the frame has the seam (a subject in
    front). One texture edge cannot decide it, since the whole edge is weighed. The prediction comes
    from the reference, not the frame, so a subject whose colour nearly matches the background in
    places cannot vouch for itself there.
    """
    regions = differs.astype(np.uint8)
    count, labels = cv2.connectedComponents(regions, connectivity=8)
    if count < 2:
        return np.zeros(len(rows), np.float32)
    reach = max(1, int(np.ceil(3 * smoothing)))  # only the regions and their surroundings matter
    x, y, w, h = cv2.boundingRect(regions)
    top, left = max(0, y - reach), max(0, x - reach)
    window = (slice(top, y + h + reach), slice(left, x + w + reach))
    agree = (~differs[window]).astype(np.float32)[:, :, None]
    known = reference[window].astype(np.float32)
    blurred = cv2.GaussianBlur(
        np.concatenate([known * agree, agree], axis=2), (0, 0), smoothing, borderType=cv2.BORDER_CONSTANT
    )
    edge = differs[window] & (blurred[:, :, 3] > 0.05)  # within about 1.6 sigma of the region's edge
    share = blurred[:, :, 3][edge]
    predicted = blurred[:, :, :3][edge] / share[:, None]
    frame_miss = np.abs(frame[window][edge].astype(np.float32) - predicted).sum(axis=1)
    reference_miss = np.abs(known[edge] - predicted).sum(axis=1)
    gain = _penalise(penalty, reference_miss) - _penalise(penalty, frame_miss)
    label = labels[window][edge]
    # (np.bincount gives int64 for an empty band: a frame unlike the reference everywhere, a flash or a cut.)
    verdict = np.bincount(label, weights=share * gain, minlength=count).astype(np.float64)
    verdict /= np.maximum(np.bincount(label, weights=share, minlength=count).astype(np.float64), 1e-6)
    verdict[0] = 0.0
    return verdict[labels[rows, columns]].astype(np.float32)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with every region it encloses filled in."""
    filled = np.zeros(mask.shape, np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | mask


def _islands_to_inpaint(islands: np.ndarray, changing: np.ndarray, turned: np.ndarray) -> np.ndarray:
    """The enclosed unchanged islands most of whose border turned away from the reference cluster."""
    holes = np.zeros(islands.shape, bool)
    if not islands.any():
        return holes
    count, labels = cv2.connectedComponents(islands.astype(np.uint8), connectivity=4)
    kernel = np.ones((5, 5), np.uint8)
    for label in range(1, count):
        island = labels == label
        border = cv2.dilate(island.astype(np.uint8), kernel).astype(bool) & changing
        if border.any() and turned[border].mean() >= 0.5:
            holes |= island
    return holes
