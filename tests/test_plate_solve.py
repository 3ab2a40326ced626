"""Re-solving alpha against the plate: sharper edges from a clean plate, the network's alpha kept where the plate
cannot be trusted, and the same step on every path that runs a model (plain, fast, TorchScript, load_model)."""
from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
import torch

from bgmatte import BgmatteError
from bgmatte.cli import main
from bgmatte.cli.video import add_model_arguments, model_options
from bgmatte.export import to_torchscript
from bgmatte.model import build
from bgmatte.model.build import load_model, save_weights
from bgmatte.model.fast import optimize_model
from bgmatte.model.matting import MattingRefine
from bgmatte.model.plate_solve import _dilate, _reduced_blur, _sample, solve_alpha


def disk_scene(height=96, width=128, radius=30.0, ramp=3.0, seed=0):
    """A flat-coloured disk with a soft edge `ramp` pixels wide over a textured plate: (src, bgr, fgr, true alpha)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=g)
    bgr = torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear", align_corners=False)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    distance = ((rows - height / 2) ** 2 + (cols - width / 2) ** 2).sqrt()
    alpha = ((radius - distance) / ramp + 0.5).clamp(0, 1)[None, None]
    fgr = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1).expand(1, 3, height, width).clone()
    src = alpha * fgr + (1 - alpha) * bgr
    return src, bgr, fgr, alpha


def full_size_blur(x, sigma):
    """`_reduced_blur` brought back to the input's size, as `solve_alpha` reads it."""
    blurred, factor = _reduced_blur([x], sigma)
    if factor > 1:
        blurred = torch.nn.functional.interpolate(blurred, x.shape[2:], mode="bilinear", align_corners=False)
    return blurred


def soften(alpha, sigma=3.0):
    """A network-like soft edge: the true alpha blurred."""
    return full_size_blur(alpha, sigma).clamp(0, 1)


def test_a_clean_plate_sharpens_a_soft_edge_towards_the_truth():
    src, bgr, fgr, alpha = disk_scene()
    soft = soften(alpha)
    solved = solve_alpha(src, bgr, soft, fgr)
    before = (soft - alpha).abs().sum().item()
    after = (solved - alpha).abs().sum().item()
    assert after < 0.3 * before
    assert solved.min() >= 0 and solved.max() <= 1


def test_a_noisier_plate_is_trusted_less_and_never_does_worse_than_the_network():
    src, bgr, fgr, alpha = disk_scene()
    soft = soften(alpha)
    network_error = (soft - alpha).abs().sum().item()
    moved = []
    for sigma in (0.0, 0.05, 0.1, 0.15):
        noise = sigma * torch.randn(bgr.shape, generator=torch.Generator().manual_seed(1))
        solved = solve_alpha(src, (bgr + noise).clamp(0, 1), soft, fgr)
        moved.append((solved - soft).abs().mean().item())
        assert (solved - alpha).abs().sum().item() <= 1.01 * network_error
    assert moved == sorted(moved, reverse=True) and moved[-1] < 0.6 * moved[0]


def test_pixels_far_from_the_matte_and_opaque_pixels_keep_their_alpha():
    src, bgr, fgr, alpha = disk_scene()
    soft = soften(alpha)
    src = src.clone()
    src[:, :, :6, :6] = 1.0 - bgr[:, :, :6, :6]  # a change in the plate far from the subject
    solved = solve_alpha(src, bgr, soft, fgr)
    far = ~_dilate((soft > 0.02).float(), 4)
    assert far[:, :, :6, :6].all()
    assert torch.equal(solved[far], soft[far])
    opaque = soft >= 0.999
    assert opaque.any() and torch.equal(solved[opaque], soft[opaque])


def test_outside_the_matte_faint_rises_are_dropped_and_clear_ones_kept():
    """A strand the network missed, just outside its matte: kept when it is clear, dropped when it is as faint
    as noise."""
    src, bgr, fgr, alpha = disk_scene(ramp=1.0)
    network = alpha.clone()
    rows, cols = slice(46, 50), slice(95, 97)  # 1-2 pixels beyond the disk's edge (radius 30 about x = 64)
    assert network[:, :, rows, cols].max() == 0
    for strand, expected in ((0.05, 0.0), (0.4, 0.4)):
        frame = src.clone()
        frame[:, :, rows, cols] = strand * fgr[:, :, rows, cols] + (1 - strand) * bgr[:, :, rows, cols]
        solved = solve_alpha(frame, bgr, network, fgr)[:, :, rows, cols]
        torch.testing.assert_close(solved, torch.full_like(solved, expected), atol=0.03, rtol=0)


