"""The closed-form baseline (`bgmatte eval --baseline closed-form`): trimaps that lack one kind of sure pixel, on
which closed-form matting has a constant solution, still give a matte close to the truth."""
from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch

from bgmatte.baseline import ClosedFormBaseline, closed_form_alpha, plate_difference_trimap
from media import plate_image

pytestmark = pytest.mark.timeout(120)
needs_pymatting = pytest.mark.skipif(importlib.util.find_spec("pymatting") is None,
                                     reason='pymatting is not installed (pip install "bgmatte[eval]")')

HEIGHT, WIDTH = 64, 96
MAGENTA = (1.0, 0.0, 1.0)


def composite(truth: np.ndarray, background: np.ndarray) -> np.ndarray:
    """A magenta subject where `truth` is 1 over `background`, float RGB."""
    subject = np.empty_like(background)
    subject[...] = MAGENTA
    return (truth[..., None] * subject + (1 - truth[..., None]) * background).astype(np.float32)


@pytest.fixture()
def plate() -> np.ndarray:
    return plate_image(WIDTH, HEIGHT).astype(np.float32) / 255


def square() -> np.ndarray:
    truth = np.zeros((HEIGHT, WIDTH))
    truth[16:48, 30:62] = 1
    return truth


@needs_pymatting
@pytest.mark.parametrize("change", ["offset", "gain"])
def test_a_frame_whose_every_pixel_differs_from_the_plate_is_not_matted_all_foreground(plate, caplog, change):
    """A change of exposure shifts every background pixel past the background threshold: the trimap had no sure
    background, and the matte came out all ones."""
    noise = np.random.default_rng(0).normal(0, 0.005, plate.shape)
    shifted = plate + 0.1 + noise if change == "offset" else plate * 1.15
    truth = square()
    frame = composite(truth, np.clip(shifted, 0, 1))
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        alpha = closed_form_alpha(frame, plate_difference_trimap(frame, plate))
    assert not np.all(alpha == 1)
    assert alpha[truth == 1].mean() > 0.99
    assert alpha[truth == 0].mean() < (0.01 if change == "offset" else 0.15)
    assert "the pixels that differ least are taken as background" in caplog.text


@needs_pymatting
def test_a_subject_thinner_than_the_band_is_not_matted_all_background(plate, caplog):
    """Erosion by the band removed a 5-pixel bar whole: the trimap had no sure foreground, and the matte was 0."""
    truth = np.zeros((HEIGHT, WIDTH))
    truth[8:56, 46:51] = 1
    frame = composite(truth, plate)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        alpha = closed_form_alpha(frame, plate_difference_trimap(frame, plate))
    assert alpha[truth == 1].mean() > 0.95 and alpha[truth == 0].mean() < 0.01
    assert "too thin for the 5-pixel band" in caplog.text


@needs_pymatting
def test_a_frame_with_nothing_clearly_different_from_the_plate_is_all_background(plate):
    """The opposite extreme: no sure foreground because nothing differs clearly (an exposure change and no
    subject); the trimap's own verdict, all background, is kept."""
    frame = np.clip(plate + 0.1, 0, 1).astype(np.float32)
    trimap = plate_difference_trimap(frame, plate)
    assert not (trimap == 255).any()
    assert np.all(closed_form_alpha(frame, trimap) == 0)


def test_an_ordinary_frame_keeps_its_trimap_and_says_nothing(plate, caplog):
    truth = square()
    frame = composite(truth, plate)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        trimap = plate_difference_trimap(frame, plate)
    assert not caplog.records
    assert (trimap[truth == 0] != 255).all() and (trimap[truth == 1] != 0).all()


@needs_pymatting
def test_the_baseline_model_mattes_a_shifted_frame_as_well_as_the_same_frame_unshifted(plate):
    """Through the model `bgmatte eval` scores: the exposure change costs (almost) nothing. Noise-free 8x8 tiles are
    hard for closed-form matting as such, shifted or not (some 0.05 of alpha leaks into them), hence the comparison."""
    truth = square()
    to_tensor = lambda image: torch.from_numpy(image).permute(2, 0, 1)[None]  # noqa: E731
    errors = {}
    for offset in (0.0, 0.1):
        pha, fgr = ClosedFormBaseline()(to_tensor(composite(truth, np.clip(plate + offset, 0, 1))), to_tensor(plate))
        assert pha.shape == (1, 1, HEIGHT, WIDTH)
        errors[offset] = np.abs(pha[0, 0].numpy() - truth).mean()
    assert errors[0.1] < errors[0.0] + 0.01, errors


def test_eval_without_pymatting_refuses_the_baseline_before_making_the_prediction_folders(tmp_path, capsys,
                                                                                          monkeypatch):
    """pymatting was imported at the first frame: the --out folder and its empty pha/ and fgr/ were left behind."""
    import sys

    from bgmatte.cli import main
    from bgmatte.io.images import write_png

    data = tmp_path / "data"
    for folder, value in (("src", 200), ("bgr", 20), ("pha", 255), ("fgr", 200)):
        (data / folder).mkdir(parents=True)
        write_png(data / folder / "frame.png", np.full((32, 32, 3), value, np.uint8))
    monkeypatch.setitem(sys.modules, "pymatting", None)  # what an absent package looks like to import
    code = main(["eval", "--baseline", "closed-form", "--data", str(data), "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err == ('bgmatte eval: error: the closed-form baseline needs pymatting: '
                                       'pip install "bgmatte[eval]"\n')
    assert not (tmp_path / "out").exists()
