"""Augmentations: paired transforms keep fgr and pha aligned; each effect does what the paper's recipe says."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bgmatte.train import augment as A


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: torch's intra-op threads only spin-wait on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(n: int = 4, height: int = 24, width: int = 32):
    """A matte and a foreground whose every channel equals the matte, so alignment is checkable."""
    pha = torch.rand(n, 1, height, width, generator=_gen(99))
    return pha.expand(-1, 3, -1, -1).clone(), pha


@pytest.mark.parametrize(
    "transform",
    [
        lambda t, g: A.random_affine(t, g, degrees=10, translate=0.2, scale=(0.5, 1.5), shear=5),
        lambda t, g: A.random_affine(t, g, size=(16, 20), degrees=5, scale=(0.4, 1.0)),
        lambda t, g: A.random_flip(t, g, 0.5),
        lambda t, g: A.random_blur(t, g, 1.0, 5),
        lambda t, g: A.random_sharpen(t, g, 1.0),
        lambda t, g: A.random_crop(t, g, (10, 12)),
    ],
    ids=["affine", "affine_resize", "flip", "blur", "sharpen", "crop"],
)
def test_paired_transforms_keep_fgr_and_pha_aligned(transform):
    fgr, pha = _pair()
    out_fgr, out_pha = transform([fgr, pha], _gen(1))
    assert out_fgr.shape[-2:] == out_pha.shape[-2:]
    for channel in range(3):
        torch.testing.assert_close(out_fgr[:, channel : channel + 1], out_pha, rtol=0, atol=1e-6)
    assert out_pha.shape != pha.shape or not torch.equal(out_pha, pha)  # it did something


def test_identity_warp_keeps_the_image():
    image = torch.rand(2, 3, 10, 14, generator=_gen())
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, -1, -1)
    (out,) = A.warp_affine([image], identity)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-5)


def test_warp_translation_is_a_fraction_of_the_output_size():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 2] = 1.0
    shift = torch.tensor([[[1.0, 0.0, 0.25], [0.0, 1.0, -0.125]]])  # +2 px right, -1 px up
    (out,) = A.warp_affine([image], shift)
    assert out[0, 0, 2, 4] == pytest.approx(1.0, abs=1e-5)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)


def test_affine_resize_fits_the_image_to_cover_the_output():
    image = 0.1 + 0.9 * torch.rand(1, 3, 100, 200, generator=_gen())
    (out,) = A.random_affine([image], _gen(), size=(50, 50))
    assert out.shape == (1, 3, 50, 50)
    # No zoom or turn: the output is the central square, downscaled, with no empty border.
    assert float(out.min()) > 0.09
    torch.testing.assert_close(out.mean(), image[:, :, :, 50:150].mean(), rtol=0.05, atol=0.01)


def test_same_generator_state_gives_the_same_batch():
    fgr, pha = _pair()
    bgr = torch.rand(4, 3, 30, 40, generator=_gen(5))
    first = A.make_training_batch(fgr, pha, bgr, (16, 16), _gen(7))
    again = A.make_training_batch(fgr, pha, bgr, (16, 16), _gen(7))
    other = A.make_training_batch(fgr, pha, bgr, (16, 16), _gen(8))
    for name in first:
        assert torch.equal(first[name], again[name])
    assert not torch.equal(first["src"], other["src"])


def test_color_jitter_of_zero_is_identity_and_hue_keeps_grey():
    image = torch.rand(3, 3, 8, 8, generator=_gen())
    torch.testing.assert_close(A.color_jitter(image, _gen(), 0, 0, 0, 0), image, rtol=0, atol=1e-6)
    grey = torch.full((2, 3, 4, 4), 0.4)
    torch.testing.assert_close(A.rotate_hue(grey, torch.tensor([0.3, -0.2])), grey, rtol=0, atol=1e-5)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 0.8
    assert not torch.allclose(A.rotate_hue(red, torch.tensor([0.33])), red, atol=0.05)


def test_color_jitter_changes_brightness_within_its_range():
    image = torch.full((64, 3, 4, 4), 0.5)
    out = A.color_jitter(image, _gen(), brightness=0.2, contrast=0, saturation=0, hue=0)
    ratio = out.mean(dim=(1, 2, 3)) / 0.5
    assert float(ratio.min()) >= 0.8 - 1e-6 and float(ratio.max()) <= 1.2 + 1e-6
    assert float(ratio.std()) > 0.05


def test_shadow_only_darkens_and_follows_the_matte():
    bgr = torch.full((3, 3, 40, 40), 0.8)
    pha = torch.zeros(3, 1, 40, 40)
    pha[:, :, 10:30, 10:30] = 1
    shaded = A.cast_shadow(bgr, pha, _gen(), probability=1.0, strength=0.5)
    assert (shaded <= bgr + 1e-6).all()
    assert float((bgr - shaded).amax()) > 0.01
    unmatted = A.cast_shadow(bgr, torch.zeros_like(pha), _gen(), probability=1.0, strength=0.5)
    torch.testing.assert_close(unmatted, bgr)
    untouched = A.cast_shadow(bgr, pha, _gen(), probability=0.0)
    torch.testing.assert_close(untouched, bgr)


def test_sensor_noise_is_small_and_optional():
    image = torch.full((4, 3, 32, 32), 0.5)
    torch.testing.assert_close(A.sensor_noise(image, _gen(), probability=0.0), image)
    noisy = A.sensor_noise(image, _gen(), probability=1.0, sigma=0.03)
    deviation = (noisy - image).flatten(1).std(dim=1)
    assert float(deviation.max()) <= 0.035
    assert float(deviation.max()) > 0.001


def test_plate_jitter_is_a_small_change_of_colour_and_position():
    bgr = torch.rand(8, 3, 32, 32, generator=_gen())
    plate = A.plate_jitter(bgr, _gen(), color_probability=1.0, affine_probability=1.0)
    assert not torch.equal(plate, bgr)
    assert float((plate - bgr).abs().mean()) < 0.25
    same = A.plate_jitter(bgr, _gen(), color_probability=0.0, affine_probability=0.0)
    torch.testing.assert_close(same, bgr)


def test_random_crop_takes_windows_of_the_input():
    image = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).reshape(2, 1, 6, 8)
    (crop,) = A.random_crop([image], _gen(), (3, 4))
    assert crop.shape == (2, 1, 3, 4)
    for sample, window in zip(image, crop):
        values = sample.flatten().tolist()
        assert all(v in values for v in window.flatten().tolist())
        assert window[0, 0, 1] - window[0, 0, 0] == 1  # contiguous columns
    (grown,) = A.random_crop([torch.rand(1, 3, 4, 4)], _gen(), (8, 8))
    assert grown.shape == (1, 3, 8, 8)


def test_training_batch_is_a_composite_over_the_plate_when_the_plate_is_exact():
    fgr = torch.rand(3, 3, 20, 20, generator=_gen(1))
    pha = torch.rand(3, 1, 20, 20, generator=_gen(2))
    bgr = torch.rand(3, 3, 30, 30, generator=_gen(3))
    exact = replace(
        A.PAPER, shadow_probability=0.0, noise_probability=0.0, plate_color_probability=0.0,
        plate_affine_probability=0.0,
    )
    batch = A.make_training_batch(fgr, pha, bgr, (16, 16), _gen(4), exact)
    assert set(batch) == {"src", "bgr", "pha", "fgr"}
    for name in ("src", "bgr", "fgr"):
        assert batch[name].shape == (3, 3, 16, 16)
    assert batch["pha"].shape == (3, 1, 16, 16)
    expected = batch["pha"] * batch["fgr"] + (1 - batch["pha"]) * batch["bgr"]
    torch.testing.assert_close(batch["src"], expected, rtol=0, atol=1e-6)


def test_training_batch_plate_differs_from_the_background_in_src_by_default():
    fgr = torch.rand(16, 3, 20, 20, generator=_gen(1))
    pha = torch.zeros(16, 1, 20, 20)  # all background: src shows the background alone
    bgr = torch.rand(16, 3, 20, 20, generator=_gen(3))
    batch = A.make_training_batch(fgr, pha, bgr, (20, 20), _gen(4))
    difference = (batch["src"] - batch["bgr"]).abs().mean(dim=(1, 2, 3))
    assert float(difference.max()) > 0.01
    assert float(difference.mean()) < 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu():
    generator = torch.Generator(device="cuda").manual_seed(0)
    fgr, pha = (t.cuda() for t in _pair())
    batch = A.make_training_batch(fgr, pha, torch.rand(4, 3, 30, 40, device="cuda"), (16, 16), generator)
    assert all(t.device.type == "cuda" for t in batch.values())
