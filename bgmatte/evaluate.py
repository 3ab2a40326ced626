"""The paper's evaluation metrics, as pure numpy functions, and the folder-level evaluation behind `bgmatte eval`.

The definitions follow the MATLAB/Octave evaluation that BackgroundMattingV2 ships in its `eval/` folder
(`compute_sad_loss.m`, `compute_mse_loss.m`, `compute_gradient_loss.m`, `gaussgradient.m`,
`compute_connectivity_error.m`, `benchmark.m`), which is the Deep Image Matting evaluation code (Ning Xu, 2018)
with one change: BackgroundMattingV2 dropped Deep Image Matting's division by 1000 from the gradient and
connectivity errors, and kept it for SAD only. The trimap's unknown region is where it equals 128.

Every alpha matte here is a float array (H, W) in [0, 1]; the MATLAB code works on 8-bit values divided by
255, so its numbers are ours for 8-bit images (up to its single-precision rounding; we compute in float64).

Files compared pixel for pixel are read as stored: EXIF orientation is applied to no matte, trimap or foreground,
since they are data, and a tag on some files but not on others would silently turn one against the rest. The
source and plate a model is run on are photographs: they are turned upright by their EXIF orientation, as viewers
show them, unless the ground-truth matte fits only their pixels as stored (`bgmatte.io.images.read_to_fit`).
Mattes are read by `bgmatte.io.images.read_matte` (an RGBA file's alpha channel, else grey; float files must be
in [0, 1]); a trimap must hold only 0, 128 and 255.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from bgmatte.errors import BgmatteError
from bgmatte.io import images
from bgmatte.io.files import refuse_existing

if TYPE_CHECKING:  # pragma: no cover
    import torch

UNKNOWN = 128
"""The trimap value of the unknown region, over which the trimap-based metrics are computed."""

METRICS = ("sad", "mse", "grad", "conn", "fgr_mse", "sad_all", "mse_all")
"""The metric names, in the order of tables and JSON."""

TRIMAP_METRICS = ("sad", "mse", "grad", "conn", "fgr_mse")
"""The metrics that need a trimap (all but the whole-frame ones)."""

TRIMAP_VALUES = (0, UNKNOWN, 255)
"""The only values a trimap may hold: background, unknown, foreground."""

IMAGE_SUFFIXES = images.IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# Metrics on one image.


def _unknown(trimap: np.ndarray) -> np.ndarray:
    return np.asarray(trimap) == UNKNOWN


def _as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def sad(pred: np.ndarray, true: np.ndarray, trimap: np.ndarray) -> float:
    """Sum of absolute alpha differences over the unknown region, divided by 1000 (`compute_sad_loss.m`)."""
    error = np.abs(_as_float(pred) - _as_float(true))
    return float(error[_unknown(trimap)].sum() / 1000.0)


def mse(pred: np.ndarray, true: np.ndarray, trimap: np.ndarray) -> float | None:
    """Mean squared alpha error over the unknown region (`compute_mse_loss.m`: the sum over the unknown pixels
    divided by their number); None when the trimap has no unknown pixel, where MATLAB would give NaN."""
    unknown = _unknown(trimap)
    count = int(unknown.sum())
    if count == 0:
        return None
    error = (_as_float(pred) - _as_float(true)) ** 2
    return float(error[unknown].sum() / count)


def sad_all(pred: np.ndarray, true: np.ndarray) -> float:
    """SAD over the whole frame, divided by 1000 like `sad`: a background matting model must be right
    everywhere, not only where a trimap says the matte is hard."""
    return float(np.abs(_as_float(pred) - _as_float(true)).sum() / 1000.0)


def mse_all(pred: np.ndarray, true: np.ndarray) -> float:
    """MSE over the whole frame (the mean over every pixel)."""
    return float(np.mean((_as_float(pred) - _as_float(true)) ** 2))


def _mat2gray(image: np.ndarray) -> np.ndarray:
    """MATLAB's `mat2gray`: rescale so that the image's minimum is 0 and its maximum 1. A constant image is
    only clipped to [0, 1] there; its gradient is zero either way."""
    image = _as_float(image)
    low, high = float(image.min()), float(image.max())
    if high == low:
        return np.clip(image, 0.0, 1.0)
    return (image - low) / (high - low)


def gauss_derivative_kernel(sigma: float = 1.4) -> np.ndarray:
    """The x-derivative-of-Gaussian kernel of `gaussgradient.m`: size 2*ceil(sigma*sqrt(-2*ln(sqrt(2*pi)*sigma*
    0.01)))+1 (9x9 for sigma 1.4), entry (i, j) = G(i) * G'(j) for offsets from the centre, scaled to unit L2 norm.
    The y kernel is its transpose."""
    halfsize = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * 1e-2)))
    offsets = np.arange(-halfsize, halfsize + 1, dtype=np.float64)
    gauss = np.exp(-(offsets**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    dgauss = -offsets * gauss / sigma**2
    kernel = np.outer(gauss, dgauss)
    return kernel / math.sqrt(float((kernel**2).sum()))


def gauss_gradient(image: np.ndarray, sigma: float = 1.4) -> tuple[np.ndarray, np.ndarray]:
    """The x and y gradients of `image` by derivative-of-Gaussian filters, as `gaussgradient.m` computes them:
    a true convolution (not correlation) with replicated borders."""
    kernel_x = gauss_derivative_kernel(sigma)
    image = np.ascontiguousarray(_as_float(image))
    # cv2.filter2D correlates; flipping the kernel both ways makes it the convolution of imfilter(..., 'conv').
    grad_x = cv2.filter2D(image, cv2.CV_64F, np.ascontiguousarray(kernel_x[::-1, ::-1]),
                          borderType=cv2.BORDER_REPLICATE)
    grad_y = cv2.filter2D(image, cv2.CV_64F, np.ascontiguousarray(kernel_x.T[::-1, ::-1]),
                          borderType=cv2.BORDER_REPLICATE)
    return grad_x, grad_y


def gradient_error(pred: np.ndarray, true: np.ndarray, trimap: np.ndarray, sigma: float = 1.4) -> float:
    """Gradient error of `compute_gradient_loss.m` as BackgroundMattingV2 ships it: both mattes min-max normalised
    (`mat2gray`), gradient magnitudes by derivative-of-Gaussian filters (sigma 1.4), and the sum of their squared
    difference over the unknown region, not divided by 1000 (Deep Image Matting's original divides)."""
    pred_x, pred_y = gauss_gradient(_mat2gray(pred), sigma)
    true_x, true_y = gauss_gradient(_mat2gray(true), sigma)
    error = (np.hypot(pred_x, pred_y) - np.hypot(true_x, true_y)) ** 2
    return float(error[_unknown(trimap)].sum())


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask, as MATLAB's `bwconncomp(mask, 4)` followed by `max`
    picks it: on a tie, the component met first in column-major order."""
    if not mask.any():
        return np.zeros_like(mask)
    # Labelling the transpose makes OpenCV's row-major scan MATLAB's column-major one.
    _, labels = cv2.connectedComponents(np.ascontiguousarray(mask.T).astype(np.uint8), connectivity=4)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # the background
    largest = np.flatnonzero(sizes == sizes.max())
    if len(largest) > 1:  # a tie: the component whose first pixel comes first in column-major order
        first_pixel = [int(np.argmax(labels.ravel() == label)) for label in largest]
        largest = largest[[int(np.argmin(first_pixel))]]
    return (labels == largest[0]).T


def connectivity_error(
    pred: np.ndarray, true: np.ndarray, trimap: np.ndarray, step: float = 0.1, theta: float = 0.15
) -> float:
    """Connectivity error of `compute_connectivity_error.m` (p = 1) as BackgroundMattingV2 ships it: for each
    threshold t = step, 2*step, ..., 1, the largest 4-connected component of (pred >= t) & (true >= t); a pixel's
    level l is the threshold before the first one at which it leaves that component (1 if it never does);
    d = alpha - l, phi = 1 - d * (d >= theta); the error is the sum of |phi_pred - phi_true| over the unknown
    region, not divided by 1000 (Deep Image Matting's original divides)."""
    pred = _as_float(pred)
    true = _as_float(true)
    count = int(math.floor(1.0 / step + 1e-9))
    # Rounded to the nearest decimals, like MATLAB's 0:step:1 gives exact 0.6 where 6*0.1 does not.
    thresholds = [round(k * step, 12) for k in range(count + 1)]
    level = np.full(pred.shape, -1.0)
    for previous, threshold in zip(thresholds[:-1], thresholds[1:]):
        omega = _largest_component((pred >= threshold) & (true >= threshold))
        level[(level == -1.0) & ~omega] = previous
    level[level == -1.0] = 1.0
    pred_d = pred - level
    true_d = true - level
    pred_phi = 1.0 - pred_d * (pred_d >= theta)
    true_phi = 1.0 - true_d * (true_d >= theta)
    return float(np.abs(pred_phi - true_phi)[_unknown(trimap)].sum())


def foreground_mse(
    pred_fgr: np.ndarray, true_fgr: np.ndarray, true_pha: np.ndarray, trimap: np.ndarray
) -> float | None:
    """Foreground MSE of `benchmark.m`: both foregrounds zeroed where the true alpha is 0, then `compute_mse_loss`
    per colour channel (squared error summed over the unknown region, divided by the number of unknown pixels),
    averaged over the channels; None when the trimap has no unknown pixel."""
    unknown = _unknown(trimap)
    count = int(unknown.sum())
    if count == 0:
        return None
    visible = (_as_float(true_pha) > 0)[..., None]
    error = ((_as_float(pred_fgr) - _as_float(true_fgr)) * visible) ** 2
    return float(np.mean(error[unknown].sum(axis=0) / count))


def _shape_text(array: np.ndarray) -> str:
    """An image array's size as WIDTHxHEIGHT, the order every size in bgmatte's messages (and image viewers) uses."""
    return f"{array.shape[1]}x{array.shape[0]}"


def score_image(
    pred_pha: np.ndarray,
    true_pha: np.ndarray,
    trimap: np.ndarray | None = None,
    pred_fgr: np.ndarray | None = None,
    true_fgr: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Every metric for one image, keyed as `METRICS`. Without a trimap, or with one that has no unknown pixel
    (where they measure nothing, and zeros would pull the means down), the trimap-based metrics are None, and
    without both foregrounds `fgr_mse` is None; mattes are (H, W) floats in [0, 1], foregrounds (H, W, 3)."""
    pred_pha = _as_float(pred_pha)
    true_pha = _as_float(true_pha)
    if pred_pha.ndim != 2 or true_pha.ndim != 2:
        raise BgmatteError("alpha mattes must be single-channel (H, W) arrays")
    if pred_pha.shape != true_pha.shape:
        raise BgmatteError(f"predicted alpha is {_shape_text(pred_pha)} but the ground truth is "
                           f"{_shape_text(true_pha)}")
    scores: dict[str, float | None] = dict.fromkeys(METRICS)
    scores["sad_all"] = sad_all(pred_pha, true_pha)
    scores["mse_all"] = mse_all(pred_pha, true_pha)
    if trimap is None:
        return scores
    trimap = np.asarray(trimap)
    if trimap.shape != true_pha.shape:
        raise BgmatteError(f"trimap is {_shape_text(trimap)} but the ground-truth alpha is "
                           f"{_shape_text(true_pha)}")
    if not _unknown(trimap).any():
        return scores
    scores["sad"] = sad(pred_pha, true_pha, trimap)
    scores["mse"] = mse(pred_pha, true_pha, trimap)
    scores["grad"] = gradient_error(pred_pha, true_pha, trimap)
    scores["conn"] = connectivity_error(pred_pha, true_pha, trimap)
    if pred_fgr is not None and true_fgr is not None:
        for name, fgr in (("predicted", pred_fgr), ("ground-truth", true_fgr)):
            if np.shape(fgr) != (*true_pha.shape, 3):
                raise BgmatteError(f"{name} foreground has shape {np.shape(fgr)} but should be (H, W, 3) with the "
                                   f"alpha's {_shape_text(true_pha)}: {(*true_pha.shape, 3)}")
        scores["fgr_mse"] = foreground_mse(pred_fgr, true_fgr, true_pha, trimap)
    return scores


def mean_scores(per_image: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The mean of each metric over the images that have it (None where no image has it)."""
    means: dict[str, float | None] = {}
    for name in METRICS:
        values = [row[name] for row in per_image if row.get(name) is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


# ---------------------------------------------------------------------------------------------------------------
# Folders.


@dataclass(frozen=True)
class Evaluation:
    """The scores of a folder of predictions: the mean row, one row per image (with its "name"), and notes on
    what could not be computed."""

    mean: dict[str, float | None]
    per_image: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape: {"mean": {metric: value}, "per_image": [{"name": ..., metric: value}]}."""
        return {"mean": dict(self.mean), "per_image": [dict(row) for row in self.per_image]}


def list_images(folder: Path) -> dict[str, Path]:
    """The image files of `folder` by file stem, hidden ones skipped (`bgmatte.io.images.list_images`); two
    images with one stem is an error, since files are matched across folders by stem."""
    return images.by_stem(images.list_images(folder), "files are matched across folders by name")


def read_image(path: Path, fit: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB image file as (H, W, 3) float64 in [0, 1] (8- or 16-bit, any format OpenCV reads): as stored, or
    for a photograph given the (width, height) of its matte, `fit`, upright unless only as stored fits it."""
    if fit is None:
        return images.read_image(path, dtype="float32", orient=False).astype(np.float64)
    return images.read_to_fit(path, fit, dtype="float32").astype(np.float64)


def read_alpha(path: Path) -> np.ndarray:
    """An alpha matte file as (H, W) float64 in [0, 1]: an RGBA file's alpha, else its grey level; colour,
    and float values outside [0, 1], are refused (`bgmatte.io.images.read_matte`)."""
    return images.read_matte(path).astype(np.float64)


def read_trimap(path: Path) -> np.ndarray:
    """A trimap file as (H, W) uint8 values, as stored; a 16-bit trimap is brought to 8 bits.

    Values other than 0, 128 (unknown) and 255 are refused: they would silently move pixels into or out of the
    unknown region the metrics sum over (a JPEG trimap, or one resized smoothly, has values in between; one coded
    0/1/2 has no 128 at all, and would score a perfect zero).
    """
    data = images.read_as_stored(path)
    if data.ndim == 3:
        colour = data[:, :, :3]
        if (colour != colour[:, :, :1]).any():
            raise BgmatteError(f"{path}: a trimap must be grey, but this one has colour")
        data = colour[:, :, 0]
    if data.dtype == np.uint16:
        data = np.round(data / 257.0).astype(np.uint8)
    elif data.dtype != np.uint8:
        raise BgmatteError(f"{path}: a trimap must be an 8- or 16-bit image, not {data.dtype}")
    present = np.unique(data)
    stray = present[~np.isin(present, TRIMAP_VALUES)]
    if stray.size:
        shown = ", ".join(str(int(value)) for value in stray[:4]) + (", ..." if stray.size > 4 else "")
        hint = " (JPEG compression changes values: save trimaps as PNG)" if path.suffix.lower() in (".jpg", ".jpeg") \
            else ""
        raise BgmatteError(f"{path}: a trimap may only hold 0, 128 (unknown) and 255, but this one also holds "
                           f"{shown}{hint}")
    return data


def _crop(array: np.ndarray, height: int, width: int, path: Path, full: tuple[int, int]) -> np.ndarray:
    """Crop to (height, width): arrays of the ground truth's size, or already of the cropped size, are accepted."""
    if array.shape[:2] not in (full, (height, width)):
        raise BgmatteError(f"{path}: image is {array.shape[1]}x{array.shape[0]} but the ground truth is "
                           f"{full[1]}x{full[0]}")
    return array[:height, :width]


def _subfolder(root: Path, name: str, required: bool) -> Path | None:
    folder = root / name
    if folder.is_dir():
        return folder
    if required:
        raise BgmatteError(f"{folder}: folder not found")
    return None


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, *, crop_multiple: int = 4) -> Evaluation:
    """Score predicted `pha/` (and optionally `fgr/`) in `pred_dir` against `pha/`, `fgr/` and `trimap/` in
    `gt_dir`, matching files by stem, and average over the images, as BackgroundMattingV2's `benchmark.m` does.

    Every image of `gt_dir/pha` must have a prediction. Like `benchmark.m`, both are cropped to the ground
    truth's size rounded down to a multiple of `crop_multiple` (1 crops nothing); a prediction may have the full
    or the cropped size. Without a `trimap/` folder the trimap-based metrics (sad, mse, grad, conn, fgr_mse) are
    None and a note says so, as they are for an image whose trimap has no unknown pixel; without `fgr/` in either
    folder, fgr_mse is None. A folder that exists but lacks an image's file is an error, not a silent skip. Files
    are read as stored, EXIF orientation ignored (see the module's notes).
    """
    pred_root, gt_root = Path(pred_dir), Path(gt_dir)
    for root in (pred_root, gt_root):
        if not root.is_dir():
            raise BgmatteError(f"{root}: folder not found")
    if crop_multiple < 1:
        raise BgmatteError(f"crop_multiple must be at least 1, not {crop_multiple}")
    gt_pha_dir = _subfolder(gt_root, "pha", required=True)
    pred_pha_dir = _subfolder(pred_root, "pha", required=True)
    trimap_dir = _subfolder(gt_root, "trimap", required=False)
    gt_fgr_dir = _subfolder(gt_root, "fgr", required=False)
    pred_fgr_dir = _subfolder(pred_root, "fgr", required=False)

    gt_pha_files = list_images(gt_pha_dir)
    if not gt_pha_files:
        raise BgmatteError(f"{gt_pha_dir}: no images found")
    pred_pha_files = list_images(pred_pha_dir)
    trimap_files = list_images(trimap_dir) if trimap_dir else {}
    use_fgr = gt_fgr_dir is not None and pred_fgr_dir is not None
    gt_fgr_files = list_images(gt_fgr_dir) if use_fgr else {}
    pred_fgr_files = list_images(pred_fgr_dir) if use_fgr else {}

    def required(files: dict[str, Path], folder: Path, stem: str) -> Path:
        if stem not in files:
            raise BgmatteError(f"{folder}: no image named {stem!r} (needed for {gt_pha_files[stem]})")
        return files[stem]

    notes = []
    if trimap_dir is None:
        notes.append(f"no trimap/ folder in {gt_root}: sad, mse, grad, conn and fgr_mse were not computed")
    elif not use_fgr:
        missing = gt_root / "fgr" if gt_fgr_dir is None else pred_root / "fgr"
        notes.append(f"no {missing} folder: fgr_mse was not computed")

    per_image = []
    for stem, gt_path in gt_pha_files.items():
        true_pha = read_alpha(gt_path)
        full = true_pha.shape
        height = full[0] // crop_multiple * crop_multiple
        width = full[1] // crop_multiple * crop_multiple
        if height == 0 or width == 0:
            raise BgmatteError(f"{gt_path}: image is smaller than {crop_multiple}x{crop_multiple}")
        true_pha = true_pha[:height, :width]
        pred_path = required(pred_pha_files, pred_pha_dir, stem)
        pred_pha = _crop(read_alpha(pred_path), height, width, pred_path, full)
        trimap = pred_fgr = true_fgr = None
        if trimap_dir is not None:
            trimap_path = required(trimap_files, trimap_dir, stem)
            trimap = _crop(read_trimap(trimap_path), height, width, trimap_path, full)
        if use_fgr:
            fgr_paths = (required(pred_fgr_files, pred_fgr_dir, stem), required(gt_fgr_files, gt_fgr_dir, stem))
            pred_fgr, true_fgr = (_crop(read_image(p), height, width, p, full) for p in fgr_paths)
        try:
            scores = score_image(pred_pha, true_pha, trimap, pred_fgr, true_fgr)
        except BgmatteError as exc:
            raise BgmatteError(f"{pred_path}: {exc}") from None
        if trimap is not None and scores["mse"] is None:
            notes.append(f"{stem}: the trimap has no unknown (128) pixel, so sad, mse, grad, conn and fgr_mse are "
                         "not computed for it")
        per_image.append({"name": stem, **scores})
    return Evaluation(mean=mean_scores(per_image), per_image=per_image, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# Running a model over a dataset first.


PREDICTED = ("pha", "fgr")
"""The subfolders `predict_folder` writes."""


def check_dataset(data_dir: str | Path, *, crop_multiple: int = 4) -> None:
    """Refuse, before a model is loaded and run, a dataset that cannot be scored or whose files do not go together:
    no ground-truth mattes (`pha/` missing or empty), a source image without its plate (every source is run, scored
    or not), a matte without its source image, or without its trimap or foreground where `trimap/` or `fgr/` is
    there (`evaluate_folders` needs them all), a matte of
    another size than its source (either way round: a photograph may be stored turned, with an EXIF orientation),
    a plate of another size, or a trimap or foreground of another size than its matte (cropped to a multiple of
    `crop_multiple` or not). From the files' names and headers alone."""
    root = Path(data_dir)
    if not root.is_dir():
        raise BgmatteError(f"{root}: folder not found")
    src_dir = _subfolder(root, "src", required=True)
    bgr_dir = _subfolder(root, "bgr", required=True)
    sources, plates = list_images(src_dir), list_images(bgr_dir)
    pha_dir = _subfolder(root, "pha", required=True)
    mattes = list_images(pha_dir)
    if not mattes:
        raise BgmatteError(f"{pha_dir}: no images found (the ground-truth mattes to score against)")
    others = [(list_images(folder), folder, what) for folder, what in
              ((root / "trimap", "trimap"), (root / "fgr", "foreground")) if folder.is_dir()]
    for stem, matte in mattes.items():
        for files, folder, what in ((sources, src_dir, "source image"), (plates, bgr_dir, "plate"), *others):
            if stem not in files:
                raise BgmatteError(f"{folder}: no {what} named {stem!r} (needed for {matte})")
    for stem, source in sources.items():
        if stem not in plates:  # predict_folder runs every source, scored or not
            raise BgmatteError(f"{bgr_dir}: no plate named {stem!r} (needed for {source})")
        size = images.header_size(source)
        for other, what in ((plates.get(stem), "plate"), (mattes.get(stem), "ground truth")):
            other_size = images.header_size(other) if other is not None else None
            if size and other_size and other_size not in (size, size[::-1]):
                raise BgmatteError(f"{other}: the {what} is {other_size[0]}x{other_size[1]} but its source {source} "
                                   f"is {size[0]}x{size[1]}")
    for stem, matte in mattes.items():
        width, height = images.header_size(matte) or (0, 0)
        cropped = (width // crop_multiple * crop_multiple, height // crop_multiple * crop_multiple)
        for files, _, _ in others:  # of the matte's size, or already cropped as `evaluate_folders` crops
            size = images.header_size(files[stem])
            if width and size and size not in ((width, height), cropped):
                raise BgmatteError(f"{files[stem]}: image is {size[0]}x{size[1]} but the ground truth is "
                                   f"{width}x{height}")


def check_prediction_folder(data_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> None:
    """Refuse an `out_dir` that `predict_folder` must not write into: a file, `data_dir` itself (whose `pha/` and
    `fgr/` are the ground truth), or a folder already holding a prediction for one of `data_dir/src`'s images,
    unless `overwrite`. It only looks at names, so the CLI calls it before loading a model."""
    data_root, out_root = Path(data_dir), Path(out_dir)
    if out_root.exists() and not out_root.is_dir():
        raise BgmatteError(f"{out_root}: is a file, not a folder (for the predictions)")
    if out_root.is_dir() and data_root.is_dir() and out_root.resolve() == data_root.resolve():
        raise BgmatteError(f"{out_root}: is the data folder itself; the predictions would replace its ground truth "
                           "(give another --out)")
    src_dir = data_root / "src"
    if overwrite or not src_dir.is_dir():  # predict_folder names a missing src/ folder
        return
    for stem in list_images(src_dir):
        for kind in PREDICTED:
            path = out_root / kind / f"{stem}.png"
            refuse_existing(path, overwrite)


def predict_folder(model: torch.nn.Module, data_dir: str | Path, out_dir: str | Path, *,
                   crop_multiple: int = 4, overwrite: bool = False) -> int:
    """Run `model` (returning pha and fgr first, like MattingRefine and MattingBase) over the `src/` images of
    `data_dir` with their `bgr/` plates, and write `pha/` and `fgr/` 8-bit PNGs by stem into `out_dir`.

    Inputs are cropped to a multiple of `crop_multiple`, as the metrics crop them; returns the number of images.
    Existing predictions are refused before any image is read, unless `overwrite` (`check_prediction_folder`).
    """
    import torch

    data_root, out_root = Path(data_dir), Path(out_dir)
    if not data_root.is_dir():
        raise BgmatteError(f"{data_root}: folder not found")
    src_dir = _subfolder(data_root, "src", required=True)
    bgr_dir = _subfolder(data_root, "bgr", required=True)
    src_files, bgr_files = list_images(src_dir), list_images(bgr_dir)
    gt_pha_dir = data_root / "pha"
    mattes = list_images(gt_pha_dir) if gt_pha_dir.is_dir() else {}
    if not src_files:
        raise BgmatteError(f"{src_dir}: no images found")
    check_prediction_folder(data_root, out_root, overwrite=overwrite)
    for kind in PREDICTED:
        try:
            (out_root / kind).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BgmatteError(f"{out_root}: cannot create the folder {exc.filename or out_root / kind} "
                               f"({exc.strerror or exc})") from None
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32

    def tensor(image: np.ndarray, height: int, width: int) -> torch.Tensor:
        image = image[:height, :width]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device, dtype)

    for stem, src_path in src_files.items():
        if stem not in bgr_files:
            raise BgmatteError(f"{bgr_dir}: no background plate named {stem!r} (needed for {src_path})")
        bgr_path = bgr_files[stem]
        fit = images.header_size(mattes[stem]) if stem in mattes else None  # the ground truth's, if any
        src, bgr = read_image(src_path, fit), read_image(bgr_path, fit)
        src_shape, bgr_shape = src.shape[:2], bgr.shape[:2]
        if src_shape != bgr_shape:
            raise BgmatteError(f"{bgr_path}: plate is {bgr_shape[1]}x{bgr_shape[0]} but the source is "
                               f"{src_shape[1]}x{src_shape[0]}")
        height = src_shape[0] // crop_multiple * crop_multiple
        width = src_shape[1] // crop_multiple * crop_multiple
        if height == 0 or width == 0:
            raise BgmatteError(f"{src_path}: image is smaller than {crop_multiple}x{crop_multiple}")
        with torch.inference_mode():
            outputs = model(tensor(src, height, width), tensor(bgr, height, width))
        pha = outputs[0][0, 0].float().clamp(0, 1).cpu().numpy()
        fgr = outputs[1][0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        for kind, image in (("pha", pha), ("fgr", fgr)):
            images.write_png(out_root / kind / f"{stem}.png", image, overwrite=overwrite)  # failures are one line
    return len(src_files)


def evaluate_model(model: torch.nn.Module, data_dir: str | Path, out_dir: str | Path | None = None, *,
                   crop_multiple: int = 4, overwrite: bool = False) -> Evaluation:
    """Run `model` over `data_dir/src` + `data_dir/bgr`, write its predictions into `out_dir` (a temporary folder
    removed afterwards when None) and score them against the ground truth in `data_dir` (`pha/`, `fgr/`,
    `trimap/`), with `evaluate_folders`. Predictions already in `out_dir` are refused unless `overwrite`; a dataset
    whose files do not go together (`check_dataset`) before the model runs."""
    check_dataset(data_dir, crop_multiple=crop_multiple)
    if out_dir is not None:
        predict_folder(model, data_dir, out_dir, crop_multiple=crop_multiple, overwrite=overwrite)
        return evaluate_folders(out_dir, data_dir, crop_multiple=crop_multiple)
    with tempfile.TemporaryDirectory(prefix="bgmatte-eval-") as temporary:
        predict_folder(model, data_dir, temporary, crop_multiple=crop_multiple)
        return evaluate_folders(temporary, data_dir, crop_multiple=crop_multiple)


# ---------------------------------------------------------------------------------------------------------------
# Presentation.

_FORMATS = {"sad": ".3f", "mse": ".6f", "grad": ".3f", "conn": ".3f", "fgr_mse": ".6f", "sad_all": ".3f",
            "mse_all": ".6f"}


def format_table(evaluation: Evaluation) -> str:
    """A plain-text table: the mean row first, then one row per image; '-' marks a metric not computed."""
    header = ["image", *METRICS]
    rows = [["mean", *(_cell(evaluation.mean[m], m) for m in METRICS)]]
    rows += [[str(row["name"]), *(_cell(row[m], m) for m in METRICS)] for row in evaluation.per_image]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(header), line(["-" * w for w in widths]), line(rows[0])]
    if len(rows) > 1:
        lines += [line(["-" * w for w in widths]), *(line(r) for r in rows[1:])]
    lines += [f"note: {note}" for note in evaluation.notes]
    return "\n".join(lines)


def _cell(value: float | None, metric: str) -> str:
    return "-" if value is None else format(value, _FORMATS[metric])
