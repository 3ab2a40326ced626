"""`bgmatte video`: both spellings, messages and exit codes, in-process through `bgmatte.cli.main`."""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import bgmatte.pipeline as pipeline
from bgmatte.cli import main
from bgmatte.errors import BgmatteError
from bgmatte.io.images import write_png
from bgmatte.io.video import VideoReader, VideoWriter
from bgmatte.model.matting import MattingRefine
from bgmatte.predictor import Predictor
from media import (DifferenceModel, alpha_planes, audio_seconds, copy_from, decode_times, make_clip, plate_image, read_frames,
                   write_clip)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.manual_seed(0)
    torch.save(MattingRefine("mobilenetv2").state_dict(), path)  # a .pth like the released ones
    return path


@pytest.fixture()
def scene(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_clip(tmp_path / "src.mp4", 12)
    write_png(tmp_path / "bgr.png", plate_image())
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fail_trailers(monkeypatch, only: str | None = None) -> None:
    """Make writing the trailer fail as on a full disk, for the output named `only` or for every output."""
    finish = VideoWriter._finish

    def trailer_fails(self):
        if only is None or self.path.name == only:
            container = self._container

            def close():
                container.close()
                raise OSError(28, "No space left on device")

            self._container = types.SimpleNamespace(mux=container.mux, close=close)
        finish(self)

    monkeypatch.setattr(VideoWriter, "_finish", trailer_fails)


def use_difference_model(monkeypatch, **kwargs) -> DifferenceModel:
    """Run the CLI with a model whose matte is known (and that can raise KeyboardInterrupt)."""
    model = DifferenceModel(**kwargs)
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(model))
    return model


def test_the_reference_command_works_as_is(scene, capsys, checkpoint):
    code, out, err = run(
        capsys, "video", "--model-type", "mattingrefine", "--model-backbone", "mobilenetv2",
        "--model-backbone-scale", "0.25", "--model-refine-mode", "sampling", "--model-refine-sample-pixels", "2000",
        "--model-checkpoint", checkpoint, "--video-src", "src.mp4", "--video-bgr", "bgr.png", "--output-dir", "out/",
        "--output-type", "com", "fgr", "err", "ref", "--device", "cpu",
    )
    assert code == 0, err
    out_dir = scene / "out"
    assert sorted(p.name for p in out_dir.iterdir()) == ["com.mp4", "err.mp4", "fgr.mp4", "ref.mp4"]
    for path in out_dir.iterdir():
        assert decode_times(path) == [round(0.04 * index, 4) for index in range(12)], path.name
    assert audio_seconds(out_dir / "com.mp4") > 0.4
    assert out.split() == [str(Path("out") / f"{kind}.mp4") for kind in ("com", "fgr", "err", "ref")]


def test_reference_image_sequences_with_resize_and_target(scene, capsys, checkpoint):
    write_png(scene / "sky.png", np.full((32, 48, 3), (40, 90, 200), np.uint8))
    code, _, err = run(
        capsys, "video", "--model-checkpoint", checkpoint, "--video-src", "src.mp4", "--video-bgr", "bgr.png",
        "--output-dir", "seq", "--output-types", "com", "pha", "--output-format", "image_sequences",
        "--video-resize", "48", "32", "--video-target-bgr", "sky.png", "--preprocess-alignment", "-q",
    )
    assert code == 0, err
    com = sorted((scene / "seq" / "com").iterdir())
    assert len(com) == 12 and len(list((scene / "seq" / "pha").iterdir())) == 12
    import cv2

    assert cv2.imread(str(com[0]), cv2.IMREAD_UNCHANGED).shape == (32, 48, 3)  # composited over the target


def test_short_spelling_writes_a_transparent_webm_and_its_mattes_beside_it(scene, capsys, checkpoint):
    code, out, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "cut.webm", "--checkpoint", checkpoint,
                         "--target-bgr", "transparent", "--outputs", "com", "pha", "--refine-sample-pixels", "2000")
    assert code == 0, err
    assert out.split() == ["cut.webm", "cut_pha.webm"]
    assert len(alpha_planes(scene / "cut.webm")) == 12
    with av.open(str(scene / "cut.webm")) as container:
        assert container.streams.audio
    assert len(read_frames(scene / "cut_pha.webm")) == 12


def test_default_output_is_beside_the_source(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch)
    code, out, err = run(capsys, "video", "src.mp4", "--bgr", "auto", "-q")
    assert code == 0, err
    assert out.split() == ["src_com.mp4"] and len(read_frames(scene / "src_com.mp4")) == 12


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bgmatte video: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


