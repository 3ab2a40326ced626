"""The video and image pipeline as a library: every frame in every output, plates, targets, safety, speed."""
from __future__ import annotations

import logging
import re
import os
import shutil
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import bgmatte.pipeline as pipeline
from bgmatte.composite import TargetBackground
from bgmatte.errors import BgmatteError
from bgmatte.io.images import read_image, write_png
from bgmatte.io.video import VideoReader
from bgmatte.model.build import save_weights
from bgmatte.model.matting import MattingBase, MattingRefine
from bgmatte.pipeline import (
    REFERENCE_GREEN,
    ModelOptions,
    TargetFrames,
    composite_matte,
    convert_video,
    matte_images,
    measure_pipeline,
    plan_video_outputs,
    render_outputs,
)
from bgmatte.predictor import Matte, Predictor
from media import (
    HEIGHT,
    SUBJECT,
    WIDTH,
    DifferenceModel,
    alpha_planes,
    audio_frequency,
    audio_seconds,
    decode_order_copy,
    decode_times,
    make_clip,
    plate_image,
    read_frames,
    stepped_tone,
    subject_box,
    subject_frame,
    write_clip,
    write_vfr_mkv,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]



@pytest.fixture()
def scene(tmp_path):
    """A 12-frame clip with audio of a subject moving over a plate, and the plate as a PNG."""
    clip, plate = tmp_path / "src.mp4", tmp_path / "plate.png"
    make_clip(clip, 12)
    write_png(plate, plate_image())
    return clip, plate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random.safetensors"
    torch.manual_seed(0)
    save_weights(MattingRefine("mobilenetv2"), path)
    return path


def background_pixels(frame: np.ndarray, index: int) -> np.ndarray:
    """The pixels of `frame` away from the subject (and its edges) at frame `index`."""
    rows, columns = subject_box(index)
    keep = np.ones(frame.shape[:2], bool)
    keep[max(0, rows.start - 4) : rows.stop + 4, max(0, columns.start - 4) : columns.stop + 4] = False
    return frame[keep]


def subject_pixels(frame: np.ndarray, index: int) -> np.ndarray:
    rows, columns = subject_box(index)
    return frame[rows.start + 3 : rows.stop - 3, columns.start + 3 : columns.stop - 3].reshape(-1, frame.shape[-1] if frame.ndim == 3 else 1)


# ------------------------------------------------------------------------------ every frame, everywhere


def test_every_output_keeps_every_frame_variable_timestamps_and_audio(tmp_path):
    clip, plate = tmp_path / "vfr.mp4", tmp_path / "plate.png"
    pts_ms = make_clip(clip, 11, pts_ms=[0, 40, 80, 200, 240, 250, 260, 400, 440, 480, 520])
    write_png(plate, plate_image())
    result = convert_video(clip, plate, output_dir=tmp_path / "out", outputs=["com", "pha", "fgr", "err", "ref"],
                           model=DifferenceModel(), progress=False)
    assert result.frames == 11
    assert set(result.outputs) == {"com", "pha", "fgr", "err", "ref"}
    for kind, path in result.outputs.items():
        assert path == tmp_path / "out" / f"{kind}.mp4"
        assert decode_times(path) == [p / 1000 for p in pts_ms], kind
        with VideoReader(path) as reader:
            assert reader.size == (WIDTH, HEIGHT)
    assert audio_seconds(result.outputs["com"]) == pytest.approx(0.56, abs=0.05)
    assert audio_seconds(result.outputs["pha"]) == 0.0  # the audio goes with the composite
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["com.mp4", "err.mp4", "fgr.mp4", "pha.mp4", "ref.mp4"]


# Millisecond stamps of a variable-rate recording, mostly 40 ms apart; its last frame lasts 60 ms (to 1.06 s).
VFR_MS = [0, 40, 80, 200, 240, 250, 260, 400, 440, 480, 520, 600, 633, 666, 700, 733, 766, 800, 900, 1000]


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
@pytest.mark.parametrize("rate", [None, 1000], ids=["no-rate", "tick-rate"])
def test_a_variable_rate_mkv_comes_out_with_its_frames_times_and_length(tmp_path, rate, suffix):
    """A Matroska recording in milliseconds whose header gives no rate, or 1000 fps: it was called truncated
    ('ended at 1.00 s of 1.06 s', its last frame taken for 1 ms long) and came out 1.001 s long at 1000 fps. Now
    every frame comes out at its source time, the file ends where the source did, and Matroska says 25 fps."""
    clip, plate = tmp_path / "vfr.mkv", tmp_path / "plate.png"
    durations = [later - earlier for earlier, later in zip(VFR_MS, VFR_MS[1:])] + [60]
    write_vfr_mkv(clip, [subject_frame(plate_image(), index) for index in range(len(VFR_MS))], VFR_MS, durations,
                  rate=rate)
    write_png(plate, plate_image())
    out = tmp_path / f"com{suffix}"
    result = convert_video(clip, plate, output=out, outputs=["com"], model=DifferenceModel(), progress=False)
    assert result.frames == len(VFR_MS)
    assert decode_times(out) == [stamp / 1000 for stamp in VFR_MS]
    with av.open(str(out)) as container:
        assert container.duration / 1e6 == pytest.approx(1.06, abs=1e-3)
        if suffix == ".mkv":  # an MP4's rate is its frames over its length, 20 in 1.06 s
            assert container.streams.video[0].average_rate == 25


def test_a_variable_rate_clip_pairs_a_target_video_by_time(tmp_path, caplog):
    """The 25 fps its stamps are mostly spaced at is no reason to play a 25 fps target frame for frame behind a
    variable-rate clip (its frame at 200 ms got the target's of 120 ms): each frame gets the target frame nearest its
    time (the earlier on a tie)."""
    clip, plate, target = tmp_path / "vfr.mkv", tmp_path / "plate.png", tmp_path / "shades.mp4"
    durations = [later - earlier for earlier, later in zip(VFR_MS, VFR_MS[1:])] + [60]
    write_vfr_mkv(clip, [subject_frame(plate_image(), index) for index in range(len(VFR_MS))], VFR_MS, durations)
    write_png(plate, plate_image())
    shades = [20 + 9 * index for index in range(26)]
    write_clip(target, [np.full((HEIGHT, WIDTH, 3), shade, np.uint8) for shade in shades], audio=False)  # 25 fps
    with caplog.at_level(logging.INFO, logger="bgmatte"):
        result = convert_video(clip, plate, output=tmp_path / "com.mp4", target_bgr=str(target),
                               model=DifferenceModel(), progress=False)
    seen = [background_pixels(frame, index).mean() for index, frame in enumerate(read_frames(result.outputs["com"]))]
    nearest = [min(range(26), key=lambda frame: (abs(40 * frame - stamp), frame)) for stamp in VFR_MS]
    assert seen == pytest.approx([shades[frame] for frame in nearest], abs=4)
    assert any("shades.mp4" in r.message and "variable rate" in r.message and "own speed" in r.message
               for r in caplog.records)


def test_a_variable_rate_clip_pairs_a_plate_video_by_time(tmp_path, caplog):
    """A 25 fps plate video behind a variable-rate clip said to be 25 fps went frame for frame, so that the clip's
    frame at 200 ms got the plate of 120 ms: each frame now gets the plate frame nearest its time."""
    plates = [plate_image(seed=seed) for seed in range(26)]
    nearest = [min(range(26), key=lambda frame: (abs(40 * frame - stamp), frame)) for stamp in VFR_MS]
    clip, plate_video = tmp_path / "vfr.mkv", tmp_path / "plates.mp4"
    durations = [later - earlier for earlier, later in zip(VFR_MS, VFR_MS[1:])] + [60]
    write_vfr_mkv(clip, [subject_frame(plates[frame], index) for index, frame in enumerate(nearest)], VFR_MS,
                  durations)
    write_clip(plate_video, plates, audio=False)  # 25 fps
    with caplog.at_level(logging.INFO, logger="bgmatte"):
        result = convert_video(clip, plate_video, output=tmp_path / "com.mp4", outputs=["pha"],
                               model=DifferenceModel(), progress=False)
    for index, frame in enumerate(read_frames(result.outputs["pha"])):  # only the subject differs
        assert background_pixels(frame, index).mean() < 10, index
    assert any("plates.mp4" in r.message and "variable rate" in r.message and "by time" in r.message
               for r in caplog.records)


def test_outputs_show_the_matte_composited_over_the_reference_green(scene, tmp_path):
    clip, plate = scene
    result = convert_video(clip, plate, output_dir=tmp_path / "out", outputs=["com", "pha", "fgr"],
                           model=DifferenceModel(), progress=False)
    pha, com, fgr = (read_frames(result.outputs[kind]) for kind in ("pha", "com", "fgr"))
    for index in (0, 5, 11):
        assert subject_pixels(pha[index], index).mean() > 240
        assert background_pixels(pha[index], index).mean() < 8
        assert np.abs(background_pixels(com[index], index).mean(axis=0) - REFERENCE_GREEN).max() < 12
        assert np.abs(subject_pixels(com[index], index).mean(axis=0) - SUBJECT).max() < 20
        assert np.abs(subject_pixels(fgr[index], index).mean(axis=0) - SUBJECT).max() < 20


