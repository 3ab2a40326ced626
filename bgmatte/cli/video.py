"""`bgmatte video`: matte a clip against its plate; parses arguments and calls `bgmatte.convert_video`.

Both the short spelling and the reference script's (`inference_video.py`) long option names work,
since each option has both names.
"""
from __future__ import annotations

import argparse
import re
import sys

from bgmatte.cli import Subcommands
from bgmatte.errors import BgmatteError

OUTPUT_KINDS = ("com", "pha", "fgr", "err", "ref")
BACKBONES = ("resnet50", "resnet101", "mobilenetv2")

DESCRIPTION = """\
Matte a video shot against a plate (the same background without the subject) and write the composite,
and on request the alpha (pha), foreground (fgr), error map (err) and refined areas (ref).

  bgmatte video SRC --bgr PLATE [-o OUT] [--outputs com pha fgr err ref] [--target-bgr ...]
  bgmatte video --model-checkpoint model.pth --video-src SRC --video-bgr PLATE --output-dir DIR \\
      --output-types com fgr err ref            (the reference script's spelling)

-o names the composite's file; its extension picks the container (.mp4, .mov, .mkv, .webm; no
extension: a folder of PNGs), and the other outputs go beside it in the same container (-o cut.webm:
cut_pha.webm ...; -o cut: PNG folders cut_pha ...). --output-dir writes com.mp4, pha.mp4 ... in a
folder (a transparent composite as com.webm), or one PNG folder per output with --output-format
image_sequences. Without either: SRC_com.mp4 (transparent: SRC_com.webm), SRC_pha.mp4 ... beside the source.

--bgr takes an image (resized to the video with a warning when its size differs; stretched when its
aspect ratio does, which only --align undoes), a video (frame for frame, or by time when its frame rate
is another or the source's varies; when shorter than the source its last frame is held, with a warning) or `auto` (a clean
plate estimated from the clip itself in a first pass: the background must be seen behind the subject at
some point, since a subject that never moves stays in the plate; one shot, without cuts; the camera must
stand still, or with --align the sampled frames are first registered onto one another).

--target-bgr takes a colour (name, #RRGGBB or R,G,B), an image, a video (looped, at its own speed),
`blur` or `transparent` (.webm VP9, .mov ProRes 4444 or a PNG folder; .mp4 cannot hold transparency).
Default: the reference's green (120,255,155) in video files, transparent in PNG folders.

Every frame goes into every output, upright, with its timestamps; the audio goes into the composite
(not into a PNG folder, which keeps neither sound nor timing).

--start TIME and --duration TIME matte part of the clip, to preview a few seconds of a long one: the
frames from the start (counted from the first frame) for the duration (default: to the end), each TIME
given as seconds (12.5) or [HH:]MM:SS[.fff] (1:02.5). The outputs start at 0 with the sound of the same
span (copied sound from the packet under the start: .mp4 and .mov trim it there, .mkv and .webm start
up to a packet early, some 20 ms for AAC, 100 ms for FLAC; at the end, copied sound ends with the video
in .mp4 and .mov and up to a packet after it in .mkv and .webm). --bgr auto
estimates the plate from the span; a plate video is read from the same start, so that each frame gets
the plate frame it would get in a whole run (a plate video that ends before the start is refused); a
--target-bgr video plays from its own beginning.

Existing outputs are refused unless --overwrite, which still never replaces an input (the source, the
plate, the target) nor a PNG folder holding anything but numbered frames. Ctrl-C (or SIGTERM, SIGHUP),
or an input that ends early, leaves playable outputs with every frame matted so far, and a non-zero exit; an output
whose encoder fails is not kept under its name (the others are, with the frames done). A damaged packet
costs its frame alone, with a warning. Inputs above 100 megapixels a frame are refused.
"""


SCRIPT_THRESHOLD = 0.7
"""--refine-threshold's default in `bgmatte video` and `image`: the value of the reference's inference_video.py and
inference_images.py, whose options these commands take, so that a command line of theirs gives the same mattes."""
MODEL_THRESHOLD = 0.1
"""--refine-threshold's default elsewhere: MattingRefine's own (RefineOptions), which load_model and the Python API
use too. Both only matter with --refine-mode thresholding."""


