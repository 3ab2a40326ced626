"""`bgmatte train base|refine`: parse the options and call `bgmatte.train.loop.train`.

Several processes: `torchrun --nproc_per_node N -m bgmatte train ...` (one per GPU; on the CPU the
gloo backend, where batch norm stays per process).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from bgmatte.errors import BgmatteError

if TYPE_CHECKING:
    from bgmatte.train.config import TrainOptions

_STAGES = ("base", "refine")
_DEFAULTS: dict[str, object] = {
    "dataset": "synthetic", "num_workers": 2, "freeze_base": False, "backbone_scale": 0.25, "steps": 10_000,
    "precision": "auto", "device": "auto", "seed": 0, "val_every": 500, "val_samples": 16,
    "save_every": (500, 0.0), "log": "csv", "log_every": 10, "quiet": False,
}
"""Defaults of the options that argparse leaves at None, so that a resumed run can tell the options typed
from those left out (which it takes from the run); the options not listed here default to None anyway."""
_FIELDS = {"quiet": ("progress",), "save_every": ("save_every", "save_minutes")}
"""Command-line options that set TrainOptions fields of other names; the others set the field of their name."""


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
    data.add_argument("--dataset", default=None,
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
    data.add_argument("--num-workers", type=int, default=None, metavar="N",
                      help=f"data loading processes per training process (default: {_DEFAULTS['num_workers']})")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=("mobilenetv2", "resnet50", "resnet101"), default=None,
                       help="default: that of --init, else mobilenetv2")
    model.add_argument("--init", type=Path, default=None, metavar="CKPT",
                       help="start from these weights (.pth or .safetensors; a base checkpoint for refine)")
    model.add_argument("--freeze-base", action="store_true", default=None,
                       help="refine stage: train the refiner alone, the base network (and its batch-norm "
                            "statistics) kept as --init gave it")
    model.add_argument("--backbone-scale", type=float, default=None,
                       help=f"refine stage (default: {_DEFAULTS['backbone_scale']})")
    model.add_argument("--sample-pixels", type=int, default=None,
                       help="pixels the refiner refines per image (default: 80,000 scaled to the crop)")
    run = parser.add_argument_group("optimisation")
    run.add_argument("--steps", type=int, default=None, help=f"total steps (default: {_DEFAULTS['steps']})")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out where it stopped, with the options it was started with "
                          "(from its state.pt) wherever none is given now. Given again, --steps, --lr-*, "
                          "--precision, --val-every, --save-every, --log and --log-every may change; --device, "
                          "--num-workers and --quiet are for this session only; any other option that differs "
                          "from the run's is refused")
    for part, rates in (("backbone", "1e-4 base, 5e-5 refine"), ("aspp", "5e-4 base, 5e-5 refine"),
                        ("decoder", "5e-4 base, 1e-4 refine"), ("refiner", "3e-4")):
        run.add_argument(f"--lr-{part}", type=float, default=None, help=f"learning rate (default: {rates})")
    run.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default=None,
                     help="auto: bf16 or fp16 on GPUs, fp32 on the CPU (default: auto)")
    run.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--seed", type=int, default=None,
                     help=f"seeds the initial weights, the data and its augmentation (default: {_DEFAULTS['seed']})")
    logs = parser.add_argument_group("validation, checkpoints and logs")
    logs.add_argument("--val-every", type=int, default=None,
                      help=f"steps between validations (0: never; default: {_DEFAULTS['val_every']})")
    logs.add_argument("--val-samples", type=int, default=None,
                      help=f"size of the fixed validation set (default: {_DEFAULTS['val_samples']})")
    logs.add_argument("--save-every", type=parse_save_every, default=None, metavar="N|Tm",
                      help="save every N steps, or every T minutes (15m, 1h) (default: 500)")
    logs.add_argument("--log", choices=("csv", "tensorboard"), default=None,
                      help="csv, or tensorboard (CSV too; needs tensorboard installed; default: csv)")
    logs.add_argument("--log-every", type=int, default=None,
                      help=f"steps between log rows (default: {_DEFAULTS['log_every']})")
    logs.add_argument("--quiet", action="store_true", default=None, help="no progress lines")
    parser.set_defaults(func=run_train)


def _is_helper_process() -> bool:
    """Whether this is a process of a torchrun group other than rank 0, which speaks for the group."""
    return os.environ.get("RANK", "0") != "0"


def training_options(args: argparse.Namespace) -> tuple[TrainOptions, set[str]]:
    """The options the arguments ask for, options left out at their defaults, and the names of the
    TrainOptions fields that were given (a resumed run takes the others from its saved state). Each option
    is checked here; for a resume, whether they fit together waits until the run's own have replaced the
    defaults (see ``TrainOptions.check_combinations``)."""
    from bgmatte.train.config import TrainOptions

    values = {dest: (value if value is not None else _DEFAULTS.get(dest)) for dest, value in vars(args).items()}
    given = {name for dest, value in vars(args).items() if value is not None for name in _FIELDS.get(dest, (dest,))}
    given &= {f.name for f in fields(TrainOptions)}
    learning_rates = {part: values[f"lr_{part}"] for part in ("backbone", "aspp", "decoder", "refiner")
                      if values[f"lr_{part}"] is not None}
    save_steps, save_minutes = values["save_every"]
    batch_size = values["batch_size"] if values["batch_size"] is not None else (8 if args.stage == "base" else 4)
    dataset = values["dataset"]
    if not args.resume and dataset != "synthetic" and (args.data_root is None or args.backgrounds is None):
        raise BgmatteError(f"--dataset {dataset} needs --data-root (the dataset's folder) and "
                           "--backgrounds (a folder of background images)")
    options = TrainOptions(
        stage=args.stage, out=args.out, dataset=dataset, data_root=args.data_root,
        backgrounds=args.backgrounds, backbone=args.backbone, steps=values["steps"], batch_size=batch_size,
        crop=args.crop, train_samples=args.train_samples, init=args.init, resume=bool(args.resume),
        lr=learning_rates, freeze_base=values["freeze_base"], backbone_scale=values["backbone_scale"],
        sample_pixels=args.sample_pixels, plate_color=args.plate_color, plate_misalign=args.plate_misalign,
        precision=values["precision"], device=values["device"], num_workers=values["num_workers"],
        seed=values["seed"], val_every=values["val_every"], val_samples=values["val_samples"],
        save_every=save_steps, save_minutes=save_minutes, log=values["log"], log_every=values["log_every"],
        progress=not values["quiet"],
    )
    return options, given


def run_train(args: argparse.Namespace) -> int:
    """Build the options from the arguments and train. Under torchrun, a refusal that every process
    reaches alike is printed by rank 0 alone; the other processes exit non-zero without a word."""
    from bgmatte.train.loop import RunRefused, train

    try:
        options, given = training_options(args)
    except BgmatteError:
        if _is_helper_process():
            return 2
        raise
    try:
        result = train(options, given)
    except RunRefused:
        if _is_helper_process():
            return 2
        raise
    if options.progress and result.step and not _is_helper_process():
        best = f", best validation loss {result.best_valid_loss:.4f}" if result.best_valid_loss is not None else ""
        print(f"bgmatte train: done at step {result.step}{best}; weights in {options.out / 'last.safetensors'}",
              file=sys.stderr)
    return 0