def test_the_video_pipeline_does_not_pay_for_the_range_check_of_floats_it_scaled_itself(scene, tmp_path, monkeypatch):
    """On the CPU it hands the Predictor floats it made from uint8, which cannot be out of range: a min/max pass over
    every frame and plate would be time taken from the model."""
    import bgmatte.predictor as predictor_module

    asked = []
    monkeypatch.setattr(predictor_module, "value_range_problem", lambda values: asked.append(values.shape))
    clip, plate = scene
    result = convert_video(clip, plate, output_dir=tmp_path / "out", outputs=["pha"], model=DifferenceModel(),
                           progress=False)
    assert len(read_frames(result.outputs["pha"])) == 12 and asked == []


def test_a_real_checkpoint_runs_with_options_chosen_for_the_size(scene, tmp_path, checkpoint):
    clip, plate = scene
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["com", "ref"],
                           model=ModelOptions(checkpoint=checkpoint, device="cpu", refine_sample_pixels=2000),
                           progress=False)
    assert result.outputs == {"com": tmp_path / "com.mp4", "ref": tmp_path / "com_ref.mp4"}
    assert len(read_frames(tmp_path / "com.mp4")) == 12 and len(read_frames(tmp_path / "com_ref.mp4")) == 12
    ref = np.stack(read_frames(tmp_path / "com_ref.mp4"))
    assert 0 < (ref > 128).mean() < 1  # some patches refined, not all: the budget was 2,000 of 6,144 pixels


def test_batches_of_several_frames_give_the_same_frames(scene, tmp_path):
    clip, plate = scene
    model = DifferenceModel()
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["pha"], model=model, batch_size=5,
                           progress=False)
    assert model.calls == [5, 5, 2]
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 12 and subject_pixels(frames[11], 11).mean() > 240


def test_rotated_video_is_matted_and_written_upright(tmp_path):
    plate = plate_image()
    clip, plate_file = tmp_path / "phone.mp4", tmp_path / "plate.png"
    make_clip(clip, 6, plate=plate, rotation=-90)
    upright_plate = np.ascontiguousarray(np.rot90(plate, 3))  # what a viewer sees: turned clockwise
    write_png(plate_file, upright_plate)
    result = convert_video(clip, plate_file, output=tmp_path / "com.mp4", outputs=["com", "pha"],
                           model=DifferenceModel(), progress=False)
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 6 and frames[0].shape[:2] == (WIDTH, HEIGHT)
    # The plate lines up with the upright frames: only the subject differs from it.
    assert (frames[2] > 128).mean() == pytest.approx(16 * 16 / (WIDTH * HEIGHT), abs=0.05)


def test_odd_frame_sizes_are_padded_for_h264_and_kept_by_vp9(tmp_path, caplog):
    plate = plate_image(95, 63)
    clip, plate_file = tmp_path / "odd.mkv", tmp_path / "plate.png"
    write_clip(clip, [subject_frame(plate, index) for index in range(5)], codec="ffv1", pix_fmt="yuv444p", audio=False)
    write_png(plate_file, plate)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        padded = convert_video(clip, plate_file, output=tmp_path / "com.mp4", model=DifferenceModel(), progress=False)
    with VideoReader(padded.outputs["com"]) as reader:
        assert reader.size == (96, 64) and len(list(reader)) == 5
    assert any("95x63" in record.message and "96x64" in record.message for record in caplog.records)
    kept = convert_video(clip, plate_file, output=tmp_path / "com.webm", model=DifferenceModel(), progress=False)
    with VideoReader(kept.outputs["com"]) as reader:
        assert reader.size == (95, 63) and len(list(reader)) == 5


def test_resize_changes_the_working_and_output_size(scene, tmp_path):
    clip, plate = scene
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["com", "pha"], resize=(48, 32),
                           model=DifferenceModel(), progress=False)
    for path in result.outputs.values():
        with VideoReader(path) as reader:
            assert reader.size == (48, 32) and len(list(reader)) == 12


def test_image_sequences_write_rgba_composites_and_grey_mattes(scene, tmp_path, caplog):
    clip, plate = scene
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, plate, output_dir=tmp_path / "out", output_format="image_sequences",
                               outputs=["com", "pha"], model=DifferenceModel(), progress=False)
    assert [r.message for r in caplog.records if "audio" in r.message] == [
        f"{clip}: the clip's audio is not kept in a folder of PNGs ({tmp_path / 'out' / 'com'}); write the composite "
        "to a video file to keep it"]
    com = sorted((tmp_path / "out" / "com").iterdir())
    assert [path.name for path in com[:2]] == ["0001.png", "0002.png"] and len(com) == 12
    assert len(list((tmp_path / "out" / "pha").iterdir())) == 12
    import cv2

    cutout = cv2.imread(str(com[4]), cv2.IMREAD_UNCHANGED)
    assert cutout.shape == (HEIGHT, WIDTH, 4)
    alpha = cutout[:, :, 3]
    assert subject_pixels(alpha, 4).min() == 255 and background_pixels(alpha, 4).max() == 0
    assert background_pixels(cutout[:, :, :3], 4).max() == 0  # no colour where fully transparent
    assert cv2.imread(str(tmp_path / "out" / "pha" / "0005.png"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert result.outputs["com"] == tmp_path / "out" / "com"


# ------------------------------------------------------------------------------------- target backgrounds


@pytest.mark.parametrize(("suffix", "codec"), [(".webm", "vp9"), (".mov", "prores")])
def test_transparent_composite_keeps_alpha_in_the_file(scene, tmp_path, suffix, codec):
    clip, plate = scene
    result = convert_video(clip, plate, output=tmp_path / f"cutout{suffix}", target_bgr="transparent",
                           model=DifferenceModel(), progress=False)
    path = result.outputs["com"]
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == codec
        assert container.streams.audio
    planes = alpha_planes(path)
    assert len(planes) == 12
    assert subject_pixels(planes[6], 6).min() > 240 and background_pixels(planes[6], 6).max() < 16


def test_transparent_mp4_is_refused_before_any_work(scene, tmp_path):
    clip, plate = scene
    model = DifferenceModel()
    with pytest.raises(BgmatteError, match=r"cutout.mp4: MP4 cannot keep transparency.*\.webm"):
        convert_video(clip, plate, output=tmp_path / "cutout.mp4", target_bgr="transparent", model=model, progress=False)
    assert model.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["plate.png", "src.mp4"]


def test_transparent_composite_in_an_output_dir_goes_to_webm(scene, tmp_path):
    clip, plate = scene
    result = convert_video(clip, plate, output_dir=tmp_path / "out", outputs=["com", "pha"], target_bgr="transparent",
                           model=DifferenceModel(), progress=False)
    assert result.outputs == {"com": tmp_path / "out" / "com.webm", "pha": tmp_path / "out" / "pha.mp4"}
    assert len(alpha_planes(result.outputs["com"])) == 12


def test_colour_and_image_targets(scene, tmp_path):
    clip, plate = scene
    blue = convert_video(clip, plate, output=tmp_path / "blue.mp4", target_bgr="#0000ff", model=DifferenceModel(),
                         progress=False)
    frame = read_frames(blue.outputs["com"])[3]
    assert np.abs(background_pixels(frame, 3).mean(axis=0) - (0, 0, 255)).max() < 12
    picture = tmp_path / "beach.png"
    write_png(picture, np.full((128, 200, 3), (200, 160, 60), np.uint8))  # another size and shape: covered
    beach = convert_video(clip, plate, output=tmp_path / "beach.mp4", target_bgr=str(picture), model=DifferenceModel(),
                          progress=False)
    frame = read_frames(beach.outputs["com"])[3]
    assert np.abs(background_pixels(frame, 3).mean(axis=0) - (200, 160, 60)).max() < 8
    assert np.abs(subject_pixels(frame, 3).mean(axis=0) - SUBJECT).max() < 20


def test_video_target_is_looped_to_the_length_of_the_clip(scene, tmp_path):
    clip, plate = scene
    target = tmp_path / "waves.mp4"
    shades = [30, 80, 130, 180, 230]
    write_clip(target, [np.full((HEIGHT, WIDTH, 3), shade, np.uint8) for shade in shades], audio=False)
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", target_bgr=str(target), model=DifferenceModel(),
                           progress=False)
    frames = read_frames(result.outputs["com"])
    assert len(frames) == 12
    seen = [int(round(background_pixels(frame, index).mean())) for index, frame in enumerate(frames)]
    assert seen == pytest.approx([shades[index % 5] for index in range(12)], abs=6)


def test_video_target_of_another_frame_rate_plays_at_its_own_speed(scene, tmp_path, caplog):
    clip, plate = scene  # 12 frames at 25 fps: 0.48 s
    target = tmp_path / "slow.mp4"
    shades = [30, 90, 150, 210]  # one shade every 100 ms: 0.4 s, so the target loops once during the clip
    write_clip(target, [np.full((HEIGHT, WIDTH, 3), shade, np.uint8) for shade in shades],
               pts_ms=[100 * index for index in range(4)], audio=False)
    with caplog.at_level(logging.INFO, logger="bgmatte"):
        result = convert_video(clip, plate, output=tmp_path / "com.mp4", target_bgr=str(target),
                               model=DifferenceModel(), progress=False)
    frames = read_frames(result.outputs["com"])
    seen = [int(round(background_pixels(frame, index).mean())) for index, frame in enumerate(frames)]
    # Frame i shows at 40i ms; the target's frame nearest that time (the earlier on a tie), from its start again
    # after 400 ms.
    expected = [shades[0], shades[0], shades[1], shades[1], shades[2], shades[2], shades[2], shades[3], shades[3],
                shades[3], shades[0], shades[0]]
    assert seen == pytest.approx(expected, abs=6)
    assert any("slow.mp4" in r.message and "own speed" in r.message for r in caplog.records)


def test_one_frame_target_video_of_another_frame_rate_is_a_still(scene, tmp_path):
    clip, plate = scene
    target = tmp_path / "one.mp4"
    with av.open(str(target), mode="w") as container:
        stream = container.add_stream("libx264", rate=60)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), 200, np.uint8), "rgb24")))
        container.mux(stream.encode(None))
    with VideoReader(target) as reader:
        assert float(reader.fps) == 60  # so that it is looked up by time
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", target_bgr=str(target), model=DifferenceModel(),
                           progress=False)
    frames = read_frames(result.outputs["com"])
    assert len(frames) == 12
    assert all(abs(background_pixels(frame, index).mean() - 200) < 6 for index, frame in enumerate(frames))


