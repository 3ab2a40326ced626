"""Training data: readers for the matting datasets users own, background folders, composites, synthetic data.

Every dataset here is a map-style `torch.utils.data.Dataset`. The matte datasets return `fgr` (3,H,W)
and `pha` (1,H,W), the background datasets `bgr` (3,H,W), and the training datasets
(`CompositeDataset`, `SyntheticDataset`) dicts of float tensors in [0, 1] at the crop size: `src`,
`bgr` (the plate given to the model), `pha` and `fgr`. Each item is drawn from its own generator
seeded by (seed, epoch, index), so results do not depend on the number of loader workers.

Images are limited to `MAX_PIXELS` against decompression bombs, checked from the file's header
before decoding (`bgmatte.io.images.read_image`). `build_dataset` checks the headers of every file of a
real dataset before training starts (`check_pairs`, `check_backgrounds`), so that most bad files are
refused at once rather than after hours of training. A matte is read as stored (it is data); its foreground,
a photograph, is turned upright by its EXIF orientation, as viewers show it, unless only its pixels as stored
fit the matte (`bgmatte.io.images.read_to_fit`).
"""
from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bgmatte.errors import BgmatteError
from bgmatte.io import images
from bgmatte.train.augment import PAPER, SYNTHETIC, AugmentOptions, make_training_batch, rand_index
from bgmatte.train.config import DATASETS
from bgmatte.train.synthetic import DEFAULT, TRAINING, SyntheticOptions, generate_batch

IMAGE_SUFFIXES = tuple(sorted(images.IMAGE_EXTENSIONS))
MAX_PIXELS = 50_000_000
MIN_SIDE = 32
"""The shortest side a training image may have: the smallest --crop. A smaller file (a thumbnail, a 1x1
placeholder, a failed export) holds no matte or background worth learning from, and would be blown up
many times over to fill a crop, so it is refused rather than trained on silently."""


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------


def read_image(
    path: str | Path, channels: int = 3, *, dtype: torch.dtype = torch.float32, max_pixels: int = MAX_PIXELS,
    orient: bool = True,
) -> Tensor:
    """Read an image as a (C,H,W) tensor: RGB for 3 channels, grey for 1; float in [0,1], or uint8.

    Reading, the refusal of images over `max_pixels` before they are decoded, and EXIF orientation (applied
    unless `orient` is False), are `bgmatte.io.images.read_image`'s.
    """
    image = images.read_image(path, dtype="uint8" if dtype == torch.uint8 else "float32", channels=channels,
                              max_pixels=max_pixels, orient=orient)
    return _as_tensor(image, dtype)


