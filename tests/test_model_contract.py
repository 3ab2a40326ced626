"""The model contract beyond the five reference cases: backbones, batches, kernels, scales, sizes, precisions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bgmatte.model.matting import MattingBase, MattingRefine, RefineOptions
from bgmatte.model.refiner import crop_patches, replace_patches

from models import reference_style_model, subject_frames


def inputs(batch=1, height=128, width=160, seed=0):
    return subject_frames(batch, height, width, seed)


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50", "resnet101"])
def test_every_backbone_returns_the_six_outputs_at_their_sizes(backbone):
    model = MattingRefine(backbone, backbone_scale=0.25, refine_sample_pixels=2000).eval()
    src, bgr = inputs(batch=2, height=96, width=128)
    with torch.no_grad():
        pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm = model(src, bgr)
    assert pha.shape == (2, 1, 96, 128) and fgr.shape == (2, 3, 96, 128)
    assert pha_sm.shape == (2, 1, 24, 32) and fgr_sm.shape == (2, 3, 24, 32) and err_sm.shape == (2, 1, 24, 32)
    assert ref_sm.shape == (2, 1, 24, 32)
    for t in (pha, fgr, pha_sm, fgr_sm, err_sm):
        assert 0 <= t.min() and t.max() <= 1


def test_batch_gives_the_same_results_as_single_frames(reference):
    model = reference_style_model(reference, refine_sample_pixels=3000)
    src, bgr = inputs(batch=3, height=128, width=160)
    with torch.no_grad():
        together = model(src, bgr)
        alone = [model(src[i:i + 1], bgr[i:i + 1]) for i in range(3)]
    for k in range(6):
        separate = torch.cat([a[k] for a in alone])
        if k == 5:
            assert torch.equal(together[k], separate)
        else:
            torch.testing.assert_close(together[k], separate, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone,kernel", [("mobilenetv2", 3), ("mobilenetv2", 1), ("resnet101", 3)])
def test_refining_every_patch_equals_full_mode(reference, backbone, kernel):
    """Patch-wise refinement and whole-frame refinement are the same computation."""
    src, bgr = inputs(batch=2, height=64, width=96)
    full = reference_style_model(reference, backbone, refine_mode="full", refine_kernel_size=kernel)
    sampled = reference_style_model(reference, backbone, refine_mode="sampling", refine_kernel_size=kernel,
                                    refine_sample_pixels=64 * 96, refine_prevent_oversampling=False)
    thresholded = reference_style_model(reference, backbone, refine_mode="thresholding", refine_kernel_size=kernel,
                                        refine_threshold=-1.0)
    with torch.no_grad():
        expected = full(src, bgr)
        for model in (sampled, thresholded):
            got = model(src, bgr)
            torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)
            assert torch.equal(got[5], expected[5])


def test_sampling_refines_the_budget_of_highest_error_cells(reference):
    model = reference_style_model(reference, refine_sample_pixels=1600)
    src, bgr = inputs(height=128, width=160)
    with torch.no_grad():
        pha, _, pha_sm, _, err_sm, ref_sm = model(src, bgr)
    assert int(ref_sm.sum()) == 1600 // 16
    err_q = F.interpolate(err_sm, (32, 40), mode="bilinear", align_corners=False)
    chosen, others = err_q[ref_sm.bool()], err_q[~ref_sm.bool()]
    assert chosen.min() >= others.max()


def test_thresholding_refines_exactly_the_cells_above_the_threshold(reference):
    model = reference_style_model(reference, refine_mode="thresholding", refine_threshold=0.5)
    src, bgr = inputs(height=128, width=160)
    with torch.no_grad():
        *_, err_sm, ref_sm = model(src, bgr)
    err_q = F.interpolate(err_sm, (32, 40), mode="bilinear", align_corners=False)
    assert torch.equal(ref_sm.bool(), err_q > 0.5)
    assert 0 < int(ref_sm.sum()) < ref_sm.numel()


def test_unrefined_pixels_are_the_upsampled_coarse_alpha(reference):
    model = reference_style_model(reference, refine_sample_pixels=800)
    src, bgr = inputs(height=128, width=160)
    with torch.no_grad():
        pha, _, pha_sm, _, _, ref_sm = model(src, bgr)
    coarse = F.interpolate(pha_sm, (128, 160), mode="bilinear", align_corners=False)
    refined = F.interpolate(ref_sm, (128, 160), mode="nearest").bool()
    torch.testing.assert_close(pha[~refined], coarse[~refined], atol=1e-6, rtol=0)
    assert (pha[refined] - coarse[refined]).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [0.5, 0.25, 0.125, 1 / 3])
def test_backbone_scale_sets_the_coarse_size(scale):
    model = MattingRefine("mobilenetv2", backbone_scale=scale, refine_sample_pixels=1000).eval()
    src, bgr = inputs(height=192, width=256)
    with torch.no_grad():
        pha, _, pha_sm, *_ = model(src, bgr)
    assert pha.shape[-2:] == (192, 256)
    assert pha_sm.shape[-2:] == (int(192 * scale), int(256 * scale))


def test_backbone_scale_above_half_is_refused():
    with pytest.raises(ValueError, match="backbone_scale"):
        MattingRefine("mobilenetv2", backbone_scale=0.75)
    with pytest.raises(ValueError, match="refine_mode"):
        RefineOptions(refine_mode="everything")


@pytest.mark.parametrize("size", [(97, 130), (101, 101), (64, 66)])
def test_sizes_that_are_not_multiples_of_four_work(size):
    model = MattingRefine("mobilenetv2", refine_sample_pixels=2000).eval()
    src, bgr = inputs(height=size[0], width=size[1])
    with torch.no_grad():
        pha, fgr, *_ = model(src, bgr)
    assert pha.shape[-2:] == size and fgr.shape[-2:] == size


def test_padding_leaves_the_interior_close_to_the_unpadded_result(reference):
    model = reference_style_model(reference, refine_mode="full")
    src, bgr = inputs(height=128, width=160)
    with torch.no_grad():
        whole = model(src, bgr)[0]
        cut = model(src[..., :127, :159], bgr[..., :127, :159])[0]
    assert (whole[..., :120, :150] - cut[..., :120, :150]).abs().mean() < 0.02


@pytest.mark.parametrize("size", [(65, 81), (128, 160)])
def test_base_model_works_at_any_size(size):
    model = MattingBase("mobilenetv2").eval()
    src, bgr = inputs(height=size[0], width=size[1])
    with torch.no_grad():
        pha, fgr, err, hid = model(src, bgr)
    assert pha.shape[-2:] == size and hid.shape[1] == 32 and hid.min() >= 0


def test_mismatched_src_and_bgr_shapes_name_both():
    model = MattingRefine("mobilenetv2").eval()
    with pytest.raises(ValueError, match=r"src \(1, 3, 64, 64\) and bgr \(1, 3, 64, 68\)"):
        model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 68))


def test_options_can_be_changed_after_construction(reference):
    model = reference_style_model(reference)
    model.configure(RefineOptions(backbone_scale=0.125, refine_mode="thresholding", refine_threshold=0.2))
    assert model.options.refine_mode == "thresholding" and model.backbone_scale == 0.125
    with pytest.raises(ValueError, match="kernel size"):
        model.configure(RefineOptions(refine_kernel_size=1))


def test_bf16_matches_fp32_within_its_precision(reference):
    model = reference_style_model(reference, refine_mode="full")
    src, bgr = inputs(height=32, width=48)
    with torch.no_grad():
        expected = model(src, bgr)[0]
        got = model.to(torch.bfloat16)(src.bfloat16(), bgr.bfloat16())[0].float()
    assert (got - expected).abs().mean() < 0.01
    assert np.quantile((got - expected).abs().numpy(), 0.99) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu(reference, dtype):
    model = reference_style_model(reference, refine_mode="full")
    src, bgr = inputs(height=128, width=160)
    with torch.no_grad():
        expected = model(src, bgr)[0]
        gpu = model.cuda().to(dtype)
        got = gpu(src.cuda().to(dtype), bgr.cuda().to(dtype))[0].float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (got - expected).abs().mean() < tol


def test_crop_patches_takes_the_window_around_each_cell():
    x = torch.arange(2 * 1 * 8 * 12, dtype=torch.float32).reshape(2, 1, 8, 12)
    index = (torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([2, 0]))
    patches = crop_patches(x, index, size=4, context=1)
    assert patches.shape == (2, 1, 6, 6)
    padded = F.pad(x, (1, 1, 1, 1))
    assert torch.equal(patches[0, 0], padded[1, 0, 4:10, 8:14])
    assert torch.equal(patches[1, 0], padded[0, 0, 0:6, 0:6])
    assert patches[1, 0, 0].abs().sum() == 0  # zero context outside the frame


def test_replace_patches_writes_only_the_chosen_cells():
    x = torch.zeros(1, 2, 8, 8)
    index = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    out = replace_patches(x, torch.ones(1, 2, 4, 4), index)
    assert out[0, :, 4:8, 0:4].eq(1).all() and out.sum() == 32 and x.sum() == 0


def test_numpy_inputs_are_a_type_error_that_says_what_to_pass():
    model = MattingRefine("mobilenetv2").eval()
    frame = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(TypeError, match="must be torch tensors, got ndarray and ndarray"):
        model(frame, frame)


@pytest.mark.parametrize(("name", "value"), [("refine_threshold", float("nan")), ("refine_threshold", float("inf")),
                                             ("refine_threshold", float("-inf")), ("backbone_scale", float("nan")),
                                             ("refine_sample_pixels", float("nan")), ("refine_sample_pixels", 1000.5),
                                             ("refine_sample_pixels", -1)])
def test_a_refine_setting_that_is_not_a_usable_number_is_refused_naming_it(name, value):
    """A NaN threshold passed every comparison check and refined nothing in thresholding mode; a NaN or fractional
    pixel budget failed only inside topk."""
    with pytest.raises(ValueError, match=name):
        RefineOptions(**{name: value})
    with pytest.raises(ValueError, match=name):
        MattingRefine("mobilenetv2", **{name: value})


@pytest.mark.parametrize("value", ["off", "False", 0, None])
def test_a_prevent_oversampling_switch_that_is_not_true_or_false_is_refused(value):
    """A string is true whatever it says: refine_prevent_oversampling="off" turned the setting on, without a word, as
    plate_solve and optimize no longer do."""
    with pytest.raises(ValueError, match=f"refine_prevent_oversampling must be True or False, not {value!r}"):
        RefineOptions(refine_prevent_oversampling=value)
    with pytest.raises(ValueError, match="refine_prevent_oversampling must be True or False"):
        MattingRefine("mobilenetv2", refine_prevent_oversampling=value)
    model = MattingRefine("mobilenetv2").eval()
    model.refiner.prevent_oversampling = value  # as an attribute: refused when the model runs
    src, bgr = inputs(height=32, width=32)
    with pytest.raises(ValueError, match="cannot run with its settings: refine_prevent_oversampling must be True"):
        model(src, bgr)


@pytest.mark.parametrize("network", ["base", "refine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_inputs_of_another_dtype_than_the_weights_are_refused_in_one_line(network, dtype):
    """The plain modules failed inside the first convolution: "expected scalar type Double but found Float"."""
    model = (MattingBase("mobilenetv2") if network == "base" else MattingRefine("mobilenetv2")).eval()
    src, bgr = inputs(height=32, width=32)
    with pytest.raises(ValueError, match=f"must have the model's dtype, torch.float32, got {dtype} and {dtype}"):
        model(src.to(dtype), bgr.to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them itself: still taken
        model(src.bfloat16(), bgr.bfloat16())


@pytest.mark.parametrize("network", ["base", "refine", "fast"])
def test_inputs_on_another_device_than_the_model_are_refused_naming_both(network):
    """A model on one device and frames on another failed deep inside torch (here: a model on the meta device)."""
    from bgmatte.model.fast import optimize_model

    model = MattingBase("mobilenetv2") if network == "base" else MattingRefine("mobilenetv2")
    model = model.eval().to("meta")
    if network == "fast":
        model = optimize_model(model)
    src, bgr = inputs(height=32, width=32)
    with pytest.raises(ValueError, match=r"must be on the model's device, meta, got cpu and cpu: move them"):
        model(src, bgr)


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize(("attribute", "value", "named"), [
    ("mode", "everything", "refine_mode"), ("sample_pixels", 1000.5, "refine_sample_pixels"),
    ("threshold", float("nan"), "refine_threshold"), ("kernel_size", 1, "kernel size 1")])
def test_a_refiner_setting_changed_to_an_unusable_value_is_refused_when_the_model_runs(optimized, attribute, value,
                                                                                      named):
    """The settings stay attributes to change after loading; set directly, an unknown mode ran as sampling, a
    fractional budget failed inside topk, a NaN threshold refined nothing, and a kernel size that the weights do not
    have failed inside a convolution."""
    from bgmatte.model.fast import optimize_model

    model = MattingRefine("mobilenetv2").eval()
    model = optimize_model(model) if optimized else model
    setattr(model.refiner, attribute, value)
    src, bgr = inputs(height=32, width=32)
    with pytest.raises(ValueError, match=named):
        model(src, bgr)


def test_configure_takes_refine_options_only():
    model = MattingRefine("mobilenetv2").eval()
    with pytest.raises(TypeError, match="configure takes a RefineOptions, not dict"):
        model.configure({"backbone_scale": 0.5})
