"""`bgmatte webcam`: matte a camera live, to a virtual camera, a preview window and/or a recording."""
from __future__ import annotations

import argparse
import logging

from bgmatte.cli import Subcommands
from bgmatte.cli.video import (add_match_exposure_argument, add_plate_solve_argument, add_refine_arguments,
                               check_refine_arguments, plate_solve_choice)

DESCRIPTION = """\
Matte a camera live against a plate (a photo of the background without you) and composite onto a target
background, sent to a virtual camera (--virtual-cam, needs pip install "bgmatte[webcam]"), shown in a preview
window, and/or recorded (--record FILE). --camera takes a camera index or a video file played as a camera.

Keys in the preview: b takes the current frame as the plate (step out of view first), t cycles the target
backgrounds given, q or Esc quits. Until there is a plate, frames pass through unchanged.

Headless (no display, or --no-preview) without --bgr, the plate is taken automatically: frames pass through
for --auto-plate-delay seconds (step out of view), then the median of the next --auto-plate-frames frames
becomes the plate. Ctrl-C stops; the recording is finished and kept.

--match-exposure brings the plate to each frame's exposure and white balance, as for `bgmatte video`: a
webcam's automatic exposure changes them once you step in, and the background would matte as you.
"""


def register(subparsers: Subcommands) -> None:
    """Add the `webcam` subcommand."""
    parser = subparsers.add_parser(
        "webcam", help="live matting from a camera to a virtual camera, a preview or a recording",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--camera", default="0", metavar="N|FILE",
                        help="camera index (default 0) or a video file used as the camera")
    parser.add_argument("--bgr", metavar="PLATE", help="the plate image (default: key b, or automatic when headless)")
    add_match_exposure_argument(parser)
    parser.add_argument("--target-bgr", nargs="+", action="extend", metavar="SPEC",
                        help="target backgrounds, cycled with key t: a colour (a name, #RRGGBB or R,G,B), an image, "
                             "a video (looped), blur or transparent (a checkerboard); default green")
    output = parser.add_argument_group("outputs")
    output.add_argument("--virtual-cam", action="store_true", help="send the result to a virtual camera")
    output.add_argument("--virtual-cam-backend", choices=("v4l2loopback", "obs", "unitycapture"),
                        help="the pyvirtualcam backend (default: the first available)")
    output.add_argument("--virtual-cam-device", metavar="DEV",
                        help="the virtual camera device, e.g. /dev/video2 (default: the first free one)")
    output.add_argument("--preview", action=argparse.BooleanOptionalAction, default=None,
                        help="show a preview window with keys (default: when a display is available)")
    output.add_argument("--record", metavar="FILE", help="also record the result to this video file")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --record file")
    output.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    capture = parser.add_argument_group("capture")
    capture.add_argument("--width", type=int, metavar="W", help="frame width asked of the camera")
    capture.add_argument("--height", type=int, metavar="H", help="frame height asked of the camera")
    capture.add_argument("--resolution", type=int, nargs=2, metavar=("W", "H"), help="the same as --width W --height H")
    capture.add_argument("--fps", type=float, metavar="F", help="frame rate asked of the camera")
    capture.add_argument("--auto-plate-delay", type=float, default=3.0, metavar="S",
                         help="headless without --bgr: seconds before the plate is taken (default 3)")
    capture.add_argument("--auto-plate-frames", type=int, default=10, metavar="N",
                         help="headless without --bgr: frames whose median is the plate (default 10)")
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", "--model-checkpoint", dest="checkpoint", metavar="C",
                       help="weights (.pth or .safetensors; default: the embedded model)")
    add_refine_arguments(model)
    add_plate_solve_argument(model)
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    model.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="inference precision (default fp32)")
    parser.set_defaults(func=run, log_level=logging.INFO)  # the live loop says what it is doing


def run(args: argparse.Namespace) -> int:
    """Call `bgmatte.io.webcam.run_webcam` with the parsed options; its progress goes to stderr through the
    CLI's logging (`log_level` INFO)."""
    from bgmatte.errors import BgmatteError

    width, height = args.width, args.height
    if args.resolution is not None:
        if width is not None or height is not None:
            raise BgmatteError("give --resolution W H or --width/--height, not both")
        width, height = args.resolution
    check_refine_arguments(args)
    from bgmatte.io.webcam import run_webcam  # torch and OpenCV: after the quick checks

    run_webcam(
        args.checkpoint,
        camera=args.camera,
        bgr=args.bgr,
        target_bgr=args.target_bgr or ["green"],
        virtual_cam=args.virtual_cam,
        virtual_cam_backend=args.virtual_cam_backend,
        virtual_cam_device=args.virtual_cam_device,
        preview=args.preview,
        record=args.record,
        overwrite=args.overwrite,
        width=width,
        height=height,
        fps=args.fps,
        backbone=args.backbone,
        backbone_scale=args.backbone_scale,
        refine_mode=args.refine_mode,
        refine_sample_pixels=args.refine_sample_pixels,
        refine_threshold=args.refine_threshold,
        plate_solve=plate_solve_choice(args),
        device=args.device,
        precision=args.precision,
        max_frames=args.max_frames,
        auto_plate_delay=args.auto_plate_delay,
        auto_plate_frames=args.auto_plate_frames,
        match_exposure=args.match_exposure,
    )
    return 0
