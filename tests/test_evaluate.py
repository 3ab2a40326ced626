"""The paper's metrics (BackgroundMattingV2's eval/*.m) pinned against values worked out by hand."""
from __future__ import annotations

import math
import struct
import zlib
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import pytest

from bgmatte.errors import BgmatteError
from bgmatte.evaluate import (
    METRICS,
    TRIMAP_METRICS,
    connectivity_error,
    evaluate_folders,
    foreground_mse,
    format_table,
    gauss_derivative_kernel,
    gauss_gradient,
    gradient_error,
    mse,
    mse_all,
    sad,
    sad_all,
    score_image,
)

UNKNOWN_ALL = np.full((4, 4), 128, np.uint8)


def _trimap_with_unknown(shape, pixels):
    trimap = np.zeros(shape, np.uint8)
    for pixel in pixels:
        trimap[pixel] = 128
    return trimap


# --- SAD and MSE -------------------------------------------------------------------------------------------------


def test_sad_sums_absolute_errors_in_the_unknown_region_and_divides_by_1000():
    true = np.zeros((4, 4))
    pred = np.zeros((4, 4))
    pred[0, 0], pred[1, 1], pred[2, 2] = 0.5, -0.25 + 0.5, 1.0  # errors 0.5, 0.25, 1.0
    trimap = _trimap_with_unknown((4, 4), [(0, 0), (1, 1)])  # (2, 2) is known: not counted
    assert sad(pred, true, trimap) == pytest.approx((0.5 + 0.25) / 1000)


def test_mse_divides_by_the_number_of_unknown_pixels():
    true = np.zeros((4, 4))
    pred = np.zeros((4, 4))
    pred[0, 0] = 0.5
    pred[3, 3] = 1.0  # known pixel, ignored
    trimap = _trimap_with_unknown((4, 4), [(0, 0), (0, 1), (0, 2), (0, 3)])
    assert mse(pred, true, trimap) == pytest.approx(0.25 / 4)


def test_mse_without_unknown_pixels_is_none_not_nan():
    assert mse(np.ones((4, 4)), np.zeros((4, 4)), np.zeros((4, 4), np.uint8)) is None


def test_whole_frame_sad_and_mse_ignore_the_trimap():
    true = np.zeros((4, 4))
    pred = np.zeros((4, 4))
    pred[0, 0], pred[3, 3] = 0.5, 1.0
    assert sad_all(pred, true) == pytest.approx(1.5 / 1000)
    assert mse_all(pred, true) == pytest.approx((0.25 + 1.0) / 16)


# --- Gradient ------------------------------------------------------------------------------------------------------


def _gauss(x, sigma=1.4):
    return math.exp(-x * x / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))


def test_gauss_derivative_kernel_is_gaussgradient_m_for_sigma_1_4():
    kernel = gauss_derivative_kernel(1.4)
    # halfsize = ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) * 1.4 * 0.01))) = ceil(3.62) = 4
    assert kernel.shape == (9, 9)
    norm = math.sqrt(sum(_gauss(u) ** 2 for u in range(-4, 5)) * sum((v * _gauss(v) / 1.96) ** 2
                                                                      for v in range(-4, 5)))
    # entry (row offset 0, column offset +1) = G(0) * dG(1), dG(x) = -x G(x) / sigma^2
    assert kernel[4, 5] == pytest.approx(_gauss(0) * (-1 * _gauss(1) / 1.96) / norm)
    assert kernel[4, 5] == pytest.approx(-0.3154337161, abs=1e-9)
    assert np.sum(kernel**2) == pytest.approx(1.0)
    np.testing.assert_allclose(kernel, -kernel[:, ::-1])  # odd along x
    np.testing.assert_allclose(kernel, kernel[::-1, :])  # even along y


def test_gauss_gradient_is_a_convolution_with_replicated_borders():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(1).random((12, 15))
    kernel = gauss_derivative_kernel(1.4)
    grad_x, grad_y = gauss_gradient(image)
    np.testing.assert_allclose(grad_x, scipy_ndimage.convolve(image, kernel, mode="nearest"), atol=1e-12)
    np.testing.assert_allclose(grad_y, scipy_ndimage.convolve(image, kernel.T, mode="nearest"), atol=1e-12)


