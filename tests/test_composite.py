"""Compositing by hand-worked values, in numpy (channels-last) and torch (channels-first) alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bgmatte.composite import (
    COLOURS,
    blur,
    clear_transparent,
    colour_like,
    composite,
    parse_target_background,
    premultiply,
    to_rgba,
    to_uint8,
    unpremultiply,
)
from bgmatte.errors import BgmatteError

FGR = (0.8, 0.4, 0.2)


def numpy_image(colour, height=2, width=3):
    return np.broadcast_to(np.asarray(colour, np.float32), (height, width, len(colour))).copy()


def torch_image(colour, height=2, width=3):
    return torch.tensor(colour, dtype=torch.float32).view(1, -1, 1, 1).expand(1, len(colour), height, width).clone()


def pixel(x):
    """The first pixel's channels, as a plain list."""
    if isinstance(x, torch.Tensor):
        return x[0, :, 0, 0].tolist()
    return x[0, 0].tolist()


@pytest.fixture(params=["numpy", "torch"])
def make(request):
    return numpy_image if request.param == "numpy" else torch_image


def test_over_a_colour_by_hand(make):
    fgr = make(FGR)
    pha = make((0.25,))
    # 0.8*0.25 + 0*0.75, 0.4*0.25 + 1*0.75, 0.2*0.25 + 0*0.75
    assert pixel(composite(fgr, pha, (0.0, 1.0, 0.0))) == pytest.approx([0.2, 0.85, 0.05])


def test_over_an_image_by_hand(make):
    fgr, pha, bgr = make(FGR), make((0.5,)), make((0.2, 0.2, 1.0))
    assert pixel(composite(fgr, pha, bgr)) == pytest.approx([0.5, 0.3, 0.6])


def test_alpha_without_a_channel_axis_broadcasts():
    fgr = numpy_image(FGR)
    pha = np.full((2, 3), 1.0, np.float32)
    assert composite(fgr, pha, (0, 0, 0)).shape == (2, 3, 3)
    assert pixel(composite(fgr, pha, (0, 0, 0))) == pytest.approx(list(FGR))
    tensor = torch_image(FGR)
    assert composite(tensor, torch.zeros(1, 2, 3), (0.1, 0.2, 0.3)).shape == (1, 3, 2, 3)


def test_opaque_and_transparent_extremes(make):
    fgr, bgr = make(FGR), make((0.1, 0.1, 0.1))
    assert pixel(composite(fgr, make((1.0,)), bgr)) == pytest.approx(list(FGR))
    assert pixel(composite(fgr, make((0.0,)), bgr)) == pytest.approx([0.1, 0.1, 0.1])


def test_integer_images_are_refused():
    with pytest.raises(TypeError, match="floats"):
        composite(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 1), np.float32), (0, 0, 0))


def test_quantised_rgba_has_no_colour_where_alpha_rounds_to_0(make):
    rgba = to_uint8(to_rgba(make((0.6, 0.6, 0.6), width=2), make((0.001,), width=2)))
    keep = to_uint8(to_rgba(make((0.6, 0.6, 0.6)), make((0.003,))))
    assert pixel(clear_transparent(rgba)) == [0, 0, 0, 0]
    assert pixel(clear_transparent(keep)) == [153, 153, 153, 1]


def test_rgba_straight_and_premultiplied(make):
    fgr, pha = make(FGR), make((0.5,))
    assert pixel(to_rgba(fgr, pha)) == pytest.approx([0.8, 0.4, 0.2, 0.5])
    assert pixel(to_rgba(fgr, pha, premultiplied=True)) == pytest.approx([0.4, 0.2, 0.1, 0.5])


def test_premultiply_round_trip_and_zero_alpha(make):
    straight = make((0.8, 0.4, 0.2, 0.5))
    premultiplied = premultiply(straight)
    assert pixel(premultiplied) == pytest.approx([0.4, 0.2, 0.1, 0.5])
    assert pixel(unpremultiply(premultiplied)) == pytest.approx([0.8, 0.4, 0.2, 0.5])
    assert pixel(unpremultiply(make((0.3, 0.3, 0.3, 0.0)))) == [0.0, 0.0, 0.0, 0.0]


def test_premultiply_needs_four_channels():
    with pytest.raises(ValueError, match="4 channels"):
        premultiply(np.zeros((2, 2, 3), np.float32))


def test_colour_like_shapes():
    assert colour_like((0.1, 0.2, 0.3), np.zeros((2, 2, 3), np.float32)).shape == (3,)
    assert colour_like((0.1, 0.2, 0.3), torch.zeros(1, 3, 2, 2)).shape == (3, 1, 1)


def test_to_uint8_rounds_and_clips():
    values = np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 2.0], np.float32)
    assert to_uint8(values).tolist() == [0, 0, 0, 2, 128, 255, 255]  # rint: halves go to even
    assert to_uint8(torch.tensor([0.0, 0.5, 1.0, 3.0])).tolist() == [0, 128, 255, 255]
    already = np.array([3, 200], np.uint8)
    assert to_uint8(already) is already


