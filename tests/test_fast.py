"""The fast inference path computes what the plain MattingRefine computes: same patches, same alpha."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bgmatte import BgmatteError
from bgmatte.model.build import load_model
from bgmatte.model.fast import (FastMattingRefine, _interleave, _nearest_phases, _phase_weight, _upsampling_phases,
                                fold_batch_norm, optimize_model)
from bgmatte.model.matting import MattingRefine, RefineOptions

from models import reference_style_model, subject_frames


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine every parallel region can wait a scheduler tick for the
    second thread, which makes the plain module (more, smaller operations) take seconds per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_style(reference, backbone="mobilenetv2", seed=3, **settings) -> MattingRefine:
    return reference_style_model(reference, backbone, seed, **settings)


def frames(batch=2, height=97, width=130, seed=0):
    return subject_frames(batch, height, width, seed)


def assert_same_outputs(expected, got, tolerance=1e-4):
    """The contract: the same refined cells, and alpha within 1e-3 on 99.9% of pixels (here: everywhere)."""
    assert len(got) == 6
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype
    assert torch.equal(expected[5], got[5])
    close = ((expected[0] - got[0]).abs() <= 1e-3).float().mean()
    assert close >= 0.999
    for e, g in zip(expected[:5], got[:5]):
        torch.testing.assert_close(g, e, atol=tolerance, rtol=0)


def both(reference, backbone="mobilenetv2", **settings):
    plain = reference_style(reference, backbone, **settings)
    return plain, optimize_model(copy.deepcopy(plain))


@pytest.mark.parametrize("mode", ["sampling", "thresholding", "full"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_fast_path_gives_the_plain_outputs_in_every_mode(reference, mode, kernel):
    plain, fast = both(reference, refine_mode=mode, refine_kernel_size=kernel, refine_sample_pixels=2400,
                       refine_threshold=0.3)
    src, bgr = frames(batch=2, height=97, width=130)  # odd sizes: padded to 100x132 inside
    with torch.no_grad():
        expected, got = plain(src, bgr), fast(src, bgr)
    assert 0 < int(expected[5].sum()) < expected[5].numel() or mode == "full"
    assert_same_outputs(expected, got)


@pytest.mark.parametrize("scale", [0.5, 0.125, 1 / 3])
def test_scales_without_the_phase_shortcut_give_the_plain_outputs(reference, scale):
    """Away from a 2x coarse-to-half ratio every patch takes the per-patch bilinear interpolation."""
    plain, fast = both(reference, backbone_scale=scale, refine_sample_pixels=3200)
    src, bgr = frames(batch=1, height=128, width=176)
    with torch.no_grad():
        assert_same_outputs(plain(src, bgr), fast(src, bgr))


def test_resnet50_fast_path_gives_the_plain_outputs(reference):
    plain, fast = both(reference, "resnet50", refine_sample_pixels=1600)
    src, bgr = frames(batch=2, height=66, width=94)
    with torch.no_grad():
        assert_same_outputs(plain(src, bgr), fast(src, bgr), tolerance=1e-3)


def test_without_onednn_the_plain_convolutions_give_the_same_outputs(reference, monkeypatch):
    """The path GPUs and low precisions take: F.conv2d with the activations and sums applied after."""
    monkeypatch.setattr("bgmatte.model.fast._onednn_usable", lambda device, dtype: False)
    plain, fast = both(reference, refine_sample_pixels=2400)
    src, bgr = frames(batch=2, height=97, width=130)
    with torch.no_grad():
        assert_same_outputs(plain(src, bgr), fast(src, bgr))


def test_frames_with_nothing_to_refine_give_the_upsampled_coarse_result(reference):
    plain, fast = both(reference, refine_mode="thresholding", refine_threshold=2.0)
    src, bgr = frames(batch=1, height=64, width=96)
    with torch.no_grad():
        expected, got = plain(src, bgr), fast(src, bgr)
    assert int(got[5].sum()) == 0
    assert_same_outputs(expected, got)


def test_settings_stay_changeable_on_the_fast_module(reference):
    plain, fast = both(reference)
    src, bgr = frames(batch=1, height=96, width=128)
    for target in (plain, fast):
        target.backbone_scale = 0.5
        target.refiner.mode, target.refiner.threshold = "thresholding", 0.4
    assert fast.options == plain.options
    with torch.no_grad():
        assert_same_outputs(plain(src, bgr), fast(src, bgr))
    fast.configure(RefineOptions(0.25, "sampling", 800))
    plain.configure(RefineOptions(0.25, "sampling", 800))
    with torch.no_grad():
        expected, got = plain(src, bgr), fast(src, bgr)
    assert int(got[5].sum()) == 800 // 16
    assert_same_outputs(expected, got)


def test_phase_convolution_equals_convolution_over_bilinear_upsampling():
    """The identity behind the shortcut: a 3x3 conv over a bilinear 2x upsampling, away from the edges,
    is four 3x3 convs over the source, interleaved."""
    g = torch.Generator().manual_seed(1)
    source = torch.rand(2, 5, 12, 14, generator=g)
    weight = torch.randn(4, 5, 3, 3, generator=g)
    upsampled = F.interpolate(source, scale_factor=2, mode="bilinear", align_corners=False)
    expected = F.conv2d(upsampled, weight)  # output i is centred on upsampled position i + 1
    phases = F.conv2d(source, _phase_weight(weight, _upsampling_phases()))
    got = _interleave(phases.contiguous(memory_format=torch.channels_last))  # output k: centred on k + 2
    # Away from the first and last source rows, where the upsampling repeats the edge.
    inner = got[:, :, 1:-2, 1:-2]
    torch.testing.assert_close(inner, expected[:, :, 2:2 + inner.shape[2], 2:2 + inner.shape[3]], atol=1e-5, rtol=0)


def test_phase_convolution_equals_convolution_over_nearest_upsampling():
    g = torch.Generator().manual_seed(2)
    source = torch.rand(3, 4, 4, 4, generator=g)
    weight = torch.randn(6, 4, 3, 3, generator=g)
    expected = F.conv2d(F.interpolate(source, scale_factor=2, mode="nearest"), weight)
    got = _interleave(F.conv2d(source, _phase_weight(weight, _nearest_phases())))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_folded_batch_norm_equals_conv_then_batch_norm():
    conv, bn = torch.nn.Conv2d(3, 5, 3, padding=1, bias=True), torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.rand(2, 3, 8, 8)
    weight, bias = fold_batch_norm(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), bn(conv(x)), atol=1e-5, rtol=0)


def test_load_model_returns_the_fast_path_with_the_plain_state_dict(tmp_path):
    plain = MattingRefine("mobilenetv2").eval()
    path = tmp_path / "w.pth"
    torch.save(plain.state_dict(), path)
    model = load_model(path, device="cpu")
    assert isinstance(model, FastMattingRefine) and isinstance(model, MattingRefine)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert not isinstance(load_model(path, device="cpu", optimize=False), FastMattingRefine)


def test_new_weights_are_folded_again(reference):
    plain, fast = both(reference, refine_sample_pixels=1600)
    src, bgr = frames(batch=1, height=64, width=96)
    with torch.no_grad():
        fast(src, bgr)
        other = reference_style(reference, seed=11, refine_sample_pixels=1600)
        fast.load_state_dict(other.state_dict())
        assert_same_outputs(other(src, bgr), fast(src, bgr))
        fast.refiner.conv4.bias.add_(0.1)  # an in-place edit
        other.refiner.conv4.bias.add_(0.1)
        assert_same_outputs(other(src, bgr), fast(src, bgr))


def test_training_mode_runs_the_plain_computation_with_gradients(reference):
    plain, fast = both(reference, refine_sample_pixels=1600)
    src, bgr = frames(batch=2, height=64, width=96)  # batch norm in training needs two frames
    fast.train()
    pha = fast(src, bgr)[0]
    pha.mean().backward()
    assert fast.refiner.conv1.weight.grad is not None
    fast.eval()
    assert not fast(src, bgr)[0].requires_grad


def test_copies_and_pickles_of_the_fast_module_work(reference):
    plain, fast = both(reference, refine_sample_pixels=1600)
    src, bgr = frames(batch=1, height=64, width=96)
    with torch.no_grad():
        expected = fast(src, bgr)  # folded and packed first: the copies must not carry the packing
        assert_same_outputs(expected, copy.deepcopy(fast)(src, bgr))
        assert_same_outputs(expected, pickle.loads(pickle.dumps(fast))(src, bgr))


def test_bf16_matches_fp32_within_its_precision(reference):
    plain, fast = both(reference, refine_mode="full")
    src, bgr = frames(batch=1, height=64, width=96)
    with torch.no_grad():
        expected = plain(src, bgr)[0]
        got = fast.to(torch.bfloat16)(src, bgr)  # fp32 inputs are cast to the model's dtype
    assert got[0].dtype == torch.bfloat16
    error = (got[0].float() - expected).abs()
    assert error.mean() < 0.01 and np.quantile(error.numpy(), 0.99) < 0.05


def test_bf16_sampling_agrees_with_fp32_where_it_refines_the_same_cells(reference):
    plain, fast = both(reference, refine_sample_pixels=2400)
    src, bgr = frames(batch=1, height=96, width=128)
    with torch.no_grad():
        expected = plain(src, bgr)
        got = fast.to(torch.bfloat16)(src, bgr)
    same_cells = F.interpolate((got[5].float() == expected[5]).float(), scale_factor=4.0, mode="nearest").bool()
    assert same_cells.float().mean() > 0.95  # reduced precision may swap a few near-tied cells
    error = (got[0].float() - expected[0]).abs()[same_cells]
    assert error.mean() < 0.01 and torch.quantile(error, 0.99) < 0.05


def test_load_model_precision_and_backend_are_checked(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(MattingRefine("mobilenetv2").state_dict(), path)
    assert load_model(path, device="cpu", precision="bf16").refiner.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(BgmatteError, match="unknown precision 'fp8'"):
        load_model(path, device="cpu", precision="fp8")
    with pytest.raises(BgmatteError, match="unknown backend 'tensorrt'"):
        load_model(path, device="cpu", backend="tensorrt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_fast_path_matches_the_cpu_plain_module(reference, dtype):
    plain, fast = both(reference, refine_mode="full")
    src, bgr = frames(batch=1, height=128, width=160)
    with torch.no_grad():
        expected = plain(src, bgr)[0]
        got = fast.cuda().to(dtype)(src.cuda(), bgr.cuda())[0].float().cpu()
    assert (got - expected).abs().mean() < (1e-4 if dtype == torch.float32 else 1e-2)


def test_at_1080p_the_fast_path_refines_the_same_cells_up_to_ties():
    """Folding batch norm rounds differently, so two error values that tie to the last bits may trade
    places at the sampling cut-off. Any cell the two paths pick differently must be such a tie."""
    from bgmatte.bench import example_frames, random_model

    plain = random_model("mobilenetv2", RefineOptions(0.25, "sampling", 80_000))
    fast = optimize_model(copy.deepcopy(plain))
    src, bgr = example_frames(1, 1080, 1920)
    with torch.no_grad():
        expected, got = plain(src, bgr), fast(src, bgr)
    quarter = F.interpolate(expected[4], size=expected[5].shape[2:], mode="bilinear", align_corners=False).flatten()
    cut = quarter.topk(80_000 // 16).values.min()
    differ = (expected[5] != got[5]).flatten()
    assert int(got[5].sum()) == int(expected[5].sum()) == 80_000 // 16
    assert differ.sum() <= 10, int(differ.sum())
    assert ((quarter[differ] - cut).abs() <= 1e-5).all(), (quarter[differ] - cut)
    close = ((expected[0] - got[0]).abs() <= 1e-3).float().mean()
    assert close >= 0.999