def test_gradient_error_of_an_impulse_is_the_squared_kernel_entry():
    # The true matte is one bright pixel; the prediction is empty (constant, so its gradient is 0). Next to the
    # impulse, |gradient| = |G(0) dG(1)| / norm (the y-derivative there is G(1) dG(0) = 0).
    true = np.zeros((11, 11))
    true[5, 5] = 1.0
    trimap = _trimap_with_unknown((11, 11), [(5, 6)])
    expected = gauss_derivative_kernel(1.4)[4, 5] ** 2
    assert gradient_error(np.zeros((11, 11)), true, trimap) == pytest.approx(expected)
    assert expected == pytest.approx(0.0994984293, abs=1e-9)


def test_gradient_error_is_not_divided_by_1000_and_sums_over_unknown_pixels():
    true = np.zeros((11, 11))
    true[5, 5] = 1.0
    trimap = _trimap_with_unknown((11, 11), [(5, 6), (5, 4), (6, 5), (4, 5)])  # the 4 symmetric neighbours
    expected = 4 * gauss_derivative_kernel(1.4)[4, 5] ** 2
    assert gradient_error(np.zeros((11, 11)), true, trimap) == pytest.approx(expected)


def test_gradient_error_normalises_each_matte_to_its_range_like_mat2gray():
    true = np.random.default_rng(2).random((8, 8))
    # a prediction that is the truth scaled into [0.2, 0.6] has the same mat2gray image, so no gradient error
    scaled = 0.2 + 0.4 * (true - true.min()) / (true.max() - true.min())
    assert gradient_error(scaled, true, UNKNOWN_ALL.repeat(2, 0).repeat(2, 1)) == pytest.approx(0.0, abs=1e-20)


# --- Connectivity --------------------------------------------------------------------------------------------------


def test_connectivity_of_a_pixel_cut_off_from_the_main_component():
    # The prediction cuts (0,0) off with two zeros; it is 0.8 where the truth is 1 everywhere. At t = 0.1 the
    # largest component of the intersection loses (0,0), (0,1), (1,0): their level is 0. The other 13 pixels stay
    # in it up to t = 1, so their level is 1 and d = 0 for both. Then:
    #   (0,0): pred d = 0.8 -> phi 0.2; true d = 1 -> phi 0   => 0.2
    #   (0,1), (1,0): pred d = 0 -> phi 1; true phi 0        => 1 each
    true = np.ones((4, 4))
    pred = np.ones((4, 4))
    pred[0, 1] = pred[1, 0] = 0.0
    pred[0, 0] = 0.8
    assert connectivity_error(pred, true, UNKNOWN_ALL) == pytest.approx(2.2)
    only_corner = _trimap_with_unknown((4, 4), [(0, 0)])
    assert connectivity_error(pred, true, only_corner) == pytest.approx(0.2)


def test_connectivity_level_is_the_last_threshold_a_pixel_stayed_connected():
    # (2,2) is 0.5 in the prediction, inside the main component: it leaves at t = 0.6, so its level is 0.5.
    # pred d = 0 -> phi 1; true d = 0.5 -> phi 0.5 => 0.5.
    # (3,3) is 0.55 in the truth and 1 in the prediction: it also leaves at t = 0.6, level 0.5.
    # pred d = 0.5 -> phi 0.5; true d = 0.05 < 0.15 -> phi 1 => 0.5 (the theta = 0.15 rule).
    true = np.ones((4, 4))
    pred = np.ones((4, 4))
    pred[2, 2] = 0.5
    true[3, 3] = 0.55
    assert connectivity_error(pred, true, UNKNOWN_ALL) == pytest.approx(1.0)


