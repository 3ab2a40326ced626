"""`bgmatte export`: write a checkpoint as TorchScript or ONNX."""
from __future__ import annotations

import argparse

from bgmatte.cli import Subcommands
from bgmatte.cli.video import add_plate_solve_argument, add_refine_arguments, check_refine_arguments, plate_solve_choice
from bgmatte.errors import BgmatteError

DESCRIPTION = """\
Export a checkpoint (the released .pth files or .safetensors; without one, the embedded default model)
for deployment:

  torchscript   a TorchScript model; backbone_scale, refine_mode, refine_sample_pixels,
                refine_threshold (and plate_solve) can still be changed after torch.jit.load, as
                with the reference's TorchScript models. fp16/bf16 export the weights in that dtype.
  onnx          an ONNX model (opset 18 by default, dynamic batch, height and width), fp32. Its
                settings are fixed at export and stored in the file's metadata; load it with
                bgmatte.load_model(path, backend="onnxruntime"). Exporting takes about a minute.

An existing output file is refused unless --overwrite; the model is written under a temporary name
beside it and renamed when complete, so an interrupted export leaves no half-written file.

  bgmatte export torchscript pytorch_resnet50.pth -o resnet50.torchscript
  bgmatte export onnx pytorch_mobilenetv2.pth -o mobilenetv2.onnx --refine-sample-pixels 80000
"""


def register(subparsers: Subcommands) -> None:
    """Add the `export` subcommand."""
    parser = subparsers.add_parser(
        "export", help="export a model to TorchScript or ONNX",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=("torchscript", "onnx"), help="what to write")
    parser.add_argument("checkpoint", nargs="?", help="weights (.pth or .safetensors); default: the embedded model")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="the file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_refine_arguments(parser, reference_names=False)
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="weights' dtype, TorchScript only (default fp32)")
    parser.add_argument("--device", default="cpu", help="device for the TorchScript weights (default cpu)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or later (default 18)")
    add_plate_solve_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and say where the file went."""
    check_refine_arguments(args)
    from bgmatte.export import export_checkpoint
    from bgmatte.model.matting import RefineOptions

    try:
        options = RefineOptions(args.backbone_scale, args.refine_mode, args.refine_sample_pixels,
                                args.refine_threshold)
    except ValueError as exc:
        raise BgmatteError(str(exc)) from None
    path = export_checkpoint(args.checkpoint, args.output, format=args.format, backbone=args.backbone,
                             options=options, precision=args.precision, device=args.device, opset=args.opset,
                             plate_solve=plate_solve_choice(args), overwrite=args.overwrite)
    print(f"bgmatte export: wrote {path}")
    return 0
