"""`bgmatte image`: files or folders, one plate or plates by name, both spellings, messages and exit codes."""
from __future__ import annotations

import errno
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import bgmatte.pipeline as pipeline
from bgmatte.cli import main
from bgmatte.errors import BgmatteError
from bgmatte.io.images import write_png
from bgmatte.model.matting import MattingRefine
from bgmatte.predictor import Predictor
from media import HEIGHT, WIDTH, DifferenceModel, plate_image, subject_box, subject_frame

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.manual_seed(0)
    torch.save(MattingRefine("mobilenetv2").state_dict(), path)
    return path


@pytest.fixture()
def photos(tmp_path, monkeypatch):
    """src/beach.png and src/office.png, each with its own plate in bgr/ (and a shared plate.png)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "bgr").mkdir()
    for index, name in enumerate(["beach", "office"]):
        plate = plate_image(seed=index)
        write_png(tmp_path / "bgr" / f"{name}.png", plate)
        write_png(tmp_path / "src" / f"{name}.png", subject_frame(plate, 2 + index))
    write_png(tmp_path / "plate.png", plate_image(seed=0))
    return tmp_path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_reference_spelling_writes_a_folder_per_output(photos, capsys, checkpoint):
    code, out, err = run(
        capsys, "image", "--model-type", "mattingrefine", "--model-backbone", "mobilenetv2",
        "--model-backbone-scale", "0.25", "--model-refine-mode", "sampling", "--model-refine-sample-pixels", "2000",
        "--model-checkpoint", checkpoint, "--images-src", "src", "--images-bgr", "bgr", "--output-dir", "out",
        "--output-type", "com", "pha", "fgr", "err", "ref", "--device", "cpu", "-q",
    )
    assert code == 0, err
    for kind in ("com", "pha", "fgr", "err", "ref"):
        assert sorted(p.name for p in (photos / "out" / kind).iterdir()) == ["beach.png", "office.png"]
    cutout = cv2.imread(str(photos / "out" / "com" / "beach.png"), cv2.IMREAD_UNCHANGED)
    assert cutout.shape == (HEIGHT, WIDTH, 4)  # an RGBA cutout
    assert cv2.imread(str(photos / "out" / "pha" / "beach.png"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert len(out.split()) == 10
    # -y, as the reference script has it, replaces the outputs.
    code, _, err = run(capsys, "image", "--model-checkpoint", checkpoint, "--images-src", "src", "--images-bgr", "bgr",
                       "--output-dir", "out", "--output-types", "com", "-y", "-q")
    assert code == 0, err


def test_short_spelling_with_files_one_plate_and_a_colour(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    code, out, err = run(capsys, "image", "src/beach.png", "--bgr", "plate.png", "-o", "cut", "--outputs", "com", "pha",
                         "--target-bgr", "blue")
    assert code == 0, err
    assert out.split() == [str(Path("cut/com/beach.png")), str(Path("cut/pha/beach.png"))]
    assert "1 com image" in err
    com = cv2.cvtColor(cv2.imread(str(photos / "cut" / "com" / "beach.png")), cv2.COLOR_BGR2RGB)
    rows, columns = subject_box(2)
    assert com[0, 0].tolist() == [0, 0, 255] and com[rows, columns].reshape(-1, 3).mean(axis=0).tolist() == [255, 0, 255]


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bgmatte image: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_missing_plate_by_name_is_named(photos, capsys, checkpoint):
    (photos / "bgr" / "office.png").unlink()
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "--checkpoint", checkpoint)
    one_line_error(code, err, "no plate with the same name", "office.png")
    assert not (photos / "out").exists()


def test_unreadable_image_is_named(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    (photos / "src" / "zebra.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_png(photos / "bgr" / "zebra.png", plate_image())
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "-q")
    one_line_error(code, err, "zebra.png")
    # The images before it were written, each one whole.
    assert sorted(p.name for p in (photos / "out" / "com").iterdir()) == ["beach.png", "office.png"]


def test_existing_outputs_are_refused_and_missing_arguments_explained(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    (photos / "out" / "com").mkdir(parents=True)
    (photos / "out" / "com" / "office.png").write_bytes(b"precious")
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out")
    one_line_error(code, err, "office.png", "already exists")
    assert (photos / "out" / "com" / "office.png").read_bytes() == b"precious"
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr")
    one_line_error(code, err, "-o")
    code, _, err = run(capsys, "image", "--bgr", "bgr", "-o", "out")
    one_line_error(code, err, "no images")
    code, _, err = run(capsys, "image", "nowhere", "--bgr", "bgr", "-o", "out")
    one_line_error(code, err, "nowhere", "no such file")
    code, _, err = run(capsys, "image", "src", "--bgr", "plate.png", "-o", "out2", "--target-bgr", "clip.mp4")
    one_line_error(code, err, "clip.mp4")


def refuse_to_load(*args, **kwargs):
    raise BgmatteError("the model was loaded")


def test_output_folders_that_cannot_be_made_are_named_before_the_model_loads(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    (photos / "x").mkdir()
    (photos / "x" / "com").write_bytes(b"")  # a file where the com folder would go
    (photos / "file").write_bytes(b"")
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "x")
    one_line_error(code, err, str(Path("x/com")), "is a file, not a folder")
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "file/sub")
    one_line_error(code, err, str(Path("file/sub/com")), "file is a file")
    real_mkdir = Path.mkdir

    def read_only(path, *args, **kwargs):
        if "ro" in path.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "ro/out", "--outputs", "pha")
    one_line_error(code, err, str(Path("ro/out/pha")), "Read-only file system")


def test_a_run_that_fails_before_writing_leaves_no_empty_output_folders(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "new/out", "--outputs", "com", "pha")
    one_line_error(code, err, "the model was loaded")
    assert not (photos / "new").exists()


def test_an_image_too_small_for_the_backbone_scale_is_refused_before_the_model_loads(photos, capsys, monkeypatch):
    """Predictor refused it only once the model had loaded for it."""
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    code, _, err = run(capsys, "image", "src/beach.png", "--bgr", "plate.png", "-o", "out", "--backbone-scale", "0.01")
    one_line_error(code, err, "frames of 96x64 are too small for backbone scale 0.01")
    assert not (photos / "out").exists()


def test_an_output_name_taken_by_a_folder_is_refused_even_with_overwrite(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    (photos / "out" / "com" / "beach.png").mkdir(parents=True)
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "--overwrite")
    one_line_error(code, err, str(Path("out/com/beach.png")), "is a folder")


def test_an_output_that_would_replace_its_own_source_is_refused_even_with_overwrite(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    (photos / "out" / "com").mkdir(parents=True)
    (photos / "out" / "com" / "beach.png").write_bytes((photos / "src" / "beach.png").read_bytes())
    code, _, err = run(capsys, "image", "out/com", "--bgr", "bgr", "-o", "out", "--overwrite")
    one_line_error(code, err, str(Path("out/com/beach.png")), "would overwrite the source image")
    assert (photos / "out" / "com" / "beach.png").read_bytes() == (photos / "src" / "beach.png").read_bytes()


@pytest.mark.parametrize("sources", [
    ("src/beach.png", "src/beach.png"),
    ("src/beach.png", "./src/beach.png"),
    ("src/beach.png", "src"),
], ids=["same-spelling", "other-spelling", "and-its-folder"])
def test_an_image_given_twice_is_named_as_given_twice_not_as_two_images(photos, capsys, monkeypatch, sources):
    """It was refused as "two images named 'beach' (src/beach.png and beach.png): their outputs would collide"."""
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    code, _, err = run(capsys, "image", *sources, "--bgr", "plate.png", "-o", "out")
    one_line_error(code, err, str(Path("src/beach.png")), "this image is given twice")
    assert "two images" not in err


def test_two_images_of_one_name_in_two_folders_are_named_by_their_paths(photos, capsys, monkeypatch):
    """The message showed the second by its name only: "(src/beach.png and beach.png)"."""
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    (photos / "more").mkdir()
    write_png(photos / "more" / "beach.png", subject_frame(plate_image(seed=0), 4))
    code, _, err = run(capsys, "image", "src/beach.png", "more/beach.png", "--bgr", "plate.png", "-o", "out")
    one_line_error(code, err, f"two images named 'beach' ({Path('src/beach.png')} and {Path('more/beach.png')})",
                   "their outputs would collide")


@pytest.mark.parametrize("sources, plate", [
    (("src/beach.png",), "src/beach.png"),
    (("src/office.png", "src/beach.png"), "./src/beach.png"),
    (("src",), "src"),
], ids=["one-image", "one-of-two", "a-folder-as-its-own-plates"])
def test_an_image_that_is_its_own_plate_is_refused_naming_it(photos, capsys, monkeypatch, sources, plate):
    """It was matted against itself without a word: every pixel matches the plate, so the cutout came out empty."""
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    code, _, err = run(capsys, "image", *sources, "--bgr", plate, "-o", "out")
    one_line_error(code, err, "beach.png", "is that image itself", "a plate is a shot of the background without")
    assert not (photos / "out").exists()


def test_a_copy_of_an_image_given_as_its_plate_is_refused_naming_it(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    shutil.copyfile(photos / "src" / "beach.png", photos / "copy.png")
    code, _, err = run(capsys, "image", "src/beach.png", "--bgr", "copy.png", "-o", "out")
    one_line_error(code, err, "copy.png: the plate of", "beach.png is a copy of that image (the same bytes)")
    assert not (photos / "out").exists()


class _FullDisk:
    """`os` as `bgmatte.io.images` sees it, on a disk with no space left for the renamed file."""

    def replace(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(os, name)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(photos, capsys, monkeypatch):
    import bgmatte.io.files as files

    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    monkeypatch.setattr(files, "os", _FullDisk())
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "--outputs", "com", "pha", "-q")
    one_line_error(code, err, "No space left on device")
    assert [path for path in (photos / "out").rglob("*") if path.is_file()] == []


def test_an_empty_plate_folder_says_so(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", refuse_to_load)
    (photos / "plates").mkdir()
    code, _, err = run(capsys, "image", "src", "--bgr", "plates", "-o", "out")
    one_line_error(code, err, "plates: no plates in this folder")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 6400000000 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["torch", "python", "cpu-allocator"])
def test_running_out_of_memory_names_the_image_its_size_and_what_to_lower(photos, capsys, monkeypatch, error):
    class Exhausted(DifferenceModel):
        def forward(self, src, bgr):
            raise error

    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(Exhausted()))
    code, _, err = run(capsys, "image", "src/office.png", "--bgr", "plate.png", "-o", "out", "-q")
    one_line_error(code, err, "office.png", f"{WIDTH}x{HEIGHT}", "not enough memory", "--backbone-scale", "--device")


def test_other_model_errors_are_not_mistaken_for_memory(photos, monkeypatch):
    class Broken(DifferenceModel):
        def forward(self, src, bgr):
            raise RuntimeError("a bug, not a lack of memory")

    with pytest.raises(RuntimeError, match="a bug"):
        pipeline.matte_images("src/office.png", "plate.png", output_dir="out", model=Predictor(Broken()),
                              progress=False)


def test_a_folder_of_mixed_sizes_gets_each_size_its_settings_from_one_load(photos, capsys, checkpoint, monkeypatch):
    import bgmatte.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "UHD_MIN_PIXELS", 150 * 100)  # "4K" from 150x100 up: the test stays small
    big_plate = plate_image(192, 128, seed=5)
    write_png(photos / "bgr" / "zebra.png", big_plate)
    write_png(photos / "src" / "zebra.png", subject_frame(big_plate, 1))
    loads, seen = [], []
    real_load = pipeline.load_predictor

    def spy(model, width, height):
        predictor = real_load(model, width, height)
        loads.append((width, height))
        predictor.model.register_forward_pre_hook(
            lambda module, inputs: seen.append((inputs[0].shape[-1], module.backbone_scale,
                                                module.refiner.sample_pixels)))
        return predictor

    monkeypatch.setattr(pipeline, "load_predictor", spy)
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "--checkpoint", checkpoint,
                       "--device", "cpu", "-q")
    assert code == 0, err
    assert loads == [(WIDTH, HEIGHT)]  # the weights are loaded once, for the first image
    assert seen == [(WIDTH, 0.5, 80_000), (WIDTH, 0.5, 80_000), (192, 0.125, 320_000)]  # below HD: 1/2, then "4K"
    # A setting given on the command line holds for every image; the other one still follows the size.
    seen.clear()
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out2", "--checkpoint", checkpoint,
                       "--device", "cpu", "--backbone-scale", "0.25", "-q")
    assert code == 0, err
    assert seen == [(WIDTH, 0.25, 80_000), (WIDTH, 0.25, 80_000), (192, 0.25, 320_000)]


def test_an_unreadable_photo_costs_itself_and_a_rerun_with_skip_existing_finishes_the_batch(photos, capsys,
                                                                                            checkpoint):
    """A damaged photo among good ones: the others are matted, the bad one named, the exit non-zero; once it is
    repaired, --skip-existing writes only what is missing (a rerun was refused on the outputs already there)."""
    good = (photos / "src" / "office.png").read_bytes()
    (photos / "src" / "zoo.png").write_bytes(good[: len(good) // 3])  # truncated
    args = ["image", "src", "--bgr", "plate.png", "-o", "out", "--outputs", "com", "pha", "--checkpoint", checkpoint,
            "--device", "cpu", "-q"]
    code, _, err = run(capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert "1 of 3 images could not be read and were left out (src/zoo.png: " in err and "--skip-existing" in err
    assert sorted(path.name for path in (photos / "out" / "com").iterdir()) == ["beach.png", "office.png"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "already exists" in err  # no silent overwrite
    (photos / "src" / "zoo.png").write_bytes(good)
    (photos / "out" / "pha" / "beach.png").unlink()
    kept = (photos / "out" / "com" / "beach.png").stat().st_mtime_ns
    code, out, err = run(capsys, *args, "--skip-existing")
    assert code == 0, err
    assert sorted(out.split()) == ["out/com/zoo.png", "out/pha/beach.png", "out/pha/zoo.png"]
    assert (photos / "out" / "com" / "beach.png").stat().st_mtime_ns == kept
    with pytest.raises(SystemExit) as stopped:
        run(capsys, *args, "--skip-existing", "--overwrite")
    assert stopped.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_files_of_a_folder_that_are_not_read_as_images_are_named(photos, capsys, checkpoint, caplog):
    for name in ("IMG_0001.HEIC", "notes.txt", ".DS_Store"):
        (photos / "src" / name).write_bytes(b"...")
    (photos / "src" / "office.png").rename(photos / "src" / "office.jfif")  # a JPEG name; OpenCV reads any kind
    code, out, err = run(capsys, "image", "src", "--bgr", "plate.png", "-o", "out", "--checkpoint", checkpoint,
                         "--device", "cpu", "-q")
    assert code == 0, err
    assert sorted(out.split()) == ["out/com/beach.png", "out/com/office.png"]
    assert "src: 2 files left out, not of a kind read as images (" in caplog.text
    assert caplog.text.rstrip().endswith("IMG_0001.HEIC, notes.txt") and ".DS_Store" not in caplog.text


def test_a_tiff_opencv_cannot_read_is_one_line_without_opencv_s_own_warning(tmp_path, capfd):
    """OpenCV wrote its own '[ WARN:0@...] grfmt_tiff.cpp' line to the terminal before the error (a float RGBA
    TIFF: OpenCV reads float TIFFs of one and three channels only)."""
    picture, photo = tmp_path / "scan.tif", tmp_path / "photo.png"
    assert cv2.imwrite(str(picture), np.random.default_rng(0).random((8, 8, 4)).astype(np.float32))
    assert cv2.imwrite(str(photo), np.zeros((8, 8, 3), np.uint8))  # not the TIFF itself: no image is its own plate
    assert main(["image", str(photo), "--bgr", str(picture), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capfd.readouterr().err
    assert err == f"bgmatte image: error: {picture}: cannot decode this TIFF file (damaged, truncated, or a variant " \
                  "OpenCV does not read)\n"


def test_a_float_tiff_photo_and_plate_are_matted(photos, capsys, monkeypatch):
    """A 32-bit float TIFF (as raw developers export) was refused as 'damaged, truncated, or a variant OpenCV does
    not read': 8-bit decoding does not take float TIFFs."""
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    plate = plate_image(seed=0)
    for name, image in (("shot.tif", subject_frame(plate, 2)), ("plate.tif", plate)):
        assert cv2.imwrite(name, cv2.cvtColor(image, cv2.COLOR_RGB2BGR).astype(np.float32) / 255)
    code, _, err = run(capsys, "image", "shot.tif", "--bgr", "plate.tif", "-o", "out", "--outputs", "fgr", "-q")
    assert code == 0, err
    fgr = cv2.cvtColor(cv2.imread("out/fgr/shot.png"), cv2.COLOR_BGR2RGB)
    assert np.abs(fgr[subject_box(2)].astype(int) - subject_frame(plate, 2)[subject_box(2)]).max() <= 1