def test_connectivity_breaks_ties_between_components_in_matlab_column_major_order():
    # Two components of 2 pixels: A in row 0 (first in row-major order), B in column 0 (first in MATLAB's
    # column-major order). MATLAB keeps B at t <= 0.5, so A's level is 0: pred d 0.5 -> phi 0.5, true phi 0,
    # 0.5 for each A pixel; B (0.9 in the prediction) stays until t = 0.9, level 0.9: pred phi 1, true d = 0.1
    # -> phi 1, no error. Total 1.0 (picking A instead would give 1.2).
    true = np.zeros((4, 4))
    pred = np.zeros((4, 4))
    for pixel in [(0, 2), (0, 3), (2, 0), (3, 0)]:
        true[pixel] = 1.0
    pred[0, 2] = pred[0, 3] = 0.5
    pred[2, 0] = pred[3, 0] = 0.9
    assert connectivity_error(pred, true, UNKNOWN_ALL) == pytest.approx(1.0)


def test_connectivity_thresholds_hit_8_bit_tenths_exactly():
    # 153/255 is 0.6 and must count as >= the threshold 0.6, as in MATLAB's 0:0.1:1 (where 6 * 0.1 in floating
    # point is 0.6000000000000001). A 1x2 image, pixel 1 at 1.0 in both; pixel 0 at 0.6 predicted, 0.8 true.
    pred = np.array([[153 / 255, 1.0]])
    true = np.array([[204 / 255, 1.0]])
    trimap = np.full((1, 2), 128, np.uint8)
    # level of pixel 0 is 0.6 (pred leaves at t = 0.7): pred d = 0 -> phi 1; true d = 0.2 -> phi 0.8 => 0.2
    # (if 0.6 were missed, the level would be 0.5: pred d 0.1 -> phi 1; true d 0.3 -> phi 0.7 => 0.3)
    assert connectivity_error(pred, true, trimap) == pytest.approx(0.2)


def _reference_connectivity(pred, true, trimap, step=0.1):
    """A plain flood-fill reading of compute_connectivity_error.m, independent of OpenCV."""
    height, width = pred.shape
    level = -np.ones(pred.shape)
    for k in range(1, 11):
        t, previous = k / 10, (k - 1) / 10
        mask = (pred >= t) & (true >= t)
        seen = np.zeros(mask.shape, bool)
        best = []
        for x in range(width):  # column-major scan, like bwconncomp's numbering
            for y in range(height):
                if mask[y, x] and not seen[y, x]:
                    component, queue = [], deque([(y, x)])
                    seen[y, x] = True
                    while queue:
                        cy, cx = queue.popleft()
                        component.append((cy, cx))
                        for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                            if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                queue.append((ny, nx))
                    if len(component) > len(best):
                        best = component
        omega = np.zeros(mask.shape, bool)
        for pixel in best:
            omega[pixel] = True
        level[(level == -1) & ~omega] = previous
    level[level == -1] = 1
    pred_d, true_d = pred - level, true - level
    pred_phi = 1 - pred_d * (pred_d >= 0.15)
    true_phi = 1 - true_d * (true_d >= 0.15)
    return np.abs(pred_phi - true_phi)[trimap == 128].sum()


def test_connectivity_matches_a_flood_fill_reading_of_the_matlab_code_on_random_8_bit_mattes():
    rng = np.random.default_rng(3)
    for _ in range(3):
        true = cv2.GaussianBlur(rng.random((14, 17)), (5, 5), 1.5)
        true = np.round((true - true.min()) / (true.max() - true.min()) * 255) / 255
        pred = np.clip(np.round((true + rng.normal(0, 0.15, true.shape)) * 255), 0, 255) / 255
        trimap = np.where(rng.random(true.shape) < 0.6, 128, 0).astype(np.uint8)
        assert connectivity_error(pred, true, trimap) == pytest.approx(_reference_connectivity(pred, true, trimap))


# --- Foreground MSE ------------------------------------------------------------------------------------------------


def test_foreground_mse_masks_by_true_alpha_and_divides_by_unknown_pixels_then_averages_channels():
    true_pha = np.array([[1.0, 0.0], [0.5, 0.0]])
    true_fgr = np.zeros((2, 2, 3))
    pred_fgr = np.zeros((2, 2, 3))
    pred_fgr[..., 0] = 0.5  # counted where true alpha > 0: (0,0) and (1,0)
    pred_fgr[..., 1] = 1.0
    pred_fgr[0, 1, 1] = pred_fgr[1, 1, 1] = 1.0  # alpha 0 there: ignored
    trimap = np.full((2, 2), 128, np.uint8)
    # channel 0: 2 * 0.25 / 4 = 0.125; channel 1: 2 * 1 / 4 = 0.5; channel 2: 0 -> mean 0.625 / 3
    assert foreground_mse(pred_fgr, true_fgr, true_pha, trimap) == pytest.approx(0.625 / 3)
    trimap[1, 0] = 255  # known: now only (0,0) counts, over 3 unknown pixels
    assert foreground_mse(pred_fgr, true_fgr, true_pha, trimap) == pytest.approx((0.25 / 3 + 1 / 3) / 3)