def add_model_arguments(parser: argparse.ArgumentParser, *, refine_threshold: float = SCRIPT_THRESHOLD) -> None:
    """Model options under both their short names and the reference scripts' `--model-*` names."""
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", "--model-checkpoint", dest="checkpoint", metavar="FILE",
                       help="weights (.pth or .safetensors); default: the embedded default model")
    group.add_argument("--model-type", choices=("mattingrefine", "mattingbase"), default="mattingrefine",
                       help="mattingrefine (default), or mattingbase: the coarse network alone at full "
                            "resolution (slower, no ref output)")
    add_refine_arguments(group, scale=None, pixels=None, threshold=refine_threshold)
    group.add_argument("--refine-kernel-size", "--model-refine-kernel-size", dest="refine_kernel_size", type=int,
                       choices=(1, 3), help="the refiner's kernel size (default: read from the checkpoint)")
    add_plate_solve_argument(group)
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="inference precision (default fp32)")
    group.add_argument("--no-optimize", dest="optimize", action="store_false",
                       help="run the plain model instead of the fast inference path (same outputs)")


def add_refine_arguments(group, *, scale: float | None = 0.25, pixels: int | None = 80_000,
                         threshold: float = MODEL_THRESHOLD, reference_names: bool = True) -> None:
    """The backbone and where the refiner works: --backbone, --backbone-scale, --refine-mode,
    --refine-sample-pixels, --refine-threshold (also as the reference scripts' --model-* names where
    `reference_names`). A default of None leaves the scale or the pixels to the frame size."""

    def names(name: str) -> tuple[str, ...]:
        return (f"--{name}", f"--model-{name}") if reference_names else (f"--{name}",)

    by_size = ("default by frame size: 0.25 from HD up, 0.125 from 4K up, up to 0.5 below HD"
               if scale is None else f"default {scale}")
    group.add_argument(*names("backbone"), dest="backbone", choices=BACKBONES,
                       help="the checkpoint's backbone (default: read from the weights)")
    group.add_argument(*names("backbone-scale"), dest="backbone_scale", type=float, default=scale, metavar="S",
                       help=f"base network scale ({by_size})")
    group.add_argument(*names("refine-mode"), dest="refine_mode", choices=("full", "sampling", "thresholding"),
                       default="sampling", help="where the refiner works (default sampling)")
    by_size = "default 80000, or 320000 from 4K up" if pixels is None else f"default {pixels}"
    group.add_argument(*names("refine-sample-pixels"), dest="refine_sample_pixels", type=int, default=pixels,
                       metavar="N", help=f"pixels refined in sampling mode ({by_size})")
    group.add_argument(*names("refine-threshold"), dest="refine_threshold", type=float, default=threshold,
                       metavar="T", help=f"error threshold in thresholding mode (default {threshold_note(threshold)})")


REFINE_OPTIONS = {"backbone_scale": "--backbone-scale", "refine_sample_pixels": "--refine-sample-pixels",
                  "refine_threshold": "--refine-threshold"}
"""The numeric refine settings and the options `add_refine_arguments` gives them, for `check_refine_arguments`."""


def check_refine_arguments(args: argparse.Namespace, options: dict[str, str] = REFINE_OPTIONS) -> None:
    """Refuse a numeric refine setting the model cannot use as one line naming its option (`options` maps each
    setting to it), before any input is read or model loaded: argparse's float() takes ``nan`` and ``inf``, and a
    NaN --refine-threshold silently refined nothing."""
    from bgmatte.model.matting import refine_setting_problem

    for name, option in options.items():
        value = getattr(args, name, None)
        problem = None if value is None else refine_setting_problem(name, value)
        if problem is not None:
            raise BgmatteError(f"{option} {value}: the value {problem}")