def test_half_precision_comes_back_in_half_precision():
    src, bgr, fgr, alpha = disk_scene()
    soft = soften(alpha)
    solved = solve_alpha(src.half(), bgr.half(), soft.half(), fgr.half())
    assert solved.dtype == torch.float16
    torch.testing.assert_close(solved.float(), solve_alpha(src, bgr, soft, fgr), atol=2e-2, rtol=0)


def test_dilation_by_running_sums_equals_max_pooling():
    mask = (torch.rand(1, 1, 40, 53, generator=torch.Generator().manual_seed(2)) > 0.97).float()
    for radius in (1, 4, 7):
        pooled = torch.nn.functional.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius) > 0
        assert torch.equal(_dilate(mask, radius), pooled)


def test_blur_at_a_quarter_resolution_stays_close_to_the_full_blur():
    x = torch.rand(1, 2, 128, 160, generator=torch.Generator().manual_seed(3))
    x = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 8), (128, 160), mode="bilinear")
    fast = full_size_blur(x, 8.0)  # pooled by 4
    g = torch.arange(-32, 33, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (g / 8.0) ** 2)
    kernel = kernel / kernel.sum()
    full = torch.nn.functional.pad(x, (32, 32, 32, 32), mode="reflect")
    full = torch.nn.functional.conv2d(full, kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)
    full = torch.nn.functional.conv2d(full, kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))  # borders are handled differently
    assert (fast - full)[inner].abs().max() < 0.02


def test_sampling_chosen_pixels_equals_upsampling_the_whole_frame():
    low = torch.rand(2, 4, 25, 33, generator=torch.Generator().manual_seed(4))
    full = torch.nn.functional.interpolate(low, (98, 130), mode="bilinear", align_corners=False)
    b, row, col = torch.meshgrid(torch.arange(2), torch.arange(98), torch.arange(130), indexing="ij")
    sampled = _sample(low, 98, 130, b.flatten(), row.flatten(), col.flatten())
    torch.testing.assert_close(sampled, full.permute(0, 2, 3, 1).reshape(-1, 4), atol=1e-5, rtol=0)


# -- on the model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """The embedded default model (a trained one gives opaque cores, which the step needs), plain, solve off."""
    if not build.DEFAULT_WEIGHTS.is_file():
        pytest.skip("no default weights in this checkout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(device="cpu", optimize=False, plate_solve=False, refine_sample_pixels=4000)


def test_the_model_applies_the_step_to_its_own_outputs_and_changes_nothing_else(trained):
    src, bgr, _, _ = disk_scene(seed=4)
    with torch.no_grad():
        off = trained(src, bgr)
        trained.plate_solve = True
        try:
            on = trained(src, bgr)
        finally:
            trained.plate_solve = False
    assert not torch.equal(on[0], off[0])
    torch.testing.assert_close(on[0], solve_alpha(src, bgr, off[0], off[1]))
    for a, b in zip(on[1:], off[1:]):
        assert torch.equal(a, b)


def test_fast_path_and_torchscript_apply_it_as_the_plain_model(trained):
    src, bgr, _, _ = disk_scene(height=98, width=130, seed=5)  # not a multiple of 4: padded, then cropped
    plain = copy.deepcopy(trained)
    plain.plate_solve = True
    with torch.no_grad():
        expected = plain(src, bgr)
        fast = optimize_model(copy.deepcopy(plain))(src, bgr)
        scripted = to_torchscript(plain)(src, bgr)
    assert expected[0].shape == (1, 1, 98, 130)
    assert (fast[0] - expected[0]).abs().gt(1e-3).float().mean() < 1e-3
    torch.testing.assert_close(scripted[0], expected[0], atol=1e-5, rtol=0)


def test_load_model_takes_the_choice_from_the_weights_unless_told(tmp_path):
    model = MattingRefine("mobilenetv2")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    save_weights(model, tmp_path / "on.safetensors", metadata={"plate_solve": "on"})
    assert load_model(tmp_path / "plain.pth", device="cpu").plate_solve is False
    assert load_model(tmp_path / "on.safetensors", device="cpu").plate_solve is True
    assert load_model(tmp_path / "on.safetensors", device="cpu", plate_solve=False).plate_solve is False
    assert load_model(tmp_path / "plain.pth", device="cpu", plate_solve=True).plate_solve is True


def test_the_shipped_default_model_was_scored_with_it_and_turns_it_on():
    if not build.DEFAULT_WEIGHTS.is_file():
        pytest.skip("no default weights in this checkout")
    assert build.weights_metadata(build.DEFAULT_WEIGHTS).get("plate_solve") == "on"


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--plate-solve", "on"], True),
                                                (["--plate-solve", "off"], False)])