def program_stream(path: Path, images: list[np.ndarray]) -> None:
    """`images` as MPEG-2 at 25 fps in an MPEG program stream (a DVD's .vob), at a rate that keeps them close."""
    with av.open(str(path), mode="w", format="vob") as container:
        stream = container.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.bit_rate = 4_000_000
        for index, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_a_vob_plate_and_target_background_are_videos(scene, tmp_path):
    # The reader takes .vob (an MPEG program stream), but the video suffixes lacked it: a .vob target background was
    # refused ("cannot tell from the extension whether this background is an image or a video"), and a .vob plate
    # was first tried as an image.
    clip, _ = scene
    program_stream(tmp_path / "plate.VOB", [plate_image()] * 12)
    program_stream(tmp_path / "sky.vob", [np.full((HEIGHT, WIDTH, 3), 200, np.uint8)] * 12)
    assert pipeline._is_video_path(tmp_path / "plate.VOB")
    result = convert_video(clip, tmp_path / "plate.VOB", output=tmp_path / "com.mp4", outputs=["com", "pha"],
                           target_bgr=str(tmp_path / "sky.vob"), model=DifferenceModel(), progress=False)
    composites, mattes = read_frames(result.outputs["com"]), read_frames(result.outputs["pha"])
    assert len(composites) == len(mattes) == 12
    for index in range(12):
        assert background_pixels(mattes[index], index).mean() < 10, index
        assert abs(background_pixels(composites[index], index).mean() - 200) < 6, index


def test_blur_target_composites_over_the_blurred_frame(scene, tmp_path):
    clip, plate = scene
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["com", "fgr"], target_bgr="blur",
                           model=DifferenceModel(), progress=False)
    com, fgr = read_frames(result.outputs["com"])[2], read_frames(result.outputs["fgr"])[2]
    # The background is the frame blurred (as composite.blur does it), not the frame itself.
    from bgmatte.composite import blur

    blurred = blur(fgr.astype(np.float32) / 255) * 255
    to_blurred = np.abs(background_pixels(com, 2) - background_pixels(blurred, 2)).mean()
    to_sharp = np.abs(background_pixels(com, 2).astype(int) - background_pixels(fgr, 2)).mean()
    assert to_blurred < 4 and to_sharp > 2 * to_blurred, (to_blurred, to_sharp)
    assert np.abs(subject_pixels(com, 2).mean(axis=0) - SUBJECT).max() < 20


def test_render_outputs_gives_uint8_frames_of_each_kind():
    pha = torch.zeros(2, 1, 6, 8)
    pha[:, :, 2:4, 2:6] = 1.0
    pha[:, :, 0, 0] = 0.5
    fgr = torch.full((2, 3, 6, 8), 0.2)
    matte = Matte(pha, fgr, torch.full_like(pha, 0.25), (pha > 0).float())
    frames = render_outputs(matte, ["com", "pha", "fgr", "err", "ref"], target=TargetBackground("colour", colour=(0, 0, 255)))
    assert {kind: frames[kind].shape for kind in frames} == {
        "com": (2, 6, 8, 3), "pha": (2, 6, 8), "fgr": (2, 6, 8, 3), "err": (2, 6, 8), "ref": (2, 6, 8)}
    assert all(frame.dtype == np.uint8 for frame in frames.values())
    assert frames["com"][0, 3, 3].tolist() == [51, 51, 51] and frames["com"][0, 5, 7].tolist() == [0, 0, 255]
    assert frames["com"][0, 0, 0].tolist() == [26, 26, 153]  # half 0.2 grey, half blue
    assert frames["err"][1, 1, 1] == 64 and frames["pha"][0, 0, 0] == 128
    rgba = render_outputs(matte, ["com"], target=TargetBackground("transparent"))["com"]
    assert rgba.shape == (2, 6, 8, 4) and rgba[0, 3, 3].tolist() == [51, 51, 51, 255]
    assert rgba[0, 5, 7].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="backdrop"):
        composite_matte(matte, TargetBackground("image", path=Path("x.png")))


def test_rgba_composite_has_no_colour_where_the_8_bit_alpha_is_0():
    """An alpha that rounds to 0 of 255 is invisible: the colour stored there must be 0 too, not the foreground's
    (it would leak the picture under fully transparent areas); an alpha that rounds to 1 keeps its colour."""
    pha = torch.zeros(1, 1, 2, 3)
    pha[0, 0, 0, 0], pha[0, 0, 0, 1], pha[0, 0, 0, 2] = 0.001, 0.003, 1.0
    matte = Matte(pha, torch.full((1, 3, 2, 3), 0.6), torch.zeros_like(pha), torch.zeros_like(pha))
    rgba = render_outputs(matte, ["com"], target=TargetBackground("transparent"))["com"][0]
    assert rgba[0].tolist() == [[0, 0, 0, 0], [153, 153, 153, 1], [153, 153, 153, 255]]
    assert rgba[1].tolist() == [[0, 0, 0, 0]] * 3


def test_target_frames_cover_the_output_size(tmp_path):
    picture = tmp_path / "wide.png"
    wide = np.zeros((20, 80, 3), np.uint8)
    wide[:, 35:45] = 255  # a white middle band
    write_png(picture, wide)
    with TargetFrames(TargetBackground("image", path=picture), 40, 40) as frames:
        backdrop = frames.take(3)
    assert backdrop.shape == (1, 3, 40, 40)  # one image, shared by the batch
    assert backdrop[0, :, :, 20].min() == 1.0 and backdrop[0, :, :, 0].max() == 0.0  # cropped at the sides, not squeezed
    assert TargetFrames(TargetBackground("blur"), 40, 40).take(2) is None


# ---------------------------------------------------------------------------------------------- plates


def test_plate_of_another_size_is_resized_with_a_warning(scene, tmp_path, caplog):
    clip, _ = scene
    big = tmp_path / "big_plate.png"
    import cv2

    write_png(big, cv2.resize(plate_image(), (WIDTH * 2, HEIGHT * 2), interpolation=cv2.INTER_NEAREST))
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, big, output=tmp_path / "com.mp4", outputs=["pha"], model=DifferenceModel(),
                               progress=False)
    assert any("big_plate.png" in r.message and "192x128" in r.message and "96x64" in r.message for r in caplog.records)
    frame = read_frames(result.outputs["pha"])[4]
    assert subject_pixels(frame, 4).mean() > 240 and background_pixels(frame, 4).mean() < 10


