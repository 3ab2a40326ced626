"""The threaded read → matte → composite → write loop behind `bgmatte video` and `bgmatte image`.

A video runs in three stages that overlap, joined by small bounded queues so that memory stays flat
however long the clip:

- a preparing thread takes decoded frames from the `VideoReader` (which decodes on its own thread),
  resizes them, finds each frame's plate (an image, a video frame for frame, or an estimate from the
  clip; aligned and exposure-matched on request) and stacks them into batches;
- the calling thread runs the model on each batch and does nothing else, so that it never waits for
  colour conversion, compositing or encoding;
- a finishing thread turns each `Matte` into output frames (`render_outputs`) and hands them to the
  writers, which encode on their own threads.

Ctrl-C stops the reading; what was matted by then is still written, and every output is closed so
that it plays. A truncated or damaged input ends the run at its last decodable frame, with every
output holding those frames, and then raises `BgmatteError`.

`render_outputs`, `TargetFrames` and `ExposureFeedback` are plain building blocks, shared with the webcam.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from bgmatte.composite import (
    TargetBackground,
    blur,
    clear_transparent,
    colour_like,
    parse_target_background,
    to_rgba,
    to_uint8,
)
from bgmatte.errors import BgmatteError, PartlyDone
from bgmatte.io.files import file_identity, refuse_existing, refuse_overwriting_inputs, same_bytes
from bgmatte.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    by_stem,
    list_images,
    match_by_stem,
    megapixels_above,
    read_image,
    read_image_and_profile,
    write_png,
)
from bgmatte.io.video import (
    OUTPUT_CONTAINERS,
    VIDEO_EXTENSIONS,
    Display,
    EncoderChoice,
    EncoderOptions,
    Frame,
    ImageSequenceWriter,
    StartPastEnd,
    TimedFrames,
    VideoReader,
    VideoWriter,
    check_frame_folder,
    check_span,
    choose_encoder,
    lower_thread_priority,
    rates_differ,
)
from bgmatte.plate import (
    ExposureOptions,
    PlateAligner,
    estimate_plate,
    fit_exposure,
    grey_against_colour,
    register_frames,
    sample_frames,
)
from bgmatte.predictor import (
    BaseAsRefine,
    Matte,
    Predictor,
    check_frame_size,
    frames_to_tensor,
    is_base_network,
    model_device_of,
    refuse_training_mode,
    settings_for_size,
)

logger = logging.getLogger(__name__)

OUTPUT_KINDS = ("com", "pha", "fgr", "err", "ref")
# The reference script's composite background when no target is given.
REFERENCE_GREEN = (120, 255, 155)
PLATE_SAMPLES = 30  # frames sampled for an automatic plate
_QUEUE_BATCHES = 2  # batches waiting between two stages

ModelLike = Any  # nn.Module | OnnxMatting | Predictor | ModelOptions | str | os.PathLike | None


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how to run it; None settings are chosen for the input size.

    Arguments:
        checkpoint: a ``.pth`` or ``.safetensors`` file, or None for the embedded default model.
        model_type: ``mattingrefine`` (the full model) or ``mattingbase`` (the coarse network alone,
            run at full resolution; it has no ``ref`` output).
        backbone: ``resnet50``, ``resnet101`` or ``mobilenetv2``; None reads it from the checkpoint.
        backbone_scale, refine_sample_pixels: None picks them for the frame size (`settings_for_size`: the
            paper's 1/4 and 80,000 from HD up, 1/8 and 320,000 at 4K, up to 1/2 below HD).
        refine_mode, refine_threshold, refine_kernel_size: as `bgmatte.load_model`; the threshold's default is
            the model's own 0.1, while ``bgmatte video`` and ``image`` pass the reference scripts' 0.7.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        optimize: use the fast inference path (same outputs).
        plate_solve: re-solve alpha against the plate (`bgmatte.model.plate_solve`); None: as the
            weights say (on for the embedded default model).
    """

    checkpoint: str | os.PathLike | None = None
    model_type: Literal["mattingrefine", "mattingbase"] = "mattingrefine"
    backbone: str | None = None
    backbone_scale: float | None = None
    refine_mode: str = "sampling"
    refine_sample_pixels: int | None = None
    refine_threshold: float = 0.1
    refine_kernel_size: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    optimize: bool = True
    plate_solve: bool | None = None

    def __post_init__(self) -> None:
        if self.model_type not in ("mattingrefine", "mattingbase"):
            raise BgmatteError(f"model type {self.model_type!r} is not supported: use mattingrefine or mattingbase")
        # Checked here, when the options are made, not when the weights load after the inputs were opened.
        from bgmatte.model.matting import BACKBONES, REFINE_MODES, refine_setting_problem, switch_problem

        if self.backbone is not None and self.backbone not in BACKBONES:
            raise BgmatteError(f"unknown backbone {self.backbone!r}: choose one of {', '.join(BACKBONES)}")

        for problem in (switch_problem("optimize", self.optimize),
                        switch_problem("plate_solve", self.plate_solve, optional=True)):
            if problem is not None:
                raise BgmatteError(problem)

        for name in ("backbone_scale", "refine_sample_pixels", "refine_threshold"):
            value = getattr(self, name)
            problem = None if value is None and name != "refine_threshold" else refine_setting_problem(name, value)
            if problem is not None:
                raise BgmatteError(f"{name} {problem}, not {value!r}")
        if self.refine_mode not in REFINE_MODES:
            raise BgmatteError(f"refine_mode must be one of {', '.join(REFINE_MODES)}, not {self.refine_mode!r}")
        if self.refine_kernel_size not in (None, 1, 3):
            raise BgmatteError(f"refine_kernel_size must be 1 or 3 (None: read from the weights), "
                               f"not {self.refine_kernel_size!r}")


HELPER_NICENESS = 10
"""How much lower than the model the decoding, converting and encoding threads run when the model is on
the CPU (`bgmatte.io.video.lower_thread_priority`)."""


def _loads_itself(model: ModelLike) -> bool:
    """Whether `model` names weights for `load_predictor` to load (a checkpoint, options or None), rather than
    being a model ready to run."""
    return model is None or isinstance(model, (str, os.PathLike, ModelOptions))


def _base_only(model: ModelLike) -> bool:
    """Whether `model` is the coarse network alone, which has no refiner and so no ``ref`` output."""
    if isinstance(model, ModelOptions):
        return model.model_type == "mattingbase"
    network = model.model if isinstance(model, Predictor) else model
    return isinstance(network, BaseAsRefine) or is_base_network(network)


def check_model(model: ModelLike, kinds: Sequence[str] = ()) -> None:
    """Refuse, before any work, a `model` the pipeline cannot run as given: a type it does not take, a module in
    training mode, a device that is not usable here (CUDA without a GPU: before any input is read, not when the
    weights load), or the coarse network alone when the ``ref`` output (among `kinds`) is asked for."""
    if not _loads_itself(model) and not isinstance(model, (Predictor, nn.Module)):
        from bgmatte.export import OnnxMatting

        if not isinstance(model, OnnxMatting):
            raise BgmatteError("model takes a checkpoint path, ModelOptions, a torch module, an ONNX model from "
                               f"load_model(backend='onnxruntime') or a Predictor, not {type(model).__name__}")
    refuse_training_mode(model.model if isinstance(model, Predictor) else model)
    model_device(model)  # resolves (and so checks) the device that options or a checkpoint ask for
    if "ref" in kinds and _base_only(model):
        raise BgmatteError("the ref output needs the refine model: drop ref, or use MattingRefine (model type "
                           "mattingrefine) instead of MattingBase")


def model_device(model: ModelLike) -> torch.device:
    """The device `load_predictor` will run `model` on, known before anything is loaded."""
    if isinstance(model, Predictor):
        return model.device
    if _loads_itself(model):
        from bgmatte.model.build import resolve_device

        return resolve_device(model.device if isinstance(model, ModelOptions) else "auto")
    return model_device_of(model)  # an ONNX model has no parameters but states its device


def load_predictor(model: ModelLike, width: int, height: int) -> Predictor:
    """A `Predictor` for frames of `width` x `height` from a module, an ONNX model, a Predictor, `ModelOptions`,
    a checkpoint or None.

    A model is used as it is (a module must be in eval mode; a ``MattingBase`` alone is run without
    refinement); options and checkpoints are loaded, with the speed settings left open chosen for the
    frame size. Callers refuse what cannot run with `check_model` first, once, before any work.
    """
    if isinstance(model, Predictor):
        return model
    if not _loads_itself(model):
        return Predictor(model)
    options = model if isinstance(model, ModelOptions) else ModelOptions(checkpoint=model)
    if options.model_type == "mattingbase":
        return Predictor(_load_base(options), precision=options.precision)
    from bgmatte.model.build import load_model

    scale, pixels = settings_for_size(width, height)
    loaded = load_model(
        options.checkpoint,
        backbone=options.backbone,
        backbone_scale=options.backbone_scale if options.backbone_scale is not None else scale,
        refine_mode=options.refine_mode,
        refine_sample_pixels=options.refine_sample_pixels if options.refine_sample_pixels is not None else pixels,
        refine_threshold=options.refine_threshold,
        refine_kernel_size=options.refine_kernel_size,
        device=options.device,
        optimize=options.optimize,
        plate_solve=options.plate_solve,
    )
    return Predictor(loaded, precision=options.precision)


def _load_base(options: ModelOptions) -> nn.Module:
    """The base network alone from a full or base-only checkpoint (its refiner weights are left out)."""
    from bgmatte.model.build import DEFAULT_WEIGHTS, backbone_mismatch, detect_backbone, read_state_dict, resolve_device
    from bgmatte.model.matting import BACKBONES, MattingBase

    if options.plate_solve:
        raise BgmatteError("the plate solve follows the refiner: it works with model type mattingrefine only")
    if options.checkpoint is None and not DEFAULT_WEIGHTS.is_file():
        raise BgmatteError("no embedded default model is shipped in this build of bgmatte yet: "
                           "pass a checkpoint (for example a released pytorch_mobilenetv2.pth)")
    source = Path(options.checkpoint) if options.checkpoint is not None else DEFAULT_WEIGHTS
    state = {key: value for key, value in read_state_dict(source).items() if not key.startswith("refiner.")}
    backbone = options.backbone or detect_backbone(state)
    if backbone not in BACKBONES:
        raise BgmatteError(f"{source}: cannot tell the backbone from the weights; pass one of {', '.join(BACKBONES)}")
    if (problem := backbone_mismatch(source, detect_backbone(state), backbone)) is not None:
        raise BgmatteError(problem)
    base = MattingBase(backbone)
    expected = base.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} {what} keys (first: {keys[0]})"
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if keys]
        raise BgmatteError(f"{source}: does not fit a MattingBase({backbone}) model: " + "; ".join(problems))
    base.load_state_dict(state)
    return BaseAsRefine(base).eval().to(resolve_device(options.device))


# -------------------------------------------------------------------------------- target backgrounds


def cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale `image` to cover `width` x `height` keeping its aspect ratio, then crop the middle."""
    source_height, source_width = image.shape[:2]
    if (source_width, source_height) == (width, height):
        return image
    scale = max(width / source_width, height / source_height)
    scaled_width, scaled_height = max(width, round(source_width * scale)), max(height, round(source_height * scale))
    scaled = resize_image(image, scaled_width, scaled_height)
    left, top = (scaled_width - width) // 2, (scaled_height - height) // 2
    return np.ascontiguousarray(scaled[top : top + height, left : left + width])


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to exactly `width` x `height` (area averaging when shrinking, bilinear when enlarging)."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _rate(fps: Fraction | None) -> str:
    """A frame rate as people write it: 25, 29.97."""
    return f"{float(fps):.2f}".rstrip("0").rstrip(".") if fps else "unknown"


def _clip_rate(fps: Fraction | None, variable: bool) -> str:
    """The clip's frame rate in a message: '25 fps', or 'of variable rate' (`VideoReader.variable_rate`)."""
    return "of variable rate" if variable else f"{_rate(fps)} fps"


