"""The stateful inference wrapper: a model on its device and precision, matting batches of uint8 frames.

The networks stay tensors-in, tensors-out; this class owns the conversions around them (uint8 RGB
to float on the device, the precision cast, upsampling ``err`` and ``ref`` for output), so that the
video pipeline, the image command and the webcam share one way of running the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bgmatte.errors import BgmatteError
from bgmatte.model.build import PRECISIONS
from bgmatte.model.matting import MattingBase, MattingRefine, base_input_size, value_range_problem

# Sides at or above this many pixels count as 4K, where the paper's settings are 1/8 and 320,000 pixels.
UHD_MIN_PIXELS = 3200 * 1800
# Below HD the base network is given as many pixels as at 1280x720 and 1/4 (320x180), up to half the frame's
# resolution, in steps of 1/16: at 1/4 it sees too little of a small frame (160x90 at 640x360) to find the subject.
HD_PIXELS = 1280 * 720
SMALL_FRAME_MAX_SCALE = 0.5


@dataclass(frozen=True)
class Matte:
    """One batch of results on the model's device, float32, channels first.

    ``err`` and ``ref`` are computed from the coarse maps on first use, so the upsampling costs
    nothing when no output needs them, and runs on the thread that asks rather than the model's.
    """

    pha: Tensor  # (B, 1, H, W) alpha
    fgr: Tensor  # (B, 3, H, W) foreground colour
    err_sm: Tensor  # (B, 1, h, w) the coarse error map, at any resolution
    ref_sm: Tensor  # (B, 1, h, w) 1 where the refiner worked, at any resolution

    @cached_property
    def err(self) -> Tensor:
        """The error map at full resolution (bilinear)."""
        return F.interpolate(self.err_sm.float(), self.pha.shape[-2:], mode="bilinear", align_corners=False)

    @cached_property
    def ref(self) -> Tensor:
        """The refined areas at full resolution (nearest)."""
        return F.interpolate(self.ref_sm.float(), self.pha.shape[-2:], mode="nearest")


class NotEnoughMemory(BgmatteError):
    """The model ran out of memory on frames of some size: a one-line error, which callers may reword
    to name their input."""


class FramesOutOfRange(BgmatteError, ValueError):
    """Float frames or plates outside [0, 1], or not finite: a ValueError to Python callers, as the models' own input
    checks are, and one line on the command line, as the Predictor's other refusals."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means memory ran out: torch's OutOfMemoryError (CUDA), Python's MemoryError,
    or the RuntimeError torch raises when a CPU allocation fails."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def settings_for_size(width: int, height: int) -> tuple[float, int]:
    """The (backbone_scale, refine_sample_pixels) for a frame size: the paper's 1/8 and 320k at 4K and 1/4 and 80k
    from HD (1280x720) up; below HD, 80k and a larger scale that gives the base network the pixels it has at HD
    (1/2 at 640x360, 3/8 at 640x480), so that a smaller frame never costs it more than HD does. On our validation
    set scaled to 640x360 (24 clean samples), 1/2 instead of 1/4 took SAD from 1.36 to 0.85 and whole-frame SAD
    from 2.06 to 0.97."""
    pixels = width * height
    if pixels >= UHD_MIN_PIXELS:
        return 0.125, 320_000
    if pixels >= HD_PIXELS or pixels <= 0:
        return 0.25, 80_000
    sixteenths = math.floor(4 * math.sqrt(HD_PIXELS / pixels) + 1e-9)  # rounded down: at most HD's base pixels
    return min(SMALL_FRAME_MAX_SCALE, sixteenths / 16), 80_000


def frames_to_tensor(frames: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype, *, name: str = "frames",
                     check_range: bool = True) -> Tensor:
    """(B,H,W,3) or (H,W,3) RGB to (B,3,H,W) floats in [0, 1] on ``device``: uint8 is scaled from 0-255, floats must
    be in [0, 1] already; other dtypes are refused (a `BgmatteError`), since their range cannot be told.

    Floats outside [0, 1] or not finite (`value_range_problem`) are refused as `FramesOutOfRange`, naming them by
    `name`, after one min/max pass where they are given (before the copy to ``device``); `check_range` False skips it
    for floats the caller made from uint8 itself. Numpy views with negative strides (``frame[..., ::-1]``, BGR to
    RGB) are copied first."""
    if isinstance(frames, np.ndarray) and any(stride < 0 for stride in frames.strides):
        frames = np.ascontiguousarray(frames)
    tensor = torch.as_tensor(frames)
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        given = frames.dtype if isinstance(frames, np.ndarray) else tensor.dtype
        raise BgmatteError(f"frames must be uint8 (0-255) or floats in [0, 1], not {given}")
    if check_range and tensor.is_floating_point():
        problem = value_range_problem(tensor)
        if problem is not None:
            raise FramesOutOfRange(f"{name}: {problem}")
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"frames must be (B, H, W, 3) RGB, got {tuple(tensor.shape)}")
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    tensor = tensor.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if tensor.dtype == torch.uint8:
        return tensor.to(dtype).div_(255)
    return tensor.to(dtype)


# Layers that behave differently in training mode: batch norm normalises by the batch and updates its
# running statistics, dropout zeroes activations. torch names their common bases only privately.
_TRAINING_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def backbone_scale_of(model: object) -> float | None:
    """The scale a model runs its base network at: a ``backbone_scale`` attribute (plain, fast and TorchScript
    models, changeable between calls) or its ``options``' (ONNX); None when it has neither (the base network)."""
    scale = getattr(model, "backbone_scale", None)
    if scale is None:
        scale = getattr(getattr(model, "options", None), "backbone_scale", None)
    return float(scale) if isinstance(scale, (int, float)) else None


