"""Plates on synthetic images: alignment by a known homography, a known exposure change, a clip-made plate."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from bgmatte.errors import BgmatteError
from bgmatte.plate import (
    AlignOptions,
    ExposureOptions,
    PlateAligner,
    PlateEstimateOptions,
    align_plate,
    estimate_plate,
    fit_exposure,
    match_exposure,
    register_frames,
    sample_frames,
)


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 background with blobs, fine grain and sharp-cornered shapes (ORB needs corners), in 40..215."""
    rng = np.random.default_rng(seed)
    blobs = cv2.resize(rng.random((height // 16 + 1, width // 16 + 1, 3)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.random((height, width, 3)).astype(np.float32), (0, 0), 1.0)
    image = 0.6 * blobs + 0.4 * grain
    for _ in range(height * width // 400):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        w, h = int(rng.integers(4, 24)), int(rng.integers(4, 24))
        cv2.rectangle(image, (x, y), (x + w, y + h), rng.random(3).tolist(), thickness=-1)
    return np.rint(40 + 175 * np.clip(image, 0, 1)).astype(np.uint8)


def known_homography(width: int, height: int) -> np.ndarray:
    """A handheld wobble: 2 degrees of roll, 2% zoom and a shift of (6, -4) pixels."""
    rotation = cv2.getRotationMatrix2D((width / 2, height / 2), 2.0, 1.02)
    homography = np.vstack([rotation, [0, 0, 1]])
    homography[0, 2] += 6
    homography[1, 2] -= 4
    return homography


def corner_error(estimated: np.ndarray, true: np.ndarray, width: int, height: int) -> float:
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]]).reshape(-1, 1, 2)
    return float(np.abs(cv2.perspectiveTransform(corners, estimated) - cv2.perspectiveTransform(corners, true)).max())


# ------------------------------------------------------------------------------------------ alignment


@pytest.mark.parametrize("working_size", [None, 200], ids=["full-resolution", "reduced"])
def test_plate_warped_by_a_known_homography_is_aligned_back(working_size):
    height, width = 240, 320
    plate = textured(height, width)
    true = known_homography(width, height)
    frame = cv2.warpPerspective(plate, true, (width, height), borderMode=cv2.BORDER_REPLICATE)
    frame[80:160, 120:190] = (30, 200, 40)  # the subject covers part of the view
    aligner = PlateAligner(plate, AlignOptions(working_size=working_size))
    homography, reason = aligner.estimate(frame)
    assert homography is not None, reason
    assert corner_error(homography, true, width, height) < 1.5
    aligned, ok = aligner.align(frame)
    assert ok and aligned.shape == frame.shape and aligned.dtype == np.uint8
    interior = np.ones((height, width), bool)
    interior[:20], interior[-20:], interior[:, :20], interior[:, -20:] = False, False, False, False
    interior[80:160, 120:190] = False
    error = np.abs(aligned.astype(float) - frame.astype(float))[interior].mean()
    unaligned = np.abs(plate.astype(float) - frame.astype(float))[interior].mean()
    assert error < 4 and unaligned > 5 * error


@pytest.mark.parametrize("size", [(64, 96), (97, 161), (120, 160)], ids=["96x64", "161x97", "160x120"])
def test_small_frames_are_aligned_too(size):
    """ORB leaves out a 31-pixel border: unenlarged, a textured 96x64 plate had no features ("too little texture")
    and one of 160x120 was 0.3 to 1 pixel off."""
    height, width = size
    wide = textured(height + 20, width + 20, seed=2)
    plate, frame = wide[10 : 10 + height, 10 : 10 + width], wide[13 : 13 + height, 6 : 6 + width]
    true = np.float64([[1, 0, 4], [0, 1, -3], [0, 0, 1]])  # the camera moved 4 pixels left and 3 down
    aligner = PlateAligner(plate)
    homography, reason = aligner.estimate(frame)
    assert aligner.textured and homography is not None, reason
    assert corner_error(homography, true, width, height) < 0.5


def grid_error(estimated: np.ndarray, true: np.ndarray, width: int, height: int) -> float:
    """The largest distance between where two homographies put a 9x9 grid of points over the picture."""
    xs, ys = np.meshgrid(np.linspace(0, width, 9), np.linspace(0, height, 9))
    points = np.float32(np.stack([xs.ravel(), ys.ravel()], axis=1)).reshape(-1, 1, 2)
    return float(np.linalg.norm(cv2.perspectiveTransform(points, estimated) - cv2.perspectiveTransform(points, true),
                                axis=2).max())


@pytest.mark.parametrize("seed, shift", [(0, (5.3, -3.7)), (1, (-7.6, 2.2)), (3, (1.4, 6.9))])
def test_a_720p_frame_is_aligned_to_a_fraction_of_a_pixel(seed, shift):
    """Features alone left a camera shift at 720p up to 2.5 pixels off at the corners (keypoints found at coarse
    pyramid levels); the intensity refinement brings it within a fraction of one."""
    height, width = 720, 1280
    rng = np.random.default_rng(seed)
    plate = textured(height, width, seed=seed)
    true = np.float64([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]])
    frame = cv2.warpPerspective(plate, true, (width, height), borderMode=cv2.BORDER_REPLICATE)
    frame = np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)
    frame[240:480, 420:640] = (30, 200, 40)  # the subject
    homography, reason = PlateAligner(plate).estimate(frame)
    assert homography is not None, reason
    assert grid_error(homography, true, width, height) < 0.5