def test_the_photo_s_colour_profile_is_kept_in_its_cutout_and_foreground(photos, capsys, monkeypatch):
    """A photo in Display P3 (every recent phone's) or Adobe RGB had its cutout written without its ICC profile,
    so viewers showed its colours as sRGB ones: duller. The matte (data) and a composite over a target image of
    another profile stay untagged."""
    from test_io_images import fake_profile, with_profile

    from bgmatte.io.images import icc_profile

    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    profile = fake_profile()
    shot = photos / "shot.jpg"
    assert cv2.imwrite(str(shot), cv2.cvtColor(subject_frame(plate_image(seed=0), 2), cv2.COLOR_RGB2BGR))
    with_profile(shot, profile)
    code, _, err = run(capsys, "image", "shot.jpg", "--bgr", "plate.png", "-o", "out", "--outputs", "com", "fgr",
                       "pha", "-q")
    assert code == 0, err
    assert icc_profile("out/com/shot.png") == profile and icc_profile("out/fgr/shot.png") == profile
    assert icc_profile("out/pha/shot.png") is None
    code, _, err = run(capsys, "image", "shot.jpg", "--bgr", "plate.png", "-o", "over", "--target-bgr", "plate.png",
                       "-q")
    assert code == 0, err
    assert icc_profile("over/com/shot.png") is None  # plate.png has no profile: its colours are sRGB ones


