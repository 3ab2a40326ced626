"""Real photographs for training, from Debian's wallpaper packages: `python -m bgmatte.train.backgrounds DIR`.

The packages are fetched with `apt-get download` (no installation, no root needed) and unpacked with
`dpkg -x` into a temporary folder; their pictures are downscaled and written to DIR as JPEG. Some
packages are reserved for held-out evaluation: never train on them. They are refused by name, names that
apt would read as a pattern are refused too, and every downloaded .deb is checked by the package name in
its control file before anything in it is unpacked.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from bgmatte.errors import BgmatteError, for_command_line
from bgmatte.io.files import make_folder, refuse_existing, write_through_temporary
from bgmatte.io.images import read_image

PACKAGES = ("plasma-workspace-wallpapers", "ukui-wallpapers", "gnome-backgrounds")
RESERVED = frozenset({"mate-backgrounds", "opencv-doc"})  # held-out evaluation data: never for training
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SKIPPED_WORDS = ("screenshot", "thumbnail", "preview")
_SIZE_NAME = re.compile(r"^(\d+)x(\d+)$")
_PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9-]+")


def check_packages(packages: Sequence[str]) -> list[str]:
    """The package names, or BgmatteError if one is reserved for evaluation or is not a plain name.
    Debian allows '.' and '+' in names, but apt reads a name holding them as a regular expression when
    no package has it exactly (`mate-background.` fetches mate-backgrounds), so they are refused here."""
    names = []
    for package in packages:
        name = re.split(r"[:=]", package.strip(), maxsplit=1)[0]
        if name in RESERVED:
            raise BgmatteError(f"{name}: reserved for held-out evaluation, never used for training")
        if not _PLAIN_NAME.fullmatch(name):
            raise BgmatteError(f"{package!r}: not a plain Debian package name (lowercase letters, digits and "
                               "'-'; apt reads other characters as a pattern)")
        names.append(name)
    return names


def select_pictures(paths: Sequence[Path]) -> list[Path]:
    """One file per picture: of a folder holding one picture at several sizes (KDE's
    contents/images/1920x1080.jpg ...) only the largest is kept; screenshots and previews are skipped."""
    best: dict[Path, tuple[int, Path]] = {}
    for path in sorted(paths):
        if path.suffix.lower() not in PICTURE_SUFFIXES:
            continue
        if any(word in part.lower() for part in path.parts for word in _SKIPPED_WORDS):
            continue
        size = _SIZE_NAME.match(path.stem)
        key = path.parent if size else path
        area = int(size.group(1)) * int(size.group(2)) if size else 0
        if key not in best or area > best[key][0]:
            best[key] = (area, path)
    return sorted(path for _, path in best.values())


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def deb_package_name(deb: Path) -> str:
    """The Package field of a .deb's control file: the package it really holds, whatever the file is called."""
    result = _run(["dpkg-deb", "-f", str(deb), "Package"], deb.parent)
    name = result.stdout.strip()
    if result.returncode != 0 or not name:
        tail = (result.stderr or "no Package field").strip().splitlines()[-1:] or ["no output"]
        raise BgmatteError(f"{deb.name}: cannot read the package name ({tail[0]})")
    return name


def check_downloads(package: str, debs: Sequence[Path]) -> None:
    """Refuse, and delete, the downloads unless each holds `package` itself: never a reserved package, nor
    another one that apt chose (a pattern's match, a virtual package's provider)."""
    names = {deb_package_name(deb) for deb in debs}
    if names == {package}:
        return
    for deb in debs:
        deb.unlink(missing_ok=True)
    reserved = sorted(names & RESERVED)
    if reserved:
        raise BgmatteError(f"apt-get download {package} fetched {', '.join(reserved)}, reserved for held-out "
                           "evaluation: deleted, never used for training")
    raise BgmatteError(f"apt-get download {package} fetched {', '.join(sorted(names - {package}))} instead: deleted")


def download_package(package: str, folder: Path, log: Callable[[str], None] = print) -> Path:
    """Download one package's .deb into the empty `folder` with `apt-get download`, running `apt-get update`
    once if the first try fails; returns the .deb path. Every .deb that appears is checked by the package
    name inside it (`check_downloads`), not by its file name."""
    if shutil.which("apt-get") is None:
        raise BgmatteError("apt-get not found: the backgrounds come from Debian packages")
    if any(folder.glob("*.deb")):  # they would be judged, and deleted, as this download
        raise BgmatteError(f"{folder}: already holds .deb files (download into an empty folder)")
    result = _run(["apt-get", "download", package], folder)
    if result.returncode != 0:
        log(f"apt-get download {package} failed; running apt-get update and trying again")
        _run(["apt-get", "update"], folder)
        result = _run(["apt-get", "download", package], folder)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BgmatteError(f"apt-get download {package} failed: {tail[0]}")
    debs = sorted(folder.glob("*.deb"))
    if not debs:
        raise BgmatteError(f"apt-get download {package}: no .deb file appeared in {folder}")
    check_downloads(package, debs)
    return debs[-1]