def test_plate_video_is_used_frame_for_frame_and_its_last_frame_held(tmp_path, caplog):
    plates = [plate_image(seed=seed) for seed in range(12)]  # a different plate for every frame
    clip, plate_video = tmp_path / "src.mp4", tmp_path / "plates.mp4"
    write_clip(clip, [subject_frame(plates[index], index) for index in range(12)], audio=False)
    write_clip(plate_video, plates[:8], audio=False)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, plate_video, output=tmp_path / "com.mp4", outputs=["pha"], model=DifferenceModel(),
                               progress=False)
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 12
    for index in range(8):  # matched frame for frame: only the subject differs
        assert background_pixels(frames[index], index).mean() < 10, index
    assert background_pixels(frames[10], 10).mean() > 100  # the held plate no longer fits the frame
    assert any("plates.mp4" in r.message and "shorter" in r.message for r in caplog.records)


def test_plate_video_of_another_frame_rate_is_paired_by_time(tmp_path, caplog):
    plates = [plate_image(seed=seed) for seed in range(24)]
    clip, plate_video = tmp_path / "src.mp4", tmp_path / "plates50.mp4"
    write_clip(clip, [subject_frame(plates[2 * index], index) for index in range(12)], audio=False)  # 25 fps
    write_clip(plate_video, plates, pts_ms=[20 * index for index in range(24)], audio=False)  # 50 fps, same 0.48 s
    with VideoReader(plate_video) as reader:
        assert float(reader.fps) > 40  # FFmpeg's average over these 24 frames: 48
    with caplog.at_level(logging.INFO, logger="bgmatte"):
        result = convert_video(clip, plate_video, output=tmp_path / "com.mp4", outputs=["pha"],
                               model=DifferenceModel(), progress=False)
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 12
    for index in range(12):  # frame i shows at 40i ms, as does plate frame 2i: only the subject differs
        assert background_pixels(frames[index], index).mean() < 10, index
    assert any("plates50.mp4" in r.message and "48 fps" in r.message and "25 fps" in r.message
               and "by time" in r.message for r in caplog.records)
    assert not any("shorter" in r.message for r in caplog.records)


def test_slower_plate_video_is_held_between_its_frames_and_warned_when_it_ends(tmp_path, caplog):
    plates = [plate_image(seed=seed) for seed in range(4)]
    clip, plate_video = tmp_path / "src.mp4", tmp_path / "plates10.mp4"
    # The plate at 10 fps (0, 100, 200, 300 ms); the 25 fps clip (40 ms apart) over the plate frame nearest in time
    # (the earlier on a tie), and over the last once the plate has ended.
    nearest = [min(3, int(np.ceil(40 * index / 100 - 0.5))) for index in range(14)]
    assert nearest == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    write_clip(clip, [subject_frame(plates[nearest[index]], index) for index in range(14)], audio=False)
    write_clip(plate_video, plates, pts_ms=[100 * index for index in range(4)], audio=False)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, plate_video, output=tmp_path / "com.mp4", outputs=["pha"],
                               model=DifferenceModel(), progress=False)
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 14
    for index in range(14):
        assert background_pixels(frames[index], index).mean() < 10, index
    assert sum("plates10.mp4" in r.message and "shorter" in r.message for r in caplog.records) == 1


def test_a_span_pairs_a_plate_video_of_another_rate_as_the_whole_run_does(tmp_path):
    from fractions import Fraction as F

    plates = [plate_image(seed=seed) for seed in range(60)]
    clip, plate_video = tmp_path / "src.mp4", tmp_path / "plates24.mp4"
    # Clip frame i (25 fps) over the 24 fps plate frame nearest its time, the earlier on a tie.
    nearest = [min(range(60), key=lambda j: (abs(F(j, 24) - F(i, 25)), j)) for i in range(50)]
    write_clip(clip, [subject_frame(plates[nearest[index]], index) for index in range(50)], audio=False)
    with av.open(str(plate_video), mode="w") as container:
        stream = container.add_stream("libx264", rate=24, options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for image in plates:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    for start in (0.0, 1.03, 1.37):
        result = convert_video(clip, plate_video, output=tmp_path / f"pha{start}.mp4", outputs=["pha"], start=start,
                               duration=0.5, model=DifferenceModel(), progress=False)
        first = round(start * 25 + 0.49)  # the span's first frame: the first at or after the start
        for offset, frame in enumerate(read_frames(result.outputs["pha"])):
            assert background_pixels(frame, first + offset).mean() < 10, (start, first + offset)


def test_a_plate_video_stamped_in_decoding_order_is_paired_by_its_frames_times(tmp_path):
    """A 50 fps plate video with B-frames copied from an AVI into Matroska (stamps in decoding order) goes behind a
    25 fps clip by time: clip frame i gets plate frame 2i, in a whole run and in a span, as with any plate video. Its
    frames were placed up to 40 ms off, which paired them with the wrong plates."""
    plates = [plate_image(seed=seed) for seed in range(50)]
    clip, avi, plate_video = tmp_path / "src.mp4", tmp_path / "plates50.avi", tmp_path / "plates50.mkv"
    write_clip(clip, [subject_frame(plates[2 * index], index) for index in range(25)], audio=False)
    with av.open(str(avi), mode="w") as container:
        stream = container.add_stream("libx264", rate=50, options={"crf": "12", "bf": "2", "g": "12"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for image in plates:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    decode_order_copy(avi, plate_video)
    for start in (0.0, 0.28):
        result = convert_video(clip, plate_video, output=tmp_path / f"pha{start}.mp4", outputs=["pha"], start=start,
                               duration=0.4 if start else None, model=DifferenceModel(), progress=False)
        first = round(start * 25)
        frames = read_frames(result.outputs["pha"])
        assert len(frames) == (10 if start else 25)
        for offset, frame in enumerate(frames):
            assert background_pixels(frame, first + offset).mean() < 10, (start, first + offset)


def test_frames_that_change_size_mid_clip_are_scaled_with_one_warning(tmp_path, caplog):
    first, second, clip = tmp_path / "small.ts", tmp_path / "large.ts", tmp_path / "grows.ts"
    write_clip(first, [subject_frame(plate_image(), index) for index in range(3)], audio=False)
    large = [np.repeat(np.repeat(subject_frame(plate_image(), index), 2, 0), 2, 1) for index in range(3, 6)]
    write_clip(second, large, pts_ms=[40 * index for index in range(3, 6)], audio=False)
    clip.write_bytes(first.read_bytes() + second.read_bytes())  # MPEG-TS joins by concatenation: a new size mid-stream
    sizes = []
    with VideoReader(clip) as reader:
        sizes = [frame.image.shape[:2] for frame in reader]
    if len(set(sizes)) == 1:
        pytest.skip(f"this FFmpeg kept one frame size in the test clip: {sizes}")
    plate = tmp_path / "plate.png"
    write_png(plate, plate_image())
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["pha"], model=DifferenceModel(),
                               progress=False)
    assert len(read_frames(result.outputs["pha"])) == 6
    warnings = [r.message for r in caplog.records if "change size" in r.message]
    assert len(warnings) == 1 and "frame 4" in warnings[0] and f"{2 * WIDTH}x{2 * HEIGHT}" in warnings[0], warnings


def test_auto_plate_is_estimated_from_the_clip(tmp_path):
    clip = tmp_path / "src.mp4"
    make_clip(clip, 12)
    result = convert_video(clip, "auto", output=tmp_path / "com.mp4", outputs=["pha"], model=DifferenceModel(),
                           progress=False)
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 12
    for index in (1, 6, 10):
        assert subject_pixels(frames[index], index).mean() > 240
        assert background_pixels(frames[index], index).mean() < 10


def test_an_automatic_plate_of_a_handheld_clip_is_registered_with_align(tmp_path, caplog):
    """--bgr auto --align: the sampled frames are registered onto one another before the plate is estimated; they
    were not, so a shake of 3 pixels left the plate's tile edges doubled: 17% of frame 1's background was foreground."""
    rng = np.random.default_rng(2)
    width, height = 2 * WIDTH, 2 * HEIGHT
    wide = plate_image(width + 6, height + 6, seed=3)
    frames = []
    for index in range(12):
        dx, dy = rng.integers(-3, 4, 2)
        frames.append(subject_frame(wide[3 + dy : 3 + dy + height, 3 + dx : 3 + dx + width].copy(), index))
    clip = tmp_path / "handheld.mp4"
    write_clip(clip, frames, audio=False)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, "auto", output=tmp_path / "com.mp4", outputs=["pha"], align=True,
                               model=DifferenceModel(0.2), progress=False)
    mattes = read_frames(result.outputs["pha"])
    for index in (1, 5, 9):
        rows, columns = subject_box(index, width, height)
        background = np.ones((height, width), bool)
        background[:4], background[-4:], background[:, :4], background[:, -4:] = False, False, False, False
        background[rows.start - 4 : rows.stop + 4, max(0, columns.start - 4) : columns.stop + 4] = False
        assert (mattes[index][background] > 128).mean() < 0.03, index
        assert mattes[index][rows.start + 3 : rows.stop - 3, columns.start + 3 : columns.stop - 3].mean() > 240
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_an_automatic_plate_is_not_called_resized_and_its_warnings_name_the_clip(tmp_path, caplog):
    """With --resize, the automatic plate (made at the working size) was said to be "48x32 but the video is 96x64;
    the plate is resized to fit", and its alignment warnings named no file."""
    clip = tmp_path / "flat.mp4"
    make_clip(clip, 6, plate=np.full((HEIGHT, WIDTH, 3), 120, np.uint8))  # nothing to align on
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, "auto", output=tmp_path / "com.mp4", outputs=["pha"], resize=(48, 32),
                               align=True, model=DifferenceModel(), progress=False)
    assert len(read_frames(result.outputs["pha"])) == 6
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not [message for message in warnings if "resized" in message], warnings
    assert any(message.startswith(f"{clip}: the plate has too little texture") for message in warnings), warnings