# --- One image -----------------------------------------------------------------------------------------------------


def test_perfect_prediction_scores_zero_everywhere():
    rng = np.random.default_rng(4)
    pha = rng.random((8, 8))
    fgr = rng.random((8, 8, 3))
    scores = score_image(pha, pha, np.full((8, 8), 128, np.uint8), fgr, fgr)
    assert set(scores) == set(METRICS)
    assert all(value == pytest.approx(0.0, abs=1e-12) for value in scores.values())


def test_score_image_without_trimap_gives_only_whole_frame_metrics():
    scores = score_image(np.zeros((4, 4)), np.ones((4, 4)))
    assert scores["sad_all"] == pytest.approx(16 / 1000)
    assert scores["mse_all"] == pytest.approx(1.0)
    assert all(scores[name] is None for name in ("sad", "mse", "grad", "conn", "fgr_mse"))


def test_score_image_rejects_mismatched_sizes():
    with pytest.raises(BgmatteError, match="4x4.*5x4"):  # width x height, as every size bgmatte names
        score_image(np.zeros((4, 4)), np.zeros((4, 5)))


# --- Folders -------------------------------------------------------------------------------------------------------


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _dataset(root: Path, with_trimap=True, with_fgr=True):
    """Two 8x8 ground-truth images and predictions; 'b' is predicted perfectly."""
    rng = np.random.default_rng(5)
    gt, pred = root / "gt", root / "pred"
    for name in ("a", "b"):
        pha = (rng.random((8, 8)) * 255).astype(np.uint8)
        fgr = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        _write(gt / "pha" / f"{name}.png", pha)
        if with_fgr:
            _write(gt / "fgr" / f"{name}.png", fgr)
            _write(pred / "fgr" / f"{name}.png", fgr)
        if with_trimap:
            _write(gt / "trimap" / f"{name}.png", np.full((8, 8), 128, np.uint8))
        pred_pha = pha.copy()
        if name == "a":
            pred_pha[0, :] = 0
            pred_pha[0, 0] = 255  # the only pixel in row 0 that is nonzero
        _write(pred / "pha" / f"{name}.png", pred_pha)
    return pred, gt


def test_evaluate_folders_matches_score_image_and_averages_images(tmp_path):
    pred, gt = _dataset(tmp_path)
    result = evaluate_folders(pred, gt)
    assert [row["name"] for row in result.per_image] == ["a", "b"]
    a = cv2.imread(str(gt / "pha" / "a.png"), cv2.IMREAD_UNCHANGED) / 255
    pa = cv2.imread(str(pred / "pha" / "a.png"), cv2.IMREAD_UNCHANGED) / 255
    assert result.per_image[0]["sad"] == pytest.approx(np.abs(a - pa).sum() / 1000)
    assert result.per_image[1]["sad"] == 0.0
    assert result.per_image[0]["fgr_mse"] == 0.0
    for name in METRICS:
        assert result.mean[name] == pytest.approx((result.per_image[0][name] + result.per_image[1][name]) / 2)
    assert set(result.as_dict()) == {"mean", "per_image"}


