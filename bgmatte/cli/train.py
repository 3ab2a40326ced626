"""`bgmatte train base|refine`: parse the options and call `bgmatte.train.loop.train`.

Several processes: `torchrun --nproc_per_node N -m bgmatte train ...` (one per GPU; on the CPU the
gloo backend, where batch norm stays per process).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from bgmatte.errors import BgmatteError

_STAGES = ("base", "refine")


def parse_save_every(text: str) -> tuple[int, float]:
    """``500`` is every 500 steps; ``15m``, ``15min`` or ``1.5h`` is every so many minutes; ``0`` is never."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(m|min|minutes?|h|hours?)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of steps (500) nor a time (15m, 1h)")
    number, unit = match.groups()
    if unit is None:
        if "." in number:
            raise argparse.ArgumentTypeError(f"{text!r}: a number of steps must be whole")
        return int(number), 0.0
    return 0, float(number) * (60.0 if unit.startswith("h") else 1.0)


def register(subparsers) -> None:
    """Add the `train` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train a model (base stage, then refine stage)",
        description="Train MattingBase (stage 'base', whole crops) or MattingRefine (stage 'refine', "
                    "initialised from a base checkpoint with --init) with the paper's losses and learning "
                    "rates. Multi-GPU or multi-node: run under torchrun.",
    )
    parser.add_argument("stage", choices=_STAGES, help="base or refine")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="run folder: last.safetensors, best.safetensors, state.pt, *.csv, samples/")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="synthetic",
                      help="synthetic (no files needed), videomatte, photomatte or aim (default: synthetic)")
    data.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                      help="the dataset's folder (synthetic: optional photographs used as textures)")
    data.add_argument("--backgrounds", type=Path, default=None, metavar="DIR",
                      help="background images to composite over (needed by the real datasets)")
    data.add_argument("--crop", type=int, default=None, metavar="PX",
                      help="square crop side (default: 256 base, 512 refine)")
    data.add_argument("--batch-size", type=int, default=None, metavar="N",
                      help="global batch, split over processes (default: 8 base, 4 refine)")
    data.add_argument("--train-samples", type=int, default=None, metavar="N",
                      help="train on the dataset's first N items only (default: all)")
    data.add_argument("--plate-color", type=float, default=None, metavar="P",
                      help="share of samples whose plate differs in colour from the true background "
                           "(default: 0.8, the paper's; less gives sharper edges on clean plates)")
    data.add_argument("--plate-misalign", type=float, default=None, metavar="P",
                      help="share of samples whose plate is slightly rotated and shifted (default: 0.3, the paper's)")
    data.add_argument("--num-workers", type=int, default=2, metavar="N",
                      help="data loading processes per training process (default: 2)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=("mobilenetv2", "resnet50", "resnet101"), default=None,
                       help="default: that of --init, else mobilenetv2")
    model.add_argument("--init", type=Path, default=None, metavar="CKPT",
                       help="start from these weights (.pth or .safetensors; a base checkpoint for refine)")
    model.add_argument("--freeze-base", action="store_true",
                       help="refine stage: train the refiner alone, the base network (and its batch-norm "
                            "statistics) kept as --init gave it")
    model.add_argument("--backbone-scale", type=float, default=0.25, help="refine stage (default: 0.25)")
    model.add_argument("--sample-pixels", type=int, default=None,
                       help="pixels the refiner refines per image (default: 80,000 scaled to the crop)")
    run = parser.add_argument_group("optimisation")
    run.add_argument("--steps", type=int, default=10_000, help="total steps (default: 10000)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    for part, rates in (("backbone", "1e-4 base, 5e-5 refine"), ("aspp", "5e-4 base, 5e-5 refine"),
                        ("decoder", "5e-4 base, 1e-4 refine"), ("refiner", "3e-4")):
        run.add_argument(f"--lr-{part}", type=float, default=None, help=f"learning rate (default: {rates})")
    run.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                     help="auto: bf16 or fp16 on GPUs, fp32 on the CPU")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--seed", type=int, default=0)
    logs = parser.add_argument_group("validation, checkpoints and logs")
    logs.add_argument("--val-every", type=int, default=500, help="steps between validations (0: never)")
    logs.add_argument("--val-samples", type=int, default=16, help="size of the fixed validation set")
    logs.add_argument("--save-every", type=parse_save_every, default=(500, 0.0), metavar="N|Tm",
                      help="save every N steps, or every T minutes (15m, 1h) (default: 500)")
    logs.add_argument("--log", choices=("csv", "tensorboard"), default="csv",
                      help="csv, or tensorboard (CSV too; needs tensorboard installed)")
    logs.add_argument("--log-every", type=int, default=10, help="steps between log rows")
    logs.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Build the options from the arguments and train."""
    from bgmatte.train.config import TrainOptions
    from bgmatte.train.loop import train

    learning_rates = {part: getattr(args, f"lr_{part}") for part in ("backbone", "aspp", "decoder", "refiner")
                      if getattr(args, f"lr_{part}") is not None}
    save_steps, save_minutes = args.save_every
    batch_size = args.batch_size if args.batch_size is not None else (8 if args.stage == "base" else 4)
    if args.dataset != "synthetic" and (args.data_root is None or args.backgrounds is None):
        raise BgmatteError(f"--dataset {args.dataset} needs --data-root (the dataset's folder) and "
                           "--backgrounds (a folder of background images)")
    options = TrainOptions(
        stage=args.stage, out=args.out, dataset=args.dataset, data_root=args.data_root,
        backgrounds=args.backgrounds, backbone=args.backbone, steps=args.steps, batch_size=batch_size,
        crop=args.crop, train_samples=args.train_samples, init=args.init, resume=args.resume,
        lr=learning_rates, freeze_base=args.freeze_base, backbone_scale=args.backbone_scale, sample_pixels=args.sample_pixels,
        plate_color=args.plate_color, plate_misalign=args.plate_misalign,
        precision=args.precision, device=args.device, num_workers=args.num_workers, seed=args.seed,
        val_every=args.val_every, val_samples=args.val_samples, save_every=save_steps, save_minutes=save_minutes,
        log=args.log, log_every=args.log_every, progress=not args.quiet,
    )
    result = train(options)
    if options.progress and result.step and os.environ.get("RANK", "0") == "0":
        best = f", best validation loss {result.best_valid_loss:.4f}" if result.best_valid_loss is not None else ""
        print(f"bgmatte train: done at step {result.step}{best}; weights in {options.out / 'last.safetensors'}",
              file=sys.stderr)
    return 0