def test_an_automatic_plate_of_a_clip_with_a_cut_is_warned_about(tmp_path, caplog):
    """Two shots in one clip: no plate fits both, and the automatic one (a patchwork) was used without a word."""
    clip = tmp_path / "shots.mp4"
    views = [plate_image(seed=0)] * 6 + [plate_image(seed=5)] * 6
    write_clip(clip, [subject_frame(view, index) for index, view in enumerate(views)], audio=False)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        convert_video(clip, "auto", output=tmp_path / "com.mp4", outputs=["pha"], model=DifferenceModel(),
                      progress=False)
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{clip}: the background changes during the clip"), warnings


def test_a_greyscale_plate_for_a_colour_clip_is_warned_about(tmp_path, caplog):
    """A plate saved in greyscale made the coloured background foreground (a mean of 105 of 255 over it) without a
    word; a grey wall, grey in the clip too, is no mismatch."""
    import cv2

    clip, grey, wall, wall_clip = tmp_path / "src.mp4", tmp_path / "grey.png", tmp_path / "wall.png", tmp_path / "w.mp4"
    make_clip(clip, 4)
    cv2.imwrite(str(grey), cv2.cvtColor(plate_image(), cv2.COLOR_RGB2GRAY))  # a one-channel file
    neutral = np.repeat(cv2.cvtColor(plate_image(), cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    make_clip(wall_clip, 4, plate=neutral)
    write_png(wall, neutral)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        convert_video(clip, grey, output=tmp_path / "a.mp4", outputs=["pha"], model=DifferenceModel(), progress=False)
        matte_images([_still(tmp_path)], grey, output_dir=tmp_path / "out",
                     outputs=["pha"], model=DifferenceModel(), progress=False)
        warned = len(caplog.records)
        convert_video(wall_clip, wall, output=tmp_path / "b.mp4", outputs=["pha"], model=DifferenceModel(),
                      progress=False)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == warned == 2, warnings
    assert warnings[0] == f"{grey}: the plate has no colour (greyscale) but the video has: its coloured background " \
                          "will matte as foreground; give the plate in colour"
    assert warnings[1].startswith(f"{grey}: the plate has no colour (greyscale) but photo.png has")


def _still(folder: Path) -> Path:
    photo = folder / "photo.png"
    write_png(photo, subject_frame(plate_image(), 2))
    return photo


def test_match_exposure_follows_a_darker_clip(tmp_path):
    clip, plate = tmp_path / "dim.mp4", tmp_path / "plate.png"
    make_clip(clip, 8, gain=0.6)  # the camera exposed the clip darker than the plate
    write_png(plate, plate_image())
    plain = convert_video(clip, plate, output=tmp_path / "plain.mp4", outputs=["pha"], model=DifferenceModel(),
                          progress=False)
    matched = convert_video(clip, plate, output=tmp_path / "matched.mp4", outputs=["pha"], match_exposure=True,
                            model=DifferenceModel(), progress=False)
    plain_frames, matched_frames = read_frames(plain.outputs["pha"]), read_frames(matched.outputs["pha"])
    assert background_pixels(plain_frames[5], 5).mean() > 128  # everything looks like foreground
    for index in range(8):
        assert background_pixels(matched_frames[index], index).mean() < 12, index
        assert subject_pixels(matched_frames[index], index).mean() > 240


def test_exposure_matching_that_cannot_fit_is_told_once_naming_the_clip(tmp_path, caplog):
    """A background clipped white leaves nothing to fit on: this was warned about on every frame, naming no file."""
    clip, plate = tmp_path / "white.mp4", tmp_path / "plate.png"
    white = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    make_clip(clip, 6, plate=white)
    write_png(plate, white)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["pha"], match_exposure=True,
                               model=DifferenceModel(), progress=False)
    assert len(read_frames(result.outputs["pha"])) == 6
    warnings = [record.getMessage() for record in caplog.records if "exposure" in record.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"{clip}: exposure matching skipped on frame 1 (only 0 background pixels")
    assert warnings[1] == f"{clip}: exposure matching was skipped on 6 of 6 frames"


def test_exposure_matching_that_cannot_fit_is_counted_when_ctrl_c_stops_the_run(tmp_path, caplog):
    """Ctrl-C, the usual way to stop a long run, used to lose the count of frames without exposure matching."""
    clip, plate = tmp_path / "white.mp4", tmp_path / "plate.png"
    white = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    make_clip(clip, 12, plate=white)
    write_png(plate, white)
    with caplog.at_level(logging.WARNING, logger="bgmatte"), pytest.raises(KeyboardInterrupt):
        convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["pha"], match_exposure=True,
                      model=DifferenceModel(interrupt_on=5), progress=False)
    warnings = [record.getMessage() for record in caplog.records]
    counted = [message for message in warnings if "exposure matching was skipped" in message]
    assert len(counted) == 1, warnings
    prepared = int(re.search(r"skipped on (\d+) of the (\d+) frames prepared before the stop$", counted[0])[2])
    assert counted[0] == f"{clip}: exposure matching was skipped on {prepared} of the {prepared} frames prepared " \
                         "before the stop"
    assert 5 <= prepared <= 12  # the frames matted (4 written, the fifth under way) and those read ahead
    assert warnings.index(counted[0]) < next(i for i, m in enumerate(warnings) if m.startswith("interrupted"))


def test_exposure_matching_that_cannot_fit_an_image_names_it_once(tmp_path, caplog):
    white = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    plate_file, photo = tmp_path / "plate.png", tmp_path / "photo.png"
    write_png(plate_file, white)
    write_png(photo, subject_frame(white, 2))
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        matte_images([photo], plate_file, output_dir=tmp_path / "out", outputs=["pha"], match_exposure=True,
                     model=DifferenceModel(), progress=False)
    warnings = [record.getMessage() for record in caplog.records if "exposure" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{photo}: exposure matching skipped (only 0"), warnings


def test_align_falls_back_to_the_plate_with_a_warning_when_it_cannot_align(tmp_path, caplog):
    clip, plate = tmp_path / "flat.mp4", tmp_path / "plate.png"
    flat = np.full((HEIGHT, WIDTH, 3), 120, np.uint8)  # no features to match
    make_clip(clip, 6, plate=flat)
    write_png(plate, flat)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["pha"], align=True,
                               model=DifferenceModel(), progress=False)
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 6 and background_pixels(frames[3], 3).mean() < 10
    warnings = [record.getMessage() for record in caplog.records if "align" in record.getMessage()]
    assert len(warnings) == 1 and "too little texture" in warnings[0], warnings  # no count of 6 failures after it


def test_align_says_at_the_end_how_many_frames_it_failed_on(tmp_path, caplog):
    """Alignment failed on half the frames and was told of on the first of them only: nothing said how many frames
    had been matted against the unaligned plate."""
    width, height = 2 * WIDTH, 2 * HEIGHT
    plate = plate_image(width, height, seed=3)
    other = plate_image(width, height, seed=8)  # a view the plate does not show
    clip, plate_file = tmp_path / "clip.mp4", tmp_path / "plate.png"
    write_clip(clip, [subject_frame(plate if index < 3 else other, index) for index in range(6)], audio=False)
    write_png(plate_file, plate)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        convert_video(clip, plate_file, output=tmp_path / "com.mp4", outputs=["pha"], align=True,
                      model=DifferenceModel(), progress=False)
    warnings = [record.getMessage() for record in caplog.records if "alignment failed" in record.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"{plate_file}: plate alignment failed (")
    assert warnings[1] == f"{plate_file}: plate alignment failed on 3 of 6 frames; they were matted against the " \
                          "unaligned plate"


def test_a_plate_of_another_aspect_ratio_is_said_to_be_stretched(tmp_path, caplog):
    """A 4:3 still of the scene for a 16:9 clip was "resized to fit", as if that were harmless: stretched, it made
    81% of the picture foreground (the subject is 1%). --align finds the clip's view in it: 2%."""
    scene = plate_image(256, 192, seed=4)
    clip, plate = tmp_path / "wide.mp4", tmp_path / "still.png"
    write_clip(clip, [subject_frame(scene[24:168].copy(), index) for index in range(4)], audio=False)
    write_png(plate, scene)
    foreground = {}
    for align in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bgmatte"):
            result = convert_video(clip, plate, output=tmp_path / f"{align}.mp4", outputs=["pha"], align=align,
                                   model=DifferenceModel(), progress=False)
        warnings = [record.getMessage() for record in caplog.records]
        assert len(warnings) == 1 and warnings[0].startswith(
            f"{plate}: the plate is 256x192 but the video is 256x144; its aspect ratio differs"), warnings
        assert ("--align finds" in warnings[0]) != align
        foreground[align] = (read_frames(result.outputs["pha"])[2][..., 0] > 128).mean()
    assert foreground[False] > 0.5 and foreground[True] < 0.05


def test_align_with_a_plate_video_warns_once_naming_it_not_every_frame(tmp_path, caplog):
    clip, plate = tmp_path / "flat.mp4", tmp_path / "plate.mp4"
    flat = np.full((HEIGHT, WIDTH, 3), 120, np.uint8)  # no features to match, in any plate frame
    make_clip(clip, 6, plate=flat)
    write_clip(plate, [flat.copy() for _ in range(6)], audio=False)
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["pha"], align=True,
                               model=DifferenceModel(), progress=False)
    assert len(read_frames(result.outputs["pha"])) == 6
    texture = [record.getMessage() for record in caplog.records if "too little texture" in record.getMessage()]
    assert len(texture) == 1 and str(plate) in texture[0]