def check_frame_size(width: int, height: int, backbone_scale: float | None) -> None:
    """Refuse frames so small that the base network would get no pixels at ``backbone_scale``, in one line: the
    model itself raises a ValueError deep inside, and an ONNX model onnxruntime's own error."""
    if backbone_scale is None:
        return
    small_h, small_w = base_input_size(height, width, backbone_scale)
    if min(small_h, small_w) < 1:
        raise BgmatteError(f"frames of {width}x{height} are too small for backbone scale {backbone_scale:g}: the "
                           f"base network would see {small_w}x{small_h} pixels; use larger frames or a larger "
                           "--backbone-scale")


def refuse_training_mode(model: object) -> None:
    """Refuse a module whose batch-norm or dropout layers are in training mode: it would write wrong mattes and
    learn the frames into the caller's running statistics. The module is not switched behind the caller's back."""
    if isinstance(model, torch.nn.Module) and any(
            layer.training for layer in model.modules() if isinstance(layer, _TRAINING_LAYERS)):
        raise BgmatteError(f"the {type(model).__name__} model is in training mode, which gives wrong mattes: "
                           "call .eval() on it first")


def first_parameter(model: object) -> Tensor | None:
    """A module's first parameter, which tells its device and dtype; None for a model without any (ONNX)."""
    parameters = getattr(model, "parameters", None)
    return next(iter(parameters()), None) if callable(parameters) else None


def model_device_of(model: object) -> torch.device:
    """The device a ready model runs on: its first parameter's, else the ``device`` it states (an ONNX model
    on CUDA), else the CPU."""
    parameter = first_parameter(model)
    if parameter is not None:
        return parameter.device
    stated = getattr(model, "device", None)
    return torch.device(stated) if isinstance(stated, (str, torch.device)) else torch.device("cpu")


def is_base_network(model: object) -> bool:
    """Whether `model` is a bare ``MattingBase`` (not the ``MattingRefine`` subclass), which `BaseAsRefine` wraps."""
    return isinstance(model, MattingBase) and not isinstance(model, MattingRefine)


class BaseAsRefine(torch.nn.Module):
    """``MattingBase`` behind ``MattingRefine``'s output tuple, so that `Predictor` runs it: no patch is refined."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, ...]:
        pha, fgr, err, _ = self.base(src, bgr)
        ref = torch.zeros(src.shape[0], 1, 1, 1, dtype=pha.dtype, device=pha.device)
        return pha, fgr, pha, fgr, err, ref


class Predictor:
    """Runs a matting model on batches of frames and plates.

    Arguments:
        model: a ``MattingRefine`` (plain or fast) in eval mode, or anything returning its tuple; a bare
            ``MattingBase`` is wrapped in `BaseAsRefine` and runs without refinement.
        precision: ``fp32``, ``fp16`` or ``bf16``, to which the model is cast once here; None keeps the
            module's own (fp32 for a model without parameters).
    """

    def __init__(self, model: torch.nn.Module, *, precision: str | None = None) -> None:
        if precision is not None and precision not in PRECISIONS:
            raise BgmatteError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        refuse_training_mode(model)
        if is_base_network(model):
            model = BaseAsRefine(model)
        parameter = first_parameter(model)
        self.device = model_device_of(model)
        own = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        self.dtype = PRECISIONS[precision] if precision is not None else own
        if self.dtype != own and isinstance(model, torch.nn.Module):
            model = model.to(self.dtype)
        self.model = model

    @torch.inference_mode()
    def __call__(self, src: np.ndarray | Tensor, bgr: np.ndarray | Tensor, *, check_range: bool = True) -> Matte:
        """Matte RGB frames ``src`` against plates ``bgr`` ((B,H,W,3) or (H,W,3) each; uint8, or floats in [0, 1]).
        One plate ((H,W,3) or (1,H,W,3)) serves every frame of a batch.

        Floats outside [0, 1] (0-255 values not divided by 255) or not finite raise `FramesOutOfRange`, a ValueError
        naming ``src`` or ``bgr``, at the cost of one min/max pass over each; `check_range` False skips it for floats
        the caller scaled from uint8 itself (the video pipeline's). Running out of memory raises `NotEnoughMemory`,
        one line saying what to lower, not a traceback.
        """
        try:
            src_t = frames_to_tensor(src, self.device, self.dtype, name="src", check_range=check_range)
            bgr_t = frames_to_tensor(bgr, self.device, self.dtype, name="bgr", check_range=check_range)
            if src_t.shape[-2:] != bgr_t.shape[-2:]:
                raise BgmatteError(f"the plate is {bgr_t.shape[-1]}x{bgr_t.shape[-2]} but the frame is "
                                   f"{src_t.shape[-1]}x{src_t.shape[-2]}")
            if len(bgr_t) == 1 and len(src_t) != 1:
                bgr_t = bgr_t.expand_as(src_t)
            if len(bgr_t) != len(src_t):
                raise BgmatteError(f"{len(bgr_t)} plates for {len(src_t)} frames: give one plate, or one per frame")
            check_frame_size(src_t.shape[-1], src_t.shape[-2], backbone_scale_of(self.model))
            pha, fgr, _, _, err_sm, ref_sm = self.model(src_t, bgr_t)
            return Matte(pha.float(), fgr.float(), err_sm, ref_sm)
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            shape = tuple(src.shape)
            count = shape[0] if len(shape) == 4 else 1
            width, height = shape[-2], shape[-3]
            raise NotEnoughMemory(
                f"not enough memory to matte {count} frame{'s' if count != 1 else ''} of {width}x{height} on "
                f"{self.device}: try smaller or fewer frames at a time, a smaller --backbone-scale or "
                "--refine-sample-pixels, or another --device"
            ) from None