def test_blur_keeps_a_flat_image_flat_and_smooths_noise():
    rng = np.random.default_rng(0)
    flat = np.full((60, 80, 3), 0.4, np.float32)
    assert np.allclose(blur(flat), 0.4, atol=1e-5)
    noise = rng.random((60, 80, 3)).astype(np.float32)
    blurred = blur(noise, sigma=6)
    assert blurred.shape == noise.shape and blurred.dtype == np.float32
    assert blurred.std() < noise.std() / 5
    assert abs(blurred.mean() - noise.mean()) < 0.02


def test_blur_agrees_between_numpy_and_torch():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:96]
    image = np.stack([np.sin(xx / 9.0), np.cos(yy / 7.0), np.sin((xx + yy) / 11.0)], axis=-1) * 0.4 + 0.5
    image = (image + rng.normal(0, 0.05, image.shape)).astype(np.float32)
    by_numpy = blur(image, sigma=5)
    by_torch = blur(torch.from_numpy(image).permute(2, 0, 1)[None], sigma=5)[0].permute(1, 2, 0).numpy()
    assert np.abs(by_numpy - by_torch)[8:-8, 8:-8].mean() < 0.02
    flat = torch.full((2, 3, 30, 40), 0.7)
    assert torch.allclose(blur(flat), flat, atol=1e-5)


def test_blur_with_zero_sigma_is_identity():
    image = np.random.default_rng(2).random((8, 8, 3)).astype(np.float32)
    assert blur(image, sigma=0) is image


# ----------------------------------------------------------------------------- inputs out of shape or range