def threshold_note(threshold: float) -> str:
    """Where a --refine-threshold default comes from, for the help: 0.7 and 0.1 are both in use (see
    `SCRIPT_THRESHOLD`), and a user meeting one should learn of the other."""
    if threshold == SCRIPT_THRESHOLD:
        return (f"{threshold}, as the reference's inference_video.py and inference_images.py; the Python API and "
                f"the other commands use the model's own {MODEL_THRESHOLD}")
    if threshold == MODEL_THRESHOLD:
        return (f"{threshold}, the model's own, as in the Python API; bgmatte video and image use the reference "
                f"scripts' {SCRIPT_THRESHOLD}")
    return str(threshold)


def model_options(args: argparse.Namespace):
    """The `ModelOptions` the parsed model arguments ask for."""
    from bgmatte.pipeline import ModelOptions

    return ModelOptions(
        checkpoint=args.checkpoint, model_type=args.model_type, backbone=args.backbone,
        backbone_scale=args.backbone_scale, refine_mode=args.refine_mode,
        refine_sample_pixels=args.refine_sample_pixels, refine_threshold=args.refine_threshold,
        refine_kernel_size=args.refine_kernel_size, device=args.device, precision=args.precision,
        optimize=args.optimize, plate_solve=plate_solve_choice(args),
    )


def add_plate_solve_argument(group) -> None:
    """`--plate-solve on|off`; left out, the weights decide (`bgmatte.load_model`)."""
    group.add_argument("--plate-solve", choices=("on", "off"),
                       help="re-solve alpha near the subject from the compositing equation against the plate "
                            "(default: as the weights say; on for the embedded model)")


def plate_solve_choice(args: argparse.Namespace) -> bool | None:
    """`--plate-solve` as `load_model` takes it: True, False, or None for the weights' own choice."""
    return {"on": True, "off": False}.get(args.plate_solve)


def add_plate_arguments(parser: argparse.ArgumentParser, each: str = "frame") -> None:
    """Plate alignment and exposure matching, under both names; `each` is what the plate is fitted to (frame, image)."""
    parser.add_argument("--align", "--preprocess-alignment", dest="align", action="store_true",
                        help=f"align the plate to each {each} (handheld shots); falls back to the plate as is")
    add_match_exposure_argument(parser, each)