def test_missing_source_is_a_one_line_error_naming_it(scene, capsys, checkpoint):
    code, _, err = run(capsys, "video", "nothing.mp4", "--bgr", "bgr.png", "--checkpoint", checkpoint)
    one_line_error(code, err, "nothing.mp4", "no such file")


def test_non_media_source_and_plate_are_named(scene, capsys, checkpoint):
    (scene / "notes.mp4").write_text("not a video\n" * 40)
    code, _, err = run(capsys, "video", "notes.mp4", "--bgr", "bgr.png", "--checkpoint", checkpoint)
    one_line_error(code, err, "notes.mp4", "not a video file")
    (scene / "plate.jpg").write_text("not a picture")
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "plate.jpg", "--checkpoint", checkpoint)
    one_line_error(code, err, "plate.jpg")


def test_missing_checkpoint_and_missing_default_model_are_explained(scene, capsys, checkpoint):
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "--checkpoint", "gone.pth")
    one_line_error(code, err, "gone.pth", "not found")
    from bgmatte.model.build import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png")
        one_line_error(code, err, "default model")
    assert not (scene / "src_com.mp4").exists()


def test_transparent_mp4_is_refused_with_the_reason(scene, capsys, checkpoint):
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "cut.mp4", "--target-bgr", "transparent",
                       "--checkpoint", checkpoint)
    one_line_error(code, err, "cut.mp4", "transparency", ".webm")
    assert not (scene / "cut.mp4").exists()


def test_unsupported_options_get_one_line_errors(scene, capsys, checkpoint):
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "--target-bgr", "plaid", "--checkpoint", checkpoint)
    one_line_error(code, err, "plaid")
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "--model-type", "mattingbase",
                       "--outputs", "com", "ref", "--checkpoint", checkpoint)
    one_line_error(code, err, "ref output needs the refine model")
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "a.mp4", "--output-dir", "out")
    one_line_error(code, err, "not both")
    code, _, err = run(capsys, "video", "src.mp4", "--video-src", "src.mp4", "--bgr", "bgr.png")
    one_line_error(code, err, "once")
    code, _, err = run(capsys, "video", "src.mp4")
    one_line_error(code, err, "--bgr")


def test_a_crf_or_preset_an_output_cannot_use_is_warned_about_naming_it(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "cut.mov", "--target-bgr", "transparent",
                       "--outputs", "com", "pha", "--crf", "10", "-q")
    assert code == 0, err
    assert err.count("warning") == 1 and "cut.mov: --crf 10 does nothing for prores_ks" in err  # cut_pha.mov is H.264
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "clip.webm", "--preset", "slow",
                       "--crf", "20", "-q")
    assert code == 0, err
    assert err.count("warning") == 1 and "clip.webm: --preset slow does nothing for libvpx-vp9" in err
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "plain.mp4", "--preset", "slow",
                       "--crf", "20", "-q")
    assert code == 0 and "warning" not in err, err


def test_existing_output_is_refused_unless_overwrite(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch)
    (scene / "com.mp4").write_bytes(b"precious")
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "com.mp4")
    one_line_error(code, err, "com.mp4: already exists (pass --overwrite to replace it)")
    assert "overwrite=True" not in err  # the Python argument, which the command line has no use for
    assert (scene / "com.mp4").read_bytes() == b"precious"
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "com.mp4", "--overwrite")
    assert code == 0 and len(read_frames(scene / "com.mp4")) == 12


def test_overwriting_a_png_folder_never_deletes_the_source_plate_or_other_files(scene, capsys, monkeypatch):
    model = use_difference_model(monkeypatch)
    shot = scene / "ow2"
    shot.mkdir()
    (shot / "src.mp4").write_bytes((scene / "src.mp4").read_bytes())
    (shot / "plate.png").write_bytes((scene / "bgr.png").read_bytes())
    (shot / "notes.txt").write_text("precious")
    before = {path.name: path.read_bytes() for path in shot.iterdir()}
    code, _, err = run(capsys, "video", "ow2/src.mp4", "--bgr", "ow2/plate.png", "-o", "ow2", "--overwrite")
    one_line_error(code, err, "ow2: this output folder holds the input video ow2/src.mp4")
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "ow2", "--overwrite")
    one_line_error(code, err, "ow2: holds more than numbered PNG frames (notes.txt, plate.png, src.mp4)")
    assert {path.name: path.read_bytes() for path in shot.iterdir()} == before
    assert model.calls == []