def read_matte(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Read an alpha matte as a (1,H,W) float tensor in [0,1]: an RGBA file's alpha, else its grey level, as
    `bgmatte.io.images.read_matte` reads and checks it."""
    return _as_tensor(images.read_matte(path, max_pixels=max_pixels), torch.float32)


def _as_tensor(image: np.ndarray, dtype: torch.dtype) -> Tensor:
    if image.ndim == 2:
        image = image[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return tensor if dtype == torch.uint8 else tensor.to(dtype)


def list_images(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files in `folder` (and its subfolders), hidden ones skipped, in natural order
    (`bgmatte.io.images.list_images`); BgmatteError if it has none."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BgmatteError(f"{folder}: is a file, not a folder")
    paths = images.list_images(folder, recursive=recursive)
    if not paths:
        raise BgmatteError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return paths


def load_images(folder: str | Path | Sequence[Path], *, max_side: int = 1024, limit: int | None = None
                ) -> list[Tensor]:
    """Read the images of a folder (or these image files) into memory as (3,H,W) uint8 tensors, downscaled so
    that their longer side is at most `max_side`; used as the photographs of the synthetic generator."""
    images = []
    paths = list_images(folder) if isinstance(folder, (str, Path)) else list(folder)
    for path in paths[:limit]:
        image = read_image(path, 3, dtype=torch.uint8)
        height, width = image.shape[1:]
        if max(height, width) > max_side:
            factor = max_side / max(height, width)
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            resized = cv2.resize(image.permute(1, 2, 0).numpy(), size, interpolation=cv2.INTER_AREA)
            image = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        images.append(image)
    return images


# --------------------------------------------------------------------------------------------
# Finding pairs
# --------------------------------------------------------------------------------------------


def match_folders(fgr_dir: str | Path, pha_dir: str | Path) -> list[tuple[Path, Path]]:
    """Pair the foregrounds in `fgr_dir` with the mattes in `pha_dir` of the same file name (the
    extensions may differ, so `0001.jpg` goes with `0001.png`); every foreground needs its matte, and
    two files of one name in a folder (`0001.png` and `0001.jpg`) are refused, as either could be meant."""
    fgr_dir, pha_dir = Path(fgr_dir), Path(pha_dir)
    mattes = images.by_stem(list_images(pha_dir, recursive=False), "keep one")
    pairs = []
    for path in images.by_stem(list_images(fgr_dir, recursive=False), "keep one").values():
        matte = mattes.get(path.stem)
        if matte is None:
            raise BgmatteError(f"{path}: no matte named {path.stem}.* in {pha_dir}")
        pairs.append((path, matte))
    return pairs


def videomatte_pairs(root: str | Path, split: str = "train") -> list[tuple[Path, Path]]:
    """Frame pairs of VideoMatte240K as frame folders: root/{train,test}/fgr/CLIP/*.jpg with the
    matching root/{train,test}/pha/CLIP/*.jpg."""
    base = Path(root) / _split_folder(Path(root), split)
    fgr_root, pha_root = base / "fgr", base / "pha"
    if not fgr_root.is_dir() or not pha_root.is_dir():
        raise BgmatteError(f"{base}: expected VideoMatte240K folders fgr/CLIP/ and pha/CLIP/")
    clips = sorted((p for p in fgr_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda path: images.natural_key(str(path)))
    if not clips:
        from bgmatte.io.video import VIDEO_EXTENSIONS

        videos = sorted(p.name for p in fgr_root.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
        if videos:
            raise BgmatteError(f"{fgr_root}: holds videos ({videos[0]}{' ...' if len(videos) > 1 else ''}), which "
                               "training does not read: it needs each clip as a folder of frames "
                               "(fgr/CLIP/00000.jpg and pha/CLIP/00000.jpg); extract the frames first")
        raise BgmatteError(f"{fgr_root}: no clip folders (VideoMatte240K is read as folders of frames, "
                           "fgr/CLIP/00000.jpg and pha/CLIP/00000.jpg)")
    pairs = []
    for clip in clips:
        if not (pha_root / clip.name).is_dir():
            raise BgmatteError(f"{pha_root / clip.name}: missing matte folder for clip {clip.name}")
        pairs.extend(match_folders(clip, pha_root / clip.name))
    return pairs


def folder_pairs(root: str | Path, split: str, names: Sequence[tuple[str, str]]) -> list[tuple[Path, Path]]:
    """Pairs from the first (foreground, matte) folder names found in root/split/ or in root/.

    A validation split that finds no folder of its own falls back on root/, where training finds its data
    too; it is allowed (the run still gets its sample images and a loss to watch), with a warning that it
    validates on the training images, so that its losses are not taken for ones on unseen images.
    """
    root = Path(root)
    found = _pair_folders(root, split, names)
    if found is None:
        expected = " or ".join(f"{f}/ + {p}/" for f, p in names)
        raise BgmatteError(f"{root}: expected {expected} (directly or under {split}/)")
    if split != "train" and found == _pair_folders(root, "train", names):
        searched = _folder_names(_split_candidates(split))
        warnings.warn(f"{root}: no {searched} folder with {found[0].name}/ + {found[1].name}/, so validation "
                      "uses the training images and its losses look better than on unseen ones (add a valid/ "
                      "folder, or pass --val-every 0)", stacklevel=2)
    return match_folders(*found)


def _pair_folders(root: Path, split: str, names: Sequence[tuple[str, str]]) -> tuple[Path, Path] | None:
    """The first (foreground, matte) folders of `names` in root/split/ (or its other names) or in root/."""
    for base in [root / s for s in _split_candidates(split)] + [root]:
        for fgr_name, pha_name in names:
            if (base / fgr_name).is_dir() and (base / pha_name).is_dir():
                return base / fgr_name, base / pha_name
    return None


def split_folder(folder: Path, split: str) -> Path:
    """``folder``'s train/valid/test subfolder for ``split`` if it has one, else ``folder`` itself."""
    for name in _split_candidates(split):
        if (folder / name).is_dir():
            return folder / name
    return folder


SPLIT_NAMES = ("train", "valid", "val", "test")
"""The subfolder names that hold one split's images (`_split_candidates`)."""


def split_images(folder: Path, split: str) -> list[Path]:
    """The images of `folder` for `split`: those of its subfolder for the split if it has one (`split_folder`),
    else the folder's own with the subfolders of other splits (train/, valid/, val/, test/) left out, so that
    images held out for validation are not trained on. A split other than training that finds nothing else takes
    them all, the training images included, as a validation split without mattes of its own does."""
    chosen = split_folder(folder, split)
    paths = list_images(chosen)
    if chosen != folder:
        return paths
    held = {name for name in SPLIT_NAMES if (folder / name).is_dir()}
    kept = [path for path in paths if path.relative_to(folder).parts[0] not in held]
    if kept or split != "train":
        return kept or paths
    raise BgmatteError(f"{folder}: its images are all in {_folder_names(sorted(held))}, which another split "
                       f"holds; put the training images in {folder / 'train'}/ or in {folder} itself")


def _split_candidates(split: str) -> list[str]:
    return {"train": ["train"], "valid": ["valid", "val", "test"], "test": ["test", "valid", "val"]}.get(split, [split])


def _split_folder(root: Path, split: str) -> str:
    candidates = _split_candidates(split)
    for name in candidates:
        if (root / name).is_dir():
            return name
    raise BgmatteError(f"{root}: no {_folder_names(candidates)} folder")


def _folder_names(names: Sequence[str]) -> str:
    """``valid/, val/ or test/``, for messages."""
    folders = [f"{name}/" for name in names]
    return folders[0] if len(folders) == 1 else f"{', '.join(folders[:-1])} or {folders[-1]}"


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def item_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, index), independent of worker layout."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


_CHECKED: dict[tuple[Path, int, int], tuple[int, int] | None] = {}
"""Header sizes already checked in this process, by (path, size in bytes, modification time): a validation split
in the training folders is not checked twice."""
_SHOWN_PROBLEMS = 3
"""How many of a dataset's problems one refusal quotes (it counts them all)."""


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a training image from its header (`bgmatte.io.images.header_size`), refusing what
    reading it would refuse before decoding; None where the header leaves it to decoding."""
    try:
        stat = path.stat()
    except OSError:
        return images.header_size(path, max_pixels=MAX_PIXELS)  # which names the problem
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = images.header_size(path, max_pixels=MAX_PIXELS)
    return _CHECKED[key]


def _too_small(path: Path, size: tuple[int, int] | None) -> str | None:
    if size is not None and min(size) < MIN_SIDE:
        return f"{path}: {size[0]}x{size[1]} is too small to train on (at least {MIN_SIDE} pixels a side)"
    return None


def checked_size(path: Path) -> tuple[int, int] | None:
    """`header_size`, also refusing a shorter side under `MIN_SIDE`."""
    size = header_size(path)
    problem = _too_small(path, size)
    if problem:
        raise BgmatteError(problem)
    return size


def check_pairs(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Refuse, before training, pairs that headers show are unreadable, too small, or of two sizes (a photo
    fits a matte as stored or turned upright by its EXIF orientation, see `MatteDataset`), all in one line.
    Only headers are read: damage further into a file is found when the file is decoded, during training."""
    problems = []
    for fgr_path, pha_path in pairs:
        try:
            fgr_size, pha_size = checked_size(fgr_path), checked_size(pha_path)
            if fgr_size is None or pha_size is None or fgr_size == pha_size:
                continue
            upright = _upright_size(fgr_path, fgr_size) if pha_size == fgr_size[::-1] else fgr_size
            if upright != pha_size:
                problems.append(_size_mismatch(fgr_path, pha_path, fgr_size, pha_size))
        except BgmatteError as exc:
            problems.append(str(exc))
    if problems:
        raise BgmatteError(_summary(problems, "foreground/matte pairs"))


def _upright_size(path: Path, stored: tuple[int, int]) -> tuple[int, int]:
    """A photo's size once turned upright by its EXIF orientation: from a JPEG's header, else by decoding it."""
    orientation = images.exif_orientation(path)
    if orientation is None:
        image = images.read_image(path, max_pixels=MAX_PIXELS)
        return image.shape[1], image.shape[0]
    return (stored[1], stored[0]) if orientation >= 5 else stored


def check_backgrounds(paths: Sequence[Path]) -> list[Path]:
    """The background images usable for training, once their headers are checked: one that is unreadable is
    refused, one too small is left out (a favicon or thumbnail among photos), with one warning for them all."""
    kept, small = [], []
    for path in paths:
        (small if _too_small(path, header_size(path)) else kept).append(path)
    if small:
        if not kept:
            raise BgmatteError(f"{small[0].parent}: every background is too small to train on (at least "
                               f"{MIN_SIDE} pixels a side; {_too_small(small[0], header_size(small[0]))})")
        warnings.warn(f"{len(small)} background image{'s' if len(small) > 1 else ''} under {MIN_SIDE} pixels a "
                      f"side left out ({small[0]}{', ...' if len(small) > 1 else ''})", stacklevel=2)
    return kept


def _summary(problems: Sequence[str], what: str) -> str:
    """One line for a dataset's problems: the problem itself if it is alone, else their count and the first few."""
    if len(problems) == 1:
        return problems[0]
    shown = "; ".join(problems[:_SHOWN_PROBLEMS])
    more = f"; and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
    return f"{len(problems)} {what} cannot be used: {shown}{more}"


def _size_mismatch(fgr_path: Path, pha_path: Path, fgr_size: tuple[int, int], pha_size: tuple[int, int],
                   upright: tuple[int, int] | None = None) -> str:
    """The refusal of a pair of two sizes; `upright`, the photo's size turned by its EXIF orientation, if known."""
    if upright is None and fgr_size[::-1] != fgr_size and images.exif_orientation(fgr_path) in (5, 6, 7, 8):
        upright = fgr_size[::-1]
    stored = f"{fgr_size[0]}x{fgr_size[1]}"
    if upright is not None and upright != fgr_size:
        stored += f" as stored and {upright[0]}x{upright[1]} turned by its EXIF orientation"
    return f"{pha_path}: matte is {pha_size[0]}x{pha_size[1]} but {fgr_path.name} is {stored}"


class MatteDataset(Dataset):
    """Foreground/matte pairs from files: items are {"fgr": (3,H,W), "pha": (1,H,W)} floats in [0,1]."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]]):
        if not pairs:
            raise BgmatteError("no foreground/matte pairs to train on")
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        fgr_path, pha_path = self.pairs[index]
        pha = read_matte(pha_path)
        size = (int(pha.shape[2]), int(pha.shape[1]))
        fgr = _as_tensor(images.read_to_fit(fgr_path, size, dtype="float32", max_pixels=MAX_PIXELS), torch.float32)
        if fgr.shape[1:] != pha.shape[1:]:
            upright = (int(fgr.shape[2]), int(fgr.shape[1]))
            stored = images.header_size(fgr_path, max_pixels=MAX_PIXELS) or upright
            raise BgmatteError(_size_mismatch(fgr_path, pha_path, stored, size, upright))
        return {"fgr": fgr, "pha": pha}


class BackgroundDataset(Dataset):
    """Background images from a folder (searched recursively): items are {"bgr": (3,H,W)}."""

    def __init__(self, paths: Sequence[Path]):
        if not paths:
            raise BgmatteError("no background images")
        self.paths = list(paths)

    @classmethod
    def from_folder(cls, folder: str | Path, split: str | None = None) -> BackgroundDataset:
        """All images of `folder`, or for `split` those of `split_images`: its train/valid/test subfolder for the
        split if it has one, else the folder's own images outside the other splits' subfolders."""
        folder = Path(folder)
        return cls(split_images(folder, split) if split is not None else list_images(folder))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"bgr": read_image(self.paths[index], 3)}


class CompositeDataset(Dataset):
    """Training composites of a matte dataset over random backgrounds, augmented as in the paper.

    Item i composites matte i over a background drawn by the item's generator and returns
    {"src", "bgr", "pha", "fgr"} at `size` (H,W). Call `set_epoch` to draw new augmentations.
    """

    def __init__(
        self,
        mattes: Dataset,
        backgrounds: Dataset,
        size: tuple[int, int] = (512, 512),
        *,
        options: AugmentOptions = PAPER,
        seed: int = 0,
    ):
        self.mattes, self.backgrounds = mattes, backgrounds
        self.size, self.options, self.seed, self.epoch = tuple(size), options, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a different background and augmentation for every item from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.mattes)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        matte = self.mattes[index]
        choice = int(rand_index(generator, 1, len(self.backgrounds))[0])
        bgr = self.backgrounds[choice]["bgr"]
        batch = make_training_batch(
            matte["fgr"][None], matte["pha"][None], bgr[None], self.size, generator, self.options
        )
        return {name: tensor[0] for name, tensor in batch.items()}


class SyntheticDataset(Dataset):
    """Synthetic training composites (`bgmatte.train.synthetic`), augmented; no download needed.

    Item i is always the same sample for a given seed and epoch (so generated data can be cached,
    and validation sets, which stay at epoch 0, are fixed). `make_batch` generates a whole batch directly on a device, the
    fast path on a GPU. `photos` are a folder of photographs or loaded images used as textures.
    """

    def __init__(
        self,
        size: tuple[int, int] = (512, 512),
        length: int = 100_000,
        *,
        seed: int = 0,
        photos: str | Path | Sequence[Tensor] | None = None,
        options: SyntheticOptions = DEFAULT,
        augment: AugmentOptions = SYNTHETIC,
    ):
        self.size, self.length, self.seed, self.epoch = tuple(size), int(length), seed, 0
        self.options, self.augment = options, augment
        self.photos = load_images(photos) if isinstance(photos, (str, Path)) else list(photos or [])
        self._photos_by_device: dict[str, list[Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        """From epoch 1 on, item i is a new sample in each epoch; epoch 0 keeps the fixed samples."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        parts = (self.seed, index) if self.epoch == 0 else (self.seed, index, self.epoch)
        generator = torch.Generator().manual_seed(item_seed(*parts))
        batch = self.make_batch(1, "cpu", generator)
        return {name: tensor[0] for name, tensor in batch.items()}

    def make_batch(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """A batch {"src", "bgr", "pha", "fgr"} of (B,C,H,W) tensors generated on `device`; pass a
        generator on that device to keep everything there."""
        device = torch.device(device)
        key = str(device)
        if key not in self._photos_by_device:
            self._photos_by_device[key] = [p.to(device) for p in self.photos]
        height, width = self.size
        raw = generate_batch(
            batch_size, height, width, device=device, generator=generator,
            photos=self._photos_by_device[key], options=self.options,
        )
        return make_training_batch(raw["fgr"], raw["pha"], raw["bgr"], self.size, generator, self.augment)


def default_augment(name: str) -> AugmentOptions:
    """The augmentation a dataset gets unless told otherwise: no geometric warps for the synthetic one
    (`SYNTHETIC`), the paper's recipe (`PAPER`) for real mattes."""
    return SYNTHETIC if name.lower() == "synthetic" else PAPER


def build_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    split: str = "train",
    size: int | tuple[int, int] = 512,
    backgrounds: str | Path | None = None,
    seed: int = 0,
    length: int | None = None,
    augment: AugmentOptions | None = None,
    used: int | None = None,
    check: bool = True,
) -> Dataset:
    """The training or validation dataset named `name` (one of `DATASETS`), items at `size`.

    - "synthetic": generated composites; `backgrounds` (or `root`) is an optional folder of
      photographs used as textures (its split's images, `split_images`); `length` items (100,000 for train,
      512 otherwise). The training split draws from the generator's ``TRAINING`` settings, the others
      from ``DEFAULT`` (the validation sets' distribution) with other seeds.
    - "videomatte": VideoMatte240K frame folders under `root` (split train or test).
    - "photomatte": PhotoMatte13K-style fgr/ + pha/ folders, under root/split/ or root/.
    - "aim": AIM/Adobe-style fg/ + alpha/ folders, under root/split/ or root/.
    The real datasets composite over the images of `backgrounds` (its split's, `split_images`); the headers of
    their files are checked first (`check_pairs`, `check_backgrounds`): those of every pair, or of the first
    `used` ones only when no others will be read (a validation set of that many items), and every background's.
    With `check` False they are not read: a process of a distributed run leaves that to rank 0, and takes the
    backgrounds that rank 0 kept (`bgmatte.train.loop.open_training_dataset`).
    """
    key = name.lower()
    if key not in DATASETS:
        raise BgmatteError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if key == "synthetic":
        photos = backgrounds if backgrounds is not None else root
        if photos is not None:
            photos = load_images(split_images(Path(photos), split))
        if length is None:
            length = 100_000 if split == "train" else 512
        split_seed = seed if split == "train" else item_seed(seed, zlib.crc32(split.encode()))
        return SyntheticDataset(size, length, seed=split_seed, photos=photos, augment=augment or default_augment(key),
                                options=TRAINING if split == "train" else DEFAULT)
    if root is None:
        raise BgmatteError(f"dataset {name!r} needs its folder (root)")
    if backgrounds is None:
        raise BgmatteError(f"dataset {name!r} needs a folder of background images")
    if not Path(root).is_dir():
        raise BgmatteError(f"{root}: " + ("is a file, not a folder" if Path(root).exists() else "folder not found"))
    if key == "videomatte":
        pairs = videomatte_pairs(root, split)
    elif key == "photomatte":
        pairs = folder_pairs(root, split, [("fgr", "pha")])
    else:
        pairs = folder_pairs(root, split, [("fg", "alpha"), ("fgr", "pha")])
    mattes, behind = MatteDataset(pairs), BackgroundDataset.from_folder(backgrounds, split)
    if check:
        check_pairs(mattes.pairs[:used])
        behind.paths = check_backgrounds(behind.paths)
    return CompositeDataset(
        mattes,
        behind,
        size,
        options=augment or default_augment(key),
        seed=seed,
    )