def add_match_exposure_argument(parser: argparse.ArgumentParser, each: str = "frame") -> None:
    """`--match-exposure`, for `add_plate_arguments` and `bgmatte webcam` (which has no --align): one flag, one help."""
    parser.add_argument("--match-exposure", action="store_true",
                        help=f"match the plate's exposure and white balance to each {each}")


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Video encoder choices."""
    from bgmatte.io.video import X264_PRESETS

    group = parser.add_argument_group("encoding")
    group.add_argument("--crf", type=int, metavar="N",
                       help="quality, lower is better: H.264 0-51 (default 18), VP9 0-63 (default 30); other "
                            "encoders (ProRes, FFV1) have none, and a warning says so")
    group.add_argument("--preset", choices=X264_PRESETS, metavar="NAME",
                       help="x264 speed preset: " + ", ".join(X264_PRESETS) + " (default: veryfast, or ultrafast "
                            "when the model runs on the CPU and the encoder would take time from it); H.264 outputs only")
    group.add_argument("--codec", metavar="NAME", help="force an FFmpeg encoder (default: chosen by extension)")


def encoder_options(args: argparse.Namespace):
    """The `EncoderOptions` the parsed encoding arguments ask for."""
    from bgmatte.io.video import EncoderOptions

    return EncoderOptions(codec=args.codec, crf=args.crf, preset=args.preset)


# Seconds (12.5) or [HH:]MM:SS[.fff] (1:02.5, 01:00:01); the first field is not bounded (90:00 is 90 minutes).
_TIME = re.compile(r"(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?|\.\d+)")


def parse_time(option: str, text: str) -> float:
    """A time from the command line in seconds: ``12.5`` or ``[HH:]MM:SS[.fff]`` (``1:02.5``). A malformed or
    negative one is a one-line `BgmatteError` that names `option` and `text`, before anything is read."""
    match = _TIME.fullmatch(text.strip())
    if match is None:
        if _TIME.fullmatch(text.strip().removeprefix("-")) is not None:
            raise BgmatteError(f"{option} {text}: a time cannot be negative")
        raise BgmatteError(f"{option} {text}: not a time; give seconds (12.5) or [HH:]MM:SS[.fff] (1:02.5)")
    hours, minutes, seconds = match.groups()
    if (minutes is not None and float(seconds) >= 60) or (hours is not None and int(minutes) >= 60):
        raise BgmatteError(f"{option} {text}: minutes and seconds must be below 60 in [HH:]MM:SS")
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


def register(subparsers: Subcommands) -> None:
    """Add the `video` subcommand."""
    parser = subparsers.add_parser(
        "video", help="matte a video against its plate (composite, alpha, foreground)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", nargs="?", metavar="SRC", help="the video to matte")
    parser.add_argument("--video-src", metavar="SRC", help="the video to matte (the reference's spelling)")
    parser.add_argument("--bgr", "--video-bgr", dest="bgr", metavar="PLATE",
                        help="the plate: an image, a video, or auto")
    parser.add_argument("-o", "--output", metavar="OUT", help="the composite's file (or PNG folder)")
    parser.add_argument("--output-dir", metavar="DIR", help="write com.mp4, pha.mp4 ... (or PNG folders) here")
    parser.add_argument("--outputs", "--output-types", dest="outputs", nargs="+", choices=OUTPUT_KINDS,
                        metavar="KIND", help="any of com pha fgr err ref (default: com)")
    parser.add_argument("--output-format", choices=("video", "image_sequences"), default="video",
                        help="video files (default) or folders of PNGs")
    parser.add_argument("--target-bgr", "--video-target-bgr", dest="target_bgr", metavar="BG",
                        help="composite over: a colour, an image, a video, blur or transparent")
    parser.add_argument("--resize", "--video-resize", dest="resize", nargs=2, type=int, metavar=("W", "H"),
                        help="resize the frames to W x H before matting")
    parser.add_argument("--start", metavar="TIME",
                        help="matte from this time on: seconds (12.5) or [HH:]MM:SS[.fff] (1:02.5); default 0")
    parser.add_argument("--duration", metavar="TIME",
                        help="matte this long from --start (same forms); default: to the end")
    add_plate_arguments(parser)
    parser.add_argument("--batch-size", type=int, metavar="N", help="frames per model call (default 1 on CPU, 4 on GPU)")
    add_encoder_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments that argparse cannot, convert the video and print the outputs' paths."""
    if args.src and args.video_src:
        raise BgmatteError("give the source video once: as SRC or as --video-src, not both")
    src = args.src or args.video_src
    if not src:
        raise BgmatteError("no source video: give SRC (or --video-src)")
    if not args.bgr:
        raise BgmatteError("no plate: give --bgr PLATE (an image, a video, or auto)")
    check_refine_arguments(args)
    start = parse_time("--start", args.start) if args.start is not None else 0.0
    duration = parse_time("--duration", args.duration) if args.duration is not None else None
    if duration is not None and duration <= 0:
        raise BgmatteError(f"--duration {args.duration}: the duration must be more than 0 seconds")
    if args.resize is not None and min(args.resize) < 1:
        raise BgmatteError(f"--resize {args.resize[0]} {args.resize[1]}: a width and a height of at least 1 pixel are "
                           "needed")
    from bgmatte.pipeline import convert_video

    result = convert_video(
        src, args.bgr, output=args.output, output_dir=args.output_dir, outputs=args.outputs or ("com",),
        output_format=args.output_format, target_bgr=args.target_bgr, resize=args.resize, align=args.align,
        match_exposure=args.match_exposure, model=model_options(args), batch_size=args.batch_size,
        overwrite=args.overwrite, progress=not args.quiet, encoder=encoder_options(args), start=start,
        duration=duration,
    )
    for path in result.outputs.values():
        print(path)
    if not args.quiet:
        print(f"bgmatte video: {result.frames} frames in {result.seconds:.1f} s ({result.fps:.2f} fps)", file=sys.stderr)
    return 0
