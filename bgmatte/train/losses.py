"""The paper's training losses: L1 on alpha and on its Sobel gradients, L1 on the foreground where the true alpha
is above 0, and MSE between the predicted error map and the actual error of the coarse alpha (in the refine stage,
both upsampled to full resolution and measured against the full-resolution truth, as ``train_refine.py`` does).

Each term is a mean over all elements, as `F.l1_loss` and `F.mse_loss` compute it in BackgroundMattingV2's
`train_base.py` and `train_refine.py` (the foreground term is a mean over every element of the masked tensors, so
masked-out pixels count as zeros), and all terms weigh 1. The Sobel magnitude is that of kornia's
`filters.sobel`, which those scripts used: 3x3 Sobel kernels divided by 8, replicated borders,
sqrt(gx^2 + gy^2 + 1e-6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SOBEL_EPS = 1e-6
"""Added under kornia's square root, so that the gradient of a flat region is finite."""


def sobel_magnitude(image: Tensor, eps: float = SOBEL_EPS) -> Tensor:
    """The per-channel Sobel gradient magnitude of a (B, C, H, W) tensor, as kornia's `filters.sobel`: kernels
    normalised to an L1 norm of 1, replicated borders, and `eps` under the square root."""
    batch, channels, height, width = image.shape
    kernel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
                            dtype=image.dtype, device=image.device) / 8.0
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]  # (2, 1, 3, 3): x then y
    flat = F.pad(image.reshape(batch * channels, 1, height, width), (1, 1, 1, 1), mode="replicate")
    gradients = F.conv2d(flat, kernels)
    magnitude = torch.sqrt(gradients[:, 0] ** 2 + gradients[:, 1] ** 2 + eps)
    return magnitude.reshape(batch, channels, height, width)


def _check_shapes(pha: Tensor, fgr: Tensor, true_pha: Tensor, true_fgr: Tensor, what: str) -> None:
    if pha.dim() != 4 or pha.shape[1] != 1 or fgr.dim() != 4 or fgr.shape[1] != 3:
        raise ValueError(f"{what}: expected pha (B,1,H,W) and fgr (B,3,H,W), got {tuple(pha.shape)} and "
                         f"{tuple(fgr.shape)}")
    if true_pha.shape != pha.shape or true_fgr.shape != fgr.shape:
        raise ValueError(f"{what}: prediction {tuple(pha.shape)}/{tuple(fgr.shape)} does not match the ground "
                         f"truth {tuple(true_pha.shape)}/{tuple(true_fgr.shape)}")


def _matting_terms(pha: Tensor, fgr: Tensor, true_pha: Tensor, true_fgr: Tensor) -> list[Tensor]:
    """The alpha, alpha-gradient and foreground terms at one resolution."""
    visible = true_pha > 0
    return [
        F.l1_loss(pha, true_pha),
        F.l1_loss(sobel_magnitude(pha), sobel_magnitude(true_pha)),
        F.l1_loss(fgr * visible, true_fgr * visible),
    ]


def _error_term(err: Tensor, pha: Tensor, true_pha: Tensor) -> Tensor:
    """MSE between the predicted error map and |pha - true_pha|; the target is detached, so that this term
    teaches the error head and does not pull the alpha towards a more predictable error."""
    if err.shape != pha.shape:
        raise ValueError(f"err {tuple(err.shape)} must have the shape of pha {tuple(pha.shape)}")
    return F.mse_loss(err, (pha.detach() - true_pha).abs())


def _total(names: tuple[str, ...], terms: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
    total = torch.stack(terms).sum()
    values = torch.stack([t.detach() for t in terms]).float().cpu().tolist()  # one device sync for all
    return total, dict(zip(names, values))


BASE_TERMS = ("pha_l1", "pha_sobel_l1", "fgr_l1", "err_mse")
"""The names of the base stage's terms, as `base_loss` reports them."""

REFINE_TERMS = ("pha_l1", "pha_sobel_l1", "fgr_l1", "pha_sm_l1", "pha_sm_sobel_l1", "fgr_sm_l1", "err_sm_mse")
"""The names of the refine stage's terms: full resolution, then the coarse (`_sm`) ones."""


def base_loss(pha: Tensor, fgr: Tensor, err: Tensor, true_pha: Tensor, true_fgr: Tensor
              ) -> tuple[Tensor, dict[str, float]]:
    """The base stage's loss from MattingBase's (pha, fgr, err) and the ground truth, all at one resolution.

    Returns the total (to backpropagate) and each term as a float (for logging), keyed as `BASE_TERMS`.
    """
    _check_shapes(pha, fgr, true_pha, true_fgr, "base_loss")
    terms = [*_matting_terms(pha, fgr, true_pha, true_fgr), _error_term(err, pha, true_pha)]
    return _total(BASE_TERMS, terms)


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ground truth to the coarse size, or the coarse outputs to the full one: bilinear, align_corners=False,
    no antialiasing (kornia's resize as the reference training used it)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def refine_loss(pha: Tensor, fgr: Tensor, pha_sm: Tensor, fgr_sm: Tensor, err_sm: Tensor, true_pha: Tensor,
                true_fgr: Tensor) -> tuple[Tensor, dict[str, float]]:
    """The refine stage's loss from MattingRefine's first five outputs and full-resolution ground truth.

    The alpha, alpha-gradient and foreground terms count at full resolution and at the coarse one (against the
    ground truth downsampled to it); the error term once, with the coarse error map and alpha upsampled to the full
    size, against the coarse alpha's error there, as ``train_refine.py`` does: the error map decides where the refiner
    works, so it must learn where the coarse alpha misses full-resolution detail (a strand of hair that averages away
    at the coarse size is no error there). Returns the total and each term as a float, keyed as `REFINE_TERMS`.
    """
    _check_shapes(pha, fgr, true_pha, true_fgr, "refine_loss")
    coarse_size, full_size = tuple(pha_sm.shape[-2:]), tuple(true_pha.shape[-2:])
    true_pha_sm = resize(true_pha, coarse_size)
    true_fgr_sm = resize(true_fgr, coarse_size)
    _check_shapes(pha_sm, fgr_sm, true_pha_sm, true_fgr_sm, "refine_loss (coarse)")
    terms = [
        *_matting_terms(pha, fgr, true_pha, true_fgr),
        *_matting_terms(pha_sm, fgr_sm, true_pha_sm, true_fgr_sm),
        _error_term(resize(err_sm, full_size), resize(pha_sm, full_size), true_pha),
    ]
    return _total(REFINE_TERMS, terms)
