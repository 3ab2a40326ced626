"""`Predictor`: the frames and plates it takes, as numpy arrays or tensors, and the ones it refuses in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bgmatte.errors import BgmatteError
from bgmatte.predictor import Predictor
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