@pytest.mark.parametrize("name", ["photo.png", "photo.jpg"])
def test_a_still_image_as_the_source_is_refused_pointing_to_bgmatte_image(scene, capsys, monkeypatch, name):
    use_difference_model(monkeypatch)
    write_png(scene / "photo.png", plate_image(seed=1))  # a photo, not a copy of the plate
    if name.endswith(".jpg"):
        import cv2

        cv2.imwrite(str(scene / name), plate_image())
    code, _, err = run(capsys, "video", name, "--bgr", "bgr.png", "-o", "out.mp4")
    one_line_error(code, err, f"{name}: a still image, not a video", "bgmatte image")
    assert not (scene / "out.mp4").exists()


@pytest.mark.parametrize("how", ["same-path", "dot-path", "absolute", "symlink", "hard-link", "reference-spelling"])
def test_a_clip_given_as_its_own_plate_is_refused_before_the_model_loads(scene, capsys, monkeypatch, how):
    """It was matted frame by frame against itself without a word: every pixel matched its plate, so every output
    came out as an empty cutout."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a clip given as its own plate")

    monkeypatch.setattr(pipeline, "load_predictor", never)
    plate = {"same-path": "src.mp4", "dot-path": "./src.mp4", "absolute": str(scene / "src.mp4"),
             "symlink": "link.mp4", "hard-link": "hard.mp4", "reference-spelling": "src.mp4"}[how]
    if how == "symlink":
        os.symlink("src.mp4", scene / "link.mp4")
    if how == "hard-link":
        os.link(scene / "src.mp4", scene / "hard.mp4")
    before = sorted(path.name for path in scene.iterdir())
    argv = (["--video-src", "src.mp4", "--video-bgr", plate, "--output-dir", "out"] if how == "reference-spelling"
            else ["src.mp4", "--bgr", plate, "-o", "out.mp4"])
    code, _, err = run(capsys, "video", *argv, "-q")
    one_line_error(code, err, f"{Path(plate)}: the plate of src.mp4 is that clip itself",
                   "a plate is a shot of the background without the subject")
    assert sorted(path.name for path in scene.iterdir()) == before  # no output, not even a folder


def test_the_default_model_keeps_a_small_subject_in_a_small_clip(scene, capsys):
    """At the paper's 1/4 the base network saw 24x16 pixels of this 96x64 clip, and the 20-pixel square vanished
    from every frame but the first (mean alpha 0.00 over it); below HD the scale now gives the base network more
    pixels (1/2 here), and the square is matted in every frame."""
    from media import subject_box

    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--outputs", "pha",
                       "--device", "cpu", "-q")
    assert code == 0, err
    mattes = [frame[..., 0] / 255.0 for frame in read_frames(scene / "out_pha.mp4")]
    assert len(mattes) == 12
    for index, matte in enumerate(mattes):
        rows, columns = subject_box(index)
        inside = matte[rows, columns][2:-2, 2:-2].mean()  # away from the square's edges (4:2:0 chroma, codec)
        outside = matte.copy()
        outside[rows.start - 2:rows.stop + 2, columns.start - 2:columns.stop + 2] = 0
        assert inside > 0.8 and outside.mean() < 0.05, (index, inside, outside.mean())


def test_a_copy_of_the_clip_given_as_its_plate_is_refused_and_a_same_sized_other_file_is_not(scene, capsys,
                                                                                              monkeypatch):
    """A copy under another name (``cp shot.mp4 plate.mp4``, a download kept twice) matted as empty as the clip
    itself did; the same bytes are refused. A different file of the very same size is compared and let through."""
    model = use_difference_model(monkeypatch)
    shutil.copyfile(scene / "src.mp4", scene / "copy.mp4")
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "copy.mp4", "-o", "out.mp4", "-q")
    one_line_error(code, err, "copy.mp4: the plate of src.mp4 is a copy of that clip (the same bytes)",
                   "a plate is a shot of the background without the subject")
    assert not (scene / "out.mp4").exists() and model.calls == []
    data = bytearray((scene / "src.mp4").read_bytes())
    data[-1] ^= 0xFF  # the same size, one byte apart: not a copy
    (scene / "near.mp4").write_bytes(bytes(data))
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "near.mp4", "-o", "out.mp4", "-q")
    assert "copy" not in err


@pytest.mark.parametrize("plate", ["bgr.png", "auto"])
def test_the_clip_as_its_own_target_background_is_matted_over_itself(scene, capsys, monkeypatch, plate):
    """Unlike the plate, the clip as the new background is a choice (the subject over its own shot), so it is kept;
    a still plate and an automatic one both still work beside it."""
    use_difference_model(monkeypatch)
    code, out, err = run(capsys, "video", "src.mp4", "--bgr", plate, "--target-bgr", "src.mp4", "-o", "out.mp4", "-q")
    assert code == 0, err
    assert out.split() == ["out.mp4"] and len(read_frames(scene / "out.mp4")) == 12


def test_a_picture_declaring_too_many_pixels_is_refused_as_a_source(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch)
    data = bytearray((scene / "bgr.png").read_bytes())  # the plate, its header claiming 12000x10000
    data[16:24] = struct.pack(">II", 12000, 10000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (scene / "bomb.png").write_bytes(bytes(data))
    code, _, err = run(capsys, "video", "bomb.png", "--bgr", "bgr.png", "-o", "out.mp4", "--resize", "96", "64")
    one_line_error(code, err, "bomb.png: 12000x10000 is 120 megapixels, above the limit of 100")
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--resize", "100000", "100000")
    one_line_error(code, err, "src.mp4: cannot resize to 100000x100000: 10000 megapixels, above the limit of 100")
    assert not (scene / "out.mp4").exists()


@pytest.mark.parametrize("size", [("0", "0"), ("96", "-4")])
def test_a_resize_below_one_pixel_is_refused_naming_the_option(scene, capsys, size):
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--resize", *size)
    one_line_error(code, err, f"--resize {size[0]} {size[1]}: a width and a height of at least 1 pixel")
    assert not (scene / "out.mp4").exists()


@pytest.mark.parametrize("span", [(), ("--start", "0.4"), ("--duration", "0.05")])
def test_an_automatic_plate_from_too_few_frames_is_refused_before_the_model_loads(scene, capsys, monkeypatch, span):
    make_clip(scene / "short.mp4", 2)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a clip that cannot give an automatic plate")

    monkeypatch.setattr(pipeline, "load_predictor", never)
    clip = "short.mp4" if not span or span[0] == "--duration" else "src.mp4"  # 12 frames: 2 from 0.4 s on
    code, _, err = run(capsys, "video", clip, "--bgr", "auto", *span, "-q")
    one_line_error(code, err, clip, "an automatic plate needs at least 3 frames", "it gave 2")
    assert sorted(path.name for path in scene.iterdir()) == ["bgr.png", "short.mp4", "src.mp4"]


@pytest.mark.parametrize("name,content,message", [
    ("garbage.png", b"not an image", "garbage.png: not an image file"),
    ("garbage.mp4", b"not a video", "garbage.mp4: not a video file"),
], ids=["image", "video"])
def test_an_unreadable_target_background_is_refused_before_the_model_loads(scene, capsys, monkeypatch, name, content,
                                                                           message):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a target background that cannot be read")

    monkeypatch.setattr(pipeline, "load_predictor", never)
    (scene / name).write_bytes(content)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "--target-bgr", name, "-o", "out.mp4")
    one_line_error(code, err, message, "(for the target background)")
    assert not (scene / "out.mp4").exists()


@pytest.mark.parametrize("plate", ["bgr.png", "auto"])
def test_frames_too_small_for_the_backbone_scale_are_refused_before_the_model_loads(scene, capsys, monkeypatch, plate):
    """Refused at the first frame, they came after the model had loaded (and an automatic plate's pass), with a
    warning that the composite got no frames."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded, or the plate estimated, for frames it cannot matte")

    monkeypatch.setattr(pipeline, "load_predictor", never)
    monkeypatch.setattr(pipeline, "_estimate_plate", never)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", plate, "--backbone-scale", "0.01", "-o", "out.mp4", "-q")
    one_line_error(code, err, "frames of 96x64 are too small for backbone scale 0.01")
    assert not (scene / "out.mp4").exists()


