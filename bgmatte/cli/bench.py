"""`bgmatte bench`: time the plain module against the fast path (or onnxruntime), interleaved in one run."""
from __future__ import annotations

import argparse
import json

from bgmatte.cli import Subcommands
from bgmatte.cli.video import MODEL_THRESHOLD, check_refine_arguments, threshold_note
from bgmatte.errors import BgmatteError

DESCRIPTION = """\
Time the plain MattingRefine module and the fast inference path (or, with --backend onnxruntime, the
model exported to ONNX and run by onnxruntime) on the same frames, taking turns, and print the median
ms/frame and fps of each and their ratio. Random weights are used unless --checkpoint is given: the
amount of work does not depend on the weights (the sampling mode always refines its whole budget).

  bgmatte bench                                  MobileNetV2, 1920x1080, scale 0.25, sampling 80,000 px
  bgmatte bench --backbone resnet50 --threads 2
  bgmatte bench --resolution 4k --scale 0.125 --pixels 320000 --precision fp16 --device cuda

With --pipeline it times `bgmatte video` end to end against the model alone instead, with the fast path
of the same model (the backbone, --checkpoint, --precision, --plate-solve off or on, --threads, --batch
and the refine settings apply). --repeats is then the number of rounds over the clip (default 2, the
best is kept); --warmup, --backend onnxruntime and --plate-solve compare are refused, as there is no
second candidate. The plate solve is off unless asked for, with any weights.
"""


def register(subparsers: Subcommands) -> None:
    """Add the `bench` subcommand."""
    parser = subparsers.add_parser(
        "bench", help="time the plain module against the fast path",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbone", choices=("mobilenetv2", "resnet50", "resnet101"),
                        help="the network (default: read from --checkpoint's weights; mobilenetv2 for random ones)")
    parser.add_argument("--resolution", default="1920x1080", metavar="WxH",
                        help="frame size: WIDTHxHEIGHT or hd, 4k, 720p, sd (default 1920x1080)")
    parser.add_argument("--scale", type=float, default=0.25, help="backbone scale (default 0.25)")
    parser.add_argument("--mode", choices=("sampling", "thresholding", "full"), default="sampling",
                        help="refine mode (default sampling)")
    parser.add_argument("--pixels", type=int, default=80_000, help="pixels refined in sampling mode (default 80000)")
    parser.add_argument("--threshold", type=float, default=MODEL_THRESHOLD,
                        help=f"error threshold in thresholding mode (default {threshold_note(MODEL_THRESHOLD)})")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="default fp32")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                        help="what to compare the plain module with: the fast path (torch, default) or "
                             "onnxruntime running the exported model")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for both (default: PyTorch's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--batch", type=int, default=1, help="frames per call (default 1)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="timed calls of each (default 10); with --pipeline, rounds over the clip (default 2)")
    parser.add_argument("--warmup", type=int, metavar="N",
                        help="untimed calls of each first (default 2; not with --pipeline)")
    parser.add_argument("--checkpoint", metavar="CKPT", help="real weights instead of random ones")
    parser.add_argument("--plate-solve", choices=("off", "on", "compare"), default="off",
                        help="re-solve alpha against the plate in both candidates (on), or time the fast path "
                             "without it against the fast path with it (compare); default off, whatever the "
                             "weights' metadata says")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--pipeline", action="store_true",
                        help="instead: time `bgmatte video` end to end (decode, matte, composite, encode) against "
                             "the model alone at the same settings, on a generated clip (see above for "
                             "which options apply)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the options, run the benchmark, print the table or JSON."""
    from bgmatte import bench
    from bgmatte.model.matting import RefineOptions

    settings_given = argparse.Namespace(backbone_scale=args.scale, refine_sample_pixels=args.pixels,
                                        refine_threshold=args.threshold)
    check_refine_arguments(settings_given, {"backbone_scale": "--scale", "refine_sample_pixels": "--pixels",
                                            "refine_threshold": "--threshold"})
    width, height = bench.parse_resolution(args.resolution)
    try:
        settings = RefineOptions(args.scale, args.mode, args.pixels, args.threshold)
    except ValueError as exc:
        raise BgmatteError(str(exc)) from None
    if args.pipeline and args.warmup is not None:  # benchmark_pipeline cannot tell a given warmup from the default
        raise BgmatteError("--pipeline makes one untimed call itself: --warmup goes without --pipeline")
    warmup = {} if args.warmup is None else {"warmup": args.warmup}  # None: the library's default
    options = bench.BenchOptions(backbone=args.backbone, width=width, height=height, options=settings,
                                 precision=args.precision, backend=args.backend, threads=args.threads,
                                 device=args.device, batch=args.batch, repeats=args.repeats,
                                 checkpoint=args.checkpoint, plate_solve=args.plate_solve, **warmup)
    if args.pipeline:  # refuses --backend onnxruntime and --plate-solve compare itself
        result = bench.benchmark_pipeline(options)
        print(json.dumps(result.as_dict(), indent=2) if args.json else bench.format_pipeline_result(result))
        return 0
    result = bench.benchmark(options)
    print(json.dumps(result.as_dict(), indent=2) if args.json else bench.format_result(result))
    return 0