def test_evaluate_folders_reads_16_bit_mattes_on_the_same_scale(tmp_path):
    pred, gt = _dataset(tmp_path)
    eight = evaluate_folders(pred, gt).per_image[0]
    pha16 = cv2.imread(str(pred / "pha" / "a.png"), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 257
    (pred / "pha" / "a.png").unlink()
    _write(pred / "pha" / "a.png", pha16)
    assert evaluate_folders(pred, gt).per_image[0]["sad"] == pytest.approx(eight["sad"])


def test_evaluate_folders_crops_to_a_multiple_of_4_like_benchmark_m(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    pha = np.zeros((6, 9), np.uint8)
    wrong = pha.copy()
    wrong[5, :] = 255  # row 5 and column 8 fall outside the 4x8 crop
    wrong[:, 8] = 255
    _write(gt / "pha" / "x.png", pha)
    _write(pred / "pha" / "x.png", wrong)
    assert evaluate_folders(pred, gt).mean["sad_all"] == 0.0
    assert evaluate_folders(pred, gt, crop_multiple=1).mean["sad_all"] == pytest.approx(14 / 1000)
    # a prediction of the cropped size is accepted too
    (pred / "pha" / "x.png").unlink()
    _write(pred / "pha" / "x.png", np.zeros((4, 8), np.uint8))
    assert evaluate_folders(pred, gt).mean["sad_all"] == 0.0


def test_evaluate_folders_without_trimaps_skips_trimap_metrics_with_a_note(tmp_path):
    pred, gt = _dataset(tmp_path, with_trimap=False)
    result = evaluate_folders(pred, gt)
    assert result.mean["sad"] is None and result.mean["conn"] is None and result.mean["fgr_mse"] is None
    assert result.mean["sad_all"] > 0
    assert any("trimap" in note for note in result.notes)
    table = format_table(result)
    assert "note:" in table and " - " in table


def test_evaluate_folders_without_fgr_skips_fgr_mse(tmp_path):
    pred, gt = _dataset(tmp_path, with_fgr=False)
    result = evaluate_folders(pred, gt)
    assert result.mean["fgr_mse"] is None
    assert result.mean["sad"] is not None


def test_evaluate_folders_rejects_a_prediction_of_another_size_naming_the_file(tmp_path):
    pred, gt = _dataset(tmp_path)
    (pred / "pha" / "b.png").unlink()
    _write(pred / "pha" / "b.png", np.zeros((12, 8), np.uint8))
    with pytest.raises(BgmatteError, match=r"b\.png: image is 8x12 but the ground truth is 8x8"):  # width x height
        evaluate_folders(pred, gt)


def test_evaluate_folders_names_a_missing_prediction(tmp_path):
    pred, gt = _dataset(tmp_path)
    (pred / "pha" / "b.png").unlink()
    with pytest.raises(BgmatteError, match=r"pha.*'b'"):
        evaluate_folders(pred, gt)


def test_evaluate_folders_names_an_unreadable_image(tmp_path):
    pred, gt = _dataset(tmp_path)
    (pred / "pha" / "a.png").write_bytes(b"not a png")
    with pytest.raises(BgmatteError, match=r"a\.png: not an image file OpenCV can read"):
        evaluate_folders(pred, gt)


@pytest.mark.parametrize("values, shown", [
    ((0, 127, 255), "127"),  # unknown coded as 127
    ((0, 1, 2), "1, 2"),  # a trimap coded 0/1/2 has no 128 at all
    ((0, 64, 128, 192, 255), "64, 192"),  # a trimap resized smoothly
])
def test_a_trimap_with_values_other_than_0_128_255_is_refused_naming_it(tmp_path, values, shown):
    pred, gt = _dataset(tmp_path)
    trimap = np.resize(np.array(values, np.uint8), (8, 8))
    _write(gt / "trimap" / "b.png", trimap)
    with pytest.raises(BgmatteError, match=rf"trimap.b\.png: a trimap may only hold 0, 128 .* also holds {shown}$"):
        evaluate_folders(pred, gt)


def test_a_jpeg_trimap_is_refused_with_the_reason(tmp_path):
    pred, gt = _dataset(tmp_path)
    trimap = np.zeros((8, 8), np.uint8)
    trimap[:, 2:6] = 128
    trimap[:, 6:] = 255
    (gt / "trimap" / "b.png").unlink()
    _write(gt / "trimap" / "b.jpg", trimap)
    with pytest.raises(BgmatteError, match=r"b\.jpg: a trimap may only hold .*save trimaps as PNG"):
        evaluate_folders(pred, gt)


def test_a_16_bit_trimap_is_read_on_the_8_bit_scale(tmp_path):
    pred, gt = _dataset(tmp_path)
    eight = evaluate_folders(pred, gt).per_image[0]
    _write(gt / "trimap" / "a.png", np.full((8, 8), 128 * 257, np.uint16))
    assert evaluate_folders(pred, gt).per_image[0] == eight


def test_an_image_whose_trimap_has_no_unknown_pixel_is_left_out_of_the_trimap_means(tmp_path):
    pred, gt = _dataset(tmp_path)
    only_a = evaluate_folders(pred, gt).per_image[0]
    _write(gt / "trimap" / "b.png", np.where(np.arange(64).reshape(8, 8) % 2, 255, 0).astype(np.uint8))
    result = evaluate_folders(pred, gt)
    assert all(result.per_image[1][name] is None for name in TRIMAP_METRICS)
    assert all(result.mean[name] == pytest.approx(only_a[name]) for name in TRIMAP_METRICS)
    assert any("b: the trimap has no unknown (128) pixel" in note for note in result.notes)


def test_a_damaged_or_oversized_trimap_is_one_line_without_opencv_noise(tmp_path, capfd):
    pred, gt = _dataset(tmp_path)
    whole = (gt / "trimap" / "b.png").read_bytes()
    (gt / "trimap" / "b.png").write_bytes(whole[:-20])
    with pytest.raises(BgmatteError, match=r"b\.png: damaged or truncated PNG"):
        evaluate_folders(pred, gt)
    assert capfd.readouterr().err == ""
    header = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (gt / "trimap" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + header
                                         + struct.pack(">I", zlib.crc32(header)))
    with pytest.raises(BgmatteError, match=r"b\.png: 20000x20000 is 400 megapixels"):
        evaluate_folders(pred, gt)


def test_a_prediction_saved_as_an_rgba_cutout_is_scored_by_its_alpha(tmp_path):
    pred, gt = _dataset(tmp_path)
    grey = evaluate_folders(pred, gt).per_image[0]
    rgba = np.full((8, 8, 4), 200, np.uint8)
    rgba[..., 3] = cv2.imread(str(pred / "pha" / "a.png"), cv2.IMREAD_UNCHANGED)
    _write(pred / "pha" / "a.png", rgba)
    assert evaluate_folders(pred, gt).per_image[0] == grey


def test_colour_and_out_of_range_float_mattes_are_refused(tmp_path):
    pred, gt = _dataset(tmp_path)
    (pred / "pha" / "a.png").unlink()
    _write(pred / "pha" / "a.png", np.dstack([np.zeros((8, 8)), np.full((8, 8), 255), np.zeros((8, 8))]))
    with pytest.raises(BgmatteError, match=r"a\.png: a colour image, not a matte"):
        evaluate_folders(pred, gt)
    (pred / "pha" / "a.png").unlink()
    _write(pred / "pha" / "a.tif", np.full((8, 8), 200.0, np.float32))  # 0-255 saved as float
    with pytest.raises(BgmatteError, match=r"a\.tif: a float matte must hold values from 0 to 1"):
        evaluate_folders(pred, gt)
    (pred / "pha" / "a.tif").unlink()
    _write(pred / "pha" / "a.tif", np.full((8, 8), 0.5, np.float32))
    assert evaluate_folders(pred, gt).per_image[0]["sad"] is not None


def _with_orientation(path: Path, orientation: int) -> None:
    """Give a JPEG an EXIF block that holds only an orientation tag."""
    tiff = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x112, 3, 1, orientation, 0)
    exif = b"Exif\x00\x00" + tiff + struct.pack(">I", 0)
    data = path.read_bytes()
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:])