class TargetFrames:
    """The target background at the output size, as float tensors ready for `render_outputs`.

    Arguments:
        target: what `parse_target_background` returned.
        width, height: the output size; images and video frames are scaled to cover it (centre crop).
        device: where the tensors go (the model's device).
        picture: an image target's pixels when already read (a folder of photos reads its target once).
        fps, frames: the frame rate and length of the clip it goes behind: a video target whose rate would drift
            from it by half a frame (`rates_differ`) is played at its own speed, its frames looked up by the clip's
            times (`take`'s `times`), not one for one.
        live: play a video target by `take`'s times whatever its rate (a live output, whose rate varies).
        variable: the clip's rate varies (`VideoReader.variable_rate`): a video target plays at its own speed,
            whatever its rate, since the clip's frames are not one rate apart.

    `take(count)` returns (count, 3, H, W) floats for a video target (looped to length), a cached
    (1, 3, H, W) for an image, and None for colours, blur and transparency, which need no frames.
    """

    def __init__(self, target: TargetBackground, width: int, height: int, device: torch.device | str = "cpu", *,
                 picture: np.ndarray | None = None, fps: Fraction | None = None, frames: int | None = None,
                 live: bool = False, variable: bool = False):
        self.target = target
        self.size = (width, height)
        self.device = torch.device(device)
        self._image: Tensor | None = None
        self._reader: VideoReader | None = None
        self._frames: Any = None
        self._timed: TimedFrames | None = None
        self._offset = 0.0  # where the current loop of a timed target starts, in the clip's seconds
        self._still: np.ndarray | None = None  # a timed target of one frame, kept
        self.loops = 0
        if target.kind == "image":
            picture = cover(picture if picture is not None else read_image(target.path), width, height)
            self._image = self._tensor(picture[None])
        elif target.kind == "video":
            self._open()
            if live:
                self._frames, self._timed = None, TimedFrames(self._reader)
            elif variable or rates_differ(fps, self._reader.fps, frames):
                logger.info("%s: the target background is %s fps and the clip %s; it plays at its own speed",
                            target.path, _rate(self._reader.fps), _clip_rate(fps, variable))
                self._frames, self._timed = None, TimedFrames(self._reader)

    def _open(self) -> None:
        self._reader = VideoReader(self.target.path, queue_size=4)
        if self._timed is not None:
            self._timed = TimedFrames(self._reader)
        else:
            self._frames = iter(self._reader)

    def _next_frame(self) -> np.ndarray:
        for _ in range(2):
            frame = next(self._frames, None)
            if frame is not None:
                return cover(frame.image, *self.size)
            if self._reader.error is not None:
                logger.warning("%s (the target background loops from its start)", self._reader.error)
            self._reader.close()
            self.loops += 1
            self._open()
        raise BgmatteError(f"{self.target.path}: the target background video gave no frames")

    def _frame_at(self, seconds: float) -> np.ndarray:
        if self._still is not None:
            return self._still
        for _ in range(2):
            frame = self._timed.at(seconds - self._offset)
            if frame is None:
                break
            looped = self._timed.duration
            if not self._timed.ended:
                return cover(frame.image, *self.size)
            if self._timed.count == 1:  # a one-frame video is a still: never read again
                self._still = cover(frame.image, *self.size)
                return self._still
            if self._reader.error is not None:
                logger.warning("%s (the target background loops from its start)", self._reader.error)
            # As many loops as fit before `seconds` (a live output that paused, a clip with a gap in its times).
            loops = max(1, math.floor((seconds - self._offset) / looped))
            self._offset += loops * looped
            self._reader.close()
            self.loops += loops
            self._open()
        raise BgmatteError(f"{self.target.path}: the target background video gave no frames")

    def take(self, count: int = 1, times: Sequence[float] | None = None) -> Tensor | None:
        """The next `count` background frames, or None when the target needs no frames. `times` (seconds from the
        clip's first frame, one per frame) place a video target of another frame rate (`fps`); else frame for frame."""
        if self._image is not None:
            return self._image
        if self._reader is None:
            return None
        if self._timed is not None and times is not None:
            return self._tensor(np.stack([self._frame_at(seconds) for seconds in times]))
        return self._tensor(np.stack([self._next_frame() for _ in range(count)]))

    def _tensor(self, frames: np.ndarray) -> Tensor:
        return model_input(frames).permute(0, 3, 1, 2).to(self.device)

    def close(self) -> None:
        """Stop decoding a video target; safe to call twice."""
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> TargetFrames:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- rendering


def check_outputs(kinds: Iterable[str]) -> tuple[str, ...]:
    """The output kinds in the order given, without repeats (a plain string is one kind); an unknown one is a
    `BgmatteError`."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    chosen: list[str] = []
    for kind in kinds:
        if kind not in OUTPUT_KINDS:
            raise BgmatteError(f"unknown output {kind!r}: choose from {', '.join(OUTPUT_KINDS)}")
        if kind not in chosen:
            chosen.append(kind)
    if not chosen:
        raise BgmatteError(f"no output asked for: choose from {', '.join(OUTPUT_KINDS)}")
    return tuple(chosen)


def composite_matte(
    matte: Matte,
    target: TargetBackground | None = None,
    *,
    backdrop: Tensor | None = None,
    src: np.ndarray | Tensor | None = None,
) -> Tensor:
    """The composite as floats on the matte's device: (B, 3, H, W), or straight RGBA (B, 4, H, W) when transparent.

    `target` None is the reference's green. An image or video target needs `backdrop` ((1 or B, 3, H, W)
    floats, from `TargetFrames.take`); `blur` needs `src`, the frames as (B, H, W, 3) uint8 or
    (B, 3, H, W) floats. Transparent pixels of an RGBA result have their colour set to 0, as the
    reference's cutouts do.

    On the CPU the arithmetic is done with numpy, which runs on the calling thread alone: torch
    would start a second thread pool beside the model's, and the two slow each other down.
    """
    target = target if target is not None else TargetBackground("colour", colour=REFERENCE_GREEN)
    pha, fgr = matte.pha.detach(), matte.fgr.detach()
    if fgr.device.type == "cpu":
        pha_np, fgr_np = pha.float().numpy(), fgr.float().numpy()
        if target.kind == "transparent":
            return torch.from_numpy(np.concatenate([fgr_np * (pha_np > 0), pha_np], axis=1))
        background = _background_numpy(target, fgr_np, backdrop, src)
        # composite.composite's `fgr * pha + bgr * (1 - pha)`, in three passes and no temporaries.
        out = np.subtract(fgr_np, background)
        out *= pha_np
        out += background
        return torch.from_numpy(out)
    if target.kind == "transparent":
        return to_rgba(fgr * (pha > 0), pha)
    if target.kind == "colour":
        background = colour_like(target.rgb, fgr).expand_as(fgr)
    elif target.kind == "blur":
        if src is None:
            raise ValueError("a blur background needs the source frames (src)")
        frames = src if isinstance(src, Tensor) and src.is_floating_point() else frames_to_tensor(src, fgr.device, torch.float32)
        background = blur(frames.to(fgr.device, fgr.dtype))
    elif backdrop is None:
        raise ValueError(f"a {target.kind} background needs its frames (backdrop, from TargetFrames.take)")
    else:
        background = backdrop.to(fgr.device, fgr.dtype).expand_as(fgr)
    # composite.composite's `fgr * pha + bgr * (1 - pha)`, in one fused pass rather than four.
    return torch.lerp(background, fgr, pha.expand_as(fgr))


def _background_numpy(target: TargetBackground, fgr: np.ndarray, backdrop: Tensor | None,
                      src: np.ndarray | Tensor | None) -> np.ndarray:
    """The background to composite over as a float32 array that broadcasts against (B, 3, H, W)."""
    if target.kind == "colour":
        return np.asarray(target.rgb, np.float32).reshape(3, 1, 1)
    if target.kind == "blur":
        if src is None:
            raise ValueError("a blur background needs the source frames (src)")
        if isinstance(src, Tensor):
            src = src.detach().cpu()
            frames = (src.float().numpy() if src.is_floating_point() else src.numpy().astype(np.float32) / 255)
            frames = frames if frames.shape[-1] == 3 else frames.transpose(0, 2, 3, 1)
        else:
            frames = src.astype(np.float32) / 255  # (B, H, W, 3)
        return blur(np.ascontiguousarray(frames)).transpose(0, 3, 1, 2)
    if backdrop is None:
        raise ValueError(f"a {target.kind} background needs its frames (backdrop, from TargetFrames.take)")
    return backdrop.detach().cpu().float().numpy()


def render_outputs(
    matte: Matte,
    kinds: Iterable[str],
    *,
    target: TargetBackground | None = None,
    backdrop: Tensor | None = None,
    src: np.ndarray | Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Turn a batch of mattes into uint8 frames for each output kind, channels last, on the CPU.

    com: (B, H, W, 3), or (B, H, W, 4) straight RGBA when `target` is transparent (see `composite_matte`), its
        colour 0 wherever the 8-bit alpha is 0;
    fgr: (B, H, W, 3); pha, err, ref: (B, H, W) grey (err bilinear and ref nearest upsampled, as the
    reference writes them). Compositing happens on the matte's device, so that from a GPU only uint8
    crosses to the host.
    """
    frames: dict[str, np.ndarray] = {}
    target = target if target is not None else TargetBackground("colour", colour=REFERENCE_GREEN)
    for kind in check_outputs(kinds):
        if kind == "com" and target.kind == "colour" and matte.fgr.device.type == "cpu":
            frames[kind] = _composite_over_colour(matte, target.rgb)
            continue
        image = composite_matte(matte, target, backdrop=backdrop, src=src) if kind == "com" else getattr(matte, kind)
        frames[kind] = channels_last_uint8(image)
        if kind == "com" and target.kind == "transparent":
            clear_transparent(frames[kind])  # where alpha rounded to 0 of 255
    return frames


def _composite_over_colour(matte: Matte, rgb: tuple[float, float, float]) -> np.ndarray:
    """The composite over a colour straight to uint8 on the CPU: per plane `(fgr - c) * pha`, then OpenCV adds
    `c`, scales, rounds and saturates in one pass (half the passes of `composite_matte` then conversion)."""
    fgr, pha = matte.fgr.detach().float().numpy(), matte.pha.detach().float().numpy()
    batch, _, height, width = fgr.shape
    out = np.empty((batch, height, width, 3), np.uint8)
    plane = np.empty((height, width), np.float32)
    for index in range(batch):
        channels = []
        for channel, value in enumerate(rgb):
            np.subtract(fgr[index, channel], np.float32(value), out=plane)
            np.multiply(plane, pha[index, 0], out=plane)
            channels.append(cv2.convertScaleAbs(plane, alpha=255.0, beta=255.0 * value))
        cv2.merge(channels, dst=out[index])
    return out