def fetch_backgrounds(
    out_dir: str | Path,
    packages: Sequence[str] = PACKAGES,
    *,
    max_side: int = 1024,
    min_side: int = 256,
    quality: int = 92,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Write the pictures of Debian wallpaper `packages` into `out_dir` as JPEG, downscaled so that the
    longer side is at most `max_side` (smaller ones and exact duplicates are skipped); returns the files.
    Pictures of these packages already in `out_dir` are refused unless `overwrite`."""
    names = check_packages(packages)
    if max_side < min_side:  # pictures under min_side are too small for the generator: none would be of use
        raise BgmatteError(f"the longest side of the pictures must be at least {min_side} pixels, not {max_side}")
    for tool in ("dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BgmatteError(f"{tool} not found: the backgrounds come from Debian packages")
    out_dir = Path(out_dir)
    make_folder(out_dir, "the pictures")  # before any download, so that the user hears of it at once
    for name in names:  # before the download, not after it
        earlier = sorted(out_dir.glob(f"{name}--*.jpg"))
        if earlier:
            refuse_existing(earlier[0], overwrite)
    written: list[Path] = []
    seen: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="bgmatte-backgrounds-") as temp:
        temp_dir = Path(temp)
        for name in names:
            downloads = temp_dir / "debs" / name
            downloads.mkdir(parents=True)
            deb = download_package(name, downloads, log)
            tree = temp_dir / "tree" / name
            tree.mkdir(parents=True)
            result = _run(["dpkg", "-x", str(deb), str(tree)], temp_dir)
            if result.returncode != 0:
                raise BgmatteError(f"dpkg -x {deb.name} failed: {result.stderr.strip()}")
            pictures = select_pictures([p for p in tree.rglob("*") if p.is_file()])
            count = 0
            for picture in pictures:
                try:  # the project's checked reader: a picture above its pixel limit is not decoded
                    image = cv2.cvtColor(read_image(picture), cv2.COLOR_RGB2BGR)
                except BgmatteError as exc:
                    inside = str(picture.relative_to(tree))  # its place in the package, not in a temporary folder
                    log(f"{name}: left out {str(exc).replace(str(picture), inside)}")
                    continue
                if min(image.shape[:2]) < min_side:
                    continue
                height, width = image.shape[:2]
                if max(height, width) > max_side:
                    factor = max_side / max(height, width)
                    size = (max(1, round(width * factor)), max(1, round(height * factor)))
                    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
                digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
                if not ok or digest in seen:
                    continue
                seen.add(digest)
                relative = picture.relative_to(tree).with_suffix("")
                stem = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(relative.parts[-4:]))
                target = out_dir / f"{name}--{stem}.jpg"
                number = 1
                while target in written:  # sky.png beside sky.jpg, or names that differ only in odd characters
                    number += 1
                    target = out_dir / f"{name}--{stem}-{number}.jpg"
                refuse_existing(target, overwrite)
                data = encoded.tobytes()
                write_through_temporary(target, lambda temporary: temporary.write_bytes(data), "the picture")
                written.append(target)
                count += 1
            log(f"{name}: {count} pictures")
            deb.unlink()
            shutil.rmtree(tree, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: fetch the pictures into DIR and print how many and how large."""
    parser = argparse.ArgumentParser(
        prog="python -m bgmatte.train.backgrounds",
        description="Fetch training photographs from Debian wallpaper packages.",
    )
    parser.add_argument("dir", type=Path, help="folder to write the pictures to")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help=f"Debian packages to take pictures from (default: {' '.join(PACKAGES)})")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="longest side of the written pictures (at least 256; default 1024)")
    parser.add_argument("--overwrite", action="store_true", help="replace pictures of these packages already in DIR")
    args = parser.parse_args(argv)
    try:
        written = fetch_backgrounds(args.dir, args.packages, max_side=args.max_side, overwrite=args.overwrite)
    except BgmatteError as exc:
        print(f"{parser.prog}: error: {for_command_line(exc)}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for p in written)
    print(f"{len(written)} pictures, {total / 1e6:.1f} MB, in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
