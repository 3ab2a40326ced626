"""The two networks of the paper: ``MattingBase`` (coarse, any resolution) and ``MattingRefine``.

``MattingRefine`` runs ``MattingBase``'s layers on a downsampled copy of the input and refines the
result at full resolution. Both load the released checkpoints key for key.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgmatte.model.aspp import ASPP
from bgmatte.model.decoder import Decoder
from bgmatte.model.mobilenetv2 import MobileNetV2Encoder
from bgmatte.model.plate_solve import solve_alpha
from bgmatte.model.refiner import REFINE_MODES, Refiner
from bgmatte.model.resnet import RESNET_LAYERS, ResNetEncoder

BACKBONES = ("resnet50", "resnet101", "mobilenetv2")


@dataclass(frozen=True)
class RefineOptions:
    """How ``MattingRefine`` trades speed for detail.

    Arguments:
        backbone_scale: the base network sees the input scaled by this (at most 1/2): 1/4 for HD,
            1/8 for 4K.
        refine_mode: ``sampling`` refines a fixed budget of pixels, ``thresholding`` every patch
            whose predicted error is above ``refine_threshold``, ``full`` everything.
        refine_sample_pixels: the pixel budget of ``sampling`` (16 pixels per patch).
        refine_threshold: the error threshold of ``thresholding``.
        refine_kernel_size: 3 (the released models) or 1.
        refine_prevent_oversampling: in ``sampling``, skip patches whose error is exactly 0 (True or False: a
            string such as ``"off"`` would be true, see `switch_problem`).
    """

    backbone_scale: float = 0.25
    refine_mode: str = "sampling"
    refine_sample_pixels: int = 80_000
    refine_threshold: float = 0.1
    refine_kernel_size: int = 3
    refine_prevent_oversampling: bool = True

    def __post_init__(self) -> None:
        for name in ("backbone_scale", "refine_sample_pixels", "refine_threshold"):
            problem = refine_setting_problem(name, getattr(self, name))
            if problem is not None:
                raise ValueError(f"{name} {problem}, not {getattr(self, name)!r}")
        if self.refine_mode not in REFINE_MODES:
            raise ValueError(f"refine_mode must be one of {', '.join(REFINE_MODES)}, not {self.refine_mode!r}")
        if self.refine_kernel_size not in (1, 3):
            raise ValueError(f"refine_kernel_size must be 1 or 3, not {self.refine_kernel_size}")
        problem = switch_problem("refine_prevent_oversampling", self.refine_prevent_oversampling)
        if problem is not None:
            raise ValueError(problem)


def refine_setting_problem(name: str, value: object) -> str | None:
    """What is wrong with a value of the numeric setting `name` (``backbone_scale``, ``refine_sample_pixels``,
    ``refine_threshold``), worded to follow the name, or None when the model can use it. NaN passes no comparison,
    so finiteness is asked for explicitly: a NaN threshold would refine nothing, a NaN budget fail inside topk. A
    threshold outside [0, 1] is allowed: it is well defined (refine every patch, or none)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name == "backbone_scale" and not (real and math.isfinite(value) and 0 < value <= 0.5):
        return "must be a number in (0, 1/2]"
    if name == "refine_sample_pixels" and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                                               and value >= 0):
        return "must be a whole number of pixels, 0 or more"
    if name == "refine_threshold" and not (real and math.isfinite(value)):
        return "must be a finite number"
    return None


def switch_problem(name: str, value: object, *, optional: bool = False) -> str | None:
    """What is wrong with an on/off setting (``plate_solve``, ``optimize``), or None: it must be a bool (or None when
    `optional`). A string would be true whatever it says: ``"off"`` would turn the setting on."""
    if isinstance(value, bool) or (optional and value is None):
        return None
    return f"{name} must be True or False{' (or None)' if optional else ''}, not {value!r}"


def check_inputs(src: Tensor, bgr: Tensor, model: nn.Module | None = None, *, cast: bool = False) -> None:
    """Raise ValueError unless src and bgr are float (B,3,H,W) tensors of one shape (TypeError for non-tensors);
    given the `model` they go into, also unless they are on its device and, where it does not `cast` them (and
    autocast does not), of its weights' dtype: the alternative is a failure deep inside the first convolution.
    The values are not looked at (the models run on every call, in training too): `value_range_problem` does that."""
    if not isinstance(src, Tensor) or not isinstance(bgr, Tensor):
        raise TypeError(f"src and bgr must be torch tensors, got {type(src).__name__} and {type(bgr).__name__} "
                        "(float, (B, 3, H, W), in [0, 1])")
    if src.shape != bgr.shape:
        raise ValueError(f"src and bgr must have the same shape, got src {tuple(src.shape)} and bgr {tuple(bgr.shape)}")
    if src.ndim != 4 or src.shape[1] != 3:
        raise ValueError(f"src and bgr must be (B, 3, H, W), got {tuple(src.shape)}")
    if not src.is_floating_point() or not bgr.is_floating_point():
        raise ValueError(f"src and bgr must be float tensors in [0, 1], got {src.dtype} and {bgr.dtype}")
    weight = next(model.parameters(), None) if model is not None else None
    if weight is None:
        return
    if src.device != weight.device or bgr.device != weight.device:
        raise ValueError(f"src and bgr must be on the model's device, {weight.device}, got {src.device} and "
                         f"{bgr.device}: move them with .to({str(weight.device)!r})")
    if not cast and not torch.is_autocast_enabled(src.device.type) and not src.dtype == bgr.dtype == weight.dtype:
        raise ValueError(f"src and bgr must have the model's dtype, {weight.dtype}, got {src.dtype} and {bgr.dtype}: "
                         f"cast them with .to({weight.dtype}), or the model (the fast path from load_model casts them)")