def channels_last_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] to rounded uint8 (B, H, W, C) on the host, or (B, H, W) for one channel.

    On the CPU, OpenCV scales, rounds and interleaves each plane in single passes, several times
    faster than the same steps as torch operations (which matters at 1080p, where this runs for
    every frame of every output).
    """
    batch, channels, height, width = images.shape
    if images.device.type != "cpu":
        pixels = to_uint8(images)
        pixels = pixels[:, 0] if channels == 1 else pixels.permute(0, 2, 3, 1).contiguous()
        return pixels.cpu().numpy()
    planes = images.detach().to(torch.float32).contiguous().numpy()
    shape = (batch, height, width) if channels == 1 else (batch, height, width, channels)
    out = np.empty(shape, np.uint8)
    for index in range(batch):
        # convertScaleAbs rounds to nearest and saturates above; max() first keeps negatives at 0.
        if channels == 1:
            cv2.convertScaleAbs(cv2.max(planes[index, 0], 0.0), dst=out[index], alpha=255.0)
            continue
        converted = [cv2.convertScaleAbs(cv2.max(plane, 0.0), alpha=255.0) for plane in planes[index]]
        cv2.merge(converted, dst=out[index])
    return out


# --------------------------------------------------------------------------------------------- plates


class ExposureFeedback:
    """Exposure matching for a stream of frames (a video, the webcam): each plate is fitted on the background of
    the latest matte made.

    The matte a few frames back is a good guess of where the subject is not; its foreground is
    grown by 3% of the frame so that a moving subject still falls inside it. Before the first matte,
    the fit's own outlier rejection keeps the subject out. A frame where no change can be fitted keeps the
    plate as it is: the first is warned about, naming the clip (or camera), the others counted for `report` at
    the end. `options`: how the change is fitted (the webcam fits on fewer pixels, to keep each live frame cheap).
    """

    def __init__(self, name: Path | str | None = None, options: ExposureOptions = ExposureOptions()) -> None:
        self.options = options
        self._mask: np.ndarray | None = None
        self._named = f"{name}: " if name else ""
        self.frames = 0
        self.skipped = 0

    def update(self, pha: Tensor) -> None:
        """Remember the foreground of one matte ((1, H, W) or (H, W))."""
        foreground = (pha.detach().reshape(pha.shape[-2:]).cpu().numpy() >= 0.05).astype(np.uint8)
        reach = max(3, int(0.03 * max(foreground.shape)) | 1)
        mask = cv2.dilate(foreground, np.ones((reach, reach), np.uint8)).astype(bool)
        # A matte that is almost all foreground was made with a badly exposed plate: no use as a guide.
        self._mask = mask if mask.mean() < 0.8 else None

    def match(self, plate: np.ndarray, frame: np.ndarray) -> np.ndarray:
        """`plate` brought to `frame`'s exposure and white balance (the same size), or as it is where no change
        can be fitted."""
        mask = self._mask
        if mask is not None and mask.shape != frame.shape[:2]:
            mask = None
        self.frames += 1
        fit = fit_exposure(plate, frame, mask, self.options, warn=False)
        if fit.skipped:
            self.skipped += 1
            if self.skipped == 1:
                logger.warning("%sexposure matching skipped on frame %d (%s); the plate is used as it is where it "
                               "cannot be fitted", self._named, self.frames, fit.skipped)
            return plate
        return fit.apply(plate)

    def report(self, stopped: bool = False) -> None:
        """At the end of a run: how many frames had no exposure matching, when more than the one already warned of.
        `stopped`: the run was cut short (Ctrl-C), so the frames counted are those prepared, a few past the last one
        written."""
        if self.skipped > 1:
            logger.warning("%sexposure matching was skipped on %d of %s", self._named, self.skipped,
                           _counted_frames(self.frames, stopped))


def _counted_frames(frames: int, stopped: bool) -> str:
    """`frames` as the end-of-run counts name them: all the clip's, or, for a run cut short, those prepared."""
    return f"the {frames} frames prepared before the stop" if stopped else f"{frames} frames"


def _resized_plate(plate: tuple[int, int], target: tuple[int, int], align: bool) -> str:
    """What the size warning says happens to a plate of size `plate` for a picture of size `target` (width,
    height): resized, or stretched when its aspect ratio differs, which only --align can undo (it finds the
    picture's view in the stretched plate; unaligned, most of the background mattes as foreground)."""
    if abs(plate[0] * target[1] - plate[1] * target[0]) <= 0.01 * plate[0] * target[1]:
        return "the plate is resized to fit"
    if align:
        return "its aspect ratio differs: the plate is stretched to fit, then aligned"
    return ("its aspect ratio differs, so the plate is stretched to fit and will not line up with the picture "
            "unless it was squeezed the same way: --align finds the picture's view in it")


class _Plates:
    """The plate for each frame: one image, or a video (the last frame held when it ends), aligned to the frame
    and exposure-matched on request. A plate video goes frame for frame with the clip, as in the paper's code,
    unless its frame rate would drift from the clip's by half a frame over the clip's `frames` (`rates_differ`):
    then by time (`TimedFrames`), both counted from their first frame (a span of the clip, starting `clip_start`
    seconds after it, gets the plate frames it gets in a whole run)."""

    def __init__(self, image: np.ndarray | None, video: VideoReader | None, width: int, height: int, *,
                 native: tuple[int, int], name: str | None, align: bool, exposure: ExposureFeedback | None,
                 fps: Fraction | None = None, frames: int | None = None, clip_start: float = 0.0,
                 variable: bool = False):
        self.size = (width, height)
        self.native = native
        self._video = video
        self._frames: Iterator[Frame] | None = None
        self._timed: TimedFrames | None = None
        self._lead = 0.0  # what the plate's times lag the clip's by, both counted from their own first frame
        if video is not None and (variable or rates_differ(fps, video.fps, frames)):
            logger.info("%s: the plate video is %s fps and the clip %s; its frames are paired by time",
                        video.path, _rate(video.fps), _clip_rate(fps, variable))
            if video.start > 0:  # a span: from one plate frame earlier, which may be the nearest to the first
                video.close()
                video = self._video = VideoReader(video.path, queue_size=4,
                                                  start=max(0.0, video.start - 1 / float(video.fps)))
            self._lead = clip_start - video.span_start
            self._timed = TimedFrames(video)
        elif video is not None:
            self._frames = iter(video)
        self._held: np.ndarray | None = None
        self._held_index = -1
        self._warned_size = False
        self._warned_end = False
        self.exposure = exposure
        self._align = align
        self._aligner: PlateAligner | None = None
        self._name = name
        self._checked_colour = False
        self.plate = self._fit(image, name) if image is not None else None
        if self.plate is not None and align:
            self._aligner = PlateAligner(self.plate, name=name)

    def _fit(self, plate: np.ndarray, name: Path | str | None) -> np.ndarray:
        height, width = plate.shape[:2]
        if (width, height) != self.native and not self._warned_size:
            self._warned_size = True
            logger.warning("%sthe plate is %dx%d but the video is %dx%d; %s", f"{name}: " if name else "",
                           width, height, *self.native, _resized_plate((width, height), self.native, self._align))
        return resize_image(plate, *self.size)

    def _video_plate(self, seconds: float) -> np.ndarray:
        if self._timed is not None:
            frame = self._timed.at(seconds + self._lead)
            ended = self._timed.ended
        else:
            frame = next(self._frames, None)
            ended = frame is None
        if frame is None and self._held is None:
            raise BgmatteError(f"{self._video.path}: the plate video gave no frames")
        if ended and not self._warned_end:
            self._warned_end = True
            cause = f" ({self._video.error})" if self._video.error else ""
            logger.warning("%s: the plate video is shorter than the source%s; its last frame is held",
                           self._video.path, cause)
        if frame is not None and frame.index != self._held_index:  # a slower plate gives a frame more than once
            self._held, self._held_index = self._fit(frame.image, self._video.path), frame.index
        return self._held

    @property
    def static(self) -> np.ndarray | None:
        """The plate when it is the same for every frame (an image, neither aligned nor exposure-matched)."""
        if self._video is None and self._aligner is None and self.exposure is None:
            return self.plate
        return None

    def next(self, frame: np.ndarray, seconds: float = 0.0) -> np.ndarray:
        """The plate for `frame` (already at the working size), `seconds` after the clip's first frame."""
        plate = self._video_plate(seconds) if self._video is not None else self.plate
        if not self._checked_colour:  # the first frame and plate tell: a file is grey or in colour throughout
            self._checked_colour = True
            if grey_against_colour(plate, frame):
                named = self._video.path if self._video is not None else self._name
                logger.warning("%sthe plate has no colour (greyscale) but the video has: its coloured background "
                               "will matte as foreground; give the plate in colour", f"{named}: " if named else "")
        if self._video is not None:
            if self._align:  # one aligner, given each new plate frame, so that a failure is told once, not per frame
                if self._aligner is None:
                    self._aligner = PlateAligner(plate, name=self._video.path)
                elif plate is not self._aligner.plate:
                    self._aligner.set_plate(plate)
                plate = self._aligner.align(frame)[0]
        elif self._aligner is not None:
            plate = self._aligner.align(frame)[0]
        if self.exposure is not None:
            plate = self.exposure.match(plate, frame)
        return plate

    def report(self, stopped: bool = False) -> None:
        """At the end of a run, what the warnings given on the way left uncounted: how many frames the plate could
        not be aligned to, or not exposure-matched to (the first of each was warned about as it came). `stopped`:
        the run was cut short, and the counts are of the frames prepared (`ExposureFeedback.report`)."""
        aligner = self._aligner
        # (A still plate with too little texture already said that it is used unaligned throughout.)
        if aligner is not None and aligner.failures > 1 and (self._video is not None or aligner.textured):
            named = self._video.path if self._video is not None else self._name
            logger.warning("%splate alignment failed on %d of %s; they were matted against the unaligned plate",
                           f"{named}: " if named else "", aligner.failures, _counted_frames(aligner.attempts, stopped))
        if self.exposure is not None:
            self.exposure.report(stopped)

    def close(self) -> None:
        if self._video is not None:
            self._video.close()


def _read_target(target: TargetBackground) -> np.ndarray | None:
    """Read an image target (its pixels, for `TargetFrames`) and open a video one (its header and first frame) before
    the model loads, so that one that cannot be read is refused at once, not after the weights were read."""
    try:
        if target.kind == "image":
            return read_image(target.path)
        if target.kind == "video":
            VideoReader(target.path, queue_size=1).close()
    except BgmatteError as exc:
        raise BgmatteError(f"{exc} (for the target background)") from None
    return None


def _frames_to_end(reader: VideoReader) -> int | None:
    """How many frames the clip has from its very first to the end of what is read: frame-for-frame pairing with a
    plate video drifts from the first frame on, also in a span."""
    if reader.frame_count is None:
        return None
    return reader.frame_count + (round(reader.span_start * float(reader.fps)) if reader.fps else 0)