@pytest.mark.parametrize("seed, gain", [(0, 0.65), (2, 0.65), (4, 1.3)])
def test_a_frame_whose_exposure_drifted_is_aligned_as_closely(seed, gain):
    """The refinement compared plate and frame level for level: a frame 35% darker or 30% brighter differed nearly
    everywhere, so the refinement was skipped or judged on the drift, leaving 1.6 to 4.8 pixels of error."""
    height, width = 720, 1280
    rng = np.random.default_rng(seed)
    plate = textured(height, width, seed=seed)
    true = known_homography(width, height)
    frame = cv2.warpPerspective(plate, true, (width, height), borderMode=cv2.BORDER_REPLICATE)
    frame = np.clip(frame * gain + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)
    frame[240:480, 420:640] = (30, 200, 40)  # the subject
    homography, reason = PlateAligner(plate).estimate(frame)
    assert homography is not None, reason
    assert grid_error(homography, true, width, height) < 0.5


@pytest.mark.parametrize("seed", [1, 3, 4])
def test_a_subject_filling_all_but_a_strip_of_the_frame_gives_no_wild_warp(seed):
    """With the background seen only in a strip down one side, the homography fitted to the matches there was
    44 to 325 pixels off across the frame; a similarity, refined, extrapolates to within a few pixels."""
    height, width = 720, 1280
    plate = textured(height, width, seed=seed)
    true = known_homography(width, height)
    frame = cv2.warpPerspective(plate, true, (width, height), borderMode=cv2.BORDER_REPLICATE)
    frame[:, 200:] = (30, 200, 40)  # the subject, close to the camera
    homography, reason = PlateAligner(plate).estimate(frame)
    assert homography is not None, reason
    assert grid_error(homography, true, width, height) < 3


def test_one_aligner_serves_many_frames():
    height, width = 200, 260
    plate = textured(height, width, seed=3)
    aligner = PlateAligner(plate)
    for shift in (0, 3, -5):
        true = np.float64([[1, 0, shift], [0, 1, -shift / 2], [0, 0, 1]])
        frame = cv2.warpPerspective(plate, true, (width, height), borderMode=cv2.BORDER_REPLICATE)
        homography, _ = aligner.estimate(frame)
        assert homography is not None and corner_error(homography, true, width, height) < 1.0
    assert aligner.failures == 0