RANGE_TOLERANCE = 1e-3
"""How far float frames and plates may stray outside [0, 1] (rounding in a float resize or colour conversion) before
`value_range_problem` calls them out of range."""


def value_range_problem(values: Tensor) -> str | None:
    """What is wrong with the values of a float frame or plate, or None when they are finite and in [0, 1] (within
    `RANGE_TOLERANCE`): 0-255 values cast to float but not divided by 255 give a wrong matte without any error.

    One min/max reduction, and on a GPU a wait for its result, so `check_inputs` and the models' forward do not ask it
    on every call (a training step, a traced export); `bgmatte.predictor.Predictor` asks it of the floats it is given.
    """
    if values.numel() == 0:
        return None
    low, high = (float(value) for value in torch.aminmax(values.detach()))
    if math.isnan(low) or math.isnan(high):
        return "float values include NaN, but floats must be finite and in [0, 1]"
    if math.isinf(low) or math.isinf(high):
        return f"float values from {low:g} to {high:g}, infinite, but floats must be finite and in [0, 1]"
    if low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE:
        return None
    hint = " (0-255 as float? divide by 255, or pass uint8)" if high > 2.0 else ""
    return f"float values from {low:g} to {high:g}, but floats must be in [0, 1]{hint}"


def prepare_inputs(src: Tensor, bgr: Tensor, backbone_scale: float, dtype: torch.dtype | None = None,
                   model: nn.Module | None = None) -> tuple[Tensor, Tensor, tuple[int, int], tuple[int, int]]:
    """Check a frame and its plate (against `model` when given: `check_inputs`), cast them to ``dtype`` (when given)
    and pad both to sides that are multiples of 4 by edge replication (the refiner works on 4x4 patches); returns
    them, the base network's input size and the size given, to crop the outputs back to."""
    check_inputs(src, bgr, model, cast=dtype is not None)
    if not 0 < backbone_scale <= 0.5:
        raise ValueError(f"backbone_scale must be in (0, 1/2], not {backbone_scale}")
    if dtype is not None:
        src, bgr = src.to(dtype).contiguous(), bgr.to(dtype).contiguous()
    height, width = src.shape[2:]
    pad_h, pad_w = -height % 4, -width % 4
    if pad_h or pad_w:
        src = F.pad(src, (0, pad_w, 0, pad_h), mode="replicate")
        bgr = F.pad(bgr, (0, pad_w, 0, pad_h), mode="replicate")
    small = base_input_size(height, width, backbone_scale)
    if min(small) < 1:
        raise ValueError(f"input {height}x{width} is too small for backbone_scale {backbone_scale}")
    return src, bgr, small, (height, width)


def base_input_size(height: int, width: int, backbone_scale: float) -> tuple[int, int]:
    """The (height, width) the base network sees for a frame of ``height`` x ``width``: the sides padded to
    multiples of 4, then scaled by ``backbone_scale`` and rounded down. A 0 means the frame is too small."""
    return math.floor((height + -height % 4) * backbone_scale), math.floor((width + -width % 4) * backbone_scale)


def build_encoder(backbone: str) -> nn.Module:
    """The 6-channel encoder for a backbone name."""
    if backbone in RESNET_LAYERS:
        return ResNetEncoder(backbone, in_channels=6)
    if backbone == "mobilenetv2":
        return MobileNetV2Encoder(in_channels=6)
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, not {backbone!r}")


class MattingBase(nn.Module):
    """Encoder, ASPP and decoder: the coarse network, usable alone at any resolution.

    Arguments:
        backbone: ``resnet50``, ``resnet101`` or ``mobilenetv2``.

    Returns from ``forward(src, bgr)``: ``(pha, fgr, err, hid)`` at the input's resolution.
    """

    def __init__(self, backbone: str = "mobilenetv2") -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = build_encoder(backbone)
        self.aspp = ASPP(self.backbone.out_channels[0], (3, 6, 9))
        self.decoder = Decoder(self.backbone.out_channels[1:])

    def predict(self, src: Tensor, bgr: Tensor) -> Tensor:
        """The decoder's raw 37 channels: alpha, foreground residual, error, 32 hidden."""
        x, *skips = self.backbone(torch.cat([src, bgr], dim=1))
        return self.decoder(self.aspp(x), *skips)

    def forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        check_inputs(src, bgr, self)
        x = self.predict(src, bgr)
        pha = x[:, 0:1].clamp(0.0, 1.0)
        fgr = (x[:, 1:4] + src).clamp(0.0, 1.0)
        err = x[:, 4:5].clamp(0.0, 1.0)
        hid = x[:, 5:].relu()
        return pha, fgr, err, hid


