"""The synthetic composite generator: determinism, ranges, the composite equation, fractional edges, hard cases."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bgmatte.train.synthetic import DEFAULT, generate_batch, procedural_textures

SHARP = replace(DEFAULT, defocus_fraction=0.0, motion_blur_fraction=0.0, translucent_fraction=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """The generator runs many small tensor operations; on a shared 2-core machine, torch's
    intra-op threads spin-wait on each other and make them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(seed: int, n: int = 4, height: int = 64, width: int = 80, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return generate_batch(n, height, width, generator=generator, **kwargs)


def test_same_seed_gives_the_same_batch_and_another_seed_does_not():
    first, again, other = _batch(3), _batch(3), _batch(4)
    for name in ("fgr", "pha", "bgr", "src", "hard"):
        assert torch.equal(first[name], again[name]), name
    assert not torch.equal(first["pha"], other["pha"])
    assert not torch.equal(first["bgr"], other["bgr"])


def test_shapes_dtypes_and_ranges():
    batch = _batch(0, n=3, height=48, width=72)
    assert batch["fgr"].shape == (3, 3, 48, 72)
    assert batch["bgr"].shape == (3, 3, 48, 72)
    assert batch["src"].shape == (3, 3, 48, 72)
    assert batch["pha"].shape == (3, 1, 48, 72)
    assert batch["hard"].shape == (3,) and batch["hard"].dtype == torch.bool
    for name in ("fgr", "pha", "bgr", "src"):
        assert batch[name].dtype == torch.float32
        assert float(batch[name].min()) >= 0.0 and float(batch[name].max()) <= 1.0
        assert torch.isfinite(batch[name]).all()


def test_composite_equation_holds():
    batch = _batch(1)
    expected = batch["pha"] * batch["fgr"] + (1 - batch["pha"]) * batch["bgr"]
    torch.testing.assert_close(batch["src"], expected, rtol=0, atol=1e-6)


def test_every_sample_shows_a_person_and_some_background():
    batch = _batch(2, n=12, height=64, width=64)
    coverage = batch["pha"].mean(dim=(1, 2, 3))
    assert (coverage > 0.005).all(), coverage
    assert (coverage < 0.995).all(), coverage


def test_edges_carry_fractional_alpha_without_any_blur():
    batch = _batch(5, n=6, height=96, width=96, options=SHARP)
    pha = batch["pha"]
    for sample in pha:
        fractional = ((sample > 0.02) & (sample < 0.98)).sum()
        solid = (sample >= 0.98).sum()
        assert solid > 0
        assert fractional > 0
    # Strands and anti-aliased outlines give many distinct levels, not a few hard steps.
    assert torch.unique((pha * 255).round()).numel() > 100


def test_hair_strands_are_thinner_than_a_pixel():
    no_strands = replace(SHARP, strands=1)
    with_strands = _batch(7, n=4, height=128, width=128, options=SHARP)["pha"]
    without = _batch(7, n=4, height=128, width=128, options=no_strands)["pha"]
    added = (with_strands - without).clamp_min(0)
    # Strand pixels are mostly faint: sub-pixel width gives partial coverage.
    touched = added > 0.01
    assert touched.sum() > 50
    assert float(added[touched].median()) < 0.6


def test_supersampling_changes_edges_not_areas():
    coarse = _batch(8, n=4, height=64, width=64, options=replace(SHARP, supersample=1, strands=1))["pha"]
    fine = _batch(8, n=4, height=64, width=64, options=replace(SHARP, supersample=4, strands=1))["pha"]
    torch.testing.assert_close(fine.mean(dim=(1, 2, 3)), coarse.mean(dim=(1, 2, 3)), rtol=0.03, atol=2e-3)


def test_hard_cases_have_foreground_close_to_background():
    hard = _batch(9, n=6, options=replace(SHARP, hard_fraction=1.0))
    easy = _batch(9, n=6, options=replace(SHARP, hard_fraction=0.0))
    assert hard["hard"].all() and not easy["hard"].any()

    def distance(batch):
        inside = (batch["pha"] > 0.5).float()
        gap = (batch["fgr"] - batch["bgr"]).abs().mean(dim=1, keepdim=True)
        return (gap * inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3)).clamp_min(1)

    assert (distance(hard) < 0.12).all(), distance(hard)
    assert float(distance(easy).mean()) > 2 * float(distance(hard).mean())


def test_training_hard_cases_keep_a_visible_difference():
    """With hard_min_offset, a hard foreground never matches what is behind it exactly (validation's may)."""

    def offsets(minimum: float) -> torch.Tensor:
        options = replace(SHARP, hard_fraction=1.0, hard_mix=(1.0, 1.0), hard_min_offset=minimum)
        batch = _batch(9, n=8, options=options)
        inside = batch["pha"] > 0.5
        return torch.stack([(batch["fgr"][i][:, inside[i, 0]] - batch["bgr"][i][:, inside[i, 0]]).mean(dim=1).norm()
                            for i in range(8)])

    free, kept = offsets(0.0), offsets(0.06)
    # Half the samples copy the local mean colour rather than the background itself, and clamping at 0 and 1
    # eats into the offset, so compare the typical sample.
    assert float(kept.median()) > 0.04 and float(kept.median()) > float(free.median()), (free, kept)


def test_empty_frames_have_no_subject():
    batch = _batch(11, n=4, options=replace(DEFAULT, empty_fraction=1.0))
    assert float(batch["pha"].max()) == 0.0
    torch.testing.assert_close(batch["src"], batch["bgr"], rtol=0, atol=0)


def test_default_settings_draw_the_same_stream_as_before_the_training_options():
    """Options that are off draw nothing, so validation sets made by earlier versions stay the same."""
    plain = _batch(12)
    explicit = _batch(12, options=replace(DEFAULT, empty_fraction=0.0, hard_min_offset=0.0))
    for name in ("fgr", "pha", "bgr", "src"):
        assert torch.equal(plain[name], explicit[name])


def test_photographs_are_used_as_textures():
    photo = torch.zeros(3, 40, 60, dtype=torch.uint8)
    photo[0] = 255  # pure red
    options = replace(SHARP, photo_fraction=1.0, hard_fraction=0.0, background_blur_fraction=0.0)
    batch = _batch(10, n=2, photos=[photo], options=options)
    bgr = batch["bgr"]
    torch.testing.assert_close(bgr[:, 0], torch.ones_like(bgr[:, 0]), rtol=0, atol=1e-5)
    assert float(bgr[:, 1:].max()) < 1e-5


def test_procedural_textures_vary_and_stay_in_range():
    textures = procedural_textures(8, 32, 48, generator=torch.Generator().manual_seed(0))
    assert textures.shape == (8, 3, 32, 48)
    assert float(textures.min()) >= 0 and float(textures.max()) <= 1
    spread = textures.flatten(1).std(dim=1)
    assert (spread > 0).all()
    assert textures.flatten(1).mean(dim=1).std() > 0.01  # not all the same picture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generates_on_the_gpu():
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch = generate_batch(2, 64, 64, device="cuda", generator=generator)
    assert batch["src"].device.type == "cuda"
    expected = batch["pha"] * batch["fgr"] + (1 - batch["pha"]) * batch["bgr"]
    torch.testing.assert_close(batch["src"], expected, rtol=0, atol=1e-6)
