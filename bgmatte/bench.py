"""Benchmarks: the plain module and the fast path (or onnxruntime), timed interleaved in one run.

Each measurement is a function returning a ``Timing``; ``benchmark`` runs the model comparison.
``benchmark_pipeline`` times ``bgmatte video`` end to end against the model alone, with the model
built as ``benchmark`` builds it (same weights, backbone and plate solve).

Timing on a shared machine is noisy, so the candidates take turns (ABBA order, so that neither
always runs right after the other), each is summarised by its median, and the headline figure is
the ratio of the medians. Random weights serve: the work does not depend on the weights, except
for which patches the refiner picks; ``random_model`` scales its output heads so that the error
map is nowhere zero, so that the sampling mode always refines its whole budget.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch

from bgmatte.errors import BgmatteError
from bgmatte.model.build import BACKENDS, PRECISIONS, load_model, resolve_device
from bgmatte.model.matting import BACKBONES, MattingRefine, RefineOptions
from bgmatte.io.images import DEFAULT_MAX_PIXELS, megapixels_above
from bgmatte.predictor import NotEnoughMemory, check_frame_size, is_out_of_memory

if TYPE_CHECKING:  # pragma: no cover
    from bgmatte.pipeline import PipelineSpeed

RESOLUTIONS = {"hd": (1920, 1080), "4k": (3840, 2160), "720p": (1280, 720), "sd": (640, 480)}


@dataclass(frozen=True)
class BenchOptions:
    """What to benchmark.

    Arguments:
        backbone: resnet50, resnet101 or mobilenetv2; None: read from the checkpoint's weights, and
            mobilenetv2 for random weights.
        width, height: the frame size.
        options: the model's settings (scale, refine mode, pixels, threshold).
        precision: fp32, fp16 or bf16 (both candidates run in it).
        backend: ``torch`` (plain module against the fast path) or ``onnxruntime`` (plain module
            against the exported model run by onnxruntime).
        threads: CPU threads for both candidates (None: PyTorch's current setting, restored after).
        device: auto, cpu or cuda.
        batch: frames per call.
        repeats: timed calls per candidate, or with ``benchmark_pipeline`` rounds over the clip; None: the
            default of whichever runs (``DEFAULT_REPEATS``, ``DEFAULT_PIPELINE_ROUNDS``).
        warmup: untimed calls first (not used by ``benchmark_pipeline``).
        checkpoint: weights to use instead of random ones.
        plate_solve: ``off`` or ``on`` (`bgmatte.model.plate_solve`, for both candidates), or ``compare``:
            the fast path without it against the fast path with it, to price the step.
    """

    backbone: str | None = None
    width: int = 1920
    height: int = 1080
    options: RefineOptions = field(default_factory=RefineOptions)
    precision: str = "fp32"
    backend: str = "torch"
    threads: int | None = None
    device: str = "auto"
    batch: int = 1
    repeats: int | None = None
    warmup: int = 2
    checkpoint: str | None = None
    plate_solve: str = "off"


PLATE_SOLVE_CHOICES = ("off", "on", "compare")
DEFAULT_REPEATS = 10  # timed calls of each candidate in ``benchmark``
DEFAULT_PIPELINE_ROUNDS = 2  # rounds over the clip in ``benchmark_pipeline``: each is slow, and the best is kept


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate, every repetition, and what they mean per frame."""

    name: str
    seconds: list[float]
    frames_per_call: int

    @property
    def median_ms(self) -> float:
        """Median milliseconds per frame."""
        return statistics.median(self.seconds) * 1000 / self.frames_per_call

    @property
    def fps(self) -> float:
        """Frames per second at the median."""
        return 1000 / self.median_ms


@dataclass(frozen=True)
class BenchResult:
    """The comparison: both timings, their ratio, and what was measured on what."""

    options: BenchOptions
    machine: str
    device: str
    threads: int
    weights: str
    refined_pixels: int
    plain: Timing
    fast: Timing

    @property
    def ratio(self) -> float:
        """How many times faster the fast candidate is, by the medians."""
        return self.plain.median_ms / self.fast.median_ms

    def as_dict(self) -> dict:
        """A JSON-ready form."""
        settings = asdict(self.options)
        return {
            "machine": self.machine, "device": self.device, "threads": self.threads, "weights": self.weights,
            "settings": settings, "refined_pixels_per_frame": self.refined_pixels,
            "plain": _timing_dict(self.plain), "fast": _timing_dict(self.fast),
            "ratio": round(self.ratio, 3),
        }


def _timing_dict(timing: Timing) -> dict:
    return {"name": timing.name, "ms_per_frame": round(timing.median_ms, 2), "fps": round(timing.fps, 3),
            "seconds_per_call": [round(s, 5) for s in timing.seconds]}


def parse_resolution(text: str) -> tuple[int, int]:
    """``1920x1080``, or a name (hd, 4k, 720p, sd), to (width, height)."""
    text = text.strip().lower()
    if text in RESOLUTIONS:
        return RESOLUTIONS[text]
    parts = text.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts) and all(int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise BgmatteError(f"resolution {text!r}: give WIDTHxHEIGHT (like 1920x1080) or one of {', '.join(RESOLUTIONS)}")


def machine_description() -> str:
    """The CPU (or GPU), core count and library versions, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def random_model(backbone: str, options: RefineOptions = RefineOptions(), seed: int = 0) -> MattingRefine:
    """A ``MattingRefine`` with random weights whose error map is nowhere zero, in eval mode.

    The output heads are scaled down and their biases set to 1/2 (as the reference test vectors
    do), so alpha and the error sit inside (0, 1) instead of being clamped to 0.
    """
    if backbone not in BACKBONES:
        raise BgmatteError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    torch.manual_seed(seed)
    model = MattingRefine(backbone, **vars(options)).eval()
    with torch.no_grad():
        model.decoder.conv4.weight.mul_(0.05)
        model.decoder.conv4.bias[:5] = 0.5
        model.refiner.conv4.weight.mul_(0.1)
        model.refiner.conv4.bias[:1] = 0.5
    return model


def example_frames(batch: int, height: int, width: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random plate, and the same plate with a random block pasted in as the subject."""
    generator = torch.Generator().manual_seed(0)
    bgr = torch.rand(batch, 3, height, width, generator=generator)
    src = bgr.clone()
    rows, cols = slice(height // 4, 3 * height // 4), slice(width // 3, 2 * width // 3)
    src[:, :, rows, cols] = torch.rand(batch, 3, height, width, generator=generator)[:, :, rows, cols]
    return src.to(device, dtype), bgr.to(device, dtype)


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     synchronize: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Call each candidate ``warmup`` times, then ``repeats`` times in turns (ABBA order), timing each call."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            start = time.perf_counter()
            candidates[name]()
            synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def benchmark(options: BenchOptions) -> BenchResult:
    """Time the plain module against the fast path (or onnxruntime) on one frame size, interleaved."""
    options = _with_repeats(options, DEFAULT_REPEATS)
    _check_options(options)
    if options.plate_solve == "compare" and options.backend != "torch":
        raise BgmatteError("plate_solve compare times the torch fast path with and without it: use backend torch")
    if options.backend == "onnxruntime":
        _check_onnx_backend(options)
    threads = torch.get_num_threads()
    try:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        with _memory_in_one_line(options):
            return _benchmark(options)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _memory_in_one_line(options: BenchOptions) -> Iterator[None]:
    """Running out of memory (frames, weights, or the model's work) as one `NotEnoughMemory` line saying what to
    lower, not a traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, BgmatteError) or not is_out_of_memory(exc):
            raise
        raise NotEnoughMemory(f"not enough memory to benchmark a batch of {options.batch} at {options.width}x"
                              f"{options.height} on {options.device}: try a smaller --resolution or --batch, or "
                              "another --device") from None


def _with_repeats(options: BenchOptions, default: int) -> BenchOptions:
    """The options with ``repeats`` filled in when not given, so that the result says what was run."""
    return options if options.repeats is not None else replace(options, repeats=default)


def _check_options(options: BenchOptions) -> None:
    """Refuse settings that no benchmark can run with, before any model is built."""
    if options.backend not in BACKENDS:
        raise BgmatteError(f"unknown backend {options.backend!r}: choose one of {', '.join(BACKENDS)}")
    if options.precision not in PRECISIONS:
        raise BgmatteError(f"unknown precision {options.precision!r}: choose one of {', '.join(PRECISIONS)}")
    for name in ("repeats", "batch"):
        if getattr(options, name) < 1:
            raise BgmatteError(f"{name} must be at least 1, not {getattr(options, name)}")
    if options.warmup < 0:
        raise BgmatteError(f"warmup must be 0 or more, not {options.warmup}")
    if options.threads is not None and options.threads < 1:
        raise BgmatteError(f"threads must be at least 1, not {options.threads}")
    if options.plate_solve not in PLATE_SOLVE_CHOICES:
        raise BgmatteError(f"plate_solve must be one of {', '.join(PLATE_SOLVE_CHOICES)}, not {options.plate_solve!r}")
    if options.backbone is not None and options.backbone not in BACKBONES:
        raise BgmatteError(f"unknown backbone {options.backbone!r}: choose one of {', '.join(BACKBONES)}")
    if options.width * options.height > DEFAULT_MAX_PIXELS:  # as for images: no frame this large is matted
        raise BgmatteError(f"resolution {options.width}x{options.height} is "
                           f"{megapixels_above(options.width * options.height, DEFAULT_MAX_PIXELS)}")
    check_frame_size(options.width, options.height, options.options.backbone_scale)


def _check_onnx_backend(options: BenchOptions) -> None:
    """Refuse what the onnxruntime candidate cannot run (a precision other than fp32, onnx or onnxruntime missing, a
    device it has no provider for) before the model is built and exported: the export takes about a minute, and
    onnxruntime was imported only after it."""
    from bgmatte.export import check_onnx_export, onnx_providers

    if options.precision != "fp32":
        raise BgmatteError("the onnxruntime backend runs fp32 models only")
    resolve_device(options.device)  # PyTorch's word on a device it cannot use, as for the torch backend
    check_onnx_export()
    onnx_providers(options.device)


def _plain_model(options: BenchOptions, device: torch.device) -> tuple[MattingRefine, str, BenchOptions]:
    """The plain module to time, in the options' precision on ``device``, with the plate solve as asked
    (never as a checkpoint's metadata says); a description of its weights; and the options with the
    backbone filled in (read from the checkpoint when not given)."""
    if options.checkpoint:
        plain = load_model(options.checkpoint, backbone=options.backbone, device=device, optimize=False,
                           precision=options.precision, plate_solve=False, **_load_settings(options.options))
        weights = options.checkpoint
    else:
        plain = random_model(options.backbone or "mobilenetv2", options.options)
        plain = plain.to(device, PRECISIONS[options.precision])
        weights = ("random: the error map, so which patches are refined, is arbitrary; the amount of work "
                   "is not, except in thresholding mode, where it depends on the error map")
    plain.plate_solve = options.plate_solve == "on"
    return plain, weights, replace(options, backbone=plain.backbone_name)


def _benchmark(options: BenchOptions) -> BenchResult:
    device = resolve_device(options.device)
    dtype = PRECISIONS[options.precision]
    plain, weights, options = _plain_model(options, device)
    plain_name = "plain module"
    if options.backend == "onnxruntime":
        fast = _onnx_candidate(plain, options)
        fast_name = "onnxruntime"
    else:
        from bgmatte.model.fast import optimize_model

        fast = optimize_model(copy.deepcopy(plain))
        fast_name = "fast path"
        if options.plate_solve == "compare":
            plain, plain_name = optimize_model(copy.deepcopy(plain)), "fast path"
            fast.plate_solve, fast_name = True, "+ plate solve"
    src, bgr = example_frames(options.batch, options.height, options.width, dtype, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        seconds = time_interleaved({"plain": lambda: plain(src, bgr), "fast": lambda: fast(src, bgr)},
                                   options.repeats, options.warmup, synchronize)
        # Counted after the timing: before it, this call would be one more warm-up for the plain module only.
        refined = int(plain(src, bgr)[5].sum()) * 16 // options.batch
    return BenchResult(options=options, machine=machine_description(), device=str(device),
                       threads=options.threads or torch.get_num_threads(), weights=weights, refined_pixels=refined,
                       plain=Timing(plain_name, seconds["plain"], options.batch),
                       fast=Timing(fast_name, seconds["fast"], options.batch))


@dataclass(frozen=True)
class PipelineBenchResult:
    """``bgmatte bench --pipeline``: end to end against the model alone, with the settings it ran under."""

    options: BenchOptions  # the backbone as resolved
    weights: str
    speed: PipelineSpeed

    def as_dict(self) -> dict:
        """A JSON-ready form: the pipeline's figures, plus the model they were measured with."""
        return {**self.speed.as_dict(), "backbone": self.options.backbone, "weights": self.weights,
                "plate_solve": self.options.plate_solve, "settings": asdict(self.options)}


def benchmark_pipeline(options: BenchOptions) -> PipelineBenchResult:
    """Time ``bgmatte video`` end to end (decode, matte, composite, encode) against the model alone on a
    generated clip (``measure_pipeline``), with the fast path of the model ``benchmark`` would build.

    ``repeats`` is the number of rounds over the clip (the best of each is kept; ``DEFAULT_PIPELINE_ROUNDS``
    when not given); ``warmup`` is not used (one untimed call always comes first). Only the torch backend
    and the plate solve ``off`` or ``on`` make sense here: there is no second candidate to compare.
    """
    from bgmatte.model.fast import optimize_model
    from bgmatte.pipeline import measure_pipeline
    from bgmatte.predictor import Predictor

    options = _with_repeats(options, DEFAULT_PIPELINE_ROUNDS)
    _check_options(options)
    if options.backend != "torch":
        raise BgmatteError(f"the pipeline benchmark (--pipeline) runs the torch fast path: backend "
                           f"{options.backend} (--backend) goes without it")
    if options.plate_solve == "compare":
        raise BgmatteError("the pipeline benchmark (--pipeline) times one model: the plate solve (--plate-solve) "
                           "must be off or on, not compare")
    with _memory_in_one_line(options):
        plain, weights, options = _plain_model(options, resolve_device(options.device))
        predictor = Predictor(optimize_model(plain), precision=options.precision)
        speed = measure_pipeline(predictor, width=options.width, height=options.height, batch_size=options.batch,
                                 rounds=options.repeats, threads=options.threads)
    return PipelineBenchResult(options=options, weights=weights, speed=speed)


def format_pipeline_result(result: PipelineBenchResult) -> str:
    """The pipeline's table, after a line naming the model it ran."""
    from bgmatte.pipeline import format_speed

    o = result.options
    return (f"bgmatte bench --pipeline: {o.backbone}, {o.precision}, plate solve {o.plate_solve}; "
            f"weights: {result.weights}\n" + format_speed(result.speed))


def _load_settings(options: RefineOptions) -> dict:
    return {"backbone_scale": options.backbone_scale, "refine_mode": options.refine_mode,
            "refine_sample_pixels": options.refine_sample_pixels, "refine_threshold": options.refine_threshold}


def _onnx_candidate(plain: MattingRefine, options: BenchOptions):
    """The plain model exported to a temporary ONNX file and loaded in onnxruntime."""
    import tempfile
    from pathlib import Path

    from bgmatte.export import OnnxMatting, export_onnx

    if options.precision != "fp32":
        raise BgmatteError("the onnxruntime backend runs fp32 models only")
    with tempfile.TemporaryDirectory(prefix="bgmatte-bench-") as folder:
        path = export_onnx(plain, Path(folder) / "model.onnx")
        # PyTorch's count when none is given, as the plain module runs with and the result reports: onnxruntime
        # would otherwise take every core.
        return OnnxMatting(path, device=str(resolve_device(options.device)),
                           threads=options.threads or torch.get_num_threads())


def format_result(result: BenchResult) -> str:
    """A short table for people."""
    o = result.options
    settings = o.options
    lines = [
        f"bgmatte bench: {o.backbone}, {o.width}x{o.height}, batch {o.batch}, {o.precision}, "
        f"scale {settings.backbone_scale}, {settings.refine_mode}"
        + (f" {settings.refine_sample_pixels} px" if settings.refine_mode == "sampling" else "")
        + (f" > {settings.refine_threshold}" if settings.refine_mode == "thresholding" else ""),
        f"machine: {result.machine}; device {result.device}, {result.threads} threads",
        f"weights: {result.weights}; refined pixels per frame: {result.refined_pixels}; "
        f"plate solve: {o.plate_solve}",
        f"median of {o.repeats} interleaved runs after {o.warmup} warm-up:",
        f"  {result.plain.name:<14} {result.plain.median_ms:9.1f} ms/frame  {result.plain.fps:7.2f} fps",
        f"  {result.fast.name:<14} {result.fast.median_ms:9.1f} ms/frame  {result.fast.fps:7.2f} fps",
        f"  ratio          {result.ratio:9.2f}x",
    ]
    return "\n".join(lines)
