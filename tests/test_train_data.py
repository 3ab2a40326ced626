"""Training data readers: image limits, dataset layouts, composites, the synthetic dataset, backgrounds."""
from __future__ import annotations

import struct
import warnings
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
    check_pairs,
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


def _colour(height: int = 36, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _grey(height: int = 36, width: int = 48, seed: int = 0) -> np.ndarray:
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
    assert rgb.shape == (3, 36, 48) and rgb.dtype == torch.float32
    assert rgb[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    grey = read_image(_write(tmp_path / "g.png", _grey()), 1)
    assert grey.shape == (1, 36, 48)
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
    assert item["fgr"].shape == (3, 36, 48) and item["pha"].shape == (1, 36, 48)


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
    fgr = _write(tmp_path / "fgr" / "x.png", _colour(36, 48))
    pha = _write(tmp_path / "pha" / "x.png", _grey(34, 48))
    with pytest.raises(BgmatteError, match="x.png"):
        MatteDataset([(fgr, pha)])[0]


def _backgrounds(folder: Path, count: int = 3) -> Path:
    for i in range(count):
        _write(folder / f"bg{i}.jpg", _colour(40, 56, seed=10 + i))
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
    assert BackgroundDataset.from_folder(tmp_path, "train")[0]["bgr"].shape == (3, 40, 56)


def test_a_folder_without_the_splits_subfolder_leaves_the_other_splits_subfolders_out(tmp_path):
    # Backgrounds kept out for validation in bg/valid/, the training ones loose in bg/: training read bg/ whole,
    # valid/ included, and validated on backgrounds it had trained on.
    _backgrounds(tmp_path / "bg", 2)
    _backgrounds(tmp_path / "bg" / "valid", 1)
    _backgrounds(tmp_path / "bg" / "more", 1)  # a subfolder of no split's name is the folder's own
    train = BackgroundDataset.from_folder(tmp_path / "bg", "train")
    assert sorted(p.relative_to(tmp_path / "bg").as_posix() for p in train.paths) == ["bg0.jpg", "bg1.jpg",
                                                                                      "more/bg0.jpg"]
    assert len(BackgroundDataset.from_folder(tmp_path / "bg", "valid")) == 1
    photos = build_dataset("synthetic", backgrounds=tmp_path / "bg", size=32, length=4).photos
    assert len(photos) == 3
    _backgrounds(tmp_path / "only" / "valid", 1)  # nothing of training's own: refused, not trained on valid/
    with pytest.raises(BgmatteError, match="valid/"):
        BackgroundDataset.from_folder(tmp_path / "only", "train")


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


def _photomatte(root: Path, count: int = 3) -> Path:
    for i in range(count):
        _write(root / "fgr" / f"{i:04d}.jpg", _colour(seed=i))
        _write(root / "pha" / f"{i:04d}.png", _grey(seed=i))
    return root


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG cut off after its IHDR chunk: the header gives a size, the pixels are gone."""
    header = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header)))
    return path


@pytest.mark.parametrize("damage, message", [
    ("empty", "0002.png: empty file"),
    ("garbage", "0002.png: damaged or truncated PNG"),
    ("small matte", "0001.png: matte is 48x34 but 0001.jpg is 48x36"),
    ("tiny", "0000.jpg: 6x8 is too small to train on"),
    ("bomb", "0002.png: 9000x9000 is 81 megapixels"),
])
def test_bad_files_are_refused_from_their_headers_before_training(tmp_path, monkeypatch, damage, message):
    root, behind = _photomatte(tmp_path / "data"), _backgrounds(tmp_path / "bg")
    if damage == "empty":
        (root / "pha" / "0002.png").write_bytes(b"")
    elif damage == "garbage":
        (root / "pha" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    elif damage == "small matte":
        _write(root / "pha" / "0001.png", _grey(34, 48))
    elif damage == "tiny":
        _write(root / "fgr" / "0000.jpg", _colour(8, 6))
        _write(root / "pha" / "0000.png", _grey(8, 6))
    else:
        _png_header_only(root / "pha" / "0002.png", 9000, 9000)
    reads = []
    monkeypatch.setattr(cv2, "imdecode", lambda *args: reads.append(args))  # nothing may be decoded
    with pytest.raises(BgmatteError, match=message):
        build_dataset("photomatte", root, size=32, backgrounds=behind)
    assert reads == []


def test_the_header_check_passes_good_data_and_cannot_see_damage_past_the_header(tmp_path):
    root, behind = _photomatte(tmp_path / "data"), _backgrounds(tmp_path / "bg")
    whole = (root / "pha" / "0001.png").read_bytes()
    (root / "pha" / "0001.png").write_bytes(whole[: len(whole) // 2])  # the header intact, the pixels cut off
    dataset = build_dataset("photomatte", root, size=32, backgrounds=behind)
    with pytest.raises(BgmatteError, match="0001.png: damaged or truncated PNG"):
        dataset[1]


def test_hidden_files_are_skipped_in_mattes_and_backgrounds(tmp_path):
    root, behind = _photomatte(tmp_path / "data", 2), _backgrounds(tmp_path / "bg", 2)
    for folder in (root / "fgr", root / "pha", behind):
        (folder / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (behind / ".thumbnails").mkdir()
    _write(behind / ".thumbnails" / "bg0.png", _colour(8, 8))
    dataset = build_dataset("photomatte", root, size=32, backgrounds=behind)
    assert len(dataset) == 2 and len(dataset.backgrounds) == 2
    assert dataset[0]["src"].shape == (3, 32, 32)


def test_two_files_of_one_name_are_refused(tmp_path):
    root = _photomatte(tmp_path / "data", 2)
    _write(root / "pha" / "0001.jpg", _grey(seed=1))
    with pytest.raises(BgmatteError, match=r"two images named '0001' .*0001\.jpg and 0001\.png"):
        match_folders(root / "fgr", root / "pha")


def test_a_matte_in_an_rgba_alpha_channel_is_read_from_the_alpha(tmp_path):
    alpha = _grey()
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha  # a cutout: black colour, the matte in alpha
    fgr, pha = _write(tmp_path / "fgr" / "a.png", _colour()), _write(tmp_path / "pha" / "a.png", rgba)
    item = MatteDataset([(fgr, pha)])[0]
    assert torch.allclose(item["pha"][0], torch.from_numpy(alpha / 255.0).float())


def test_float_mattes_out_of_range_are_refused(tmp_path):
    fgr = _write(tmp_path / "fgr" / "a.png", _colour())
    pha = _write(tmp_path / "pha" / "a.tif", _grey().astype(np.float32))  # 0-255 saved as float
    with pytest.raises(BgmatteError, match="a.tif: a float matte must hold values from 0 to 1"):
        MatteDataset([(fgr, pha)])[0]


def test_foreground_and_matte_are_read_as_stored_whatever_their_exif_orientation(tmp_path):
    fgr = _write(tmp_path / "fgr" / "a.jpg", _colour(36, 48))
    pha = _write(tmp_path / "pha" / "a.jpg", _grey(36, 48))
    for path in (fgr, pha):
        _set_jpeg_orientation(path, 6)  # "rotate 90 degrees to view"
    check_pairs([(fgr, pha)])
    item = MatteDataset([(fgr, pha)])[0]
    assert item["fgr"].shape == (3, 36, 48) and item["pha"].shape == (1, 36, 48)


def _phone_photo(tmp_path: Path, height: int, width: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """A JPEG stored sideways with EXIF orientation 6, its subject on the stored left half; returns the file and
    the subject's mask as stored and as viewers show it (upright)."""
    stored = np.zeros((height, width, 3), np.uint8)
    stored[:, : width // 2] = 255
    path = _write(tmp_path / "fgr" / "a.jpg", stored)
    _set_jpeg_orientation(path, 6)
    mask = stored[:, :, 0] > 127
    return path, mask, np.rot90(mask, -1)  # orientation 6: turned a quarter clockwise to view


@pytest.mark.parametrize("drawn", ["upright", "as stored"])
def test_a_photo_is_turned_upright_unless_its_matte_fits_it_only_as_stored(tmp_path, drawn):
    fgr, stored, upright = _phone_photo(tmp_path, 36, 48)
    mask = upright if drawn == "upright" else stored
    pha = _write(tmp_path / "pha" / "a.png", mask.astype(np.uint8) * 255)
    check_pairs([(fgr, pha)])
    item = MatteDataset([(fgr, pha)])[0]
    assert item["pha"].shape == (1, *mask.shape)
    assert torch.equal(item["fgr"][0] > 0.5, item["pha"][0] > 0.5)  # the matte covers the subject


def test_a_square_photo_is_turned_upright_to_meet_its_matte(tmp_path):
    fgr, stored, upright = _phone_photo(tmp_path, 40, 40)
    pha = _write(tmp_path / "pha" / "a.png", upright.astype(np.uint8) * 255)
    item = MatteDataset([(fgr, pha)])[0]
    assert torch.equal(item["fgr"][0] > 0.5, item["pha"][0] > 0.5)


def test_a_matte_fitting_neither_orientation_names_both_sizes(tmp_path):
    fgr = _phone_photo(tmp_path, 36, 48)[0]
    pha = _write(tmp_path / "pha" / "a.png", _grey(40, 40))
    message = "a.png: matte is 40x40 but a.jpg is 48x36 as stored and 36x48 turned by its EXIF orientation"
    with pytest.raises(BgmatteError, match=message):
        check_pairs([(fgr, pha)])
    with pytest.raises(BgmatteError, match=message):
        MatteDataset([(fgr, pha)])[0]


def test_too_small_backgrounds_are_left_out_with_one_warning(tmp_path):
    root, behind = _photomatte(tmp_path / "data"), _backgrounds(tmp_path / "bg")
    for name in ("favicon.png", "thumb_a.jpg", "thumb_b.jpg"):
        _write(behind / name, _colour(24, 24))
    with pytest.warns(UserWarning, match=r"3 background images under 32 pixels a side left out \(.*favicon.png"):
        dataset = build_dataset("photomatte", root, size=32, backgrounds=behind)
    assert len(dataset.backgrounds) == 3
    tiny = _write(tmp_path / "tiny" / "a.png", _colour(8, 8))
    with pytest.raises(BgmatteError, match=r"every background is too small.*a.png: 8x8"):
        build_dataset("photomatte", root, size=32, backgrounds=tiny.parent)


def test_every_bad_pair_is_counted_in_one_refusal(tmp_path):
    root, behind = _photomatte(tmp_path / "data", 5), _backgrounds(tmp_path / "bg")
    for i in range(5):
        _write(root / "pha" / f"{i:04d}.png", _grey(34, 48))
    message = r"5 foreground/matte pairs cannot be used: .*0000.png: matte is 48x34.*0002.png: .*; and 2 more$"
    with pytest.raises(BgmatteError, match=message):
        build_dataset("photomatte", root, size=32, backgrounds=behind)


def test_a_validation_set_checks_only_the_pairs_it_reads(tmp_path):
    root, behind = _photomatte(tmp_path / "data"), _backgrounds(tmp_path / "bg")
    (root / "pha" / "0002.png").write_bytes(b"")
    assert len(build_dataset("photomatte", root, size=32, backgrounds=behind, used=2)) == 3
    with pytest.raises(BgmatteError, match="0002.png: empty file"):
        build_dataset("photomatte", root, size=32, backgrounds=behind, used=3)


def _set_jpeg_orientation(path: Path, orientation: int) -> None:
    """Insert an EXIF block holding only an orientation tag after a JPEG's start marker."""
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x112, 3, 1, orientation, 0)
    tiff += struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + tiff
    data = path.read_bytes()
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:])