def test_align_lines_up_a_shifted_plate(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    wide = cv2.resize(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8), (360, 240), interpolation=cv2.INTER_LINEAR)
    plate, shifted = wide[20:20 + 192, 20:20 + 288].copy(), wide[26:26 + 192, 29:29 + 288].copy()
    clip, plate_file = tmp_path / "handheld.mp4", tmp_path / "plate.png"
    write_clip(clip, [shifted.copy() for _ in range(3)], audio=False)
    write_png(plate_file, plate)
    plain = convert_video(clip, plate_file, output=tmp_path / "plain.mp4", outputs=["pha"], model=DifferenceModel(0.2),
                          progress=False)
    aligned = convert_video(clip, plate_file, output=tmp_path / "aligned.mp4", outputs=["pha"], align=True,
                            model=DifferenceModel(0.2), progress=False)
    inner = (slice(20, -20), slice(20, -20))  # away from the borders the plate cannot cover
    assert read_frames(plain.outputs["pha"])[1][inner].mean() > 100
    assert read_frames(aligned.outputs["pha"])[1][inner].mean() < 10


# ------------------------------------------------------------------------------------------- safety


def test_existing_outputs_are_refused_unless_overwrite(scene, tmp_path):
    clip, plate = scene
    target = tmp_path / "com.mp4"
    target.write_bytes(b"precious")
    model = DifferenceModel()
    with pytest.raises(BgmatteError, match="com.mp4: already exists"):
        convert_video(clip, plate, output=target, model=model, progress=False)
    assert target.read_bytes() == b"precious" and model.calls == []
    convert_video(clip, plate, output=target, model=model, overwrite=True, progress=False)
    assert len(read_frames(target)) == 12


def test_output_over_the_input_is_refused(scene):
    clip, plate = scene
    with pytest.raises(BgmatteError, match="would overwrite the input"):
        convert_video(clip, plate, output=clip, model=DifferenceModel(), overwrite=True, progress=False)


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if the model is loaded: the refusals below come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(pipeline, "load_predictor", refuse)


def test_outputs_never_replace_the_plate_or_the_target_even_with_overwrite(scene, tmp_path, no_model):
    clip, _ = scene
    plate, target = tmp_path / "pv_pha.mp4", tmp_path / "pv_fgr.mp4"
    make_clip(plate, 4, audio=False)
    make_clip(target, 6, audio=False)
    before = {path: path.read_bytes() for path in (clip, plate, target)}
    with pytest.raises(BgmatteError, match=r"pv_pha.mp4: this output would overwrite the plate .*pv_pha.mp4"):
        convert_video(clip, plate, output=tmp_path / "pv.mp4", outputs=["com", "pha", "fgr"], target_bgr=str(target),
                      overwrite=True, progress=False)
    with pytest.raises(BgmatteError, match=r"pv_fgr.mp4: this output would overwrite the target background"):
        convert_video(clip, plate, output=tmp_path / "pv.mp4", outputs=["com", "fgr"], target_bgr=str(target),
                      overwrite=True, progress=False)
    link = tmp_path / "link.mp4"  # the source under another name
    os.link(clip, link)
    with pytest.raises(BgmatteError, match=r"link.mp4: this output would overwrite the input video"):
        convert_video(clip, plate, output=link, overwrite=True, progress=False)
    assert {path: path.read_bytes() for path in before} == before


def test_a_png_folder_output_never_deletes_its_inputs_or_other_files(scene, tmp_path, no_model):
    clip, plate = scene
    folder = tmp_path / "shot"
    folder.mkdir()
    inside_clip, inside_plate, notes = folder / "src.mp4", folder / "plate.png", folder / "notes.txt"
    inside_clip.write_bytes(clip.read_bytes())
    inside_plate.write_bytes(plate.read_bytes())
    notes.write_text("precious")
    with pytest.raises(BgmatteError, match=r"shot: this output folder holds the input video .*src.mp4"):
        convert_video(inside_clip, inside_plate, output=folder, overwrite=True, progress=False)
    with pytest.raises(BgmatteError, match=r"shot: this output folder holds the plate .*plate.png"):
        convert_video(clip, inside_plate, output=folder, overwrite=True, progress=False)
    deep = tmp_path / "out" / "com" / "plates" / "plate.png"  # deeper, in the reference's layout
    deep.parent.mkdir(parents=True)
    deep.write_bytes(plate.read_bytes())
    with pytest.raises(BgmatteError, match=r"com: this output folder holds the plate .*plates/plate.png"):
        convert_video(clip, deep, output_dir=tmp_path / "out", output_format="image_sequences", overwrite=True,
                      progress=False)
    assert deep.read_bytes() == plate.read_bytes()
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(BgmatteError, match=r"shot: holds more than numbered PNG frames \(notes.txt, plate.png, src.mp4\)"):
        convert_video(clip, plate, output=folder, overwrite=True, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plate.png", "shot", "src.mp4"]
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt", "plate.png", "src.mp4"]
    assert inside_clip.read_bytes() == clip.read_bytes() and notes.read_text() == "precious"


def test_a_png_folder_output_is_replaced_when_it_holds_only_frames(scene, tmp_path):
    clip, plate = scene
    folder = tmp_path / "frames"
    convert_video(clip, plate, output=folder, model=DifferenceModel(), progress=False)
    (folder / "0099.png").write_bytes(b"from a longer run")
    convert_video(clip, plate, output=folder, model=DifferenceModel(), overwrite=True, progress=False)
    assert sorted(path.name for path in folder.iterdir()) == [f"{index:04d}.png" for index in range(1, 13)]


def test_resize_above_the_pixel_limit_is_refused(scene, no_model):
    clip, plate = scene
    with pytest.raises(BgmatteError) as caught:
        convert_video(clip, plate, resize=(100_000, 100_000), progress=False)
    assert str(caught.value) == f"{clip}: cannot resize to 100000x100000: 10000 megapixels, above the limit of 100"


def test_an_automatic_plate_from_too_few_frames_names_the_clip(tmp_path):
    clip = tmp_path / "still.mp4"
    make_clip(clip, 1)
    with pytest.raises(BgmatteError) as caught:
        convert_video(clip, "auto", output=tmp_path / "com.mp4", model=DifferenceModel(), progress=False)
    assert str(caught.value) == f"{clip}: an automatic plate needs at least 3 frames of the clip; it gave 1"
    assert not (tmp_path / "com.mp4").exists()


def test_an_automatic_plate_of_a_variable_rate_mkv_samples_the_whole_clip(tmp_path, monkeypatch):
    """An MKV gives no frame count, and one of variable rate says 1000 fps: the count estimated from its duration,
    5000 frames for 200, spread the samples over frames that never came, 2 of them in all, and the clip was
    refused; a second pass now chooses them from the frames there were. (The reader now takes the rate from the
    spacing of the first stamps, 17 ms, whose estimate of some 300 frames is still far off.)"""
    clip = tmp_path / "screen.mkv"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        time = 0
        for index in range(200):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), index, np.uint8), format="rgb24")
            frame.pts, frame.time_base = time, Fraction(1, 1000)
            time += 100 if index < 20 else 17  # 10 fps for 2 s, then about 60
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with VideoReader(clip) as reader:
        assert reader.frame_count > 250  # the estimate this is about: more than 10% above the 200 frames
    seen = []
    monkeypatch.setattr(pipeline, "estimate_plate", lambda samples, **kwargs: seen.append(samples) or samples[0])
    pipeline._estimate_plate(clip, (64, 48), False)
    levels = [int(sample[..., 0].mean()) for sample in seen[0]]
    assert len(levels) == 30 and levels[0] < 5 and levels[-1] > 190  # from the first frame to the last


