"""`bgmatte eval`: score predicted mattes against ground truth with the paper's metrics, or run a model first."""
from __future__ import annotations

import argparse
import json
import sys

from bgmatte.cli import Subcommands
from bgmatte.cli.video import add_plate_solve_argument, add_refine_arguments, check_refine_arguments, plate_solve_choice
from bgmatte.errors import BgmatteError

DESCRIPTION = """\
Score alpha mattes with the metrics of BackgroundMattingV2's evaluation code: SAD/1000, MSE, gradient and
connectivity errors over the trimap's unknown region (value 128), foreground MSE there where the true alpha is
above 0, and SAD/1000 and MSE over the whole frame. Files are matched by name stem; both sides are cropped to a
multiple of 4 pixels, as the paper's benchmark.m does.

A matte is the alpha channel of an RGBA file (when it is not constant), else the grey level; colour mattes and
float mattes outside [0, 1] are refused. A trimap may hold only 0, 128 and 255 (so no JPEG trimaps); an image
whose trimap has no 128 pixel gets no trimap metrics and is left out of their means. Every file is compared as
stored: EXIF orientation tags are ignored.

  bgmatte eval --pred DIR --gt DIR       DIR/pha (and DIR/fgr) against GT/pha, GT/fgr, GT/trimap
  bgmatte eval --model CKPT --data DIR   run the model over DIR/src + DIR/bgr first, then score against DIR
                                         (a base-stage checkpoint, without refiner weights, runs as the
                                         base network at full resolution)
  bgmatte eval --baseline closed-form --data DIR
                                         the classical peer instead of a model: closed-form matting on a
                                         trimap drawn from the plate difference (needs pymatting)

With --out, predictions already there (DIR/pha/NAME.png or DIR/fgr/NAME.png for an image of --data's
src/) are refused before the model is loaded, unless --overwrite.
"""


def register(subparsers: Subcommands) -> None:
    """Add the `eval` subcommand."""
    parser = subparsers.add_parser(
        "eval", help="score mattes with the paper's metrics (SAD, MSE, Grad, Conn)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", metavar="DIR", help="predictions: pha/ and optionally fgr/")
    parser.add_argument("--gt", metavar="DIR", help="ground truth: pha/, fgr/ and trimap/")
    parser.add_argument("--model", metavar="CKPT", help="a checkpoint (.pth or .safetensors) to run first")
    parser.add_argument("--baseline", choices=("closed-form",),
                        help="score the classical peer instead of a model (with --data)")
    parser.add_argument("--data", metavar="DIR", help="with --model or --baseline: src/ and bgr/, plus the ground truth")
    parser.add_argument("--out", metavar="DIR", help="with --model or --baseline: where to write the predicted pha/ and fgr/ "
                                                     "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--overwrite", action="store_true", help="with --out: replace predictions already there")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    model = parser.add_argument_group("model options (with --model)")
    add_refine_arguments(model, reference_names=False)
    add_plate_solve_argument(model)
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.set_defaults(func=run)


def _base_stage_model(args: argparse.Namespace):
    """The base network of a checkpoint without refiner weights (what `bgmatte train base` writes), in eval mode on
    --device, or None for any other checkpoint. Such weights are scored as the MattingBase they were trained and
    validated as, at full resolution: inside MattingRefine the refiner would be random and its noise scored."""
    import torch

    from bgmatte.model.build import detect_backbone, read_state_dict, resolve_device
    from bgmatte.model.matting import MattingBase

    try:
        state = read_state_dict(args.model)
    except BgmatteError:
        return None  # load_model says what is wrong with the file
    if any(key.startswith("refiner.") for key in state):
        return None
    backbone = args.backbone or detect_backbone(state)
    if backbone is None:
        return None  # load_model names the keys that fit no backbone
    model = MattingBase(backbone)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        return None  # load_model names the keys that do not fit
    print(f"bgmatte eval: {args.model}: a base-stage checkpoint (no refiner weights), scored as MattingBase at "
          "full resolution; the refine and plate-solve options do not apply", file=sys.stderr)
    return model.eval().to(resolve_device(args.device), torch.float32)


def run(args: argparse.Namespace) -> int:
    """Check which mode was asked for, evaluate, and print the table or JSON."""
    from bgmatte import evaluate

    if args.model or args.data or args.baseline:
        if args.pred or args.gt:
            raise BgmatteError("use either --pred/--gt or --model/--data, not both")
        if args.model and args.baseline:
            raise BgmatteError("use either --model or --baseline, not both")
        if not ((args.model or args.baseline) and args.data):
            raise BgmatteError("--data goes with --model or --baseline")
        if args.overwrite and not args.out:
            raise BgmatteError("--overwrite goes with --out")
        check_refine_arguments(args)
        if args.model:  # an unusable device before the data is looked at, not once the weights are read
            from bgmatte.model.build import resolve_device

            resolve_device(args.device)
        evaluate.check_dataset(args.data)  # before the model is loaded, which takes a while
        if args.out:
            evaluate.check_prediction_folder(args.data, args.out, overwrite=args.overwrite)
        if args.baseline:
            from bgmatte.baseline import ClosedFormBaseline

            model = ClosedFormBaseline()
        else:
            model = _base_stage_model(args)
            if model is None:
                import bgmatte

                model = bgmatte.load_model(
                    args.model, backbone=args.backbone, backbone_scale=args.backbone_scale,
                    refine_mode=args.refine_mode, refine_sample_pixels=args.refine_sample_pixels,
                    refine_threshold=args.refine_threshold, device=args.device,
                    plate_solve=plate_solve_choice(args),
                )
        result = evaluate.evaluate_model(model, args.data, args.out, overwrite=args.overwrite)
    else:
        if not (args.pred and args.gt):
            raise BgmatteError("give --pred DIR and --gt DIR (or --model CKPT and --data DIR)")
        if args.out or args.overwrite:
            raise BgmatteError("--out and --overwrite go with --model or --baseline")
        result = evaluate.evaluate_folders(args.pred, args.gt)
    if args.json:
        for note in result.notes:
            print(f"bgmatte eval: note: {note}", file=sys.stderr)
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(evaluate.format_table(result))
    return 0
