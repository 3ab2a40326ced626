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

from bgmatte.cli import Subcommands
from bgmatte.errors import BgmatteError
from bgmatte.train.config import DEFAULT_BATCH, DEFAULT_CROP, LOGGERS, PARTS, PRECISIONS, STAGES, TrainOptions

_FIELD_NAMES = frozenset(f.name for f in fields(TrainOptions))


def _per_stage(table: dict[str, object]) -> str:
    """A per-stage default in help words: ``256 base, 512 refine``."""
    return ", ".join(f"{value} {stage}" for stage, value in table.items())


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


def register(subparsers: Subcommands) -> None:
    """Add the `train` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train a model (base stage, then refine stage)",
        description="Train MattingBase (stage 'base', whole crops) or MattingRefine (stage 'refine', "
                    "initialised from a base checkpoint with --init) with the paper's losses and learning "
                    "rates. Multi-GPU or multi-node: run under torchrun.",
    )
    parser.add_argument("stage", choices=STAGES, help="base or refine")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="run folder: last.safetensors, best.safetensors, state.pt, *.csv, samples/")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None,
                      help="synthetic (no files needed), videomatte, photomatte or aim "
                           f"(default: {TrainOptions.dataset})")
    data.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                      help="the dataset's folder (synthetic: optional photographs used as textures)")
    data.add_argument("--backgrounds", type=Path, default=None, metavar="DIR",
                      help="background images to composite over (needed by the real datasets); its train/ and "
                           "valid/ subfolders, where there, keep training's and validation's apart")
    data.add_argument("--crop", type=int, default=None, metavar="PX",
                      help=f"square crop side (default: {_per_stage(DEFAULT_CROP)})")
    data.add_argument("--batch-size", type=int, default=None, metavar="N",
                      help=f"global batch, split over processes (default: {_per_stage(DEFAULT_BATCH)})")
    data.add_argument("--train-samples", type=int, default=None, metavar="N",
                      help="train on the dataset's first N items only, each composited and augmented once and "
                           "kept in memory for the whole run: to overfit or to train on a fixed pool (default: all, "
                           "drawn anew every epoch)")
    data.add_argument("--plate-color", type=float, default=None, metavar="P",
                      help="share of samples whose plate differs in colour from the true background "
                           "(default: 0.8, the paper's; less gives sharper edges on clean plates)")
    data.add_argument("--plate-misalign", type=float, default=None, metavar="P",
                      help="share of samples whose plate is slightly rotated and shifted (default: 0.3, the paper's)")
    data.add_argument("--num-workers", type=int, default=None, metavar="N",
                      help=f"data loading processes per training process (default: {TrainOptions.num_workers})")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=("mobilenetv2", "resnet50", "resnet101"), default=None,
                       help="default: that of --init, else mobilenetv2")
    model.add_argument("--init", type=Path, default=None, metavar="CKPT",
                       help="start from these weights (.pth or .safetensors; a base checkpoint for refine)")
    model.add_argument("--freeze-base", action="store_true", default=None,
                       help="refine stage: train the refiner alone, the base network (and its batch-norm "
                            "statistics) kept as --init gave it (so it needs --init)")
    model.add_argument("--backbone-scale", type=float, default=None,
                       help=f"refine stage (default: {TrainOptions.backbone_scale})")
    model.add_argument("--sample-pixels", type=int, default=None,
                       help="pixels the refiner refines per image (default: 80,000 scaled to the crop)")
    run = parser.add_argument_group("optimisation")
    run.add_argument("--steps", type=int, default=None, help=f"total steps (default: {TrainOptions.steps})")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out where it stopped, with the options it was started with "
                          "(from its state.pt) wherever none is given now. Given again, --steps, --lr-*, "
                          "--precision, --val-every, --save-every, --log and --log-every may change; --device, "
                          "--num-workers and --quiet are for this session only; any other option that differs "
                          "from the run's is refused")
    for part, rates in (("backbone", "1e-4 base, 5e-5 refine"), ("aspp", "5e-4 base, 5e-5 refine"),
                        ("decoder", "5e-4 base, 1e-4 refine"), ("refiner", "3e-4")):
        run.add_argument(f"--lr-{part}", type=float, default=None, help=f"learning rate (default: {rates})")
    run.add_argument("--precision", choices=PRECISIONS, default=None,
                     help=f"auto: bf16 or fp16 on GPUs, fp32 on the CPU (default: {TrainOptions.precision})")
    run.add_argument("--device", default=None, help=f"auto, cpu, cuda or cuda:N (default: {TrainOptions.device})")
    run.add_argument("--seed", type=int, default=None,
                     help=f"seeds the initial weights, the data and its augmentation (default: {TrainOptions.seed})")
    logs = parser.add_argument_group("validation, checkpoints and logs")
    logs.add_argument("--val-every", type=int, default=None,
                      help="steps between validations, and at the last step (0: never; "
                           f"default: {TrainOptions.val_every})")
    logs.add_argument("--val-samples", type=int, default=None,
                      help=f"size of the fixed validation set (default: {TrainOptions.val_samples})")
    logs.add_argument("--save-every", type=parse_save_every, default=None, metavar="N|Tm",
                      help=f"save every N steps, or every T minutes (15m, 1h) (default: {TrainOptions.save_every})")
    logs.add_argument("--log", choices=LOGGERS, default=None,
                      help=f"csv, or tensorboard (CSV too; needs tensorboard installed; default: {TrainOptions.log})")
    logs.add_argument("--log-every", type=int, default=None,
                      help=f"steps between log rows (default: {TrainOptions.log_every})")
    logs.add_argument("--quiet", action="store_true", default=None, help="no progress lines")
    parser.set_defaults(func=run_train)


def _is_helper_process() -> bool:
    """Whether this is a process of a torchrun group other than rank 0, which speaks for the group."""
    return os.environ.get("RANK", "0") != "0"


def _given_options(args: argparse.Namespace) -> dict[str, object]:
    """The TrainOptions fields the command line sets, by name. The options left out are None in ``args`` and
    stay out of it, so that TrainOptions' defaults, or a resumed run's own settings, fill them in."""
    typed = {dest: value for dest, value in vars(args).items() if value is not None}
    values = {name: value for name, value in typed.items() if name in _FIELD_NAMES}
    rates = {part: typed[f"lr_{part}"] for part in PARTS if f"lr_{part}" in typed}
    if rates:
        values["lr"] = rates
    if "save_every" in typed:  # steps or minutes: the other is 0
        values["save_every"], values["save_minutes"] = typed["save_every"]
    if "quiet" in typed:
        values["progress"] = not typed["quiet"]
    return values


def training_options(args: argparse.Namespace) -> tuple[TrainOptions, set[str]]:
    """The options the arguments ask for, TrainOptions' defaults standing in for those left out, and the names
    of the fields given (a resumed run takes the others from its saved state). Each option is checked here; for
    a resume, whether they fit together waits until the run's own have replaced the defaults (see
    ``TrainOptions.check_combinations``)."""
    values = _given_options(args)
    return TrainOptions(**values), set(values)


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