def test_interrupt_leaves_playable_outputs_with_every_frame_matted(scene, tmp_path):
    clip, plate = scene
    model = DifferenceModel(interrupt_on=5)  # Ctrl-C while the fifth frame is being matted
    with pytest.raises(KeyboardInterrupt):
        convert_video(clip, plate, output_dir=tmp_path / "out", outputs=["com", "pha"], model=model, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["com.mp4", "pha.mp4"]  # no temporary files left
    assert decode_times(out / "com.mp4") == [0.0, 0.04, 0.08, 0.12]
    assert len(read_frames(out / "pha.mp4")) == 4
    assert 0.1 < audio_seconds(out / "com.mp4") < 0.25
    assert not [t for t in threading.enumerate() if t.name.startswith("bgmatte-")]


def test_truncated_input_keeps_every_decoded_frame_and_says_so(tmp_path):
    whole, plate = tmp_path / "whole.mkv", tmp_path / "plate.png"
    rng = np.random.default_rng(0)
    noisy = [np.clip(subject_frame(plate_image(), index).astype(int) + rng.integers(0, 12, (HEIGHT, WIDTH, 3)), 0, 255)
             .astype(np.uint8) for index in range(25)]  # noise makes the file big enough to cut in the middle
    write_clip(whole, noisy)
    write_png(plate, plate_image())
    cut = tmp_path / "cut.mkv"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with VideoReader(cut) as reader:
        decodable = len(list(reader))
    assert 5 <= decodable < 25
    with pytest.raises(BgmatteError, match=r"cut.mkv.*truncated.*outputs hold those \d+ frames$") as caught:
        convert_video(cut, plate, output_dir=tmp_path / "out", outputs=["com", "pha"], model=DifferenceModel(),
                      progress=False)
    assert "\n" not in str(caught.value)
    assert len(read_frames(tmp_path / "out" / "com.mp4")) == decodable
    assert len(read_frames(tmp_path / "out" / "pha.mp4")) == decodable


def test_an_input_that_ends_after_its_first_frame_says_the_outputs_hold_that_frame(tmp_path):
    """The message said "the outputs hold those 1 frames"; one frame is "that frame", more are "those N frames"."""
    whole, plate = tmp_path / "whole.mkv", tmp_path / "plate.png"
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 12, (HEIGHT, WIDTH, 3)) for _ in range(25)]
    write_clip(whole, [np.clip(subject_frame(plate_image(), index).astype(int) + grain, 0, 255).astype(np.uint8)
                       for index, grain in enumerate(noise)], audio=False)
    write_png(plate, plate_image())
    data, cut = whole.read_bytes(), tmp_path / "cut.mkv"
    for percent in range(5, 50):  # the shortest cut that still decodes: its first frame only
        cut.write_bytes(data[: len(data) * percent // 100])
        try:
            with VideoReader(cut) as reader:
                decoded, error = len(list(reader)), reader.error
        except BgmatteError:  # the header or the first frame is cut
            continue
        if decoded:
            break
    assert decoded == 1 and error is not None
    with pytest.raises(BgmatteError) as caught:
        convert_video(cut, plate, output_dir=tmp_path / "out", outputs=["pha"], model=DifferenceModel(), progress=False)
    assert str(caught.value).endswith("(the file looks truncated or damaged); the outputs hold that frame")
    assert len(read_frames(tmp_path / "out" / "pha.mp4")) == 1


def test_what_a_stopped_run_holds_is_worded_for_its_count():
    held = pipeline._frames_held
    assert [held(count, "the first") for count in (0, 1, 5)] == ["no frame", "the first frame", "the first 5 frames"]
    assert [held(count, "those") for count in (0, 1, 5)] == ["no frame", "that frame", "those 5 frames"]


def test_missing_and_non_media_inputs_name_the_file(tmp_path, scene):
    clip, plate = scene
    with pytest.raises(BgmatteError, match="nothing.mp4: no such file"):
        convert_video(tmp_path / "nothing.mp4", plate, model=DifferenceModel(), progress=False)
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video\n" * 40)
    with pytest.raises(BgmatteError, match="notes.mp4: not a video file"):
        convert_video(notes, plate, model=DifferenceModel(), progress=False)
    with pytest.raises(BgmatteError, match="missing.png: no such image file"):
        convert_video(clip, tmp_path / "missing.png", output=tmp_path / "o.mp4", model=DifferenceModel(), progress=False)
    with pytest.raises(BgmatteError, match="unknown output 'alpha'"):
        convert_video(clip, plate, outputs=["alpha"], model=DifferenceModel(), progress=False)


def test_reading_stays_a_bounded_distance_ahead_of_the_model(tmp_path):
    clip, plate = tmp_path / "long.mp4", tmp_path / "plate.png"
    make_clip(clip, 60, audio=False)
    write_png(plate, plate_image())
    ahead: list[int] = []

    original = pipeline.VideoReader.__iter__

    def counting(self):
        for frame in original(self):
            ahead.append(frame.index - len(model.calls))
            yield frame

    model = DifferenceModel()
    pipeline.VideoReader.__iter__ = counting
    try:
        convert_video(clip, plate, output=tmp_path / "com.mp4", model=model, progress=False)
    finally:
        pipeline.VideoReader.__iter__ = original
    assert len(model.calls) == 60
    assert max(ahead) <= 8  # a few batches in flight, never the whole clip


def test_default_output_names_sit_beside_the_source(scene):
    clip, _ = scene
    plans = plan_video_outputs(clip, ["com", "pha"], output=None, output_dir=None, output_format="video",
                               transparent=False, overwrite=False)
    assert [plan.path.name for plan in plans] == ["src_com.mp4", "src_pha.mp4"]
    plans = plan_video_outputs(clip, ["com", "fgr"], output=clip.parent / "cut.webm", output_dir=None,
                               output_format="video", transparent=True, overwrite=False)
    assert [(plan.path.name, plan.alpha) for plan in plans] == [("cut.webm", True), ("cut_fgr.webm", False)]
    with pytest.raises(BgmatteError, match="out.avi: cannot write video with extension .avi"):
        plan_video_outputs(clip, ["com"], output="out.avi", output_dir=None, output_format="video", transparent=False,
                           overwrite=False)


def test_mattingbase_runs_at_full_resolution_and_has_no_ref(scene, tmp_path):
    clip, plate = scene
    weights = tmp_path / "base.pth"
    torch.save(MattingBase("mobilenetv2").state_dict(), weights)
    options = ModelOptions(checkpoint=weights, model_type="mattingbase", device="cpu")
    with pytest.raises(BgmatteError, match="ref output needs the refine model"):
        convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["com", "ref"], model=options, progress=False)
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["com", "err"], model=options,
                           progress=False)
    assert len(read_frames(result.outputs["err"])) == 12


class _StatesCuda:
    """A model without parameters that says it runs on CUDA, as an ONNX model on the CUDA provider does."""

    device = torch.device("cuda", 1)

    def __call__(self, src, bgr):
        raise AssertionError("not run")


def test_a_model_without_parameters_is_placed_by_the_device_it_states():
    """So that an ONNX model on CUDA gets the GPU's batch and encoder settings, not the CPU's; no GPU is needed."""
    model = _StatesCuda()
    assert pipeline.model_device(model) == torch.device("cuda", 1)
    assert Predictor(model).device == torch.device("cuda", 1)
    assert pipeline.model_device(DifferenceModel()) == torch.device("cpu")


# --------------------------------------------------------------------------------------------- images


def test_matte_images_pairs_plates_by_name_and_writes_rgba_cutouts(tmp_path):
    import cv2

    sources, plates = tmp_path / "src", tmp_path / "bgr"
    sources.mkdir()
    plates.mkdir()
    for index, name in enumerate(["beach", "office"]):
        plate = plate_image(seed=index)
        write_png(plates / f"{name}.png", plate)
        write_png(sources / f"{name}.png", subject_frame(plate, index + 2))
    written = matte_images(sources, plates, output_dir=tmp_path / "out", outputs=["com", "pha", "err"],
                           model=DifferenceModel(), progress=False)
    assert {kind: sorted(p.name for p in paths) for kind, paths in written.items()} == {
        kind: ["beach.png", "office.png"] for kind in ("com", "pha", "err")}
    cutout = cv2.imread(str(tmp_path / "out" / "com" / "office.png"), cv2.IMREAD_UNCHANGED)
    assert cutout.shape == (HEIGHT, WIDTH, 4)
    assert subject_pixels(cutout[:, :, 3], 3).min() == 255 and background_pixels(cutout[:, :, 3], 3).max() == 0
    with pytest.raises(BgmatteError, match=r"out/com/beach.png: already exists"):
        matte_images(sources, plates, output_dir=tmp_path / "out", model=DifferenceModel(), progress=False)
    matte_images(sources, plates, output_dir=tmp_path / "out", model=DifferenceModel(), overwrite=True, progress=False)


