"""Training data readers: image limits, dataset layouts, composites, the synthetic dataset, backgrounds."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bgmatte.errors import BgmatteError
from bgmatte.train import backgrounds
from bgmatte.train.data import (
    BackgroundDataset,
    CompositeDataset,
    MatteDataset,
    SyntheticDataset,
    build_dataset,
    match_folders,
    read_image,
    videomatte_pairs,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The generator runs many small tensor operations; on a shared 2-core machine, torch's
    intra-op threads spin-wait on each other and make them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _colour(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _grey(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    # A PNG whose header claims 20000 x 20000 pixels, with no image data at all.
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(header + struct.pack(">I", zlib.crc32(header[12:29])))
    with pytest.raises(BgmatteError, match=r"bomb\.png.*20000x20000.*megapixels"):
        read_image(bomb)
    small = _write(tmp_path / "small.png", _colour(100, 100))
    with pytest.raises(BgmatteError, match="small.png"):
        read_image(small, max_pixels=5000)


def test_read_image_gives_rgb_or_grey_floats(tmp_path):
    colour = _colour()
    colour[0, 0] = (0, 0, 255)  # BGR red
    path = _write(tmp_path / "c.png", colour)
    rgb = read_image(path, 3)
    assert rgb.shape == (3, 12, 16) and rgb.dtype == torch.float32
    assert rgb[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    grey = read_image(_write(tmp_path / "g.png", _grey()), 1)
    assert grey.shape == (1, 12, 16)
    deep = np.full((4, 4), 65535, dtype=np.uint16)
    assert float(read_image(_write(tmp_path / "d.png", deep), 1).min()) == 1.0
    assert read_image(path, 3, dtype=torch.uint8).dtype == torch.uint8


def test_unreadable_images_name_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(BgmatteError, match="broken.jpg"):
        read_image(broken)
    with pytest.raises(BgmatteError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def _videomatte(root: Path) -> None:
    for split in ("train", "test"):
        for clip in ("0000", "0001"):
            for frame in range(3):
                _write(root / split / "fgr" / clip / f"{frame:05d}.jpg", _colour(seed=frame))
                _write(root / split / "pha" / clip / f"{frame:05d}.jpg", _grey(seed=frame))


def test_videomatte_frame_folders_are_paired_by_clip_and_frame(tmp_path):
    _videomatte(tmp_path)
    pairs = videomatte_pairs(tmp_path, "train")
    assert len(pairs) == 6
    for fgr, pha in pairs:
        assert fgr.parent.name == pha.parent.name and fgr.name == pha.name
        assert fgr.parts[-3] == "fgr" and pha.parts[-3] == "pha"
    assert all("test" in str(f) for f, _ in videomatte_pairs(tmp_path, "valid"))
    item = MatteDataset(pairs)[0]
    assert item["fgr"].shape == (3, 12, 16) and item["pha"].shape == (1, 12, 16)


def test_a_frame_without_its_matte_is_named(tmp_path):
    _videomatte(tmp_path)
    (tmp_path / "train" / "pha" / "0001" / "00002.jpg").unlink()
    with pytest.raises(BgmatteError, match="00002.jpg"):
        videomatte_pairs(tmp_path, "train")


def test_aim_folders_match_by_name_across_extensions(tmp_path):
    _write(tmp_path / "fg" / "a.jpg", _colour())
    _write(tmp_path / "fg" / "b.png", _colour(seed=1))
    _write(tmp_path / "alpha" / "a.png", _grey())
    _write(tmp_path / "alpha" / "b.png", _grey(seed=1))
    pairs = match_folders(tmp_path / "fg", tmp_path / "alpha")
    assert [(f.name, p.name) for f, p in pairs] == [("a.jpg", "a.png"), ("b.png", "b.png")]


def test_mismatched_sizes_are_reported(tmp_path):
    fgr = _write(tmp_path / "fgr" / "x.png", _colour(12, 16))
    pha = _write(tmp_path / "pha" / "x.png", _grey(10, 16))
    with pytest.raises(BgmatteError, match="x.png"):
        MatteDataset([(fgr, pha)])[0]


def _backgrounds(folder: Path, count: int = 3) -> Path:
    for i in range(count):
        _write(folder / f"bg{i}.jpg", _colour(30, 40, seed=10 + i))
    return folder


@pytest.mark.parametrize(
    "name, layout",
    [("aim", ("fg", "alpha")), ("photomatte", ("train/fgr", "train/pha")), ("videomatte", None)],
)
def test_real_datasets_give_augmented_composites_at_the_crop_size(tmp_path, name, layout):
    root = tmp_path / "data"
    if layout is None:
        _videomatte(root)
    else:
        for i in range(3):
            _write(root / layout[0] / f"{i}.jpg", _colour(seed=i))
            _write(root / layout[1] / f"{i}.png", _grey(seed=i))
    dataset = build_dataset(name, root, size=(24, 20), backgrounds=_backgrounds(tmp_path / "bg"), seed=3)
    assert isinstance(dataset, CompositeDataset) and len(dataset) == (6 if layout is None else 3)
    item = dataset[1]
    assert set(item) == {"src", "bgr", "pha", "fgr"}
    assert item["src"].shape == (3, 24, 20) and item["pha"].shape == (1, 24, 20)
    assert all(float(t.min()) >= 0 and float(t.max()) <= 1 for t in item.values())
    again = dataset[1]
    assert all(torch.equal(item[k], again[k]) for k in item)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["src"], item["src"])


def test_background_folders_use_their_split_subfolder(tmp_path):
    _backgrounds(tmp_path / "train", 2)
    _backgrounds(tmp_path / "valid", 1)
    assert len(BackgroundDataset.from_folder(tmp_path, "train")) == 2
    assert len(BackgroundDataset.from_folder(tmp_path, "valid")) == 1
    assert len(BackgroundDataset.from_folder(tmp_path)) == 3
    assert BackgroundDataset.from_folder(tmp_path, "train")[0]["bgr"].shape == (3, 30, 40)


def test_synthetic_dataset_is_fixed_per_index_and_split():
    train = build_dataset("synthetic", size=32, length=10, seed=1)
    valid = build_dataset("synthetic", split="valid", size=32, seed=1)
    assert isinstance(train, SyntheticDataset) and len(train) == 10 and len(valid) == 512
    item = train[4]
    assert set(item) == {"src", "bgr", "pha", "fgr"}
    assert item["src"].shape == (3, 32, 32) and item["pha"].shape == (1, 32, 32)
    assert torch.equal(train[4]["src"], item["src"])
    assert not torch.equal(train[5]["src"], item["src"])
    assert not torch.equal(valid[4]["src"], item["src"])
    with pytest.raises(IndexError):
        train[10]
    train.set_epoch(2)
    assert not torch.equal(train[4]["src"], item["src"])
    train.set_epoch(0)
    assert torch.equal(train[4]["src"], item["src"])


def test_synthetic_photographs_follow_the_split_and_training_draws_harder_settings(tmp_path):
    _backgrounds(tmp_path / "train", 2)
    _backgrounds(tmp_path / "valid", 1)
    train = build_dataset("synthetic", backgrounds=tmp_path, size=32, length=4)
    valid = build_dataset("synthetic", backgrounds=tmp_path, split="valid", size=32, length=4)
    assert len(train.photos) == 2 and len(valid.photos) == 1
    assert train.options.empty_fraction > 0 and train.options.hard_min_offset > 0
    assert valid.options.empty_fraction == 0 and valid.options.hard_min_offset == 0


def test_synthetic_dataset_makes_batches_with_photographs(tmp_path):
    dataset = build_dataset("synthetic", backgrounds=_backgrounds(tmp_path / "photos"), size=(24, 32))
    assert len(dataset.photos) == 3 and dataset.photos[0].dtype == torch.uint8
    batch = dataset.make_batch(3, "cpu", torch.Generator().manual_seed(0))
    assert batch["src"].shape == (3, 3, 24, 32) and batch["pha"].shape == (3, 1, 24, 32)


def test_dataset_names_and_missing_folders_are_reported(tmp_path):
    with pytest.raises(BgmatteError, match="unknown dataset"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(BgmatteError, match="background"):
        build_dataset("aim", tmp_path)
    with pytest.raises(BgmatteError, match="fg/ \\+ alpha/"):
        build_dataset("aim", tmp_path, backgrounds=_backgrounds(tmp_path / "bg"))
    with pytest.raises(BgmatteError, match="no such folder"):
        build_dataset("synthetic", backgrounds=tmp_path / "nowhere")


@pytest.mark.parametrize("package", ["mate-backgrounds", "opencv-doc", "opencv-doc:all"])
def test_reserved_evaluation_packages_are_refused(tmp_path, package, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must refuse before downloading")

    monkeypatch.setattr(backgrounds, "download_package", no_download)
    with pytest.raises(BgmatteError, match="reserved"):
        backgrounds.fetch_backgrounds(tmp_path, ["ukui-wallpapers", package])
    assert not any(tmp_path.iterdir())


def test_one_picture_is_kept_per_folder_of_sizes():
    paths = [
        Path("x/Kite/contents/images/1920x1080.jpg"),
        Path("x/Kite/contents/images/5120x2880.jpg"),
        Path("x/Kite/contents/images/800x600.png"),
        Path("x/Kite/contents/screenshot.jpg"),
        Path("x/backgrounds/city.jpg"),
        Path("x/backgrounds/desert.webp"),
        Path("x/backgrounds/readme.xml"),
    ]
    assert backgrounds.select_pictures(paths) == [
        Path("x/Kite/contents/images/5120x2880.jpg"),
        Path("x/backgrounds/city.jpg"),
        Path("x/backgrounds/desert.webp"),
    ]