def test_a_decoder_s_own_warning_is_one_line_naming_the_file(photos, capfd, monkeypatch):
    """libjpeg and libpng print their warnings on stderr themselves, naming no file: 'Corrupt JPEG data: 3 extraneous
    bytes before marker 0xdb', 'libpng warning: iCCP: too short' (once per file of a folder: which?). The image is
    read all the same; the warning is bgmatte's one line, with the file's name."""
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(subject_frame(plate_image(seed=0), 2), cv2.COLOR_RGB2BGR))
    data = encoded.tobytes()
    table = data.index(b"\xff\xdb")
    (photos / "src" / "stray.jpg").write_bytes(data[:table] + b"\x00\x01\x02" + data[table:])
    png = write_png(photos / "src" / "tagged.png", subject_frame(plate_image(seed=0), 3)).read_bytes()
    body = b"ICC profile\x00\x00" + zlib.compress(b"\x00\x00\x00\x10short")  # libpng writes no such profile
    chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
    (photos / "src" / "tagged.png").write_bytes(png[:33] + chunk + png[33:])  # after the signature and IHDR
    code = main(["image", "src/stray.jpg", "src/tagged.png", "--bgr", "plate.png", "-o", "out", "-q"])
    err = capfd.readouterr().err
    assert code == 0, err
    assert err.splitlines() == [
        "bgmatte image: warning: src/stray.jpg: Corrupt JPEG data: 3 extraneous bytes before marker 0xdb",
        "bgmatte image: warning: src/tagged.png: libpng warning: iCCP: too short",
    ]