def test_matte_images_with_one_plate_a_target_and_exposure_matching(tmp_path):
    plate = plate_image()
    plate_file, dim = tmp_path / "plate.png", tmp_path / "dim.png"
    write_png(plate_file, plate)
    write_png(dim, subject_frame(plate, 4, gain=0.6))
    written = matte_images([dim], plate_file, output_dir=tmp_path / "out", outputs=["com", "pha"], target_bgr="white",
                           match_exposure=True, model=DifferenceModel(), progress=False)
    from bgmatte.io.images import read_image

    pha = read_image(written["pha"][0])[:, :, 0]
    com = read_image(written["com"][0])
    assert background_pixels(pha, 4).mean() < 10 and subject_pixels(pha, 4).mean() > 240
    assert background_pixels(com, 4).min() >= 250


def test_matte_images_reads_an_image_target_once_and_scales_it_when_the_size_changes(tmp_path, monkeypatch):

    plate, sources = plate_image(), tmp_path / "src"
    sources.mkdir()
    plate_file, target = tmp_path / "plate.png", tmp_path / "beach.png"
    write_png(plate_file, plate)
    write_png(target, plate_image(150, 80, seed=7))
    big = plate_image(2 * WIDTH, 2 * HEIGHT, seed=0)
    write_png(sources / "a.png", subject_frame(plate, 2))
    write_png(sources / "b.png", subject_frame(plate, 3))
    write_png(sources / "c.png", subject_frame(big, 4))
    reads, covers = [], []
    read_image, with_profile, cover = pipeline.read_image, pipeline.read_image_and_profile, pipeline.cover
    monkeypatch.setattr(pipeline, "read_image", lambda path: reads.append(Path(path).name) or read_image(path))
    monkeypatch.setattr(pipeline, "read_image_and_profile",
                        lambda path: reads.append(Path(path).name) or with_profile(path))
    monkeypatch.setattr(pipeline, "cover", lambda image, *size: covers.append(size) or cover(image, *size))
    together = matte_images(sources, plate_file, output_dir=tmp_path / "out", outputs=["com"], target_bgr=str(target),
                            model=DifferenceModel(), progress=False)
    assert reads.count("beach.png") == 1
    assert covers == [(WIDTH, HEIGHT), (2 * WIDTH, 2 * HEIGHT)]  # b.png takes a.png's
    for index, source in enumerate(sorted(sources.iterdir())):  # the same pixels as each photo matted alone
        alone = matte_images([source], plate_file, output_dir=tmp_path / f"alone{index}", outputs=["com"],
                             target_bgr=str(target), model=DifferenceModel(), progress=False)
        assert np.array_equal(read_image(alone["com"][0]), read_image(together["com"][index]))


def test_matte_images_names_a_missing_plate(tmp_path):
    sources, plates = tmp_path / "src", tmp_path / "bgr"
    sources.mkdir()
    plates.mkdir()
    write_png(sources / "dog.png", plate_image())
    write_png(plates / "cat.png", plate_image())
    with pytest.raises(BgmatteError, match="no plate with the same name.*dog.png"):
        matte_images(sources, plates, output_dir=tmp_path / "out", model=DifferenceModel(), progress=False)
    with pytest.raises(BgmatteError, match="needs a video"):
        matte_images(sources, "auto", output_dir=tmp_path / "out", model=DifferenceModel(), progress=False)


# ---------------------------------------------------------------------------------------------- speed


def test_measure_pipeline_reports_model_and_end_to_end_throughput():
    speed = measure_pipeline(DifferenceModel(), width=96, height=64, frames=6, rounds=1, threads=1)
    assert speed.frames == 6 and speed.batch_size == 1 and speed.outputs == ("com",) and speed.threads == 1
    assert speed.model_fps > 0 and speed.pipeline_fps > 0 and speed.ratio == speed.pipeline_fps / speed.model_fps


# ------------------------------------------------------------------------------------------ a span of the clip


def test_a_span_is_matted_from_zero_with_the_sound_of_that_span(tmp_path):
    """0.4 s for 0.2 s of a 25 fps clip: the subject of frames 10 to 14, timed from 0, over 0.2 s of the sound from
    the same span (1000 Hz; the tone is 440 Hz before it and 2500 Hz after)."""
    clip, plate = tmp_path / "src.mp4", tmp_path / "plate.png"
    make_clip(clip, 25, tone=stepped_tone)
    write_png(plate, plate_image())
    result = convert_video(clip, plate, output=tmp_path / "com.mp4", outputs=["com", "pha"], model=DifferenceModel(),
                           start=0.4, duration=0.2, progress=False)
    assert result.frames == 5
    assert decode_times(result.outputs["com"]) == decode_times(result.outputs["pha"]) == [0.0, 0.04, 0.08, 0.12, 0.16]
    for index, frame in enumerate(read_frames(result.outputs["pha"]), start=10):
        assert subject_pixels(frame, index).mean() > 200 and background_pixels(frame, index).mean() < 20, index
    assert audio_seconds(result.outputs["com"]) == pytest.approx(0.2, abs=0.04)
    assert audio_frequency(result.outputs["com"]) == pytest.approx(1000, abs=30)


def test_an_automatic_plate_is_estimated_from_the_span(tmp_path):
    """The first 15 frames are underexposed: a plate estimated over the whole clip would be dark, one from the span
    (frames 15 to 24) is the plate itself."""
    clip = tmp_path / "src.mp4"
    write_clip(clip, [subject_frame(plate_image(), index, gain=0.5 if index < 15 else 1.0) for index in range(25)])
    result = convert_video(clip, "auto", output_dir=tmp_path / "out", outputs=["pha"], model=DifferenceModel(),
                           start=0.6, progress=False)
    frames = read_frames(result.outputs["pha"])
    assert len(frames) == 10
    for index, frame in enumerate(frames, start=15):
        assert subject_pixels(frame, index).mean() > 200 and background_pixels(frame, index).mean() < 20, index


def marked_plate(index: int) -> np.ndarray:
    """The plate with a black mark above the subject's rows at a place that tells `index`."""
    image = plate_image()
    image[2:8, 3 * index : 3 * index + 6] = 0
    return image


def test_a_plate_video_with_a_span_pairs_the_frames_it_pairs_untrimmed(tmp_path):
    clip, plates = tmp_path / "src.mp4", tmp_path / "plates.mp4"
    make_clip(clip, 25)
    write_clip(plates, [marked_plate(index) for index in range(25)], audio=False)
    outputs = {}
    for name, span in [("whole", {}), ("span", {"start": 0.4, "duration": 0.2})]:
        result = convert_video(clip, plates, output_dir=tmp_path / name, outputs=["pha"], model=DifferenceModel(),
                               output_format="image_sequences", progress=False, **span)
        outputs[name] = [read_image(path) for path in sorted(result.outputs["pha"].iterdir())]
    assert len(outputs["whole"]) == 25 and len(outputs["span"]) == 5
    for index, frame in enumerate(outputs["span"], start=10):
        assert np.array_equal(frame, outputs["whole"][index]), index
        assert frame[3:7, 3 * index + 1 : 3 * index + 5].min() == 255  # the mark of plate frame `index`


def test_a_plate_video_that_ends_before_the_start_is_refused_by_name(tmp_path):
    clip, plates = tmp_path / "src.mp4", tmp_path / "plates.mp4"
    make_clip(clip, 25)
    write_clip(plates, [marked_plate(index) for index in range(5)], audio=False)
    with pytest.raises(BgmatteError) as caught:
        convert_video(clip, plates, output=tmp_path / "com.mp4", model=DifferenceModel(), start=0.4, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{plates}: ") and "0.4 s" in message and "\n" not in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plates.mp4", "src.mp4"]


def test_an_automatic_plate_from_too_short_a_span_says_what_to_change(scene, tmp_path):
    clip, _ = scene  # 12 frames at 25 fps
    with pytest.raises(BgmatteError, match=r"3 frames of the span from 0.4 s to the end \(an earlier --start\?\); "
                                           r"it gave 2"):
        convert_video(clip, "auto", output=tmp_path / "a.mp4", start=0.4, model=DifferenceModel(), progress=False)
    with pytest.raises(BgmatteError, match=r"3 frames of the span from 0 s for 0.05 s \(a longer --duration\?\)"):
        convert_video(clip, "auto", output=tmp_path / "b.mp4", duration=0.05, model=DifferenceModel(),
                      progress=False)