def test_warnings_reach_stderr_as_one_line_each(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch)
    write_png(scene / "small.png", plate_image(48, 32))
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "small.png", "-q")
    assert code == 0
    lines = err.strip().splitlines()
    assert lines == ["bgmatte video: warning: small.png: the plate is 48x32 but the video is 96x64; "
                     "the plate is resized to fit"]


def test_ctrl_c_exits_130_and_leaves_playable_outputs(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch, interrupt_on=4)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "--output-dir", "out", "--outputs", "com", "pha")
    assert code == 130
    assert "interrupted" in err and "first 3 frames" in err and "Traceback" not in err
    assert decode_times(scene / "out" / "com.mp4") == [0.0, 0.04, 0.08]
    assert len(read_frames(scene / "out" / "pha.mp4")) == 3
    assert sorted(p.name for p in (scene / "out").iterdir()) == ["com.mp4", "pha.mp4"]


@pytest.mark.parametrize("failing", ["out.mp4", "out_pha.mp4"])
def test_an_encoder_failing_mid_run_leaves_no_file_under_its_name_and_the_others_whole(scene, capsys, monkeypatch,
                                                                                       failing):
    use_difference_model(monkeypatch)
    (scene / failing).write_bytes(b"an earlier output")  # replaced only by a whole file, never by a broken one
    encode = VideoWriter._encode

    def breaks_at_frame_six(self, item):
        if self.path.name == failing and self.frames_written == 5:
            raise av.error.ExternalError(542398533, "Generic error in an external library")
        encode(self, item)

    monkeypatch.setattr(VideoWriter, "_encode", breaks_at_frame_six)
    write = VideoWriter.write

    def taken_before_the_next(self, *args):
        # On a loaded machine the encoders can lag the whole clip, so that the failure comes out only at the end;
        # waiting for each frame to leave the queue makes it come out mid-run, as it does when encoding keeps up.
        write(self, *args)
        deadline = time.monotonic() + 10
        while self._worker._queue.qsize() and self._worker.error is None and time.monotonic() < deadline:
            time.sleep(0.001)

    monkeypatch.setattr(VideoWriter, "write", taken_before_the_next)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--outputs", "com", "pha",
                       "--overwrite")
    assert code == 2 and f"{failing}: encoding failed" in err and "Traceback" not in err
    assert (scene / failing).read_bytes() == b"an earlier output"
    survivor = scene / ({"out.mp4", "out_pha.mp4"} - {failing}).pop()
    held = len(read_frames(survivor))
    assert 6 <= held < 12
    assert f"{failing} is not kept" in err and f"{survivor.name} holds the first {held} frames" in err
    assert sorted(p.name for p in scene.iterdir()) == ["bgr.png", "out.mp4", "out_pha.mp4", "src.mp4"]


