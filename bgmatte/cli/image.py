"""`bgmatte image`: matte photos against their plates; parses arguments and calls `bgmatte.matte_images`.

The reference script's spelling (`inference_images.py`: --images-src, --images-bgr, --output-dir,
--output-types) works as well as the short one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bgmatte.cli import Subcommands
from bgmatte.cli.video import (OUTPUT_KINDS, add_model_arguments, add_plate_arguments, check_refine_arguments,
                               model_options)
from bgmatte.errors import BgmatteError, PartlyDone

DESCRIPTION = """\
Matte still images shot against a plate. Writes OUT/com/NAME.png (an RGBA cutout, or a composite with
--target-bgr) and, on request, OUT/pha, OUT/fgr, OUT/err and OUT/ref.

  bgmatte image photo.jpg more/ --bgr plate.jpg -o OUT [--outputs com pha fgr]
  bgmatte image --images-src DIR --images-bgr DIR --output-dir OUT --output-types com pha   (the reference's)

--bgr is one plate for every image, or a folder of plates matched to the images by file name.
A JPEG, PNG or WebP photo's ICC colour profile (Display P3, Adobe RGB) is kept in its fgr and com PNGs,
except in a composite over a --target-bgr image of another profile; a TIFF's is not read (untagged outputs).
Existing outputs are refused unless --overwrite (or -y), or kept with --skip-existing, which writes only
the missing ones: to finish a run stopped by Ctrl-C. An image that cannot be read, or whose plate from a
folder cannot, is left out, the others are matted, and the exit status is non-zero: the files written are
listed and counted as after a clean run, then one error line names every input left out and why.
Ctrl-C (or SIGTERM, SIGHUP) lets the images being saved finish, lists and counts the files written so far
the same way, and leaves no partly written file.
"""


def register(subparsers: Subcommands) -> None:
    """Add the `image` subcommand."""
    parser = subparsers.add_parser(
        "image", help="matte photos against their plates (RGBA cutouts, alpha, foreground)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", nargs="*", metavar="SRC", help="image files or folders")
    parser.add_argument("--images-src", action="append", metavar="SRC", help="an image file or folder (the reference's spelling)")
    parser.add_argument("--bgr", "--images-bgr", dest="bgr", metavar="PLATE", help="a plate image or a folder of plates")
    parser.add_argument("-o", "--output-dir", dest="output_dir", metavar="OUT", help="the output folder")
    parser.add_argument("--outputs", "--output-types", dest="outputs", nargs="+", choices=OUTPUT_KINDS,
                        metavar="KIND", help="any of com pha fgr err ref (default: com)")
    parser.add_argument("--target-bgr", dest="target_bgr", metavar="BG",
                        help="composite over a colour, an image or blur instead of writing RGBA cutouts (transparent, the default)")
    add_plate_arguments(parser, each="image")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", "-y", dest="overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep existing outputs and write only the missing ones (finish a stopped run)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, matte the images and print how many files went where."""
    sources = [*args.src, *(args.images_src or [])]
    if not sources:
        raise BgmatteError("no images: give image files or folders (or --images-src)")
    if not args.bgr:
        raise BgmatteError("no plate: give --bgr PLATE (an image, or a folder of plates named like the images)")
    if not args.output_dir:
        raise BgmatteError("no output folder: give -o OUT (or --output-dir)")
    check_refine_arguments(args)
    from bgmatte.pipeline import matte_images

    try:
        written = matte_images(
            sources, args.bgr, output_dir=args.output_dir, outputs=args.outputs or ("com",),
            target_bgr=args.target_bgr, align=args.align, match_exposure=args.match_exposure,
            model=model_options(args), overwrite=args.overwrite, skip_existing=args.skip_existing,
            progress=not args.quiet,
        )
    except PartlyDone as exc:  # some inputs left out: what was written is reported as after a clean run, then the error
        report(exc.written, args, partial=True)
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C or a signal: the same, before main's "interrupted" line
        report(getattr(exc, "written", {}), args, partial=True)
        raise
    report(written, args)
    return 0


def report(written: dict[str, list[Path]], args: argparse.Namespace, partial: bool = False) -> None:
    """Each written file on stdout, and (unless --quiet) how many of each output went to which folder on stderr;
    after a batch that left inputs out, kinds with no file are not counted."""
    for kind, paths in written.items():
        for path in paths:
            print(path)
        if not args.quiet and (paths or not partial):
            print(f"bgmatte image: {len(paths)} {kind} image{'s' if len(paths) != 1 else ''} in "
                  f"{paths[0].parent if paths else args.output_dir}", file=sys.stderr)
