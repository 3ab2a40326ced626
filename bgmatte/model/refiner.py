"""The refiner: full-resolution corrections on the 4x4 patches where the coarse matte is least sure.

It works on the quarter-resolution grid: each selected grid cell is a 4x4 patch of the output. A
patch is refined in two stages: at half resolution, from an 8x8 crop (2x2 plus 3 pixels of context
each side) of the upsampled coarse result and the inputs; then at full resolution, from those
features upsampled and an 8x8 crop (4x4 plus 2 of context) of the inputs. Refined patches replace
the bilinearly upsampled coarse result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REFINE_MODES = ("full", "sampling", "thresholding")


def crop_patches(x: Tensor, index: tuple[Tensor, Tensor, Tensor], size: int, context: int) -> Tensor:
    """Cut the patches of side ``size`` at grid cells ``index`` (batch, row, column), each widened by
    ``context`` pixels of zero-padded surroundings; returns (N, C, size + 2*context, size + 2*context)."""
    batch, row, col = index
    if context:
        x = F.pad(x, (context, context, context, context))
    span = torch.arange(size + 2 * context, device=x.device)
    rows = (row * size).unsqueeze(1) + span  # (N, S)
    cols = (col * size).unsqueeze(1) + span
    # Advanced indices around a slice put the patch dimensions first: (N, S, S, C).
    patches = x[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return patches.permute(0, 3, 1, 2)


def replace_patches(x: Tensor, patches: Tensor, index: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Write (N, C, S, S) ``patches`` into ``x`` at grid cells ``index`` of side S; returns a new tensor."""
    batch, row, col = index
    size = patches.shape[-1]
    span = torch.arange(size, device=x.device)
    rows = (row * size).unsqueeze(1) + span
    cols = (col * size).unsqueeze(1) + span
    out = x.clone()
    out[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]] = patches.permute(0, 2, 3, 1).to(x.dtype)
    return out


class Refiner(nn.Module):
    """Refines the coarse result at full resolution where it matters.

    Attribute names (``mode``, ``sample_pixels``, ``threshold``, ``kernel_size``,
    ``prevent_oversampling``) follow the reference, so they can be changed on a loaded model.
    """

    def __init__(self, mode: str = "sampling", sample_pixels: int = 80_000, threshold: float = 0.1,
                 kernel_size: int = 3, prevent_oversampling: bool = True) -> None:
        super().__init__()
        if mode not in REFINE_MODES:
            raise ValueError(f"refine mode must be one of {REFINE_MODES}, not {mode!r}")
        if kernel_size not in (1, 3):
            raise ValueError(f"refine kernel size must be 1 or 3, not {kernel_size}")
        self.mode = mode
        self.sample_pixels = sample_pixels
        self.threshold = threshold
        self.kernel_size = kernel_size
        self.prevent_oversampling = prevent_oversampling
        self.conv1 = nn.Conv2d(42, 24, kernel_size, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, kernel_size, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16 + 6, 12, kernel_size, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.conv4 = nn.Conv2d(12, 4, kernel_size, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def select(self, err: Tensor) -> Tensor:
        """The (B,1,H/4,W/4) mask of grid cells to refine, from the error at quarter resolution."""
        if self.mode == "thresholding":
            return err.gt(self.threshold).to(err.dtype)
        b, _, h, w = err.shape
        flat = err.reshape(b, h * w)
        count = min(self.sample_pixels // 16, h * w)
        ref = torch.zeros_like(flat)
        if count > 0:
            ref.scatter_(1, flat.topk(count, dim=1, sorted=False).indices, 1.0)
        if self.prevent_oversampling:
            ref = ref * flat.gt(0).to(flat.dtype)
        return ref.reshape(b, 1, h, w)

    def _half_stage(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(torch.cat([x, y], dim=1))))
        return self.relu(self.bn2(self.conv2(x)))

    def _full_stage(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.relu(self.bn3(self.conv3(torch.cat([x, y], dim=1))))
        return self.conv4(x)

    def forward(self, src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, err: Tensor,
                hid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns full-resolution alpha, foreground residual, and ``ref`` at quarter resolution."""
        full_size = src.shape[2:]
        half_size = (full_size[0] // 2, full_size[1] // 2)
        quarter_size = (full_size[0] // 4, full_size[1] // 4)
        src_bgr = torch.cat([src, bgr], dim=1)
        if self.mode == "full":
            return self._refine_everywhere(src_bgr, pha, fgr, hid, half_size, quarter_size)

        err = F.interpolate(err, quarter_size, mode="bilinear", align_corners=False)
        ref = self.select(err)
        coarse = F.interpolate(torch.cat([pha, fgr], dim=1), full_size, mode="bilinear", align_corners=False)
        index = tuple(torch.nonzero(ref.squeeze(1)).unbind(1))
        if index[0].numel() == 0:
            return coarse[:, :1], coarse[:, 1:], ref

        context_half, context_full, upsampled = (3, 2, 8) if self.kernel_size == 3 else (0, 0, 4)
        x = F.interpolate(torch.cat([hid, pha, fgr], dim=1), half_size, mode="bilinear", align_corners=False)
        y = F.interpolate(src_bgr, half_size, mode="bilinear", align_corners=False)
        x = self._half_stage(crop_patches(x, index, 2, context_half), crop_patches(y, index, 2, context_half))
        x = F.interpolate(x, (upsampled, upsampled), mode="nearest")
        x = self._full_stage(x, crop_patches(src_bgr, index, 4, context_full))
        out = replace_patches(coarse, x, index)
        return out[:, :1], out[:, 1:], ref

    def _refine_everywhere(self, src_bgr: Tensor, pha: Tensor, fgr: Tensor, hid: Tensor,
                           half_size: tuple[int, int], quarter_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """The ``full`` mode: the same two stages as convolutions over the whole (zero-padded) frame."""
        full_size = src_bgr.shape[2:]
        x = F.interpolate(torch.cat([hid, pha, fgr], dim=1), half_size, mode="bilinear", align_corners=False)
        y = F.interpolate(src_bgr, half_size, mode="bilinear", align_corners=False)
        if self.kernel_size == 3:
            x, y = F.pad(x, (3, 3, 3, 3)), F.pad(y, (3, 3, 3, 3))
            target, full = (full_size[0] + 4, full_size[1] + 4), F.pad(src_bgr, (2, 2, 2, 2))
        else:
            target, full = tuple(full_size), src_bgr
        x = F.interpolate(self._half_stage(x, y), target, mode="nearest")
        x = self._full_stage(x, full)
        ref = torch.ones(src_bgr.shape[0], 1, *quarter_size, device=src_bgr.device, dtype=src_bgr.dtype)
        return x[:, :1], x[:, 1:], ref