@pytest.mark.parametrize("failing", ["out.mp4", "out_pha.mp4"])
def test_an_encoder_failing_as_its_file_is_finished_is_reported_not_kept_as_a_mid_run_failure_is(
        scene, capsys, monkeypatch, failing):
    """Every frame encoded, then the trailer cannot be written (a full disk): the file is not kept, and the user is
    told so, and what the other output holds, as when an encoder fails mid-run."""
    use_difference_model(monkeypatch)
    (scene / failing).write_bytes(b"an earlier output")
    fail_trailers(monkeypatch, failing)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--outputs", "com", "pha",
                       "--overwrite", "-q")
    survivor = ({"out.mp4", "out_pha.mp4"} - {failing}).pop()
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines() == [
        f"bgmatte video: warning: {failing} is not kept (its encoder failed); {survivor} holds all 12 frames",
        f"bgmatte video: error: {failing}: could not finish the file (No space left on device)",
    ]
    assert (scene / failing).read_bytes() == b"an earlier output"
    assert len(read_frames(scene / survivor)) == 12
    assert sorted(p.name for p in scene.iterdir()) == ["bgr.png", "out.mp4", "out_pha.mp4", "src.mp4"]


def test_outputs_that_all_fail_are_named_in_the_plural_and_none_said_to_hold_a_frame_they_never_took(
        scene, capsys, monkeypatch):
    """Both outputs refused at their start (an encoder that opens only at other settings): the first frame was counted
    as written though no output took it, so that a warning before the one error said the files were 'not kept'; and
    both trailers failing (a full disk) were named as one: 'out.mp4 and out_pha.mp4 is not kept (its encoder failed)'."""
    use_difference_model(monkeypatch)

    def refuse(self, *, copy_audio, audio=True):
        raise OSError("the muxer refused")

    start = VideoWriter._start
    monkeypatch.setattr(VideoWriter, "_start", refuse)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--outputs", "com", "pha", "-q")
    assert code == 2
    assert err.splitlines() == ["bgmatte video: error: out.mp4: could not start the file (libx264 video 96x64): "
                                "the muxer refused; nothing was written"]
    monkeypatch.setattr(VideoWriter, "_start", start)
    fail_trailers(monkeypatch)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--outputs", "com", "pha", "-q")
    assert code == 2
    assert err.splitlines() == [
        "bgmatte video: warning: out.mp4 and out_pha.mp4 are not kept (their encoders failed)",
        "bgmatte video: error: out.mp4: could not finish the file (No space left on device)",
    ]
    assert sorted(p.name for p in scene.iterdir()) == ["bgr.png", "src.mp4"]


