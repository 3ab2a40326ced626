"""`bgmatte demo`: matte a generated sample with the embedded default model, to see everything work."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="matte a generated sample shot with the default model",
                                   description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo/)")
    parser.add_argument("--checkpoint", help="use these weights instead of the embedded default model")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bgmatte.demo import run_demo

    for path in run_demo(args.out, checkpoint=args.checkpoint, overwrite=args.overwrite, progress=not args.quiet):
        print(path)
    return 0
