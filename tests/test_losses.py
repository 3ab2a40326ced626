"""The paper's training losses, each term pinned by hand on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bgmatte.train.losses import BASE_TERMS, REFINE_TERMS, base_loss, refine_loss, sobel_magnitude

EPS_ROOT = math.sqrt(1e-6)  # the Sobel magnitude of a flat region


def _edge():
    """A 3x3 matte whose right column is 1: a vertical edge."""
    return torch.tensor([[0.0, 0.0, 1.0]] * 3).reshape(1, 1, 3, 3)


def test_sobel_magnitude_of_a_vertical_edge_with_replicated_borders():
    # Kernels /8 and replicated borders: column 0 sees 0 on both sides -> 0; columns 1 and 2 see 0 left and 1
    # right across the three rows -> (1 + 2 + 1) / 8 = 0.5; gy is 0 everywhere.
    magnitude = sobel_magnitude(_edge())[0, 0]
    expected_column = torch.tensor([EPS_ROOT, math.sqrt(0.25 + 1e-6), math.sqrt(0.25 + 1e-6)])
    torch.testing.assert_close(magnitude, expected_column.expand(3, 3))


def test_sobel_magnitude_is_per_channel_and_direction_free():
    image = torch.rand(2, 3, 5, 6)
    torch.testing.assert_close(sobel_magnitude(image), sobel_magnitude(image.transpose(-1, -2)).transpose(-1, -2))
    torch.testing.assert_close(sobel_magnitude(image)[:, 1:2], sobel_magnitude(image[:, 1:2]))


def _zeros_like_fgr(pha):
    return torch.zeros(pha.shape[0], 3, *pha.shape[2:])


def test_base_alpha_and_gradient_terms_by_hand():
    pha = _edge()
    true_pha = torch.zeros_like(pha)
    _, terms = base_loss(pha, _zeros_like_fgr(pha), torch.zeros_like(pha), true_pha, _zeros_like_fgr(pha))
    assert set(terms) == set(BASE_TERMS)
    assert terms["pha_l1"] == pytest.approx(3 / 9)
    # six pixels of magnitude sqrt(0.25 + 1e-6) against the flat truth's sqrt(1e-6)
    assert terms["pha_sobel_l1"] == pytest.approx(6 * (math.sqrt(0.250001) - EPS_ROOT) / 9, rel=1e-6)
    assert terms["fgr_l1"] == 0.0  # the true alpha is 0 everywhere: no foreground counts


def test_base_foreground_term_counts_only_where_true_alpha_is_positive():
    true_pha = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).reshape(1, 1, 2, 2)
    true_fgr = torch.zeros(1, 3, 2, 2)
    fgr = torch.full((1, 3, 2, 2), 0.5)  # off by 0.5 everywhere; only 2 of 4 pixels count
    _, terms = base_loss(true_pha, fgr, torch.zeros_like(true_pha), true_pha, true_fgr)
    # mean over all 12 elements: 2 pixels x 3 channels x 0.5 / 12
    assert terms["fgr_l1"] == pytest.approx(3 / 12)
    assert terms["pha_l1"] == 0.0


def test_base_error_term_is_mse_against_the_actual_alpha_error():
    true_pha = torch.zeros(1, 1, 2, 2)
    pha = torch.tensor([[0.5, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    err = torch.full((1, 1, 2, 2), 0.5)
    _, terms = base_loss(pha, _zeros_like_fgr(pha), err, true_pha, _zeros_like_fgr(pha))
    # targets |pha - true| = 0.5, 0, 0, 1 -> squared errors 0, 0.25, 0.25, 0.25
    assert terms["err_mse"] == pytest.approx(0.75 / 4)


def test_base_total_is_the_sum_of_terms():
    pha, true_pha = torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6)
    total, terms = base_loss(pha, torch.rand(2, 3, 6, 6), torch.rand(2, 1, 6, 6), true_pha, torch.rand(2, 3, 6, 6))
    assert total.item() == pytest.approx(sum(terms.values()), rel=1e-6)


def test_error_target_is_detached_so_only_the_error_head_learns_from_it():
    true_pha, true_fgr = torch.rand(1, 1, 4, 4), torch.rand(1, 3, 4, 4)
    pha = torch.rand(1, 1, 4, 4, requires_grad=True)
    err = torch.rand(1, 1, 4, 4, requires_grad=True)
    total, _ = base_loss(pha, torch.rand(1, 3, 4, 4), err, true_pha, true_fgr)
    grad_pha, grad_err = torch.autograd.grad(total, (pha, err))
    without_err = F.l1_loss(pha, true_pha) + F.l1_loss(sobel_magnitude(pha), sobel_magnitude(true_pha))
    (expected_pha,) = torch.autograd.grad(without_err, pha)
    torch.testing.assert_close(grad_pha, expected_pha)
    assert grad_err.abs().sum() > 0


def test_refine_coarse_terms_use_ground_truth_downsampled_to_the_coarse_size():
    # 4x4 truth downsampled bilinearly by 2 (align_corners=False) is the mean of each 2x2 block.
    true_pha = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                             [1.0, 1.0, 0.0, 0.0],
                             [0.0, 1.0, 0.0, 0.0],
                             [1.0, 0.0, 0.0, 0.0]]).reshape(1, 1, 4, 4)  # blocks: 1, 0, 0.5, 0
    true_fgr = torch.ones(1, 3, 4, 4)
    pha_sm = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)  # off by 0.5 in one block
    fgr_sm = torch.zeros(1, 3, 2, 2)  # off by 1 wherever the coarse truth is above 0: 2 of 4 blocks
    err_sm = torch.zeros(1, 1, 2, 2)
    _, terms = refine_loss(true_pha, true_fgr, pha_sm, fgr_sm, err_sm, true_pha, true_fgr)
    assert set(terms) == set(REFINE_TERMS)
    assert terms["pha_l1"] == 0.0 and terms["fgr_l1"] == 0.0
    assert terms["pha_sobel_l1"] == pytest.approx(0.0, abs=1e-7)
    assert terms["pha_sm_l1"] == pytest.approx(0.5 / 4)
    assert terms["fgr_sm_l1"] == pytest.approx(6 / 12)
    # err_sm predicts 0: the term is the mean square of the coarse alpha's error at full resolution
    upsampled = F.interpolate(pha_sm, size=(4, 4), mode="bilinear", align_corners=False)
    assert terms["err_sm_mse"] == pytest.approx((upsampled - true_pha).pow(2).mean().item())
    coarse_truth = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).reshape(1, 1, 2, 2)
    expected_sobel = F.l1_loss(sobel_magnitude(pha_sm), sobel_magnitude(coarse_truth)).item()
    assert terms["pha_sm_sobel_l1"] == pytest.approx(expected_sobel)
    assert expected_sobel > 0.01  # the blocks differ, so this term is not trivially zero


def test_refine_error_term_is_the_coarse_alphas_error_at_full_resolution():
    # As train_refine.py: err_sm and pha_sm are upsampled to the full size and err_sm learns |pha_sm - true_pha|
    # there. A checkerboard (fine hair) is 0.5 everywhere once downsampled, so a coarse alpha of 0.5 is exact at the
    # coarse size but off by 0.5 at every full-resolution pixel: that is where the refiner is needed.
    true_pha = torch.tensor([[1.0, 0.0] * 2, [0.0, 1.0] * 2] * 2).reshape(1, 1, 4, 4)
    pha_sm, fgr, fgr_sm = torch.full((1, 1, 2, 2), 0.5), torch.rand(1, 3, 4, 4), torch.rand(1, 3, 2, 2)
    _, found = refine_loss(true_pha, fgr, pha_sm, fgr_sm, torch.full((1, 1, 2, 2), 0.5), true_pha, fgr)
    _, missed = refine_loss(true_pha, fgr, pha_sm, fgr_sm, torch.zeros(1, 1, 2, 2), true_pha, fgr)
    assert found["err_sm_mse"] == pytest.approx(0.0, abs=1e-7)
    assert missed["err_sm_mse"] == pytest.approx(0.25)


def test_refine_full_resolution_terms_match_the_base_terms():
    pha, fgr = torch.rand(1, 1, 8, 8), torch.rand(1, 3, 8, 8)
    true_pha, true_fgr = torch.rand(1, 1, 8, 8), torch.rand(1, 3, 8, 8)
    _, base_terms = base_loss(pha, fgr, torch.zeros(1, 1, 8, 8), true_pha, true_fgr)
    _, terms = refine_loss(pha, fgr, torch.rand(1, 1, 2, 2), torch.rand(1, 3, 2, 2), torch.rand(1, 1, 2, 2),
                           true_pha, true_fgr)
    for name in ("pha_l1", "pha_sobel_l1", "fgr_l1"):
        assert terms[name] == pytest.approx(base_terms[name])


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match"):
        base_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 3, 4, 4), torch.rand(1, 1, 4, 4),
                  torch.rand(1, 1, 4, 5), torch.rand(1, 3, 4, 5))
    with pytest.raises(ValueError, match="err"):
        base_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 3, 4, 4), torch.rand(1, 1, 2, 2),
                  torch.rand(1, 1, 4, 4), torch.rand(1, 3, 4, 4))