def _is_video_path(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _open_plate(bgr: str | os.PathLike | np.ndarray, *,
                start: float = 0.0) -> tuple[np.ndarray | None, VideoReader | None]:
    """Read a plate given as an array, an image file or a video file (by extension; else tried as both). A plate
    video is read from the clip's `start` (`_plate_video`)."""
    if isinstance(bgr, np.ndarray):
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise BgmatteError(f"a plate array must be (H, W, 3) uint8 RGB, not {bgr.dtype} {bgr.shape}")
        return bgr, None
    path = Path(bgr)
    if _is_video_path(path):
        return None, _plate_video(path, start)
    if path.suffix.lower() in IMAGE_EXTENSIONS or not path.is_file():
        return read_image(path), None
    try:
        return read_image(path), None
    except BgmatteError:
        try:
            return None, _plate_video(path, start)
        except StartPastEnd:
            raise
        except BgmatteError:
            raise BgmatteError(f"{path}: the plate is neither an image nor a video that can be read") from None


def _plate_video(path: Path, start: float) -> VideoReader:
    """A plate video from the clip's `start` (seconds from its first frame), so that a span of the clip pairs with
    the plate frames it pairs with in a whole run. One that ends before the start is refused: holding its last
    frame would pair every frame with a plate the whole run never gives them."""
    try:
        return VideoReader(path, queue_size=4, start=start)
    except StartPastEnd as exc:
        raise StartPastEnd(f"{exc}; a plate video is read from the clip's start, to pair the frames it pairs in a "
                           "whole run") from None


def plate_sample_count(width: int, height: int) -> int:
    """How many frames an automatic plate is estimated from: 30 up to 1080p, fewer above, to bound memory."""
    return max(12, min(PLATE_SAMPLES, PLATE_SAMPLES * 1920 * 1080 // (width * height)))


AUTO_PLATE_FRAMES = 3
"""The fewest frames an automatic plate is estimated from (`estimate_plate`'s own minimum)."""


def _too_few_for_plate(src: Path, got: int, *, start: float, duration: float | None) -> BgmatteError:
    """The refusal of an automatic plate from a clip (or span) of fewer than `AUTO_PLATE_FRAMES` frames, saying
    which option could give it more."""
    where = "the clip" if not (start or duration) else f"the span from {start:g} s" + (
        f" for {duration:g} s (a longer --duration?)" if duration else " to the end (an earlier --start?)")
    return BgmatteError(f"{src}: an automatic plate needs at least {AUTO_PLATE_FRAMES} frames of {where}; "
                        f"it gave {got}")


def _check_plate_frames(src: Path, *, start: float = 0.0, duration: float | None = None) -> None:
    """Refuse an automatic plate for a clip (or span) too short to give one, before the model is loaded: decoding
    its first few frames takes a moment, loading the model seconds. The header's frame count is not trusted (it
    may promise frames that do not decode); `_estimate_plate` still refuses a clip whose samples fall short."""
    with VideoReader(src, queue_size=AUTO_PLATE_FRAMES, start=start, duration=duration) as reader:
        got = sum(1 for _ in zip(range(AUTO_PLATE_FRAMES), reader))
    if got < AUTO_PLATE_FRAMES:
        raise _too_few_for_plate(src, got, start=start, duration=duration)


def _estimate_plate(src: Path, size: tuple[int, int], progress: bool, *, start: float = 0.0,
                    duration: float | None = None, align: bool = False, match_exposure: bool = False) -> np.ndarray:
    """A clean plate from frames sampled evenly over a first pass through the clip, or through its span from
    `start` for `duration` seconds (`VideoReader`), which is what is matted. With `align` (a handheld clip) the
    samples are registered onto their middle one first (`register_frames`); too few registered, the plate is
    estimated from them as they are, with a warning.

    When a whole clip says how many frames it has, only the chosen frames are kept as it is decoded;
    otherwise (a span's count is an estimate) `sample_frames` thins as it goes, holding at most twice the count.
    """
    from tqdm import tqdm

    count = plate_sample_count(*size)

    def read(reader: VideoReader, expected: int | None) -> list[np.ndarray]:
        bar = tqdm(reader, total=expected or reader.frame_count, desc="plate", unit="frame", file=sys.stderr,
                   disable=None if progress else True, leave=False)
        with bar:
            if expected:
                chosen = set(np.linspace(0, expected - 1, min(count, expected)).round().astype(int).tolist())
                return [resize_image(frame.image, *size) for frame in bar if frame.index in chosen]
            return sample_frames((resize_image(frame.image, *size) for frame in bar), count)

    with VideoReader(src, start=start, duration=duration) as reader:
        expected = reader.frame_count if not (start or duration) else None
        samples = read(reader, expected)
        decoded = reader.frames_read
    if expected and abs(decoded - expected) > 0.1 * expected:
        # The count was far off (estimated from the duration and a frame rate that a variable-rate clip, an MKV of
        # 1000 "fps" say, does not keep): the samples bunched at the start, or stopped short. Chosen again from
        # the count now known.
        logger.debug("%s: %d frames where %d were expected; sampling the plate again", src, decoded, expected)
        with VideoReader(src) as reader:
            samples = read(reader, decoded)
    if len(samples) < AUTO_PLATE_FRAMES:  # estimate_plate's own refusal cannot name the clip
        raise _too_few_for_plate(src, len(samples), start=start, duration=duration)
    if align:
        registered, failed = register_frames(samples)
        if len(registered) < 3:
            logger.warning("%s: the frames sampled for the automatic plate could not be registered to one another "
                           "(%d of %d failed); it is estimated as if the camera stood still", src, failed, len(samples))
        else:
            if failed:
                logger.warning("%s: %d of %d frames sampled for the automatic plate could not be registered to the "
                               "others; it is estimated from the rest", src, failed, len(samples))
            samples = registered
    logger.info("estimating a clean plate from %d frames sampled over the clip", len(samples))
    return estimate_plate(samples, name=src, match_exposure=match_exposure)


# -------------------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class OutputFile:
    """One output: a video file, or a folder of PNGs (`folder`), RGBA when `alpha`; a video file's `encoder`
    is the one the plan chose, which its writer takes rather than choosing (and trying a forced one) again."""

    kind: str
    path: Path
    folder: bool
    alpha: bool
    encoder: EncoderChoice | None = field(default=None, compare=False, repr=False)  # a dict: not part of the hash


def _sequence_name(path: Path) -> bool:
    """Whether an output path names a folder of PNGs rather than a video file."""
    return path.suffix == "" or path.is_dir()


def plan_video_outputs(
    src: Path,
    kinds: Sequence[str],
    *,
    output: str | os.PathLike | None,
    output_dir: str | os.PathLike | None,
    output_format: str,
    transparent: bool,
    overwrite: bool,
    encoder: EncoderOptions = EncoderOptions(),
    size: tuple[int, int] | None = None,
    inputs: Sequence[tuple[str, Path]] = (),
) -> list[OutputFile]:
    """Where each output goes, checked before any work: containers that fit, nothing overwritten by accident.

    With `output_dir`: ``DIR/com.mp4``, ``DIR/pha.mp4``... (a transparent composite: ``com.webm``), or
    ``DIR/com/``... with ``image_sequences``. With `output`: the composite's file (its extension picks
    the container; no extension means a folder of PNGs) and the others beside it in the same container, as
    ``NAME_pha.EXT``...
    With neither: ``SRC_com.mp4``, ``SRC_pha.mp4``... beside the source. `size` (width, height), the
    frames' size when known, is the size a forced encoder is tried at (`choose_encoder`).

    Even with `overwrite`, an output is refused that is `src` or one of the other `inputs` ((what, path)
    pairs: the plate, the target background), and a PNG folder that holds one of them or anything but
    numbered frames (`check_frame_folder`): replacing it would delete what is in it.
    """
    if output_format not in ("video", "image_sequences"):
        raise BgmatteError(f"output format {output_format!r} is not supported: use video or image_sequences")
    if output is not None and output_dir is not None:
        raise BgmatteError("give either an output file (-o) or an output folder (--output-dir), not both")
    sequences = output_format == "image_sequences"
    plans: list[OutputFile] = []
    if output_dir is not None:
        folder = Path(output_dir)
        if folder.exists() and not folder.is_dir():
            raise BgmatteError(f"{folder}: is a file, not a folder (for --output-dir)")
        for kind in kinds:
            alpha = kind == "com" and transparent
            if sequences:
                plans.append(OutputFile(kind, folder / kind, True, alpha))
            else:
                suffix = ".webm" if alpha else ".mp4"
                if alpha:
                    logger.info("the transparent composite goes to %s (MP4 cannot keep transparency)", folder / "com.webm")
                plans.append(OutputFile(kind, folder / f"{kind}{suffix}", False, alpha))
    else:
        if output is not None:
            base = Path(output)
            sequence = _sequence_name(base)
            if sequences and not sequence:
                raise BgmatteError(f"{base}: image_sequences output needs a folder name, not a file with an extension")
            if not sequence and base.suffix.lower() not in OUTPUT_CONTAINERS:
                raise BgmatteError(f"{base}: cannot write video with extension {base.suffix}; use .mp4, .mov, .mkv "
                                   "or .webm, or a name without extension for a folder of PNGs")
        else:
            sequence = sequences
            suffix = "" if sequence else ".webm" if transparent else ".mp4"
            base = src.with_name(f"{src.stem}_com{suffix}")
        for kind in kinds:
            if kind == "com":
                path = base
            elif output is None:
                path = src.with_name(f"{src.stem}_{kind}{'' if sequence else '.mp4'}")
            else:
                path = base.with_name(f"{base.stem if not sequence else base.name}_{kind}{'' if sequence else base.suffix}")
            plans.append(OutputFile(kind, path, sequence, kind == "com" and transparent))
    seen: dict[Path, str] = {}
    for index, plan in enumerate(plans):
        resolved = plan.path.resolve()
        if resolved == src.resolve():
            raise BgmatteError(f"{plan.path}: the {plan.kind} output would overwrite the input video")
        if resolved in seen:
            raise BgmatteError(f"{plan.path}: both the {seen[resolved]} and the {plan.kind} outputs would go there")
        seen[resolved] = plan.kind
        if not plan.folder:
            # Refuses .mp4 with transparency, unknown containers, and a forced encoder that does not work there.
            choice = choose_encoder(plan.path, alpha=plan.alpha, options=encoder, size=size)
            plans[index] = replace(plan, encoder=choice)
    everything = [("input video", src), *inputs]
    refuse_overwriting_inputs([plan.path for plan in plans], everything, advice="choose another output")
    for plan in plans:
        if plan.folder:
            _refuse_holding_inputs(plan.path, everything)
        refuse_existing(plan.path, overwrite)
        if plan.folder:
            check_frame_folder(plan.path)
    return plans


CRF_ENCODERS = frozenset({"libx264", "libvpx-vp9"})
"""The encoders that take `EncoderOptions.crf` (--crf); x264 alone takes a preset (--preset)."""


def warn_unused_encoder_options(plans: Sequence[OutputFile], options: EncoderOptions) -> None:
    """Warn, naming the file, about a crf or preset asked for that an output's encoder does not take (ProRes,
    FFV1, a forced encoder; VP9 has no preset): it was dropped without a word, so ``--crf 10`` into a .mov
    with transparency looked like a choice of quality that it never was."""
    for plan in plans:
        if plan.encoder is None:
            continue
        codec = plan.encoder.codec
        if options.crf is not None and codec not in CRF_ENCODERS:
            logger.warning("%s: --crf %d does nothing for %s (only H.264 and VP9 take a crf)", plan.path,
                           options.crf, codec)
        if options.preset is not None and codec != "libx264":
            logger.warning("%s: --preset %s does nothing for %s (it is x264's)", plan.path, options.preset, codec)


def _refuse_holding_inputs(folder: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse a PNG folder output that holds one of the `inputs` ((what, path) pairs), at any depth or through a
    link: replacing the folder would delete it."""
    place = folder.resolve()
    for what, path in inputs:
        if place in Path(path).resolve().parents:
            raise BgmatteError(f"{folder}: this output folder holds the {what} {path}, which replacing it would "
                               "delete: choose another output")


def _open_writer(plan: OutputFile, *, fps: Fraction | None, audio_from: Path | None, overwrite: bool,
                 encoder: EncoderOptions, frame_count: int | None, niceness: int,
                 display: Display | None = None, audio_start: float = 0.0) -> VideoWriter | ImageSequenceWriter:
    """The writer for one output; `audio_start` is where the audio of a span starts (`VideoReader.offset`)."""
    if plan.folder:
        return ImageSequenceWriter(plan.path, overwrite=overwrite, digits=max(4, len(str(frame_count or 0))),
                                   niceness=niceness)
    return VideoWriter(plan.path, fps=fps or 30, alpha=plan.alpha, audio_from=audio_from if plan.kind == "com" else None,
                       audio_start=audio_start, overwrite=overwrite, options=encoder, choice=plan.encoder,
                       display=display, niceness=niceness)


# ------------------------------------------------------------------------------------------- the loop


_END = object()
_POLL_S = 0.1


class _Channel:
    """A bounded queue between two stages whose waits give up once `abandoned()` says nobody will answer."""

    def __init__(self, size: int, abandoned: Callable[[], bool]):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._abandoned = abandoned

    def put(self, item: object) -> bool:
        while True:
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if self._abandoned():
                    return False

    def get(self) -> object:
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._abandoned():
                    return _END


@contextmanager
def opencv_threads(count: int) -> Iterator[None]:
    """Run the block with OpenCV's thread pool set to ``count`` threads, restored afterwards."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def model_input(images: np.ndarray) -> Tensor:
    """uint8 (B, H, W, 3) RGB to floats in [0, 1] stored (B, 3, H, W) contiguous, handed over as a (B, H, W, 3) view.

    `Predictor` takes channels-last frames and permutes them; given this view, its permute gives
    back the contiguous layout the model computes in, so it neither converts nor copies again. The
    conversion runs plane by plane in OpenCV and numpy, which keeps it off torch's thread pool.
    """
    batch, height, width, _ = images.shape
    out = np.empty((batch, 3, height, width), np.float32)
    scale = np.float32(1 / 255)
    for index in range(batch):
        for channel, plane in enumerate(cv2.split(images[index])):
            target = out[index, channel]
            np.copyto(target, plane, casting="unsafe")  # a plain widening copy, then a float multiply in place:
            target *= scale  # both vectorise, unlike numpy's mixed uint8 * float32 loop
    return torch.from_numpy(out).permute(0, 2, 3, 1)


class _ModelInputs:
    """Prepares what the model is given, on the preparing thread: on the CPU, float tensors (`model_input`),
    the plate converted once when it never changes; for a GPU, the uint8 frames, which `Predictor`
    moves and converts there."""

    def __init__(self, device: torch.device, static_plate: np.ndarray | None):
        self.convert = device.type == "cpu"
        self._plate = model_input(static_plate[None]) if self.convert and static_plate is not None else None

    def __call__(self, src: np.ndarray, bgr: list[np.ndarray]) -> tuple[np.ndarray | Tensor, np.ndarray | Tensor]:
        if not self.convert:
            return src, (bgr[0][None] if len(bgr) == 1 else np.stack(bgr))
        if self._plate is not None:
            return model_input(src), self._plate.expand(len(src), -1, -1, -1)
        return model_input(src), model_input(bgr[0][None] if len(bgr) == 1 else np.stack(bgr))


@dataclass
class _Batch:
    """Frames on their way through the loop: the pixels, what the model is given, and the timestamps."""

    src: np.ndarray  # (B, H, W, 3) uint8
    src_input: np.ndarray | Tensor
    bgr_input: np.ndarray | Tensor
    stamps: list[tuple[int | None, Fraction | None, int | None]] = field(default_factory=list)  # pts, base, duration
    times: list[float] = field(default_factory=list)  # seconds from the clip's first frame

    @classmethod
    def of(cls, pending: list[tuple[np.ndarray, np.ndarray, Frame, float]], inputs: _ModelInputs) -> _Batch:
        src = pending[0][0][None] if len(pending) == 1 else np.stack([item[0] for item in pending])
        src_input, bgr_input = inputs(src, [item[1] for item in pending])
        return cls(src, src_input, bgr_input, [(item[2].pts, item[2].time_base, item[2].duration) for item in pending],
                   [item[3] for item in pending])

    def __len__(self) -> int:
        return len(self.stamps)


def _run_loop(
    reader: VideoReader,
    plates: _Plates,
    predictor: Predictor,
    *,
    size: tuple[int, int],
    batch_size: int,
    on_matte: Callable[[_Batch, Matte], None],
    niceness: int = 0,
) -> None:
    """Prepare batches on one thread, matte them on this one, finish them (`on_matte`) on a third; the
    preparing and finishing threads run ``niceness`` lower than this one.

    On KeyboardInterrupt the reading stops, the batches already matted are still finished, and the
    interrupt goes on to the caller. An error in any stage stops all three and is raised here.
    """
    inputs = _ModelInputs(predictor.device, plates.static)
    errors: list[BaseException] = []
    failed = threading.Event()  # every stage stops
    stop_input = threading.Event()  # no more batches: the model stage has stopped taking them
    batches = _Channel(_QUEUE_BATCHES, lambda: failed.is_set() or stop_input.is_set())
    mattes = _Channel(_QUEUE_BATCHES, failed.is_set)

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        failed.set()

    def prepare() -> None:
        lower_thread_priority(niceness)
        try:
            pending: list[tuple[np.ndarray, np.ndarray, Frame, float]] = []
            resized = False  # warned that the frames changed size in mid-clip
            for frame in reader:
                if stop_input.is_set() or failed.is_set():
                    return
                if frame.image.shape[1::-1] != reader.size and not resized:
                    resized = True
                    logger.warning("%s: the frames change size at frame %d (%dx%d; the clip began %dx%d): they are "
                                   "scaled to %dx%d", reader.path, frame.index + 1, *frame.image.shape[1::-1],
                                   *reader.size, *size)
                image = resize_image(frame.image, *size)
                pending.append((image, plates.next(image, frame.seconds), frame, frame.seconds))
                if len(pending) == batch_size:
                    if not batches.put(_Batch.of(pending, inputs)):
                        return
                    pending = []
            if pending:
                batches.put(_Batch.of(pending, inputs))
        except BaseException as exc:  # noqa: BLE001 - handed to the model stage, which raises it
            fail(exc)
        finally:
            batches.put(_END)

    def finish() -> None:
        lower_thread_priority(niceness)
        try:
            while True:
                item = mattes.get()
                if item is _END:
                    return
                on_matte(*item)
        except BaseException as exc:  # noqa: BLE001 - raised by the model stage
            fail(exc)

    preparer = threading.Thread(target=prepare, name="bgmatte-prepare", daemon=True)
    finisher = threading.Thread(target=finish, name="bgmatte-finish", daemon=True)
    preparer.start()
    finisher.start()
    try:
        while True:
            batch = batches.get()
            if batch is _END:
                break
            # uint8, or floats `model_input` scaled from uint8 (in range by construction): no pass over them
            matte = predictor(batch.src_input, batch.bgr_input, check_range=False)
            if not mattes.put((batch, matte)):
                break
    except BaseException as exc:
        stop_input.set()
        if not isinstance(exc, KeyboardInterrupt):
            failed.set()
        raise
    finally:
        stop_input.set()
        mattes.put(_END)
        finisher.join()
        preparer.join()
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class VideoResult:
    """What `convert_video` wrote: each output's path, the frame count and the time taken."""

    outputs: dict[str, Path]
    frames: int
    seconds: float

    @property
    def fps(self) -> float:
        """End-to-end frames per second, model loading and plate estimation included."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def convert_video(
    src: str | os.PathLike,
    bgr: str | os.PathLike | np.ndarray,
    *,
    output: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    outputs: Sequence[str] = ("com",),
    output_format: Literal["video", "image_sequences"] = "video",
    target_bgr: str | os.PathLike | TargetBackground | None = None,
    resize: tuple[int, int] | None = None,
    align: bool = False,
    match_exposure: bool = False,
    model: ModelLike = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    encoder: EncoderOptions = EncoderOptions(),
    start: float = 0.0,
    duration: float | None = None,
) -> VideoResult:
    """Matte a video against its plate and write the composite and any of pha, fgr, err, ref; one call does it all.

    Arguments:
        src: the video. Every frame goes into every output, upright, with its own timestamp (variable
            frame rate kept); the audio is carried into the composite.
        bgr: the plate: an image (resized to the video, with a warning, if its size differs; stretched when its
            aspect ratio does, which only `align` undoes), a video
            (frame for frame, or by time when its frame rate is another; when it is shorter, its last frame is
            held, with a warning; the clip itself, however spelled, is refused), ``"auto"``
            (estimated from frames sampled over a first pass through the clip, one shot in which the subject
            moves enough to show the background behind it; with `align`, registered onto one another first), or
            an (H, W, 3) array.
        output: the composite's file; its extension picks the container (a name without extension is
            a folder of PNGs). The other outputs go beside it with its extension: ``NAME_pha.EXT`` and so on.
        output_dir: instead of `output`, the reference's layout: ``com.mp4``, ``pha.mp4``... in it,
            or one folder of PNGs per output with ``output_format="image_sequences"``.
        outputs: any of ``com``, ``pha``, ``fgr``, ``err``, ``ref`` (a sequence of them, or one as a string).
        target_bgr: what the composite goes over: a colour name or hex, an image, a video (looped; at its own
            speed when its frame rate is another),
            ``blur``, or ``transparent`` (RGBA: .webm VP9, .mov ProRes 4444 or PNGs; .mp4 is refused).
            None: the reference's green for video files, transparent for PNG folders.
        resize: (width, height) to resize the frames (and plate) to before matting. The video outputs
            keep the source's display aspect ratio: where the new size has another, their pixels are
            tagged non-square, as an anamorphic source's are.
        align: align the plate to each frame (feature matching and a homography), for handheld shots;
            a frame where that fails uses the unaligned plate, with a warning.
        match_exposure: correct exposure and white-balance drift of the plate on each frame, fitted on
            pixels the latest matte says are background.
        model: a checkpoint path, None (the default model), `ModelOptions` (to choose the device,
            precision and settings), or a model ready to run: a module in eval mode (in its own
            precision; a ``MattingBase`` has no ``ref`` output), what ``load_model(...,
            backend="onnxruntime")`` returns, or a `Predictor`.
        batch_size: frames per model call (default 4 on a GPU, 1 on the CPU).
        overwrite: replace existing outputs instead of refusing; never an input, nor a PNG folder that holds
            anything but numbered frames (`plan_video_outputs`).
        progress: show a progress bar (with fps and ETA) on stderr when it is a terminal.
        encoder: video encoder choices.
        start, duration: matte only the frames whose time is in [start, start + duration) seconds from the
            video's first frame (duration None: to the end), to preview part of a long clip. The outputs are
            a clip of their own: they start at 0 and carry the source's audio from the same moment (copied
            audio from the packet under the start, trimmed there in MP4 and QuickTime, up to a packet early in
            Matroska: 20 ms for AAC, 100 ms for FLAC). An automatic plate is estimated from
            the span alone; a plate video is read from the same start, so that it pairs with the frames it
            pairs with in a whole run (one that ends before the start is refused); a target video still plays
            from its beginning. A start at or past the end of the video is refused.

    Returns a `VideoResult`. Outputs are written under temporary names and renamed when complete;
    after Ctrl-C, or an input that ends early or is damaged, they hold every frame matted so far
    and play, and the KeyboardInterrupt or a `BgmatteError` follows.
    """
    started = time.perf_counter()
    src = Path(src)
    kinds = check_outputs(outputs)
    check_model(model, kinds)
    target_bgr = _target_background(target_bgr)
    if batch_size is not None and (not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise BgmatteError(f"batch size must be a whole number, 1 or more, not {batch_size!r}")
    resize = _check_resize(resize, src)
    check_span(start, duration)
    auto_plate = isinstance(bgr, str) and bgr.strip().lower() == "auto"
    if not auto_plate and not isinstance(bgr, np.ndarray):
        _refuse_own_plates([(src, Path(bgr))], what="clip")
    with ExitStack() as stack:
        on_cpu = model_device(model).type == "cpu"
        # With the model on the CPU, everything else runs at a lower priority, in the gaps of its work.
        niceness = HELPER_NICENESS if on_cpu else 0
        reader = stack.enter_context(VideoReader(src, niceness=niceness, start=start, duration=duration))
        if reader.still:  # a one-frame "video" from a photo: the wrong file, or meant for matte_images
            raise BgmatteError(f"{src}: a still image, not a video: matte photos with `bgmatte image` "
                               "(matte_images in Python)")
        native = reader.size
        size = resize or native
        _check_frames_fit(model, *size)
        if auto_plate:
            _check_plate_frames(src, start=start, duration=duration)
        image, plate_video = (None, None) if auto_plate else _open_plate(bgr, start=start)
        if plate_video is not None:
            stack.callback(plate_video.close)
        picture = _read_target(target_bgr) if target_bgr is not None else None
        sequences = output_format == "image_sequences" or (output is not None and _sequence_name(Path(output)))
        if target_bgr is None:
            target_bgr = TargetBackground("transparent") if sequences else TargetBackground("colour", colour=REFERENCE_GREEN)
        asked = encoder  # the caller's own choices, before the CPU defaults below
        if on_cpu:
            # The model keeps every core busy, so whatever else runs takes time from it: each output gets one
            # encoding thread (no cost of synchronising several) and x264's fastest preset (at 1080p about
            # 15 ms of CPU a frame against 25 to 40 for veryfast; the files are larger at the same quality), and
            # OpenCV works on the calling thread only, so that it never interrupts both of the model's threads.
            # Settled before the plan, so that its try of a forced encoder is the only one, with these settings.
            encoder = replace(encoder, threads=encoder.threads or 1, preset=encoder.preset or "ultrafast")
            stack.enter_context(opencv_threads(1))
        inputs = [] if auto_plate or isinstance(bgr, np.ndarray) else [("plate", Path(bgr))]
        if target_bgr.kind in ("image", "video"):
            inputs.append(("target background", Path(target_bgr.path)))
        plans = plan_video_outputs(src, kinds, output=output, output_dir=output_dir, output_format=output_format,
                                   transparent=target_bgr.kind == "transparent", overwrite=overwrite, encoder=encoder,
                                   size=size, inputs=inputs)
        warn_unused_encoder_options(plans, asked)
        if reader.audio is not None and any(plan.folder for plan in plans if plan.kind == "com"):
            logger.warning("%s: the clip's audio is not kept in a folder of PNGs (%s); write the composite to a video "
                           "file to keep it", src, next(plan.path for plan in plans if plan.kind == "com"))
        predictor = load_predictor(model, *size)
        if batch_size is None:
            batch_size = 4 if predictor.device.type == "cuda" else 1
        targets = stack.enter_context(TargetFrames(target_bgr, *size, device=predictor.device, picture=picture,
                                                   fps=reader.fps, frames=reader.frame_count,
                                                   variable=reader.variable_rate))
        if auto_plate:
            image = _estimate_plate(src, size, progress, start=start, duration=duration, align=align,
                                    match_exposure=match_exposure)
        # An automatic plate is named by its clip (in alignment warnings), and is of the working size already.
        plates = _Plates(image, plate_video, *size, native=size if auto_plate else native,
                         name=str(src) if auto_plate else None if isinstance(bgr, np.ndarray) else str(bgr),
                         align=align, exposure=ExposureFeedback(src) if match_exposure else None, fps=reader.fps,
                         frames=_frames_to_end(reader), clip_start=reader.span_start,
                         variable=reader.variable_rate)
        writers = {
            plan.kind: stack.enter_context(_open_writer(plan, fps=reader.fps, audio_from=src, overwrite=overwrite,
                                                        encoder=encoder, frame_count=reader.frame_count,
                                                        niceness=niceness, display=reader.display_at(*size),
                                                        audio_start=reader.offset))
            for plan in plans
        }
        from tqdm import tqdm

        bar = stack.enter_context(tqdm(total=reader.frame_count, desc=src.name, unit="frame", file=sys.stderr,
                                       disable=None if progress else True, dynamic_ncols=True))
        written = 0

        def on_matte(batch: _Batch, matte: Matte) -> None:
            nonlocal written
            backdrop = targets.take(len(batch), batch.times)
            frames = render_outputs(matte, kinds, target=target_bgr, backdrop=backdrop, src=batch.src)
            for index, (pts, time_base, duration) in enumerate(batch.stamps):
                failure: BaseException | None = None
                taken = False  # by some output: none did when every one failed (their files could not start)
                for kind, writer in writers.items():  # a writer that fails still lets the others take the frame
                    image = frames[kind][index]
                    try:
                        if isinstance(writer, VideoWriter):
                            writer.write(image, pts, time_base, duration)
                        else:
                            writer.write(image)
                        taken = True
                    except Exception as exc:  # noqa: BLE001 - raised once this frame is in every other output
                        failure = failure or exc
                if taken:
                    written += 1  # every output still kept holds this frame
                    bar.update(1)
                if failure is not None:
                    raise failure
            if plates.exposure is not None:
                plates.exposure.update(matte.pha[-1])

        try:
            _run_loop(reader, plates, predictor, size=size, batch_size=batch_size, on_matte=on_matte,
                      niceness=niceness)
        except KeyboardInterrupt:  # SIGTERM and SIGHUP too (`Terminated`)
            plates.report(stopped=True)
            logger.warning("interrupted: the outputs hold %s", _frames_held(written, "the first"))
            raise
        except Exception:
            if written and not _warn_not_kept(writers, plans, written, _frames_held(written, "the first"),
                                              "stopped by an error: "):
                logger.warning("stopped by an error: the outputs hold %s", _frames_held(written, "the first"))
            raise
        finally:
            plates.close()
        plates.report()
        error = reader.error
        _close_outputs(writers, plans, written, _frames_held(written, "the first") if error is not None
                       else _all_frames(written))
    if error is not None:
        raise BgmatteError(f"{error}; the outputs hold {_frames_held(written, 'those')}")
    return VideoResult({plan.kind: plan.path for plan in plans}, written, time.perf_counter() - started)


def _warn_not_kept(writers: dict[str, VideoWriter | ImageSequenceWriter], plans: Sequence[OutputFile], written: int,
                   held: str, prefix: str = "") -> bool:
    """Warn which video outputs are not kept because their encoder failed, and what the others hold (`held`, in
    words); returns whether it did. Nothing is said when no frame was written: no output exists then."""
    broken = [writer.path for writer in writers.values() if isinstance(writer, VideoWriter) and writer.failed]
    if not (broken and written):
        return False
    kept = [plan.path for plan in plans if plan.path not in broken]
    failed = "is not kept (its encoder failed)" if len(broken) == 1 else "are not kept (their encoders failed)"
    logger.warning("%s%s %s%s", prefix, _and_list(broken), failed,
                   f"; {_and_list(kept)} {'holds' if len(kept) == 1 else 'hold'} {held}" if kept else "")
    return True


def _close_outputs(writers: dict[str, VideoWriter | ImageSequenceWriter], plans: Sequence[OutputFile], written: int,
                   held: str) -> None:
    """Finish every output after the loop, each even when another fails, and raise the first failure once the user
    has been told which files are not kept: an encoder that fails only now (its last frames, the trailer) leaves
    its file out as one failing mid-run does, and is reported the same way. A stop (Ctrl-C, a signal) while one is
    finished goes on at once: the exit stack finishes the rest."""
    failure: BgmatteError | None = None
    for writer in writers.values():
        try:
            writer.close()
        except BgmatteError as exc:
            failure = failure or exc
    if failure is not None:
        _warn_not_kept(writers, plans, written, held)
        raise failure


def _all_frames(count: int) -> str:
    """What the outputs of a whole run hold, in words: "no frame", "the one frame", "all 12 frames"."""
    return "no frame" if count == 0 else "the one frame" if count == 1 else f"all {count} frames"


def _and_list(paths: Sequence[Path]) -> str:
    """Paths as words: ``a.mp4``, ``a.mp4 and b.mp4``, ``a.mp4, b.mp4 and c.mp4``."""
    names = [str(path) for path in paths]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _frames_held(count: int, which: str) -> str:
    """What the outputs of a run cut short hold, in words that fit the count: "no frame", "the first frame" or
    "that frame" for one, "the first 5 frames" or "those 5 frames" (`which` is "the first" or "those")."""
    if count == 0:
        return "no frame"
    if count == 1:
        return "the first frame" if which == "the first" else "that frame"
    return f"{which} {count} frames"


def _target_background(target_bgr: str | os.PathLike | TargetBackground | None) -> TargetBackground | None:
    """`target_bgr` as a `TargetBackground`: text (and a path) read by `parse_target_background`, anything else
    refused in one line."""
    if isinstance(target_bgr, (str, os.PathLike)):
        return parse_target_background(os.fspath(target_bgr))
    if target_bgr is not None and not isinstance(target_bgr, TargetBackground):
        raise BgmatteError("target_bgr takes a colour name, #RRGGBB, 'R,G,B' (0-255), 'blur', 'transparent', an "
                           f"image or video path, or a TargetBackground, not {type(target_bgr).__name__}")
    return target_bgr


def _check_resize(resize: Sequence[int] | None, src: Path) -> tuple[int, int] | None:
    """`resize` as (width, height), refused when a side is below 1 or the frames would exceed the pixel limit
    that every input is held to."""
    if resize is None:
        return None
    if len(resize) != 2 or any(int(side) < 1 for side in resize):
        raise BgmatteError(f"resize needs a width and a height of at least 1 pixel, not {tuple(resize)}")
    width, height = int(resize[0]), int(resize[1])
    if width * height > DEFAULT_MAX_PIXELS:
        raise BgmatteError(f"{src}: cannot resize to {width}x{height}: "
                           f"{megapixels_above(width * height, DEFAULT_MAX_PIXELS)}")
    return width, height


# --------------------------------------------------------------------------------------------- images


def collect_images(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named, with folders expanded to the images directly in them (natural order)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[Path] = []
    given: dict[tuple[int, int], str] = {}  # how each file was given, to name one given twice
    for source in sources:
        path = Path(source)
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise BgmatteError(f"{path}: no images in this folder ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            _warn_left_out(path, images)
            for image in images:
                _refuse_given_twice(image, f"in the folder {path}", given)
            found.extend(images)
        elif not path.exists():
            raise BgmatteError(f"{path}: no such file or folder")
        else:
            _refuse_given_twice(path, f"as {path}", given)
            found.append(path)
    if not found:
        raise BgmatteError("no input images given")
    by_stem(found, "their outputs would collide")
    return found


def _refuse_given_twice(path: Path, how: str, given: dict[tuple[int, int], str]) -> None:
    """Refuse an image file already among those `given` (by identity, however spelled), saying both ways it was
    given; else add it. Left to `by_stem`, it would be "two images named" one name, which reads as two files."""
    identity = file_identity(path)
    if identity is None:
        return
    if identity in given:
        raise BgmatteError(f"{path}: this image is given twice ({given[identity]} and {how}); name each image once")
    given[identity] = how


def _refuse_own_plates(pairs: Sequence[tuple[Path, Path]], what: str = "image") -> None:
    """Refuse a source paired with itself as its plate, however spelled (``--bgr`` naming the image or its folder,
    or the clip through another path or a link; `what` says which), or with a copy of it (the same bytes): it would
    be matted without a word against a plate that matches every pixel, an empty cutout."""
    for source, plate in pairs:
        identity = file_identity(source)
        if identity is None:  # missing: its reader names it
            continue
        if identity == file_identity(plate):
            found = f"that {what} itself"
        elif same_bytes(source, plate):
            found = f"a copy of that {what} (the same bytes)"
        else:
            continue
        raise BgmatteError(f"{plate}: the plate of {source} is {found}; a plate is a shot of the background without "
                           "the subject")


def _warn_left_out(folder: Path, images: Sequence[Path]) -> None:
    """Say which files of a folder are not taken as images (HEIC photos, videos, notes), so that none goes missing
    unnoticed; hidden files (.DS_Store) stay unmentioned."""
    taken = set(images)
    others = sorted(entry.name for entry in folder.iterdir()
                    if entry not in taken and not entry.name.startswith(".") and entry.is_file())
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        logger.warning("%s: %d file%s left out, not of a kind read as images (%s): %s", folder, len(others),
                       "s" if len(others) > 1 else "", ", ".join(sorted(IMAGE_EXTENSIONS)), shown)


def _make_output_folders(folders: Sequence[Path]) -> list[Path]:
    """Create the output folders, or raise a one-line error naming the path that cannot be one.

    Done before the model loads, so that a bad -o fails at once. Returns the folders that did not exist
    before (deepest first), for a run that fails to remove again if it left them empty.
    """
    created: list[Path] = []
    for folder in folders:
        new = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise BgmatteError(f"{folder}: is a file, not a folder (for the outputs)") from None
        except NotADirectoryError:
            blocker = next((path for path in folder.parents if path.exists() and not path.is_dir()), None)
            because = f"{blocker} is a file" if blocker is not None else "a part of the path is not a folder"
            raise BgmatteError(f"{folder}: cannot create this output folder: {because}") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename and Path(exc.filename) != folder else ""
            raise BgmatteError(f"{folder}: cannot create this output folder ({where}{exc.strerror or exc})") from None
        created.extend(path for path in new if path not in created)
    return sorted(created, key=lambda path: len(path.parts), reverse=True)


def _remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove those of `folders` that are empty (deepest first), leaving any that hold files."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def _size_options(model: ModelLike) -> ModelOptions | None:
    """The options `load_predictor` reads when it loads the model itself; None when `model` is given ready."""
    if not _loads_itself(model):
        return None
    return model if isinstance(model, ModelOptions) else ModelOptions(checkpoint=model)


def _check_frames_fit(model: ModelLike, width: int, height: int) -> None:
    """Refuse frames too small for the backbone scale a model that loads itself will get, before it loads and before
    an automatic plate's pass: `Predictor` refuses them only at the first frame, after both (a model given ready is
    refused there at no cost). The base network alone (mattingbase) runs at full resolution."""
    options = _size_options(model)
    if options is None or options.model_type == "mattingbase":
        return
    check_frame_size(width, height, options.backbone_scale if options.backbone_scale is not None
                     else settings_for_size(width, height)[0])


def _fit_to_size(predictor: Predictor, options: ModelOptions | None, width: int, height: int) -> None:
    """Give the loaded network the paper's backbone scale and refined pixels for this image's size, where
    `options` leave them open: one set of weights serves a folder of mixed sizes, each image at its own."""
    from bgmatte.model.matting import MattingRefine

    network = getattr(predictor, "model", None)
    if options is None or not isinstance(network, MattingRefine):  # FastMattingRefine is one; mattingbase has none
        return
    scale, pixels = settings_for_size(width, height)
    current = network.options
    network.configure(replace(
        current,
        backbone_scale=scale if options.backbone_scale is None else current.backbone_scale,
        refine_sample_pixels=pixels if options.refine_sample_pixels is None else current.refine_sample_pixels,
    ))


def matte_images(
    src: str | os.PathLike | Sequence[str | os.PathLike],
    bgr: str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    outputs: Sequence[str] = ("com",),
    target_bgr: str | os.PathLike | TargetBackground | None = None,
    align: bool = False,
    match_exposure: bool = False,
    model: ModelLike = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    progress: bool = True,
) -> dict[str, list[Path]]:
    """Matte still images against their plates and write ``OUTPUT_DIR/<output>/<name>.png`` for each output.

    Arguments:
        src: image files and/or folders of images.
        bgr: one plate for every image, or a folder of plates matched to the images by file name.
            A plate whose size differs is resized to its image, with a warning (stretched when its aspect
            ratio differs, which only `align` undoes).
        output_dir: where the ``com``, ``pha``, ``fgr``, ``err`` and ``ref`` folders go.
        outputs: which of them to write (a sequence, or one as a string).
        target_bgr: None (default) makes ``com`` an RGBA cutout; otherwise a colour, an image or
            ``blur`` to composite over.
        align: align each plate to its image (homography); falls back to the plate as it is.
        match_exposure: fit the plate's exposure and white balance on the background of a first
            matte, then matte again with the corrected plate.
        model, overwrite, progress: as in `convert_video`.
        skip_existing: leave existing outputs as they are and write only the missing ones (an image whose
            outputs all exist is not matted again): to finish a run that was stopped, or that met a bad file.

    A photo's RGB ICC profile is stored in its ``fgr`` and ``com`` PNGs, so that they show its colours, except in
    a composite over a target image of another profile (or of none). OpenCV reads it, with the pixels, from a
    JPEG, PNG or WebP photo; a TIFF's profile is not read, so its outputs are untagged.

    Returns each output's written files. Existing files are refused before any work, unless `overwrite` or
    `skip_existing`; an output that would replace one of the input images (a photo, a plate or the target)
    always is. A source image that cannot be read, or whose plate from a folder cannot, is left out and the others
    are matted; then a `bgmatte.errors.PartlyDone` (a `BgmatteError`) names every one left out, in one line, and
    carries the files written (`written`, as returned) and the images left out (`left_out`). A KeyboardInterrupt
    (Ctrl-C, or `Terminated`) goes on once the files queued are complete, with those written as its `written`.
    """
    if overwrite and skip_existing:
        raise BgmatteError("overwrite and skip_existing (--overwrite, --skip-existing) exclude each other: choose one")
    kinds = check_outputs(outputs)
    check_model(model, kinds)
    sources = collect_images(src)
    target_bgr = _target_background(target_bgr) or TargetBackground("transparent")
    if target_bgr.kind == "video":
        raise BgmatteError(f"{target_bgr.path}: a video target background needs a video; for images use a colour, "
                           "an image, blur or transparent")
    plate_path = Path(bgr)
    if str(bgr).strip().lower() == "auto":
        raise BgmatteError("an automatic plate (--bgr auto) needs a video; for images give a plate image or folder")
    if plate_path.is_dir():
        plate_files = list_images(plate_path)
        if not plate_files:
            raise BgmatteError(f"{plate_path}: no plates in this folder ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        _warn_left_out(plate_path, plate_files)
        pairs = match_by_stem(sources, plate_files)
    else:
        if not plate_path.exists():
            raise BgmatteError(f"{plate_path}: no such plate file or folder")
        pairs = [(source, plate_path) for source in sources]
    _refuse_own_plates(pairs)
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise BgmatteError(f"{folder}: is a file, not a folder (for the outputs)")
    destinations = {kind: [folder / kind / f"{source.stem}.png" for source in sources] for kind in kinds}
    plates = dict.fromkeys(plate for _, plate in pairs)  # one plate for many images, listed once
    inputs = [*(("source image", path) for path in sources), *(("plate", path) for path in plates)]
    if target_bgr.kind == "image":
        inputs.append(("target background", target_bgr.path))
    refuse_overwriting_inputs([path for paths in destinations.values() for path in paths], inputs)
    wanted: dict[Path, tuple[str, ...]] = {}  # the outputs each image still needs
    for index, source in enumerate(sources):
        missing = []
        for kind in kinds:
            path = destinations[kind][index]
            if path.is_dir():
                raise BgmatteError(f"{path}: is a folder, where this output image would go")
            if not skip_existing:
                refuse_existing(path, overwrite)
            if not (skip_existing and os.path.lexists(path)):
                missing.append(kind)
        wanted[source] = tuple(missing)
    done = [source for source in sources if not wanted[source]]
    if done:
        logger.info("%d of %d images have all their outputs already; they are left as they are", len(done),
                    len(sources))
    pairs = [(source, plate) for source, plate in pairs if wanted[source]]
    created = _make_output_folders([folder / kind for kind in kinds])
    try:
        return _matte_pairs(pairs, folder, wanted, target_bgr=target_bgr, align=align,
                            match_exposure=match_exposure, model=model, overwrite=overwrite, progress=progress)
    except BaseException:
        _remove_empty_folders(created)  # a run that wrote nothing leaves no empty folders behind
        raise


def _matte_pairs(pairs: Sequence[tuple[Path, Path]], folder: Path, wanted: dict[Path, tuple[str, ...]], *,
                 target_bgr: TargetBackground, align: bool, match_exposure: bool, model: ModelLike,
                 overwrite: bool, progress: bool) -> dict[str, list[Path]]:
    """The work of `matte_images` once its arguments are checked and its folders made: each (image, plate)
    pair matted, and the outputs it still needs (`wanted`) written to ``folder/<kind>/<name>.png``. A source image
    that cannot be read, or whose own plate cannot, is left out; the others go on, and a `PartlyDone` names them
    at the end, with what was written. A plate shared by every image is read first, before the model loads: one
    that cannot be stops the batch."""
    from tqdm import tqdm

    from bgmatte.predictor import NotEnoughMemory, is_out_of_memory

    options = _size_options(model)
    predictor: Predictor | None = None
    cached_plate: tuple[Path, np.ndarray] | None = None  # one plate file for many images is read once
    # An image target is read once too, and scaled again only when the size changes.
    picture, picture_profile = (_read_with_rgb_profile(target_bgr.path) if target_bgr.kind == "image"
                                else (None, None))
    backdrop: tuple[tuple[int, int], Tensor | None] | None = None  # at the last size: photos mostly share one
    kinds = [kind for kind in OUTPUT_KINDS if any(kind in needed for needed in wanted.values())]
    written: dict[str, list[Path]] = {kind: [] for kind in kinds}
    pending: list[tuple[str, Future]] = []
    unreadable: list[tuple[Path, str]] = []  # (source image, why it was left out)
    bad_plates = False  # some of those left out for their plate
    shared_plate = len({plate for _, plate in pairs}) == 1  # then a bad plate fails every image: read it first

    def collect(limit: int) -> None:
        while len(pending) > limit:
            kind, future = pending.pop(0)
            written[kind].append(future.result())

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="bgmatte-png") as pool, ExitStack() as stack:
        try:
            if shared_plate and pairs:  # read before the model loads: if it cannot be, nothing can be matted
                cached_plate = (pairs[0][1], read_image(pairs[0][1]))
            bar = stack.enter_context(tqdm(pairs, desc="images", unit="image", file=sys.stderr,
                                           disable=None if progress else True))
            for source, plate_file in bar:
                try:
                    image, profile = _read_with_rgb_profile(source)  # one decoding gives both
                except BgmatteError as exc:  # one bad photo in a folder costs itself, not the batch
                    if len(pairs) == 1:
                        raise
                    logger.debug("%s; left out", exc)
                    unreadable.append((source, str(exc)))
                    continue
                height, width = image.shape[:2]
                _check_frames_fit(model, width, height)  # the first image's before the model loads for it
                if predictor is None:
                    predictor = load_predictor(model, width, height)
                _fit_to_size(predictor, options, width, height)
                if cached_plate is None or cached_plate[0] != plate_file:
                    try:
                        cached_plate = (plate_file, read_image(plate_file))
                    except BgmatteError as exc:  # a plate by name costs its image, as a bad photo does
                        logger.debug("%s; left out", exc)
                        unreadable.append((source, f"{exc} (the plate of {source})"))
                        bad_plates = True
                        continue
                plate = cached_plate[1]
                if plate.shape[:2] != image.shape[:2]:
                    logger.warning("%s: the plate is %dx%d but %s is %dx%d; %s", plate_file, plate.shape[1],
                                   plate.shape[0], source.name, width, height,
                                   _resized_plate(plate.shape[1::-1], (width, height), align))
                    plate = resize_image(plate, width, height)
                if grey_against_colour(plate, image):
                    logger.warning("%s: the plate has no colour (greyscale) but %s has: its coloured background will "
                                   "matte as foreground; give the plate in colour", plate_file, source.name)
                if align:
                    plate = PlateAligner(plate, name=source).align(image)[0]
                try:
                    if backdrop is None or backdrop[0] != (width, height):
                        with TargetFrames(target_bgr, width, height, device=predictor.device, picture=picture) as target:
                            backdrop = ((width, height), target.take(1))
                    frames = _matte_one(predictor, image, plate, wanted[source], target_bgr, backdrop[1],
                                        match_exposure, source)
                except Exception as exc:
                    if not isinstance(exc, NotEnoughMemory) and not is_out_of_memory(exc):
                        raise
                    raise BgmatteError(
                        f"{source}: not enough memory to matte this {width}x{height} image on {predictor.device}: "
                        "scale it down, or try a smaller --backbone-scale or --refine-sample-pixels, or another "
                        "--device"
                    ) from None
                # The photo's colours are in its profile's colour space: fgr holds them, com too unless it is over
                # a target picture in another one.
                tagged = {"fgr"} if target_bgr.kind == "image" else {"fgr", "com"}
                if profile is not None and profile == picture_profile:
                    tagged.add("com")
                for kind in wanted[source]:
                    path = folder / kind / f"{source.stem}.png"
                    pending.append((kind, pool.submit(write_png, path, frames[kind][0], overwrite=overwrite,
                                                      icc_profile=profile if kind in tagged else None)))
                collect(8)  # a few images may wait for their PNG encoding; not the whole folder
            collect(0)
            if unreadable:
                # Every one is named, however many: the line is the only record of which inputs are missing.
                others = "the others were matted; " if len(unreadable) < len(pairs) else ""
                what = "images or their plates" if bad_plates else "images"
                raise PartlyDone(f"{len(unreadable)} of {len(pairs)} {what} could not be read and were left out "
                                 f"({'; '.join(reason for _, reason in unreadable)}); {others}repair or remove them, "
                                 "then run again with --skip-existing to add theirs",
                                 written, [source for source, _ in unreadable])
        except BaseException as stop:
            # Stopped early: the files already queued are finished (each is complete or absent).
            for kind, future in pending:
                try:
                    written[kind].append(future.result())
                except Exception as exc:  # noqa: BLE001 - the first error is the one on its way
                    logger.debug("%s", exc)
            if isinstance(stop, KeyboardInterrupt):  # Ctrl-C or a signal: the caller can still say what exists
                stop.written = written
            raise
    return written


def _read_with_rgb_profile(path: Path) -> tuple[np.ndarray, bytes | None]:
    """`read_image`'s pixels and, from the same decoding, the ICC profile embedded in the file if it describes RGB
    colours (a grey or CMYK one does not fit the RGB pixels bgmatte reads and writes)."""
    image, profile = read_image_and_profile(path)
    return image, profile if profile is not None and profile[16:20] == b"RGB " else None


def _matte_one(predictor: Predictor, image: np.ndarray, plate: np.ndarray, kinds: Sequence[str],
               target_bgr: TargetBackground, backdrop: Tensor | None, match_exposure: bool,
               name: Path | str = "") -> dict[str, np.ndarray]:
    """The requested outputs for one image against its plate (already of its size) and the target at its size
    (`TargetFrames.take`), as (1, H, W, C) arrays. `name`: the image's file, which a warning names."""
    if match_exposure:
        # A first fit keeps the subject out by rejecting outliers; the matte it allows
        # tells the second fit which pixels are background.
        fit = fit_exposure(plate, image, warn=False)
        first = fit.apply(plate)
        foreground = (predictor(image, first).pha[0, 0] >= 0.05).cpu().numpy()
        if not foreground.all():
            fit = fit_exposure(plate, image, foreground, warn=False)
            plate = fit.apply(plate)
        else:
            plate = first
        if fit.skipped:
            logger.warning("%s: exposure matching skipped (%s); the plate is used as it is", name, fit.skipped)
    matte = predictor(image, plate)
    return render_outputs(matte, kinds, target=target_bgr, backdrop=backdrop, src=image[None])


# ------------------------------------------------------------------------------------- measuring speed


@dataclass(frozen=True)
class PipelineSpeed:
    """Model-only and end-to-end throughput at the same size, batch size and model, from one run."""

    width: int
    height: int
    frames: int
    batch_size: int
    outputs: tuple[str, ...]
    threads: int  # torch's CPU threads during the measurement
    model_fps: float  # the model alone, on frames already decoded and on its device
    pipeline_fps: float  # convert_video from the file to the encoded outputs
    model_cpu_fps: float  # the same per second of CPU time used by this process (all its threads)
    pipeline_cpu_fps: float

    @property
    def ratio(self) -> float:
        """End-to-end throughput as a fraction of the model's (wall clock)."""
        return self.pipeline_fps / self.model_fps if self.model_fps > 0 else 0.0

    @property
    def cpu_ratio(self) -> float:
        """The same in CPU time: what the ratio becomes when every core is busy, and little moved by other load."""
        return self.pipeline_cpu_fps / self.model_cpu_fps if self.model_cpu_fps > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON, the ratios included."""
        return {**{name: getattr(self, name) for name in self.__dataclass_fields__}, "outputs": list(self.outputs),
                "ratio": self.ratio, "cpu_ratio": self.cpu_ratio}


def _write_sample_clip(path: Path, plate: np.ndarray, frames: int, fps: int = 25) -> None:
    """A clip of the generated sample shot (a figure moving in front of `plate`), with a sine tone."""
    import av

    from bgmatte.sample import sample_frame

    height, width = plate.shape[:2]
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = container.add_stream("aac", rate=48000)
        sound.layout = "mono"
        first, _ = sample_frame(plate, 0.0)
        for index in range(frames):
            # Drawing the figure is slow at large sizes; shifting one drawing is enough to keep the coder busy.
            image = np.roll(first, 8 * index, axis=1)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = 48000 * frames // fps
        for start in range(0, samples, 1024):
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(start, start + 1024) / 48000)).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = 48000, start, Fraction(1, 48000)
            container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))


def measure_pipeline(
    model: ModelLike = None,
    *,
    width: int = 1280,
    height: int = 720,
    frames: int = 32,
    batch_size: int | None = None,
    outputs: Sequence[str] = ("com",),
    rounds: int = 2,
    threads: int | None = None,
    workdir: str | os.PathLike | None = None,
) -> PipelineSpeed:
    """Measure the model alone and `convert_video` end to end on the same generated clip, in one run.

    Model-only runs the model on the clip's frames already decoded and converted on its device;
    end-to-end decodes, mattes, composites and encodes the clip to files, audio included. The
    rounds alternate between the two and the best of each is kept, which discounts other load on
    a shared machine. `threads` sets torch's CPU threads for the measurement (restored after).
    """
    kinds = check_outputs(outputs)
    check_model(model, kinds)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(model, width, height, frames, batch_size, kinds, rounds, workdir)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(model: ModelLike, width: int, height: int, frames: int, batch_size: int | None, kinds: tuple[str, ...],
             rounds: int, workdir: str | os.PathLike | None) -> PipelineSpeed:
    from bgmatte.sample import sample_plate

    predictor = load_predictor(model, width, height)
    batch = batch_size or (4 if predictor.device.type == "cuda" else 1)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bgmatte-bench-") as folder:
        work = Path(folder)
        plate = sample_plate(width, height)
        clip, plate_file = work / "clip.mp4", work / "plate.png"
        _write_sample_clip(clip, plate, frames)
        write_png(plate_file, plate)
        with VideoReader(clip) as reader:
            decoded = [frame.image for frame in reader]
        device, dtype = predictor.device, predictor.dtype

        def tensor(images: np.ndarray) -> Tensor:  # contiguous (B, 3, H, W) on the device: the model's best case
            return model_input(images).permute(0, 3, 1, 2).to(device, dtype).contiguous()

        groups = [np.stack(decoded[start : start + batch]) for start in range(0, len(decoded), batch)]
        inputs = [(tensor(group), tensor(np.repeat(plate[None], len(group), 0))) for group in groups]

        def synchronize() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        with torch.inference_mode():
            predictor.model(*inputs[0])  # warm-up: folding, kernel selection
        synchronize()
        model_times: list[tuple[float, float]] = []  # (wall, CPU) seconds per round
        pipeline_times: list[tuple[float, float]] = []
        for attempt in range(max(1, rounds)):
            started, cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                for src_t, bgr_t in inputs:
                    predictor.model(src_t, bgr_t)
            synchronize()
            model_times.append((time.perf_counter() - started, time.process_time() - cpu))
            started, cpu = time.perf_counter(), time.process_time()
            convert_video(clip, plate_file, output_dir=work / f"out{attempt}", outputs=kinds, model=predictor,
                          batch_size=batch, progress=False)
            pipeline_times.append((time.perf_counter() - started, time.process_time() - cpu))
    count = len(decoded)
    best = lambda times, column: count / min(row[column] for row in times)  # noqa: E731
    return PipelineSpeed(width, height, count, batch, kinds, torch.get_num_threads(), best(model_times, 0),
                         best(pipeline_times, 0), best(model_times, 1), best(pipeline_times, 1))


def format_speed(speed: PipelineSpeed) -> str:
    """A small table of a `PipelineSpeed` for the terminal."""
    model_ms, pipeline_ms = 1000 / speed.model_fps, 1000 / speed.pipeline_fps
    return "\n".join([
        f"pipeline benchmark: {speed.width}x{speed.height}, batch {speed.batch_size}, {speed.threads} CPU threads, "
        f"outputs {' '.join(speed.outputs)}, {speed.frames} frames, best round of each",
        f"  model only   {speed.model_fps:7.2f} fps  {model_ms:8.1f} ms/frame",
        f"  end to end   {speed.pipeline_fps:7.2f} fps  {pipeline_ms:8.1f} ms/frame  "
        f"{100 * speed.ratio:5.1f}% of the model",
        f"  per CPU-second: model {speed.model_cpu_fps:.2f}, end to end {speed.pipeline_cpu_fps:.2f} frames "
        f"({100 * speed.cpu_ratio:.1f}%)",
    ])