def test_truncated_input_exits_2_with_every_decoded_frame_written(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch)
    rng = np.random.default_rng(0)
    write_clip(scene / "whole.mkv", [rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(25)])
    data = (scene / "whole.mkv").read_bytes()
    (scene / "cut.mkv").write_bytes(data[: len(data) * 6 // 10])
    with VideoReader(scene / "cut.mkv") as reader:
        decodable = len(list(reader))
    code, _, err = run(capsys, "video", "cut.mkv", "--bgr", "bgr.png", "-o", "out.mp4", "-q")
    assert code == 2 and "Traceback" not in err
    assert "cut.mkv" in err and "truncated" in err
    assert len(read_frames(scene / "out.mp4")) == decodable
    assert audio_seconds(scene / "out.mp4") > 0


def test_a_short_mkv_cut_by_a_third_exits_2(scene, capsys, monkeypatch):
    # 12 frames (0.48 s of video, 0.51 s with the audio's tail) cut to two thirds of their bytes leave nine.
    use_difference_model(monkeypatch)
    make_clip(scene / "whole.mkv", 12, plate=plate_image(160, 96))
    write_png(scene / "plate.png", plate_image(160, 96))
    data = (scene / "whole.mkv").read_bytes()
    (scene / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])
    with VideoReader(scene / "cut.mkv") as reader:
        decodable = len(list(reader))
    assert 5 <= decodable < 12
    code, _, err = run(capsys, "video", "cut.mkv", "--bgr", "plate.png", "-o", "out.mp4", "-q")
    assert code == 2 and "Traceback" not in err
    assert "cut.mkv: ended at" in err and "of 0.48 s" in err and "truncated" in err
    assert len(read_frames(scene / "out.mp4")) == decodable
    code, _, err = run(capsys, "video", "whole.mkv", "--bgr", "plate.png", "-o", "whole.mp4", "-q")
    assert code == 0 and "warning" not in err.replace("interim checkpoint", "")


def test_an_mp4_trimmed_by_its_edit_list_exits_0_with_the_frames_it_shows(scene, capsys, monkeypatch):
    # `ffmpeg -ss 0.2 -i src.mp4 -c copy trimmed.mp4` keeps all 12 frames behind an edit list that shows the last
    # seven: it exited 2, "ended after 7 of 12 frames".
    use_difference_model(monkeypatch)
    copy_from(scene / "src.mp4", scene / "trimmed.mp4", 0.2)
    code, _, err = run(capsys, "video", "trimmed.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "-q")
    assert code == 0, err
    assert "warning" not in err.replace("interim checkpoint", "")
    assert decode_times(scene / "out.mp4") == [round(0.04 * index, 4) for index in range(7)]
    assert audio_seconds(scene / "out.mp4") == pytest.approx(0.28, abs=0.03)


def test_a_span_of_a_short_mkv_cut_by_a_third_exits_2(scene, capsys, monkeypatch):
    # A span from 0.08 s of the same cut file lost those frames too: it exited 0 without a word.
    use_difference_model(monkeypatch)
    make_clip(scene / "whole.mkv", 12, plate=plate_image(160, 96))
    write_png(scene / "plate.png", plate_image(160, 96))
    data = (scene / "whole.mkv").read_bytes()
    (scene / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])
    with VideoReader(scene / "cut.mkv", start=0.08) as reader:
        decodable = len(list(reader))
    assert 3 <= decodable < 10
    code, _, err = run(capsys, "video", "cut.mkv", "--bgr", "plate.png", "-o", "out.mp4", "--start", "0.08", "-q")
    assert code == 2 and "Traceback" not in err
    assert "cut.mkv: ended at" in err and "of 0.48 s" in err and "truncated" in err
    assert len(read_frames(scene / "out.mp4")) == decodable
    code, _, err = run(capsys, "video", "whole.mkv", "--bgr", "plate.png", "-o", "whole.mp4", "--start", "0.08", "-q")
    assert code == 0 and "warning" not in err.replace("interim checkpoint", "")
    assert len(read_frames(scene / "whole.mp4")) == 10


def test_progress_bar_shows_rate_on_a_terminal_and_quiet_hides_it(scene, monkeypatch, capsys):
    use_difference_model(monkeypatch)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["video", "src.mp4", "--bgr", "bgr.png", "-o", "a.mp4"]) == 0
    shown = terminal.getvalue()
    assert "src.mp4" in shown and "12/12" in shown and "frame/s" in shown
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main(["video", "src.mp4", "--bgr", "bgr.png", "-o", "b.mp4", "--quiet"]) == 0
    assert quiet.getvalue() == ""


