"""A fixed validation set on disk, laid out for `bgmatte eval`: src/, bgr/, pha/, fgr/ and trimap/ PNGs.

It is drawn from the synthetic generator over photographs kept out of training, at the size the
held-out evaluation uses (1280x720), so the model and the classical baseline can be compared on it.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from bgmatte.errors import BgmatteError, OutputExists, for_command_line
from bgmatte.io.files import make_folder
from bgmatte.io.images import write_png
from bgmatte.train.augment import SYNTHETIC, AugmentOptions
from bgmatte.train.data import SyntheticDataset, load_images

# A plate shot right after the take: the background is the same, but each capture has its own sensor
# noise. The training augmentations (plate colour drift, misalignment, cast shadows) stay off.
CLEAN_PLATE = replace(SYNTHETIC, plate_color_probability=0.0, plate_affine_probability=0.0, shadow_probability=0.0)
FOLDERS = ("src", "bgr", "pha", "fgr", "trimap")
_SAMPLE_NAME = re.compile(r"\d{4,}\.png")  # the names the set's samples are written under: 0000.png ...


def trimap_from_alpha(pha: np.ndarray, band: int = 7) -> np.ndarray:
    """The ground-truth trimap: 0 and 255 where alpha is certain, 128 on fractional alpha widened by ``band`` pixels."""
    known_fg = pha >= 0.999
    known_bg = pha <= 0.001
    unknown = (~(known_fg | known_bg)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    unknown = cv2.dilate(unknown, kernel).astype(bool)
    trimap = np.where(known_fg, 255, 0).astype(np.uint8)
    trimap[unknown] = 128
    return trimap


def remove_samples(out: Path) -> None:
    """Delete an earlier set's samples from ``out`` (only files named like them, NNNN.png), so that a smaller
    set written over a larger one does not keep the larger one's extra samples beside its own."""
    for name in FOLDERS:
        try:
            for path in (out / name).iterdir():
                if _SAMPLE_NAME.fullmatch(path.name) and not path.is_dir():
                    path.unlink()
        except OSError as exc:
            raise BgmatteError(f"{out / name}: cannot remove the earlier samples ({exc.strerror or exc})") from None


def make_validation_set(out_dir: str | Path, *, count: int = 24, width: int = 1280, height: int = 720,
                        photos: str | Path | None = None, seed: int = 20261124, overwrite: bool = False,
                        augment: AugmentOptions = CLEAN_PLATE) -> Path:
    """Write ``count`` generated samples into ``out_dir`` and return it; ``augment`` decides how the plate
    differs from the shot (``CLEAN_PLATE`` by default, ``SYNTHETIC`` for the training's harder plates)."""
    out = Path(out_dir)
    if count < 1:
        raise BgmatteError(f"the count of samples must be at least 1, not {count}")
    if os.path.lexists(out) and not out.is_dir():  # a file, or a link to nowhere
        raise BgmatteError(f"{out}: is a file, not a folder (for the validation set)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out}: already exists and is not empty", "write into it")
    pictures = None
    if photos is not None:
        if Path(photos).exists() and not Path(photos).is_dir():
            raise BgmatteError(f"{photos}: is a file, not a folder (of photographs)")
        pictures = load_images(photos)  # a missing folder is one line from here
        if not pictures:  # the generator would fall back on procedural textures alone, without a word
            raise BgmatteError(f"{photos}: no images in this folder")
    dataset = SyntheticDataset((height, width), count, seed=seed, photos=pictures, augment=augment)
    for folder in (out, *(out / name for name in FOLDERS)):  # the set's folder first, to be named if it fails
        make_folder(folder, "the validation set")
    if overwrite:
        remove_samples(out)
    for index in range(count):
        item = dataset[index]
        arrays = {name: item[name].permute(1, 2, 0).numpy() for name in ("src", "bgr", "pha", "fgr")}
        stem = f"{index:04d}.png"
        for name, array in arrays.items():
            write_png(out / name / stem, array[..., 0] if name == "pha" else array, overwrite=True)
        write_png(out / "trimap" / stem, trimap_from_alpha(arrays["pha"][..., 0]), overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: write a validation set and print its folder; bad input is one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m bgmatte.train.validation", description=__doc__)
    parser.add_argument("out", type=Path, help="folder to write the set into")
    parser.add_argument("--photos", type=Path, help="photographs kept out of training (default: procedural "
                        "textures only)")
    parser.add_argument("--count", type=int, default=24, help="samples (default 24)")
    parser.add_argument("--seed", type=int, default=20261124, help="the generator's seed (default 20261124)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty, "
                        "replacing an earlier set's samples")
    parser.add_argument("--jittered-plates", action="store_true",
                        help="plates drift in colour and alignment as in training (harder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    augment = SYNTHETIC if args.jittered_plates else CLEAN_PLATE
    try:
        out = make_validation_set(args.out, count=args.count, photos=args.photos, seed=args.seed,
                                  overwrite=args.overwrite, augment=augment)
    except BgmatteError as exc:
        print(f"{parser.prog}: error: {for_command_line(exc)}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
