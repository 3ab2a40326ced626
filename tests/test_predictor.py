"""`Predictor`: the frames and plates it takes, as numpy arrays or tensors, and the ones it refuses in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bgmatte.errors import BgmatteError
from bgmatte.predictor import Predictor, settings_for_size
from media import DifferenceModel


def frames(batch: int = 2, height: int = 16, width: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames with a bright block over a dark plate."""
    rng = np.random.default_rng(seed)
    plate = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    src = np.repeat(plate[None], batch, 0)
    src[:, 4:12, 5:15] = 250
    return src, plate


def test_one_plate_serves_a_whole_batch():
    """A (H, W, 3) plate with (B, H, W, 3) frames was refused as "the plate is 20x16 but the frame is 20x16"."""
    src, plate = frames()
    predictor = Predictor(DifferenceModel())
    each = predictor(src, np.repeat(plate[None], 2, 0))
    for one in (plate, plate[None], torch.from_numpy(plate)):
        torch.testing.assert_close(predictor(src, one).pha, each.pha, rtol=0, atol=0)


def test_a_plate_for_another_count_of_frames_is_refused_naming_both_counts():
    src, plate = frames(batch=3)
    with pytest.raises(BgmatteError, match="2 plates for 3 frames") as caught:
        Predictor(DifferenceModel())(src, np.repeat(plate[None], 2, 0))
    assert "\n" not in str(caught.value)


def test_a_plate_of_another_size_names_both_sizes():
    src, plate = frames()
    with pytest.raises(BgmatteError, match="the plate is 19x16 but the frame is 20x16"):
        Predictor(DifferenceModel())(src, plate[:, :19])


def test_frames_flipped_from_bgr_by_a_negative_stride_view_are_taken():
    """``frame[..., ::-1]``, the usual OpenCV BGR to RGB flip, failed inside torch.as_tensor (negative strides)."""
    src, plate = frames()
    predictor = Predictor(DifferenceModel())
    expected = predictor(np.ascontiguousarray(src[..., ::-1]), np.ascontiguousarray(plate[..., ::-1]))
    got = predictor(src[..., ::-1], plate[..., ::-1])
    torch.testing.assert_close(got.pha, expected.pha, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.bool_])
def test_integer_frames_other_than_uint8_are_refused_in_one_line(dtype):
    """They were cast to float unscaled: 0-255 values went into a model that takes [0, 1] (a silent, wrong matte)."""
    src, plate = frames()
    with pytest.raises(BgmatteError, match=f"frames must be uint8 .* or floats in \\[0, 1\\], not {np.dtype(dtype)}"):
        Predictor(DifferenceModel())(src.astype(dtype), plate.astype(dtype))


def test_float_frames_in_0_1_are_taken_as_they_are():
    src, plate = frames()
    predictor = Predictor(DifferenceModel())
    plates = np.repeat(plate[None], 2, 0)
    expected = predictor(src, plates)
    got = predictor(src.astype(np.float32) / 255, plates.astype(np.float64) / 255)
    torch.testing.assert_close(got.pha, expected.pha, rtol=0, atol=0)


@pytest.mark.parametrize("argument", ["src", "bgr"])
def test_float_frames_in_0_255_are_refused_naming_the_argument_and_the_range_found(argument):
    """Cast with ``.astype(np.float32)`` but not divided by 255, they gave a wrong matte without a word."""
    src, plate = frames()
    given = {"src": src.astype(np.float32) / 255, "bgr": plate.astype(np.float32) / 255}
    given[argument] = given[argument] * 255
    low, high = given[argument].min(), given[argument].max()
    with pytest.raises(ValueError, match=rf"^{argument}: float values from {low:g} to {high:g}, but floats must be "
                                         r"in \[0, 1\] \(0-255 as float\? divide by 255, or pass uint8\)$") as caught:
        Predictor(DifferenceModel())(given["src"], given["bgr"])
    assert isinstance(caught.value, BgmatteError)  # one line on the command line, as the Predictor's other refusals


@pytest.mark.parametrize("bad, found", [
    (np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite"), (1.01, "from 0.* to 1.01"), (-0.01, "from -0.01 to"),
], ids=["nan", "inf", "minus-inf", "above-1", "below-0"])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_float_frames_outside_0_1_or_not_finite_are_refused_in_one_line(bad, found, kind):
    src, plate = frames()
    src = src.astype(np.float32) / 255
    src[0, 0, 0, 0] = bad
    given = torch.from_numpy(src) if kind == "tensor" else src
    with pytest.raises(BgmatteError, match=rf"^src: .*{found}.*\[0, 1\]") as caught:
        Predictor(DifferenceModel())(given, plate)
    assert "\n" not in str(caught.value)


def test_float_frames_a_rounding_step_outside_0_1_are_taken():
    """A resize or colour conversion in float overshoots by a hair; that is no scale mistake (1e-3 is allowed)."""
    src, plate = frames()
    src = src.astype(np.float32) / 255
    src[0, 0, 0] = (-5e-4, 1 + 5e-4, 1.0)
    Predictor(DifferenceModel())(src, plate.astype(np.float16) / 255)


@pytest.mark.parametrize("size, expected", [
    ((3840, 2160), (0.125, 320_000)), ((1920, 1080), (0.25, 80_000)), ((1280, 720), (0.25, 80_000)),
    ((720, 1280), (0.25, 80_000)), ((1280, 719), (0.25, 80_000)), ((960, 540), (0.3125, 80_000)),
    ((640, 480), (0.375, 80_000)), ((640, 360), (0.5, 80_000)), ((96, 64), (0.5, 80_000)),
])
def test_frames_below_hd_give_the_base_network_the_pixels_it_has_at_hd(size, expected):
    """At 1/4 a 640x360 frame left the base network 160x90 pixels, and small subjects were lost; from HD up the
    paper's settings hold."""
    assert settings_for_size(*size) == expected
    scale = expected[0]
    width, height = size
    assert (width * scale) * (height * scale) <= 1280 * 720 / 16 + 1e-6 or scale == 0.25 or scale == 0.125