def test_debug_shows_the_traceback(scene, capsys):
    with pytest.raises(BgmatteError, match="nothing.mp4"):
        main(["--debug", "video", "nothing.mp4", "--bgr", "bgr.png"])


def test_command_line_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "bgmatte", "video", str(tmp_path / "missing.mp4"), "--bgr", "bgr.png"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"bgmatte video: error: {tmp_path / 'missing.mp4'}: no such file"
    assert done.stdout == ""


@pytest.mark.slow
def test_bench_pipeline_measures_the_model_and_the_whole_pipeline_in_one_run(capsys):
    import json

    code, out, err = run(capsys, "bench", "--pipeline", "--resolution", "96x64", "--threads", "1", "--json")
    assert code == 0, err
    speed = json.loads(out)
    assert speed["frames"] == 32 and speed["outputs"] == ["com"] and speed["threads"] == 1
    assert speed["model_fps"] > 0 and speed["pipeline_fps"] > 0
    assert speed["ratio"] == pytest.approx(speed["pipeline_fps"] / speed["model_fps"])


# ------------------------------------------------------------------------------------------ --start, --duration


def test_start_and_duration_take_seconds_or_clock_times(scene, capsys, monkeypatch):
    calls: list[dict] = []

    def convert(src, bgr, **kwargs):
        calls.append(kwargs)
        return pipeline.VideoResult({}, 0, 1.0)

    monkeypatch.setattr(pipeline, "convert_video", convert)
    for argv, start, duration in [((), 0.0, None), (("--start", "12.5"), 12.5, None),
                                  (("--start", "1:02.5", "--duration", "01:00:01"), 62.5, 3601.0),
                                  (("--duration", "0:07"), 0.0, 7.0), (("--start", "90:00"), 5400.0, None)]:
        code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-q", *argv)
        assert code == 0, err
        assert (calls[-1]["start"], calls[-1]["duration"]) == (start, duration), argv


@pytest.mark.parametrize(("option", "value"), [("--duration", "0"), ("--duration", "0:00"), ("--start", "-1"),
                                               ("--start", "abc"), ("--start", "1:75"), ("--duration", "1:2:3:4"),
                                               ("--start", "nan")])
def test_a_bad_start_or_duration_is_a_one_line_error_naming_the_option_and_the_value(scene, capsys, monkeypatch,
                                                                                       option, value):
    model = use_difference_model(monkeypatch)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", option, value)
    one_line_error(code, err, option, value)
    assert model.calls == [] and not (scene / "src_com.mp4").exists()


def test_a_span_of_the_clip_is_matted_with_its_sound_and_an_automatic_plate(scene, capsys, monkeypatch):
    use_difference_model(monkeypatch)
    code, out, err = run(capsys, "video", "src.mp4", "--bgr", "auto", "-o", "cut.mp4", "--start", "0:00.2",
                         "--duration", "0.2", "-q")
    assert code == 0, err
    assert decode_times(scene / "cut.mp4") == [0.0, 0.04, 0.08, 0.12, 0.16]
    assert audio_seconds(scene / "cut.mp4") == pytest.approx(0.2, abs=0.04)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "late.mp4", "--start", "1:00")
    one_line_error(code, err, "src.mp4", "60 s", "0.48 s")
    assert not (scene / "late.mp4").exists()


@pytest.mark.parametrize("interrupt_on", [None, 4])  # the signal while finishing a whole run, or after a Ctrl-C
def test_a_signal_while_the_outputs_are_finished_still_leaves_them_whole(scene, capsys, monkeypatch, interrupt_on):
    """SIGTERM (a second Ctrl-C, a job scheduler's stop) while the encoders flush and the files get their trailers:
    the files are finished and renamed all the same, and the exit says the signal."""
    import signal
    import time

    use_difference_model(monkeypatch, interrupt_on=interrupt_on)
    finish = VideoWriter._finish

    def signalled_while_finishing(self):
        if self.path.name == "out.mp4":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the main thread takes the signal while this one still flushes
        finish(self)

    monkeypatch.setattr(VideoWriter, "_finish", signalled_while_finishing)
    code, _, err = run(capsys, "video", "src.mp4", "--bgr", "bgr.png", "-o", "out.mp4", "--outputs", "com", "pha", "-q")
    assert code == 128 + signal.SIGTERM and "terminated (SIGTERM)" in err, err
    frames = 12 if interrupt_on is None else interrupt_on - 1
    assert len(read_frames(scene / "out.mp4")) == frames and len(read_frames(scene / "out_pha.mp4")) == frames
    assert audio_seconds(scene / "out.mp4") > 0
    assert sorted(p.name for p in scene.iterdir()) == ["bgr.png", "out.mp4", "out_pha.mp4", "src.mp4"]