def test_the_command_line_flag_reaches_the_model_options(flag, expected):
    import argparse

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert model_options(parser.parse_args(flag)).plate_solve is expected


def test_where_the_frame_is_the_plate_alpha_can_only_fall():
    """A subject the network imagines over an empty frame: the compositing equation says alpha 0 there."""
    _, bgr, fgr, alpha = disk_scene(seed=6)
    imagined = soften(alpha)
    solved = solve_alpha(bgr, bgr, imagined, fgr)
    assert (solved <= imagined + 1e-6).all()
    assert (imagined - solved).max() > 0.5


@pytest.mark.slow
def test_onnx_export_carries_the_step_and_says_so(trained, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    from bgmatte.export import OnnxMatting, export_onnx

    model = copy.deepcopy(trained)
    model.plate_solve = True
    with caplog.at_level(logging.WARNING):
        runner = OnnxMatting(export_onnx(model, tmp_path / "m.onnx"))
    assert "Attribute type is ambiguous" not in caplog.text  # onnx_ir's notice on the step's graph, not for users
    assert runner.session.get_modelmeta().custom_metadata_map["plate_solve"] == "on"
    for size in ((98, 130), (160, 200)):
        src, bgr, _, _ = disk_scene(*size, seed=7)
        with torch.no_grad():
            expected = model(src, bgr)
            without = trained(src, bgr)[0]
        assert not torch.equal(expected[0], without)  # the step changed something here
        got = runner(src, bgr)
        np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), atol=1e-4, rtol=0)
    assert load_model(tmp_path / "m.onnx", backend="onnxruntime").plate_solve is True
    with pytest.raises(BgmatteError, match="exported with the plate solve on"):
        load_model(tmp_path / "m.onnx", backend="onnxruntime", plate_solve=False)


def test_the_pipeline_follows_the_weights_unless_told_and_refuses_it_without_the_refiner(tmp_path):
    from bgmatte.pipeline import ModelOptions, load_predictor

    save_weights(MattingRefine("mobilenetv2"), tmp_path / "on.safetensors", metadata={"plate_solve": "on"})
    weights = str(tmp_path / "on.safetensors")
    assert load_predictor(ModelOptions(checkpoint=weights, device="cpu"), 64, 48).model.plate_solve is True
    told = ModelOptions(checkpoint=weights, device="cpu", plate_solve=False)
    assert load_predictor(told, 64, 48).model.plate_solve is False
    base = ModelOptions(checkpoint=weights, device="cpu", model_type="mattingbase", plate_solve=True)
    with pytest.raises(BgmatteError, match="mattingrefine only"):
        load_predictor(base, 64, 48)


def test_torchscript_export_takes_the_flag_and_keeps_it_changeable(tmp_path, capsys):
    torch.save(MattingRefine("mobilenetv2").state_dict(), tmp_path / "w.pth")
    path = tmp_path / "m.torchscript"
    assert main(["export", "torchscript", str(tmp_path / "w.pth"), "-o", str(path), "--plate-solve", "on"]) == 0
    scripted = torch.jit.load(str(path))
    assert scripted.plate_solve is True
    scripted.plate_solve = False
    src, bgr, _, _ = disk_scene(height=64, width=96)
    scripted(src, bgr)