class MattingRefine(MattingBase):
    """The full model: the base network at ``backbone_scale``, then the refiner at full resolution.

    Arguments: as ``RefineOptions``, plus ``backbone`` and ``plate_solve`` (True: re-solve the full-resolution
    alpha against the plate, `bgmatte.model.plate_solve.solve_alpha`). They stay attributes (``backbone_scale``
    and ``plate_solve`` here, ``refiner.mode`` and the like on the refiner) that can be changed after loading,
    or all at once with ``configure``; a value the model cannot run is refused when it runs.

    Returns from ``forward(src, bgr)``: ``(pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm)``. Any H and W
    work: inputs whose sides are not multiples of 4 are padded by edge replication and the
    full-resolution outputs cropped back; the ``*_sm`` outputs then describe the padded frame.
    """

    def __init__(self, backbone: str = "mobilenetv2", backbone_scale: float = 0.25, refine_mode: str = "sampling",
                 refine_sample_pixels: int = 80_000, refine_threshold: float = 0.1, refine_kernel_size: int = 3,
                 refine_prevent_oversampling: bool = True, plate_solve: bool = False) -> None:
        problem = switch_problem("plate_solve", plate_solve)
        if problem is not None:
            raise TypeError(problem)
        super().__init__(backbone)
        self.plate_solve = plate_solve
        options = RefineOptions(backbone_scale, refine_mode, refine_sample_pixels, refine_threshold,
                                refine_kernel_size, refine_prevent_oversampling)
        self.backbone_scale = options.backbone_scale
        self.refiner = Refiner(refine_mode, refine_sample_pixels, refine_threshold, refine_kernel_size,
                               refine_prevent_oversampling)

    @property
    def options(self) -> RefineOptions:
        """The current settings, validated."""
        r = self.refiner
        return RefineOptions(self.backbone_scale, r.mode, r.sample_pixels, r.threshold, r.kernel_size,
                             r.prevent_oversampling)

    def check_settings(self) -> RefineOptions:
        """The current settings; a ValueError when one was set (as an attribute) to a value the model cannot run."""
        try:
            options = self.options
        except ValueError as exc:
            raise ValueError(f"this model cannot run with its settings: {exc}") from None
        weights = self.refiner.conv1.weight.shape[-1]
        if options.refine_kernel_size != weights:
            raise ValueError(f"this model's refiner weights have kernel size {weights}; "
                             f"it cannot run with kernel size {options.refine_kernel_size}")
        return options

    def configure(self, options: RefineOptions) -> "MattingRefine":
        """Change the speed settings in place (the kernel size is part of the weights and cannot change)."""
        if not isinstance(options, RefineOptions):
            raise TypeError(f"configure takes a RefineOptions, not {type(options).__name__}")
        if options.refine_kernel_size != self.refiner.kernel_size:
            raise ValueError(f"this model's refiner has kernel size {self.refiner.kernel_size}; "
                             f"it cannot run with {options.refine_kernel_size}")
        self.backbone_scale = options.backbone_scale
        self.refiner.mode = options.refine_mode
        self.refiner.sample_pixels = options.refine_sample_pixels
        self.refiner.threshold = options.refine_threshold
        self.refiner.prevent_oversampling = options.refine_prevent_oversampling
        return self

    def forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        self.check_settings()
        src, bgr, small, (height, width) = prepare_inputs(src, bgr, self.backbone_scale, model=self)
        src_sm = F.interpolate(src, small, mode="bilinear", align_corners=False)
        bgr_sm = F.interpolate(bgr, small, mode="bilinear", align_corners=False)
        x = self.predict(src_sm, bgr_sm)
        pha_sm = x[:, 0:1].clamp(0.0, 1.0)
        fgr_residual_sm = x[:, 1:4]
        err_sm = x[:, 4:5].clamp(0.0, 1.0)
        hid_sm = x[:, 5:].relu()

        pha, fgr_residual, ref_sm = self.refiner(src, bgr, pha_sm, fgr_residual_sm, err_sm, hid_sm)
        pha = pha.clamp(0.0, 1.0)
        fgr = (fgr_residual + src).clamp(0.0, 1.0)
        fgr_sm = (fgr_residual_sm + src_sm).clamp(0.0, 1.0)
        if self.plate_solve:
            pha = solve_alpha(src, bgr, pha, fgr)
        return pha[:, :, :height, :width], fgr[:, :, :height, :width], pha_sm, fgr_sm, err_sm, ref_sm