def test_exif_orientation_is_ignored_on_every_input(tmp_path):
    pred, gt = _dataset(tmp_path)
    pha = np.zeros((8, 8), np.uint8)
    pha[:, 4:] = 255  # a vertical edge, which a rotation turns into a horizontal one
    (gt / "pha" / "b.png").unlink()
    _write(gt / "pha" / "b.jpg", pha)
    _with_orientation(gt / "pha" / "b.jpg", 6)
    _write(pred / "pha" / "b.png", cv2.imread(str(gt / "pha" / "b.jpg"), cv2.IMREAD_UNCHANGED))  # as stored
    assert evaluate_folders(pred, gt).per_image[1]["mse_all"] == 0.0


@pytest.mark.parametrize("matte", ["upright", "as stored", "square"])
def test_a_source_and_plate_are_turned_upright_unless_the_matte_fits_them_only_as_stored(tmp_path, matte):
    import torch

    from bgmatte.evaluate import predict_folder

    class Source(torch.nn.Module):
        """A stand-in model whose alpha is the source's red channel: the prediction shows how src was read."""

        def forward(self, src, bgr):
            return src[:, :1], src

    height, width = (16, 16) if matte == "square" else (16, 24)
    stored = np.zeros((height, width, 3), np.uint8)
    stored[:, : width // 2, 2] = 255  # the subject on the stored left half (red, in OpenCV's BGR)
    data = tmp_path / "data"
    for kind in ("src", "bgr"):
        _write(data / kind / "a.jpg", stored)
        _with_orientation(data / kind / "a.jpg", 6)
    mask = stored[:, :, 2] > 127
    truth = mask if matte == "as stored" else np.rot90(mask, -1)  # orientation 6: a quarter turn clockwise
    _write(data / "pha" / "a.png", truth.astype(np.uint8) * 255)
    predict_folder(Source(), data, tmp_path / "out")
    predicted = cv2.imread(str(tmp_path / "out" / "pha" / "a.png"), cv2.IMREAD_UNCHANGED) > 127
    assert predicted.shape == truth.shape and (predicted == truth).all()


def test_predict_folder_names_a_plate_of_another_size_width_first(tmp_path):
    import torch

    from bgmatte.evaluate import predict_folder

    data = tmp_path / "data"
    _write(data / "src" / "a.png", np.zeros((8, 12, 3), np.uint8))
    _write(data / "bgr" / "a.png", np.zeros((12, 8, 3), np.uint8))
    with pytest.raises(BgmatteError, match=r"a\.png: plate is 8x12 but the source is 12x8"):  # width x height
        predict_folder(torch.nn.Identity(), data, tmp_path / "out")


def test_hidden_files_are_not_taken_for_images(tmp_path):
    pred, gt = _dataset(tmp_path)
    for folder in ("pha", "trimap", "fgr"):
        (gt / folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert [row["name"] for row in evaluate_folders(pred, gt).per_image] == ["a", "b"]


def test_evaluate_folders_names_a_missing_folder(tmp_path):
    with pytest.raises(BgmatteError, match="nowhere"):
        evaluate_folders(tmp_path / "nowhere", tmp_path)
    (tmp_path / "pred").mkdir()
    with pytest.raises(BgmatteError, match=r"pha.*not found"):
        evaluate_folders(tmp_path / "pred", tmp_path)


def test_predict_folder_refuses_existing_predictions_unless_overwrite(tmp_path):
    import torch

    from bgmatte.evaluate import predict_folder

    class Grey(torch.nn.Module):
        """A stand-in model: alpha 1/2 and the source as foreground, all predict_folder needs."""

        def forward(self, src, bgr):
            return torch.full_like(src[:, :1], 0.5), src

    data, out = tmp_path / "data", tmp_path / "out"
    for kind, value in (("src", 200), ("bgr", 20)):
        (data / kind).mkdir(parents=True)
        cv2.imwrite(str(data / kind / "a.png"), np.full((8, 8, 3), value, np.uint8))
    (out / "pha").mkdir(parents=True)
    (out / "pha" / "a.png").write_bytes(b"precious")
    with pytest.raises(BgmatteError, match=r"pha/a\.png: already exists"):
        predict_folder(Grey(), data, out)
    assert (out / "pha" / "a.png").read_bytes() == b"precious" and not (out / "fgr").exists()
    assert predict_folder(Grey(), data, out, overwrite=True) == 1
    assert cv2.imread(str(out / "pha" / "a.png"), cv2.IMREAD_UNCHANGED).max() == 128
    with pytest.raises(BgmatteError, match="ground truth"):
        predict_folder(Grey(), data, data, overwrite=True)