@pytest.mark.parametrize("suffix", [".bmp", ".gif", ".ppm"])
def test_a_truncated_image_is_one_line_without_opencv_s_own_error_line(tmp_path, capfd, suffix):
    """OpenCV logs a decoder's failure at its ERROR level ('[ERROR:0@...] global loadsave.cpp ... imdecode_ ...:
    can't read data: ... Unexpected end of input stream') before bgmatte's own line said what went wrong."""
    whole = tmp_path / f"whole{suffix}"
    assert cv2.imwrite(str(whole), np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    picture = tmp_path / f"cut{suffix}"
    picture.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert main(["image", str(picture), "--bgr", str(whole), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bgmatte image: error: {picture}: "), err


def test_align_warnings_name_the_photo_they_concern(photos, capsys, monkeypatch):
    """With many photos, "plate alignment failed" alone did not say which photo was matted against an
    unaligned plate."""
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    write_png(photos / "flat.png", np.full((HEIGHT, WIDTH, 3), 128, np.uint8))  # too little texture to align
    code, _, err = run(capsys, "image", "src", "--bgr", "flat.png", "-o", "flat", "--align", "-q")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("too little texture" in line for line in lines), err
    assert str(Path("src/beach.png")) in lines[0] and str(Path("src/office.png")) in lines[1]
    rng = np.random.default_rng(5)
    for folder in ("photos", "plates"):  # sharp-cornered blocks, each plate nothing like its photo
        (photos / folder).mkdir()
        for name in ("beach", "office"):
            write_png(photos / folder / f"{name}.png", np.kron(rng.integers(0, 256, (20, 25, 3), np.uint8),
                                                               np.ones((8, 8, 1), np.uint8)))
    code, _, err = run(capsys, "image", "photos", "--bgr", "plates", "-o", "blocks", "--align", "-q")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("using the unaligned plate" in line for line in lines), err
    assert str(Path("photos/beach.png")) in lines[0] and str(Path("photos/office.png")) in lines[1]


@pytest.mark.parametrize("damage", ["truncated", "too large"])
def test_an_unreadable_plate_in_a_plate_folder_costs_its_image_only(photos, capsys, monkeypatch, damage):
    """A bad plate among plates matched by name stopped the whole batch; it is left out as an unreadable photo
    is: named in the one error line, the others matted, the exit non-zero."""
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    write_png(photos / "src" / "zebra.png", subject_frame(plate_image(seed=3), 1))
    whole = cv2.imencode(".png", plate_image(seed=3))[1].tobytes()
    if damage == "truncated":
        (photos / "bgr" / "beach.png").write_bytes(whole[: len(whole) // 2])
    else:  # a PNG header claiming 50000x50000 pixels: refused before decoding
        header = bytearray(whole)
        header[16:24] = (50_000).to_bytes(4, "big") * 2
        (photos / "bgr" / "beach.png").write_bytes(bytes(header))
    write_png(photos / "bgr" / "zebra.png", plate_image(seed=3))
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "-q")
    one_line_error(code, err, "1 of 3 images or their plates could not be read", str(Path("bgr/beach.png")) + ": ",
                   f"(the plate of {Path('src/beach.png')})", "--skip-existing")
    assert sorted(p.name for p in (photos / "out" / "com").iterdir()) == ["office.png", "zebra.png"]


def test_an_unreadable_plate_shared_by_every_image_stops_the_batch(photos, capsys, monkeypatch):
    """One plate for all: no image can be matted, so its error is the one line, found before the model loads."""
    def no_model(*args, **kw):
        raise AssertionError("the model was loaded before the shared plate was read")

    monkeypatch.setattr(pipeline, "load_predictor", no_model)
    whole = (photos / "plate.png").read_bytes()
    (photos / "plate.png").write_bytes(whole[: len(whole) // 2])
    code, out, err = run(capsys, "image", "src", "--bgr", "plate.png", "-o", "out", "-q")
    one_line_error(code, err, "plate.png: damaged or truncated PNG")
    assert out == "" and not (photos / "out").exists()


def test_a_batch_with_unreadable_images_lists_what_it_wrote(photos, capsys, monkeypatch):
    """The error line said the others were matted but not which files exist: the written outputs are listed on
    stdout and counted per folder on stderr as after a clean run, and every input left out is named, past five."""
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    bad = [f"zz{index}" for index in range(7)]
    for name in bad:
        (photos / "src" / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out, err = run(capsys, "image", "src", "--bgr", "plate.png", "-o", "out", "--outputs", "com", "pha")
    assert code == 2
    assert sorted(out.split()) == [str(Path(f"out/{kind}/{name}.png")) for kind in ("com", "pha")
                                   for name in ("beach", "office")]
    lines = err.strip().splitlines()
    assert f"bgmatte image: 2 com images in {Path('out/com')}" in lines
    assert f"bgmatte image: 2 pha images in {Path('out/pha')}" in lines
    assert lines[-1].startswith("bgmatte image: error: 7 of 9 images could not be read and were left out (")
    assert all(str(Path(f"src/{name}.png")) + ": " in lines[-1] for name in bad), lines[-1]
    # In Python the error carries the same lists.
    with pytest.raises(BgmatteError) as caught:
        pipeline.matte_images("src", "plate.png", output_dir="again", progress=False)
    assert caught.value.written == {"com": [Path("again/com/beach.png"), Path("again/com/office.png")]}
    assert caught.value.left_out == [Path(f"src/{name}.png") for name in bad]


def test_a_batch_with_an_unreadable_plate_lists_what_it_wrote_even_when_quiet(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    whole = (photos / "bgr" / "beach.png").read_bytes()
    (photos / "bgr" / "beach.png").write_bytes(whole[: len(whole) // 2])
    code, out, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "-q")
    one_line_error(code, err, "1 of 2 images or their plates could not be read", "the others were matted")
    assert out.split() == [str(Path("out/com/office.png"))]


def test_ctrl_c_in_a_batch_lists_what_it_wrote_and_leaves_no_partial_file(photos, capsys, monkeypatch):
    """Ctrl-C only printed "interrupted": the outputs already written are listed and counted as after a clean run
    (or a partial one), they stay whole, and the image being matted leaves nothing, not even a temporary file."""
    write_png(photos / "src" / "zoo.png", subject_frame(plate_image(seed=0), 4))
    monkeypatch.setattr(pipeline, "load_predictor",
                        lambda *args, **kw: Predictor(DifferenceModel(interrupt_on=2)))  # during office.png
    code, out, err = run(capsys, "image", "src", "--bgr", "plate.png", "-o", "out", "--outputs", "com", "pha")
    assert code == 130
    assert sorted(out.split()) == [str(Path(f"out/{kind}/beach.png")) for kind in ("com", "pha")]
    lines = err.strip().splitlines()
    assert f"bgmatte image: 1 com image in {Path('out/com')}" in lines
    assert f"bgmatte image: 1 pha image in {Path('out/pha')}" in lines
    assert lines[-1] == "bgmatte image: interrupted"
    assert sorted(path.name for path in (photos / "out").rglob("*") if path.is_file()) == ["beach.png", "beach.png"]
    for kind in ("com", "pha"):
        assert cv2.imread(str(photos / "out" / kind / "beach.png"), cv2.IMREAD_UNCHANGED) is not None
    # In Python the interruption carries the same list.
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel(interrupt_on=2)))
    with pytest.raises(KeyboardInterrupt) as caught:
        pipeline.matte_images("src", "plate.png", output_dir="again", progress=False)
    assert caught.value.written == {"com": [Path("again/com/beach.png")]}