def test_validation_on_the_training_folders_is_warned_about(tmp_path):
    root, behind = _photomatte(tmp_path / "data"), _backgrounds(tmp_path / "bg")
    with pytest.warns(UserWarning, match="validation uses the training images"):
        build_dataset("photomatte", root, split="valid", size=32, backgrounds=behind)
    _photomatte(tmp_path / "split" / "train")
    _photomatte(tmp_path / "split" / "valid", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(build_dataset("photomatte", tmp_path / "split", split="valid", size=32, backgrounds=behind)) == 1


def test_messages_name_what_is_wrong_with_a_folder(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text("print()")
    with pytest.raises(BgmatteError, match="gen.py: is a file, not a folder"):
        build_dataset("photomatte", _photomatte(tmp_path / "data"), size=32, backgrounds=script)
    _videomatte(tmp_path / "vm")
    with pytest.raises(BgmatteError, match=r"no valid/, val/ or test/ folder"):
        videomatte_pairs(tmp_path / "vm" / "train", "valid")
    clips = tmp_path / "mp4" / "train"
    (clips / "fgr").mkdir(parents=True)
    (clips / "pha").mkdir()
    (clips / "fgr" / "0000.mp4").write_bytes(b"")
    with pytest.raises(BgmatteError, match="holds videos .*0000.mp4.*folder of frames"):
        videomatte_pairs(tmp_path / "mp4", "train")


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