def test_float_images_are_aligned_in_their_own_dtype():
    plate = textured(200, 260, seed=4)
    true = known_homography(260, 200)
    frame = cv2.warpPerspective(plate, true, (260, 200), borderMode=cv2.BORDER_REPLICATE)
    aligned, ok = align_plate(plate.astype(np.float32) / 255, frame.astype(np.float32) / 255)
    assert ok and aligned.dtype == np.float32
    assert np.abs(aligned - frame / 255.0)[20:-20, 20:-20].mean() < 0.02


def test_flat_plate_falls_back_unaligned_with_a_warning(caplog):
    plate = np.full((120, 160, 3), 128, np.uint8)
    frame = textured(120, 160)
    with caplog.at_level(logging.WARNING, logger="bgmatte.plate"):
        aligned, ok = align_plate(plate, frame)
    assert not ok and np.array_equal(aligned, plate)
    warnings = [record.message for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "too little texture" in warnings[0]  # said once, not again on failing


def test_unrelated_frame_falls_back_and_warns_once(caplog):
    aligner = PlateAligner(textured(160, 200, seed=1))
    with caplog.at_level(logging.WARNING, logger="bgmatte.plate"):
        for seed in (7, 8, 9):
            aligned, ok = aligner.align(textured(160, 200, seed=seed))
            assert not ok and aligned.shape == (160, 200, 3)
    assert aligner.failures == 3 and aligner.attempts == 3
    assert len([record for record in caplog.records if "alignment failed" in record.message]) == 1


def test_fallback_plate_is_resized_to_the_frame():
    plate = np.full((100, 150, 3), 90, np.uint8)
    aligned, ok = align_plate(plate, textured(120, 160))
    assert not ok and aligned.shape == (120, 160, 3)


def test_mirrored_or_collapsed_homographies_are_rejected():
    aligner = PlateAligner(textured(120, 160))
    assert aligner._implausible(np.diag([-1.0, 1.0, 1.0])) == "a homography that mirrors the plate"
    assert "scales the plate" in aligner._implausible(np.diag([0.2, 0.2, 1.0]))
    assert aligner._implausible(np.full((3, 3), np.nan)) == "a degenerate homography"


# ----------------------------------------------------------------------------------- exposure matching

GAINS = np.array([1.2, 0.9, 1.05])
OFFSETS = np.array([0.02, -0.03, 0.0])


def exposure_pair(seed: int = 0):
    """A plate, and a frame of the same view with changed exposure, white balance, noise and a subject."""
    rng = np.random.default_rng(seed)
    plate = 0.15 + 0.6 * textured(120, 160, seed).astype(np.float32) / 255  # 0.24 .. 0.66
    background = plate * GAINS + OFFSETS
    frame = np.clip(background + rng.normal(0, 0.004, plate.shape), 0, 1).astype(np.float32)
    subject = np.zeros((120, 160), bool)
    subject[20:90, 50:110] = True  # about a quarter of the frame
    frame[subject] = rng.random((int(subject.sum()), 3)).astype(np.float32)
    return plate.astype(np.float32), frame, background.astype(np.float32), subject


@pytest.mark.parametrize("hint", ["none", "mask", "pha"])
def test_known_gain_and_offset_are_corrected(hint):
    plate, frame, background, subject = exposure_pair()
    pha = {"none": None, "mask": subject, "pha": subject.astype(np.float32) * 0.9}[hint]
    fit = fit_exposure(plate, frame, pha)
    assert np.diag(fit.matrix) == pytest.approx(GAINS, abs=0.01)
    assert fit.offset == pytest.approx(OFFSETS, abs=0.005)
    corrected = match_exposure(plate, frame, pha)
    assert corrected.dtype == np.float32
    assert np.abs(corrected - background).mean() < 0.003
    assert np.abs(plate - background).mean() > 0.03  # there was something to correct


@pytest.mark.parametrize("seed, columns", [(0, (25, 135)), (3, (25, 135)), (1, (40, 140))])
def test_a_subject_covering_most_of_the_frame_needs_no_mask(seed, columns):
    """Without a mask the refits started from a least-squares fit on every pixel, which belongs to the subject once
    it covers over half the frame: a textured one covering 62-69% gave fits 15 to 19 grey levels off (worse than
    none at times) or none, unwarned; a consensus start finds the background."""
    rng = np.random.default_rng(seed)
    plate = 0.15 + 0.6 * textured(120, 160, seed).astype(np.float32) / 255
    background = plate * GAINS + OFFSETS
    frame = np.clip(background + rng.normal(0, 0.004, plate.shape), 0, 1).astype(np.float32)
    subject = np.zeros((120, 160), bool)
    subject[:, columns[0] : columns[1]] = True
    frame[subject] = (textured(120, 160, seed + 7).astype(np.float32) / 255)[subject]
    fit = fit_exposure(plate, frame)
    assert not fit.skipped
    assert np.abs(fit.apply(plate) - background)[~subject].mean() < 0.003


def test_colour_mixing_is_fitted_by_the_affine_model():
    plate, _, _, subject = exposure_pair(seed=2)
    mixing = np.array([[1.1, 0.05, 0.0], [0.0, 0.95, 0.08], [0.04, 0.0, 1.0]])
    frame = (plate @ mixing.T + 0.01).astype(np.float32)
    frame[subject] = 0.9
    corrected = match_exposure(plate, frame, subject, ExposureOptions(model="affine"))
    assert np.abs(corrected - frame)[~subject].mean() < 0.002
    per_channel = match_exposure(plate, frame, subject)
    assert np.abs(per_channel - frame)[~subject].mean() > np.abs(corrected - frame)[~subject].mean()


def test_uint8_plates_come_back_as_uint8():
    plate, frame, background, _ = exposure_pair(seed=1)
    corrected = match_exposure((plate * 255).round().astype(np.uint8), (frame * 255).round().astype(np.uint8))
    assert corrected.dtype == np.uint8
    assert np.abs(corrected / 255.0 - background).mean() < 0.006


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_clipped_highlights_stay_untinted(dtype):
    plate, frame, background, subject = exposure_pair(seed=3)
    plate[100:, :] = 1.0  # a clipped white window along the bottom, clipped in the frame too
    frame[100:, :] = 1.0
    if dtype == np.uint8:
        plate, frame = (plate * 255).round().astype(np.uint8), (frame * 255).round().astype(np.uint8)
    corrected = match_exposure(plate, frame, subject)
    window = corrected[100:].astype(np.float64) / (255.0 if dtype == np.uint8 else 1.0)
    assert window.min() > 0.99  # not scaled down to 0.9 in green (GAINS), which would tint it pink
    rest = corrected[:100].astype(np.float64) / (255.0 if dtype == np.uint8 else 1.0)
    assert np.abs(rest - background[:100])[~subject[:100]].mean() < 0.006  # the fit itself unchanged


def test_no_background_to_fit_on_leaves_the_plate_alone(caplog):
    plate, frame, _, _ = exposure_pair()
    with caplog.at_level(logging.WARNING, logger="bgmatte.plate"):
        corrected = match_exposure(plate, frame, np.ones(plate.shape[:2], bool))
    assert np.array_equal(corrected, plate)
    assert any("exposure matching skipped" in record.message for record in caplog.records)


def test_a_skipped_fit_says_why_and_warns_only_when_asked(caplog):
    plate, frame, _, _ = exposure_pair()
    with caplog.at_level(logging.WARNING, logger="bgmatte.plate"):
        fit = fit_exposure(plate, frame, np.ones(plate.shape[:2], bool), warn=False)
    assert fit.skipped == "only 0 background pixels to fit on" and not caplog.records
    assert np.array_equal(fit.matrix, np.eye(3)) and fit_exposure(plate, frame).skipped == ""


def test_exposure_needs_same_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        match_exposure(np.zeros((4, 4, 3), np.float32), np.zeros((5, 4, 3), np.float32))


# ------------------------------------------------------------------------------------ automatic plate


def synthetic_clip(count: int = 24, seed: int = 0):
    """A textured background; a subject crossing it; a box that stays for 2/3 of the clip, then leaves."""
    rng = np.random.default_rng(seed)
    background = textured(96, 128, seed=5)
    mover = rng.integers(0, 256, (22, 22, 3), dtype=np.uint8)
    frames = []
    for index in range(count):
        frame = background.astype(np.int16) + rng.normal(0, 2, background.shape).round().astype(np.int16)
        x = int(index * (128 - 22) / (count - 1))
        frame[8:30, x : x + 22] = mover
        if index < count * 2 // 3:
            frame[50:80, 60:95] = (200, 40, 40)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames, background


def test_automatic_plate_removes_moving_and_partly_still_subjects():
    frames, background = synthetic_clip()
    plate = estimate_plate(frames)
    assert plate.shape == background.shape and plate.dtype == np.uint8
    error = np.abs(plate.astype(float) - background.astype(float)).max(axis=2)
    still = (slice(50, 80), slice(60, 95))
    assert error.mean() < 2.5
    assert error[still].mean() < 4
    assert error[8:30].mean() < 4
    # A plain median keeps the box that stayed; the refinement is what removes it.
    median = np.median(np.stack(frames), axis=0)
    assert np.abs(median - background.astype(float)).max(axis=2)[still].mean() > 50


def swaying_clip(step_aside: float):
    """A yellow box that sways a few pixels in every sample and, with probability `step_aside`, moves right."""
    rng = np.random.default_rng(3)
    background = textured(96, 128, seed=6)
    frames = []
    for _ in range(16):
        frame = background.copy()
        dy, dx = rng.integers(-4, 5, 2)
        frame[30 + dy : 66 + dy, 40 + dx : 80 + dx] = (230, 230, 30)
        if rng.random() < step_aside:
            frame[30 + dy : 66 + dy, 40 + dx : 80 + dx] = background[30 + dy : 66 + dy, 40 + dx : 80 + dx]
            frame[30 + dy : 66 + dy, 70 + dx : 110 + dx] = (230, 230, 30)
        frames.append(frame)
    return frames, background


def region_error(plate, background, region):
    return np.abs(plate[region].astype(float) - background[region].astype(float)).max(axis=2).mean()


def test_subject_that_sways_and_sometimes_steps_aside_is_removed():
    frames, background = swaying_clip(step_aside=0.3)
    plate = estimate_plate(frames)
    assert region_error(plate, background, (slice(26, 70), slice(36, 84))) < 5
    assert region_error(plate, background, (slice(0, 96), slice(0, 128))) < 2


def test_subject_that_never_uncovered_its_middle_is_inpainted():
    frames, background = swaying_clip(step_aside=0.0)
    plate = estimate_plate(frames)
    middle = (slice(36, 60), slice(48, 72))
    subject_gap = np.abs(np.float64([230, 230, 30]) - background[middle]).max(axis=2).mean()
    # Nothing there was ever seen: a smooth guess from around it, far closer than the subject itself.
    assert region_error(plate, background, middle) < 0.5 * subject_gap
    assert np.abs(plate[middle].astype(float) - np.float64([230, 230, 30])).max(axis=2).min() > 30


def passing_clip(count: int = 24):
    """A textured background with a flat-coloured figure walking across it; also the share of samples covering each pixel."""
    rng = np.random.default_rng(7)
    background = textured(120, 160, seed=8)
    frames, covered = [], np.zeros((120, 160))
    for index in range(count):
        frame = background.astype(np.int16) + rng.normal(0, 2, background.shape).round().astype(np.int16)
        figure = np.zeros((120, 160), np.uint8)
        x = int(16 + index * (160 - 32) / (count - 1))
        cv2.ellipse(figure, (x, 75), (16, 40), 0, 0, 360, 1, thickness=-1)  # body
        cv2.circle(figure, (x, 28), 13, 1, thickness=-1)  # head
        frame[figure > 0] = (210, 160, 130)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        covered += figure
    return frames, background, covered / count


def test_subject_passing_over_texture_stays_out_of_the_plate():
    frames, background, covered = passing_clip()
    assert covered.max() < 0.3  # every pixel shows the background in most samples...
    median = np.abs(np.median(np.stack(frames), axis=0) - background).max(axis=2)
    assert median.max() < 10  # ...so the plain median is right everywhere
    plate = estimate_plate(frames)
    error = np.abs(plate.astype(float) - background.astype(float)).max(axis=2)
    # Predictions across texture edges used to favour the figure's colour, which then spread ring by ring.
    assert error.mean() < median.mean() + 0.5
    assert (error > 30).mean() < 0.005


def test_still_clip_gives_its_median_and_float_input_gives_float():
    frames, background = synthetic_clip()
    still = [background.astype(np.float32) / 255] * 5
    plate = estimate_plate(still)
    assert plate.dtype == np.float32 and np.allclose(plate, background / 255.0, atol=1 / 255)


def test_automatic_plate_needs_a_few_frames():
    with pytest.raises(BgmatteError, match="at least 3 frames"):
        estimate_plate([np.zeros((4, 4, 3), np.uint8)] * 2)


def test_explicit_threshold_is_used():
    frames, background = synthetic_clip()
    plate = estimate_plate(frames, PlateEstimateOptions(threshold=0.1))
    assert np.abs(plate.astype(float) - background.astype(float)).max(axis=2).mean() < 3


def test_sampling_keeps_an_even_spread_with_bounded_memory():
    picked = sample_frames(iter(range(1000)), count=10)
    assert len(picked) == 10 and picked[0] == 0 and picked[-1] > 800
    assert np.all(np.diff(picked) > 50)
    assert sample_frames(range(4), count=10) == [0, 1, 2, 3]


@pytest.mark.parametrize("flash", [np.full((48, 64, 3), 255, np.uint8), np.zeros((48, 64, 3), np.uint8)])
def test_a_frame_unlike_the_background_everywhere_does_not_break_the_estimate(flash):
    background = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    plate = estimate_plate([background, background, flash, background, background])
    assert np.abs(plate.astype(int) - background).max() <= 1


def handheld_clip(count: int = 15, shake: int = 4):
    """A camera that shakes up to `shake` pixels each way over a textured background, a box crossing it; the
    background as the middle frame sees it."""
    rng = np.random.default_rng(4)
    height, width = 120, 160
    wide = textured(height + 2 * shake, width + 2 * shake, seed=5)
    frames, views = [], []
    for index in range(count):
        dx, dy = rng.integers(-shake, shake + 1, 2) if index != count // 2 else (0, 0)
        view = wide[shake + dy : shake + dy + height, shake + dx : shake + dx + width]
        frame = view.copy()
        frame[40:90, 8 + 10 * index : 38 + 10 * index] = (220, 50, 60)
        frames.append(frame)
        views.append(view)
    return frames, views[count // 2]


def test_a_handheld_clip_registered_first_gives_its_background():
    """Unregistered, a shake of 4 pixels left every texture edge smeared or doubled: 24 levels off on average (0.2 registered)."""
    frames, background = handheld_clip()
    registered, failed = register_frames(frames)
    assert failed == 0 and len(registered) == len(frames)
    plate = estimate_plate(registered)
    error = np.abs(plate.astype(float) - background.astype(float)).max(axis=2)[4:-4, 4:-4]
    assert error.mean() < 3
    unregistered = np.abs(estimate_plate(frames).astype(float) - background.astype(float)).max(axis=2)[4:-4, 4:-4]
    assert unregistered.mean() > 10


def test_frames_that_cannot_be_registered_are_left_out():
    frames, _ = handheld_clip(count=5)
    frames[1] = np.full_like(frames[1], 128)  # a frame the subject fills, or a cut to black
    registered, failed = register_frames(frames)
    assert failed == 1 and len(registered) == 4


def cut_clip(before: int, after: int):
    """A box crossing one textured view for `before` frames, then another view (a cut) for `after`."""
    views = [textured(120, 160, seed=1)] * before + [textured(120, 160, seed=2)] * after
    frames = [view.copy() for view in views]
    for index, frame in enumerate(frames):
        frame[30:80, 5 + 8 * index : 35 + 8 * index] = (220, 50, 60)
    return frames


@pytest.mark.parametrize("before, after", [(8, 8), (12, 4), (14, 2)])
def test_a_clip_with_a_cut_is_warned_about(before, after, caplog):
    """No plate fits both sides of a cut: with 8 and 8 frames the plate was a patchwork of the two views, with 12
    and 4 mostly the second one, and nothing was said."""
    with caplog.at_level(logging.WARNING, logger="bgmatte.plate"):
        estimate_plate(cut_clip(before, after), name="shots.mp4")
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("shots.mp4: the background changes during the clip: "), warnings


@pytest.mark.parametrize("gain", [1.2, 0.8])
def test_a_change_of_exposure_mid_clip_gives_one_plate_in_one_exposure(gain, caplog):
    """Half the samples 20% brighter or darker made a plate mixing the two exposures pixel by pixel (17 to 21 grey
    levels from either half, which no exposure matching could undo), and nothing was said. The samples are now
    brought to one exposure first, and the change is warned about."""
    background = textured(120, 160, seed=1)
    changed = np.clip(np.rint(background * gain), 0, 255).astype(np.uint8)
    frames = []
    for index in range(16):
        frame = (background if index < 8 else changed).copy()
        frame[30:80, 5 + 8 * index : 35 + 8 * index] = (220, 50, 60)  # a subject walking across
        frames.append(frame)
    with caplog.at_level(logging.INFO, logger="bgmatte.plate"):
        plate = estimate_plate(frames, name="light.mp4")
        quiet = estimate_plate(frames, name="light.mp4", match_exposure=True)
    # The exposure of the sample of median brightness: the first of the brighter half.
    brighter = changed if gain > 1 else background
    assert np.abs(plate - brighter.astype(float)).max(axis=2).mean() < 1.5
    assert np.array_equal(plate, quiet)
    levels = [record.levelno for record in caplog.records if "the exposure changes during the clip" in record.getMessage()]
    assert levels == [logging.WARNING, logging.INFO], caplog.records
    assert not any("the background changes" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("gain", [1.3, 0.6])
def test_one_flash_in_the_middle_of_the_clip_sets_no_exposure(gain, caplog):
    """Bringing every sample to the middle one's exposure gave the plate that of a flash there (46-64 grey levels
    off): the sample of median brightness sets it, and one flash is no change of exposure to warn of."""
    background = textured(120, 160, seed=1)
    frames = []
    for index in range(16):
        frame = background.copy()
        frame[30:80, 5 + 8 * index : 35 + 8 * index] = (220, 50, 60)
        frames.append(frame if index != 8 else np.clip(np.rint(frame * gain), 0, 255).astype(np.uint8))
    with caplog.at_level(logging.WARNING, logger="bgmatte.plate"):
        plate = estimate_plate(frames)
    assert np.abs(plate - background.astype(float)).max(axis=2).mean() < 0.5
    assert not caplog.records


def test_a_large_moving_subject_or_a_flash_is_no_change_of_background(caplog):
    background = textured(120, 160, seed=1)
    large = []
    for index in range(16):  # covering 40% of the picture
        frame = background.copy()
        frame[10:110, 10 + 5 * index : 90 + 5 * index] = (220, 50, 60)
        large.append(frame)
    flash = [background, background, np.full_like(background, 255), background, background]
    with caplog.at_level(logging.WARNING, logger="bgmatte.plate"):
        for frames in (large, flash, synthetic_clip()[0], swaying_clip(0.3)[0]):
            estimate_plate(frames)
    assert not caplog.records, [record.getMessage() for record in caplog.records]