def test_ill_shaped_inputs_are_one_line_value_errors_naming_the_argument(make):
    """Before, these were numpy or torch broadcasting errors, or a 5- or 6-channel 'RGBA'."""
    fgr, pha = make(FGR), make((0.5,))
    cases = [
        ("pha", lambda: composite(fgr, make((0.5, 0.5)), (0.0, 0.0, 0.0))),  # two channels
        ("pha", lambda: composite(fgr, make((0.5,), height=4), (0.0, 0.0, 0.0))),  # another size
        ("fgr", lambda: composite(make((0.1, 0.2, 0.3, 0.4)), pha, (0.0, 0.0, 0.0))),  # four channels
        ("bgr", lambda: composite(fgr, pha, make((0.1, 0.2, 0.3), width=5))),  # another size
        ("bgr", lambda: composite(fgr, pha, (0.0, 1.0))),  # two colour values
        ("pha", lambda: to_rgba(fgr, make((0.5, 0.5, 0.5)))),  # was a six-channel result
        ("fgr", lambda: to_rgba(make((0.1, 0.2, 0.3, 0.4)), pha)),  # was a five-channel result
        ("pha", lambda: to_rgba(fgr, make((0.5,), width=4))),  # another size
        ("colour", lambda: colour_like((0.0, 1.0), fgr)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b") as error:
            call()
        assert "\n" not in str(error.value) and " must " in str(error.value)


def test_a_colour_given_in_0_255_is_refused_not_composited_out_of_range(make):
    with pytest.raises(ValueError, match=r"^bgr .*\[0, 1\].*255"):
        composite(make(FGR), make((0.5,)), (0, 255, 0))
    with pytest.raises(ValueError, match=r"^colour .*\[0, 1\]"):
        colour_like((0, 255, 0), make(FGR))


def test_rgba_helpers_refuse_torch_tensors_without_a_channel_axis():
    """Before: IndexError, tuple index out of range."""
    for call in (premultiply, unpremultiply, clear_transparent):
        with pytest.raises(ValueError, match=r"^rgba .*4 channels.*\(\.\.\., 4, H, W\)"):
            call(torch.zeros(4, 2))


def test_premultiplying_integer_rgba_is_refused_not_wrapped():
    """Before: 200 * 200 wrapped to 64 in uint8, and unpremultiplying gave 1."""
    for call in (premultiply, unpremultiply):
        with pytest.raises(TypeError, match=r"^rgba must hold floats"):
            call(np.full((1, 1, 4), 200, np.uint8))


def test_to_uint8_refuses_integers_rather_than_wrapping_or_rescaling_them():
    """Before: torch int64 300 wrapped to 44 and -1 to 255; numpy int32 5 became 255 (taken as 5.0 of [0, 1])."""
    with pytest.raises(TypeError, match=r"^x must hold floats in \[0, 1\] or be uint8, not torch.int64"):
        to_uint8(torch.tensor([300, -1, 5]))
    with pytest.raises(TypeError, match=r"^x must hold floats in \[0, 1\] or be uint8, not int32"):
        to_uint8(np.array([300, -1, 5], np.int32))
    assert to_uint8(torch.tensor([True, False])).tolist() == to_uint8(np.array([True, False])).tolist() == [255, 0]


def test_blur_refuses_what_is_not_an_image_and_a_sigma_that_is_not_a_number():
    """Before: 'not enough values to unpack', a conv2d channel error, 'cannot convert float NaN to integer'."""
    with pytest.raises(ValueError, match=r"^src must be an image, \(\.\.\., H, W, C\), not shape \(8, 8\)"):
        blur(np.zeros((8, 8), np.float32), 2)
    with pytest.raises(ValueError, match=r"^src must be an image, \(\.\.\., C, H, W\), not shape \(8, 8\)"):
        blur(torch.zeros(8, 8), 2)
    for sigma in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^sigma must be a finite number of pixels, not {sigma}"):
            blur(np.zeros((8, 8, 3), np.float32), sigma)


def test_blur_of_an_empty_or_half_precision_numpy_image():
    """Before: OpenCV assertion errors."""
    empty = np.zeros((0, 8, 3), np.float32)
    assert blur(empty, 2).shape == (0, 8, 3)
    half = np.full((8, 8, 3), 0.5, np.float16)
    blurred = blur(half, 2)
    assert blurred.dtype == np.float16 and np.allclose(blurred, 0.5, atol=1e-3)


@pytest.mark.parametrize(
    ("spec", "colour"),
    [
        ("white", (255, 255, 255)),
        ("Green", (0, 255, 0)),
        ("grey", (128, 128, 128)),
        ("gray", (128, 128, 128)),
        ("#00FF80", (0, 255, 128)),
        ("#f80", (255, 136, 0)),
        ("1a2b3c", (26, 43, 60)),
        ("120, 255, 155", (120, 255, 155)),
    ],
)
def test_colour_specs(spec, colour):
    target = parse_target_background(spec)
    assert target.kind == "colour" and target.colour == colour


def test_colour_as_floats():
    assert parse_target_background("#ff8000").rgb == pytest.approx((1.0, 128 / 255, 0.0))
    assert set(COLOURS) >= {"white", "black", "green", "blue", "red", "gray", "grey"}


def test_blur_and_transparent_specs():
    assert parse_target_background("blur").kind == "blur"
    assert parse_target_background(" Transparent ").kind == "transparent"


def test_file_specs_are_classified_by_extension(tmp_path):
    (tmp_path / "beach.JPG").write_bytes(b"x")
    (tmp_path / "waves.mp4").write_bytes(b"x")
    (tmp_path / "odd.xyz").write_bytes(b"x")
    image = parse_target_background(str(tmp_path / "beach.JPG"))
    assert image.kind == "image" and image.path == tmp_path / "beach.JPG"
    assert parse_target_background(str(tmp_path / "waves.mp4")).kind == "video"
    with pytest.raises(BgmatteError, match="odd.xyz: cannot tell"):
        parse_target_background(str(tmp_path / "odd.xyz"))


def test_bare_hex_gives_way_to_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "abcdef").write_bytes(b"x")
    with pytest.raises(BgmatteError, match="cannot tell"):
        parse_target_background("abcdef")
    assert parse_target_background("#abcdef").colour == (171, 205, 239)


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(BgmatteError, match=r"missing.png: no such file"):
        parse_target_background(str(tmp_path / "missing.png"))
    with pytest.raises(BgmatteError, match="'gren' is not a colour name") as caught:
        parse_target_background("gren")
    assert "\n" not in str(caught.value)
    with pytest.raises(BgmatteError, match="0 to 255"):
        parse_target_background("300,0,0")
    with pytest.raises(ValueError):
        parse_target_background("blur").rgb


def test_numpy_and_torch_arguments_mixed_in_one_call_are_a_type_error_naming_them():
    """A numpy backdrop or alpha with a torch foreground failed in numpy's or torch's arithmetic ("unsupported operand
    type(s) for *"), or, with a torch alpha, gave a wrongly laid-out array."""
    fgr, pha = torch_image(FGR), torch_image((0.5,))
    cases = [
        ("bgr", lambda: composite(fgr, pha, numpy_image((0.0, 1.0, 0.0)).transpose(2, 0, 1)[None])),
        ("pha", lambda: composite(fgr, np.full((1, 1, 2, 3), 0.5, np.float32), (0.0, 0.0, 0.0))),
        ("pha", lambda: to_rgba(numpy_image(FGR), pha[0].permute(1, 2, 0))),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=rf"^{name} is a .* but fgr a") as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("spec", ["0.5,0.5,0.5", "-1,0,0", "1.0, 0, 0", "255,128"])
def test_a_colour_of_fractions_or_the_wrong_count_is_named_as_a_colour_not_a_missing_file(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BgmatteError, match="whole numbers from 0 to 255") as caught:
        parse_target_background(spec)
    assert "no such file" not in str(caught.value)


def test_a_file_named_like_a_list_of_numbers_is_still_read_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import cv2
    cv2.imwrite("0.5,0.5.png", np.zeros((4, 4, 3), np.uint8))
    assert parse_target_background("0.5,0.5.png").kind == "image"