@pytest.mark.parametrize("signum", [15, 1])  # SIGTERM (kill, a job scheduler), SIGHUP (the terminal closed)
def test_termination_finalizes_the_outputs_as_ctrl_c_does(tmp_path, signum):
    """Stopped by a signal in mid-run: the composite is playable with the frames matted so far, with its sound,
    no temporary file is left, and the exit status says which signal (the process died at once, leaving a hidden
    partial file and no output)."""
    import signal
    import time

    make_clip(tmp_path / "src.mp4", 600)
    write_png(tmp_path / "bgr.png", plate_image())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "bgmatte", "video", "src.mp4", "--bgr", "bgr.png", "-o",
                                "out.mp4", "-q"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            partial = list(tmp_path.glob(".out.*"))
            if partial and partial[0].stat().st_size > 2000:  # past the header: frames are being written
                break
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()[1].decode()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr.decode()
    assert f"terminated ({signal.Signals(signum).name})" in stderr.decode()
    frames = read_frames(tmp_path / "out.mp4")
    assert 0 < len(frames) < 600
    assert audio_seconds(tmp_path / "out.mp4") > 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bgr.png", "out.mp4", "src.mp4"]


def test_each_refine_threshold_default_says_where_it_applies_and_why():
    """bgmatte video and image default to 0.7 (the reference's inference_video.py and inference_images.py), the
    rest to the model's 0.1; the help said only "(default 0.7)" or "(default 0.1)", never that the other exists."""
    from bgmatte.cli import build_parsers
    from bgmatte.model.matting import RefineOptions

    commands = build_parsers()[1]
    found = {}
    for name, parser in commands.items():
        for action in parser._actions:
            if action.dest in ("refine_threshold", "threshold"):
                found[name] = (action.default, " ".join(action.help.split()))
    assert sorted(found) == ["bench", "eval", "export", "image", "video", "webcam"]
    for name in ("video", "image"):
        assert found[name][0] == 0.7
        assert "inference_video.py" in found[name][1] and "0.1" in found[name][1], found[name]
    for name in ("webcam", "eval", "export", "bench"):
        assert found[name][0] == 0.1
        assert "the model's own" in found[name][1] and "0.7" in found[name][1], (name, found[name])
    assert pipeline.ModelOptions().refine_threshold == RefineOptions().refine_threshold == 0.1
    readme = " ".join((ROOT / "README.md").read_text().replace("`", "").split())
    assert "--refine-threshold defaults to 0.7 in bgmatte video and image" in readme


@pytest.mark.parametrize(("command", "option"), [
    (["video", "missing.mp4", "--bgr", "missing.png"], "--refine-threshold"),
    (["video", "missing.mp4", "--bgr", "missing.png"], "--model-refine-threshold"),
    (["video", "missing.mp4", "--bgr", "missing.png"], "--backbone-scale"),
    (["image", "missing.png", "--bgr", "missing.png", "-o", "out"], "--refine-threshold"),
    (["webcam", "--camera", "missing.mp4", "--record", "out.mp4", "--no-preview"], "--refine-threshold"),
    (["webcam", "--camera", "missing.mp4", "--record", "out.mp4", "--no-preview"], "--backbone-scale"),
    (["eval", "--model", "missing.pth", "--data", "missing"], "--refine-threshold"),
    (["export", "onnx", "missing.pth", "-o", "out.onnx"], "--refine-threshold"),
    (["bench"], "--threshold"),
    (["bench"], "--scale"),
])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_refine_setting_that_is_not_a_finite_number_is_one_line_naming_the_option_before_any_file_is_read(
        tmp_path, capsys, monkeypatch, command, option, value):
    """argparse's float() takes nan and inf; a NaN --refine-threshold was accepted and refined nothing. The inputs
    named do not exist: the option must be refused before any of them (or a model) is looked at."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *command, option, value)
    assert code == 2, err
    named = option.replace("--model-", "--")  # the reference's spelling is reported under the short one
    assert len(err.splitlines()) == 1 and err.startswith(f"bgmatte {command[0]}: error: {named} {value}"), err
    assert not list(tmp_path.iterdir())
