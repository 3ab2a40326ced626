"""Video reading and writing: every frame, timestamps (VFR too), audio, rotation, alpha, safe files."""
from __future__ import annotations

import logging
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from bgmatte.errors import BgmatteError
from bgmatte.io.video import (
    ClosesOnExit,
    EncoderOptions,
    ImageSequenceWriter,
    VideoReader,
    VideoWriter,
    choose_encoder,
    lower_thread_priority,
    to_yuv420p,
)

from media import audio_seconds, decode_times, write_clip

pytestmark = pytest.mark.timeout(60)

WIDTH, HEIGHT = 64, 48
MS = Fraction(1, 1000)


def pattern(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A frame whose brightness encodes its index, with a white marker in the top-left corner."""
    image = np.full((height, width, 3), 20 + 9 * index, np.uint8)  # index up to 25
    image[:, :, 2] = 100
    image[:8, :8] = 255
    return image


def make_clip(
    path: Path,
    *,
    count: int = 12,
    pts_ms: list[int] | None = None,
    size: tuple[int, int] = (WIDTH, HEIGHT),
    noise: bool = False,
    **kwargs,
) -> list[int]:
    """Write a small clip of `pattern` frames through `media.write_clip` (H.264 at 25 fps unless `pts_ms` says
    otherwise, with a 440 Hz AAC track; `audio`, `rotation`, `codec`, `options` as there); returns pts (ms)."""
    rng = np.random.default_rng(0)
    images = []
    for index in range(len(pts_ms) if pts_ms is not None else count):
        image = pattern(index, *size)
        if noise:  # incompressible texture makes a file big enough to damage in the middle
            image = (image + rng.integers(0, 12, image.shape)).astype(np.uint8)
        images.append(image)
    return write_clip(path, images, pts_ms=pts_ms, **kwargs)


def read_all(path: Path) -> tuple[VideoReader, list]:
    with VideoReader(path) as reader:
        frames = list(reader)
    return reader, frames


def rgba(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """RGB pattern plus alpha: opaque left half, transparent right half."""
    alpha = np.zeros((height, width, 1), np.uint8)
    alpha[:, : width // 2] = 255
    return np.concatenate([pattern(index, width, height), alpha], axis=2)


# ------------------------------------------------------------------------------------------- reader


def test_reader_yields_every_frame_with_size_rate_and_audio(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, count=12)
    reader, frames = read_all(clip)
    assert len(frames) == 12
    assert reader.size == (WIDTH, HEIGHT) and reader.fps == 25 and reader.frame_count == 12
    assert reader.duration == pytest.approx(0.48, abs=0.05)
    assert reader.audio is not None and reader.audio.codec == "aac" and reader.audio.channels == 2
    assert reader.error is None and reader.frames_read == 12
    assert all(frame.image.shape == (HEIGHT, WIDTH, 3) and frame.image.dtype == np.uint8 for frame in frames)
    assert [frame.index for frame in frames] == list(range(12))
    # The frames come in order: the brightness grows with the index.
    assert np.all(np.diff([int(frame.image[30, 40, 0]) for frame in frames]) > 5)


def test_reader_keeps_variable_frame_rate_timestamps(tmp_path):
    clip = tmp_path / "vfr.mp4"
    pts_ms = make_clip(clip, pts_ms=[0, 40, 80, 200, 240, 250, 260, 400, 440, 480])
    _, frames = read_all(clip)
    assert [round(frame.time, 4) for frame in frames] == [p / 1000 for p in pts_ms]


@pytest.mark.parametrize(
    ("rotation", "marker"),
    [(-90, (0, -1)), (90, (-1, 0)), (180, (-1, -1))],
    ids=["clockwise", "counterclockwise", "upside-down"],
)
def test_reader_turns_rotated_video_upright(tmp_path, rotation, marker):
    clip = tmp_path / "phone.mp4"
    make_clip(clip, count=3, rotation=rotation, audio=False)
    reader, frames = read_all(clip)
    assert reader.rotation == rotation
    expected = (HEIGHT, WIDTH) if rotation == 180 else (WIDTH, HEIGHT)  # (rows, columns)
    assert frames[0].image.shape[:2] == expected
    assert reader.size == (expected[1], expected[0])
    # The white top-left marker moves to the corner a viewer would see it in.
    assert frames[0].image[marker].min() > 230
    assert frames[0].image[0, 0].min() < 200


def test_reader_can_leave_rotation_alone(tmp_path):
    clip = tmp_path / "phone.mp4"
    make_clip(clip, count=2, rotation=-90, audio=False)
    with VideoReader(clip, apply_rotation=False) as reader:
        image = next(iter(reader)).image
    assert reader.rotation == -90 and image.shape == (HEIGHT, WIDTH, 3) and image[0, 0].min() > 230


def test_missing_file_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(BgmatteError, match="nothing.mp4: no such file") as caught:
        VideoReader(tmp_path / "nothing.mp4")
    assert "\n" not in str(caught.value)


def test_non_media_file_is_refused_with_its_name(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 50)
    with pytest.raises(BgmatteError, match="notes.mp4: not a video file"):
        VideoReader(fake)
    with pytest.raises(BgmatteError, match="is a folder"):
        VideoReader(tmp_path)


def test_audio_only_file_is_refused(tmp_path):
    sound = tmp_path / "sound.m4a"
    with av.open(str(sound), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(BgmatteError, match="sound.m4a: has no video stream"):
        VideoReader(sound)


@pytest.mark.parametrize("kind", ["mkv", "faststart-mp4"])
def test_truncated_input_keeps_decoded_frames_and_reports_it(tmp_path, kind):
    clip = tmp_path / ("whole.mkv" if kind == "mkv" else "whole.mp4")
    make_clip(clip, count=25, options={"movflags": "faststart"} if kind != "mkv" else None)
    data = clip.read_bytes()
    cut = tmp_path / f"cut{clip.suffix}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    reader, frames = read_all(cut)
    assert 5 <= len(frames) < 25
    assert reader.error is not None and "cut" in str(reader.error) and "truncated" in str(reader.error)
    # What was decoded is intact and in order.
    assert np.all(np.diff([int(frame.image[30, 40, 0]) for frame in frames]) > 5)


def test_mp4_cut_before_its_index_is_a_clear_error(tmp_path):
    clip = tmp_path / "whole.mp4"
    make_clip(clip, count=10)  # the index (moov) sits at the end
    cut = tmp_path / "cut.mp4"
    data = clip.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BgmatteError, match="cut.mp4"):
        read_all(cut)


def test_garbage_in_the_middle_never_hangs(tmp_path):
    clip = tmp_path / "whole.mkv"
    make_clip(clip, count=25, audio=False, noise=True)
    data = bytearray(clip.read_bytes())
    rng = np.random.default_rng(0)
    middle = len(data) * 6 // 10
    data[middle : middle + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(bytes(data))
    started = time.monotonic()
    reader, frames = read_all(broken)
    assert time.monotonic() - started < 20
    assert len(frames) >= 5  # at least everything before the damage
    assert reader.frames_read == len(frames)
    assert len(frames) == 25 or "broken.mkv" in str(reader.error)


def test_closing_the_reader_early_stops_its_thread(tmp_path):
    clip = tmp_path / "clip.mkv"
    make_clip(clip, count=25, audio=False)
    before = threading.active_count()
    reader = VideoReader(clip, queue_size=2)
    first = next(iter(reader))
    assert first.index == 0
    reader.close()
    reader.close()  # twice is harmless
    assert not reader._thread.is_alive()
    assert threading.active_count() <= before


# ------------------------------------------------------------------------------------------- writer


def copy_clip(source: Path, target: Path, **kwargs) -> VideoReader:
    with VideoReader(source) as reader, VideoWriter(target, fps=reader.fps, audio_from=source, **kwargs) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    return reader


def test_writer_keeps_every_frame_timestamps_and_audio(tmp_path):
    source = tmp_path / "vfr.mp4"
    pts_ms = make_clip(source, pts_ms=[0, 40, 80, 200, 240, 250, 260, 400, 440, 480, 520])
    target = tmp_path / "out.mp4"
    copy_clip(source, target)
    assert decode_times(target) == [p / 1000 for p in pts_ms]
    reader, frames = read_all(target)
    assert reader.size == (WIDTH, HEIGHT) and len(frames) == len(pts_ms)
    assert reader.audio is not None and reader.audio.codec == "aac"
    assert audio_seconds(target) == pytest.approx(0.56, abs=0.05)  # trimmed to the video's end
    # Pixels survive the round trip (lossy, but close).
    assert np.abs(frames[5].image.astype(int) - pattern(5).astype(int)).mean() < 4


def test_constant_rate_and_frame_count_survive(tmp_path):
    source = tmp_path / "cfr.mp4"
    make_clip(source, count=20)
    target = tmp_path / "out.mkv"
    copy_clip(source, target)
    reader, frames = read_all(target)
    assert len(frames) == 20 and reader.fps == 25
    assert decode_times(target) == [round(0.04 * index, 4) for index in range(20)]
    assert reader.audio is not None


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_grey_frames_encode_as_their_rgb_expansion(tmp_path, suffix):
    rng = np.random.default_rng(1)
    greys = [cv2.GaussianBlur(rng.integers(0, 256, (36, 50), dtype=np.uint8), (5, 5), 2) for _ in range(3)]
    decoded = []
    for name, frames in (("grey", greys), ("rgb", [np.repeat(g[:, :, None], 3, axis=2) for g in greys])):
        path = tmp_path / f"{name}{suffix}"
        with VideoWriter(path, fps=25, options=EncoderOptions(threads=1 if name == "grey" else None)) as writer:
            for frame in frames:
                writer.write(frame)
        decoded.append([frame.image for frame in VideoReader(path)])
    assert len(decoded[0]) == 3 and all(np.array_equal(a, b) for a, b in zip(*decoded))
    assert np.abs(decoded[0][0][:, :, 0].astype(int) - greys[0]).mean() < 4  # lossy, but the same picture


@pytest.mark.parametrize("height, width", [(48, 64), (22, 30), (2, 2)])
def test_yuv_conversion_gives_ffmpegs_pixels(height, width):
    """The writer's own RGB to 4:2:0 conversion: FFmpeg's luma within 1, chroma the mean of each 2x2 block."""
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (3, 3), 1)
    ours = to_yuv420p(image)
    ffmpeg = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p").to_ndarray()
    assert ours.shape == ffmpeg.shape == (height * 3 // 2, width)
    assert np.abs(ours[:height].astype(int) - ffmpeg[:height]).max() <= 1
    rgb = image.astype(np.float64).reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
    cb = 128 + (-37.797 * rgb[..., 0] - 74.203 * rgb[..., 1] + 112.0 * rgb[..., 2]) / 255
    cr = 128 + (112.0 * rgb[..., 0] - 93.786 * rgb[..., 1] - 18.214 * rgb[..., 2]) / 255
    planes = ours[height:].reshape(-1)
    assert np.abs(planes[: cb.size] - cb.reshape(-1)).max() <= 1.5  # three roundings on the way
    assert np.abs(planes[cb.size :] - cr.reshape(-1)).max() <= 1.5
    back = av.VideoFrame.from_ndarray(ours, format="yuv420p").to_ndarray(format="rgb24")
    ffmpeg_back = av.VideoFrame.from_ndarray(ffmpeg, format="yuv420p").to_ndarray(format="rgb24")
    assert np.abs(back.astype(int) - image).mean() <= np.abs(ffmpeg_back.astype(int) - image).mean() + 0.5


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="per-thread priorities are a Linux feature")
def test_lowering_priority_affects_the_calling_thread_only():
    import os

    seen = {}

    def worker():
        lower_thread_priority(3)
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["worker"] == min(19, before + 3)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_a_lower_priority_reader_and_writer_give_the_same_frames(tmp_path):
    source = tmp_path / "in.mp4"
    make_clip(source, count=12)
    plain = [frame.image for frame in VideoReader(source)]
    low = [frame.image for frame in VideoReader(source, niceness=5)]
    assert len(low) == 12 and all(np.array_equal(a, b) for a, b in zip(plain, low))
    with VideoWriter(tmp_path / "a.mp4", fps=25) as writer, VideoWriter(tmp_path / "b.mp4", fps=25, niceness=5) as nicer:
        for frame in plain:
            writer.write(frame)
            nicer.write(frame)
    first, second = ([frame.image for frame in VideoReader(tmp_path / name)] for name in ("a.mp4", "b.mp4"))
    assert len(second) == 12 and all(np.array_equal(a, b) for a, b in zip(first, second))


def test_encoder_options_are_checked():
    with pytest.raises(BgmatteError, match="preset"):
        EncoderOptions(preset="quick")
    with pytest.raises(BgmatteError, match="crf"):
        EncoderOptions(crf=80)
    assert choose_encoder(Path("a.mp4"), alpha=False, options=EncoderOptions(preset="slow", crf=23)).options == {
        "crf": "23", "preset": "slow"}
    assert choose_encoder(Path("a.mp4"), alpha=False).options["preset"] == "veryfast"


def test_frames_without_timestamps_follow_the_frame_rate(tmp_path):
    target = tmp_path / "ntsc.mp4"
    with VideoWriter(target, fps=Fraction(30000, 1001)) as writer:
        for index in range(6):
            writer.write(pattern(index))
    assert decode_times(target) == [round(index * 1001 / 30000, 4) for index in range(6)]


def test_mpeg4_fallback_takes_fine_time_bases(tmp_path):
    target = tmp_path / "old.mp4"
    with VideoWriter(target, fps=25, options=EncoderOptions(codec="mpeg4")) as writer:
        for index in range(5):
            writer.write(pattern(index), pts=3600 * index, time_base=Fraction(1, 90000))
    assert decode_times(target) == [0.0, 0.04, 0.08, 0.12, 0.16]


def alpha_planes(path: Path) -> list[np.ndarray]:
    """Decode the alpha of every frame; VP9 alpha needs the libvpx decoder, which reads the side data."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.codec_context.name == "vp9":
            decoder = av.CodecContext.create("libvpx-vp9", "r")
            frames = [frame for packet in container.demux(stream) for frame in decoder.decode(packet)]
        else:
            frames = list(container.decode(stream))
        return [frame.to_ndarray(format="rgba")[:, :, 3] for frame in frames]


@pytest.mark.parametrize(("suffix", "codec"), [(".webm", "vp9"), (".mov", "prores"), (".mkv", "ffv1")])
def test_transparent_outputs_keep_alpha_in_the_file(tmp_path, suffix, codec):
    source = tmp_path / "src.mp4"
    make_clip(source, count=6)
    target = tmp_path / f"cutout{suffix}"
    with VideoWriter(target, fps=25, alpha=True, audio_from=source) as writer:
        for index in range(6):
            writer.write(rgba(index), pts=40 * index, time_base=MS)
    with av.open(str(target)) as container:
        assert container.streams.video[0].codec_context.name == codec
        assert container.streams.audio, "the audio track is carried"
    planes = alpha_planes(target)
    assert len(planes) == 6
    for plane in planes:
        assert plane[:, :28].min() >= 250  # opaque half (away from the chroma-blurred middle)
        assert plane[:, 36:].max() <= 5  # transparent half
    assert decode_times(target) == [0.0, 0.04, 0.08, 0.12, 0.16, 0.2]


def test_webm_gets_opus_audio_from_an_aac_source(tmp_path):
    source = tmp_path / "src.mp4"
    make_clip(source, count=10)
    target = tmp_path / "out.webm"
    copy_clip(source, target)
    with av.open(str(target)) as container:
        assert container.streams.audio[0].codec_context.name == "opus"
    assert audio_seconds(target) == pytest.approx(0.4, abs=0.06)


def test_source_without_audio_gives_output_without_audio(tmp_path):
    source = tmp_path / "silent.mp4"
    make_clip(source, count=4, audio=False)
    target = tmp_path / "out.mp4"
    copy_clip(source, target)
    with av.open(str(target)) as container:
        assert not container.streams.audio and container.streams.video[0].frames == 4


def test_mp4_with_alpha_is_refused_with_the_reason_and_the_way_out(tmp_path):
    with pytest.raises(BgmatteError) as caught:
        VideoWriter(tmp_path / "cutout.mp4", alpha=True)
    message = str(caught.value)
    assert "cutout.mp4" in message and "transparency" in message and ".webm" in message and ".mov" in message
    assert not (tmp_path / "cutout.mp4").exists()


def test_unknown_extension_is_refused(tmp_path):
    with pytest.raises(BgmatteError, match=r"out.xyz: cannot write video with extension \.xyz"):
        VideoWriter(tmp_path / "out.xyz")


def test_encoders_by_extension():
    assert choose_encoder("a.mp4", alpha=False).codec in ("libx264", "mpeg4")
    assert (choose_encoder("a.webm", alpha=True).codec, choose_encoder("a.webm", alpha=True).pix_fmt) == ("libvpx-vp9", "yuva420p")
    assert (choose_encoder("a.mov", alpha=True).codec, choose_encoder("a.mov", alpha=True).pix_fmt) == ("prores_ks", "yuva444p10le")
    assert choose_encoder("a.webm", alpha=False).pix_fmt == "yuv420p"


@pytest.mark.parametrize(("even", "expected"), [("pad", (66, 48)), ("crop", (64, 46))])
def test_odd_sizes_are_made_even_for_h264_and_logged(tmp_path, caplog, even, expected):
    target = tmp_path / "odd.mp4"
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.video"):
        with VideoWriter(target, fps=25, options=EncoderOptions(even=even)) as writer:
            for index in range(3):
                writer.write(pattern(index, 65, 47))
    reader, frames = read_all(target)
    assert reader.size == expected and len(frames) == 3
    assert any("65x47" in record.message and f"{expected[0]}x{expected[1]}" in record.message for record in caplog.records)


def test_vp9_keeps_odd_sizes(tmp_path):
    target = tmp_path / "odd.webm"
    with VideoWriter(target, fps=25) as writer:
        for index in range(3):
            writer.write(pattern(index, 65, 47))
    assert read_all(target)[0].size == (65, 47)


def test_writer_uses_a_temporary_name_until_closed(tmp_path):
    target = tmp_path / "out.mp4"
    writer = VideoWriter(target, fps=25)
    for index in range(60):  # past the encoder's lookahead, so that the file has been started
        writer.write(pattern(index % 25))
    time.sleep(0.3)
    assert not target.exists()
    partial = [path.name for path in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith(".out.") and partial[0].endswith(".partial.mp4")
    assert writer.close() == target
    assert [path.name for path in tmp_path.iterdir()] == ["out.mp4"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"precious")
    with pytest.raises(BgmatteError, match="out.mp4: already exists"):
        VideoWriter(target)
    assert target.read_bytes() == b"precious"
    with VideoWriter(target, overwrite=True) as writer:
        writer.write(pattern(0))
    assert read_all(target)[0].frames_read == 1


def test_writer_closed_after_an_interrupt_is_playable_with_every_frame(tmp_path):
    source = tmp_path / "src.mp4"
    make_clip(source, count=20)
    target = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoReader(source) as reader, VideoWriter(target, fps=reader.fps, audio_from=source) as writer:
            for frame in reader:
                writer.write(frame.image, frame.pts, frame.time_base)
                if frame.index == 6:
                    raise KeyboardInterrupt
    assert decode_times(target) == [round(0.04 * index, 4) for index in range(7)]
    assert 0.2 < audio_seconds(target) < 0.35
    assert {path.name for path in tmp_path.iterdir()} == {"src.mp4", "out.mp4"}  # no temporary left


def test_writer_with_no_frames_leaves_nothing(tmp_path):
    target = tmp_path / "empty.mp4"
    assert VideoWriter(target).close() is None
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_frames_that_do_not_fit(tmp_path):
    with VideoWriter(tmp_path / "out.mp4") as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((HEIGHT, WIDTH, 3), np.float32))
        with pytest.raises(ValueError, match="RGB"):
            writer.write(np.zeros((HEIGHT, WIDTH, 4), np.uint8))
        writer.write(pattern(0))
        with pytest.raises(ValueError, match="size changed"):
            writer.write(pattern(1, 32, 32))


def test_grey_frames_are_accepted_for_mattes(tmp_path):
    target = tmp_path / "pha.mp4"
    with VideoWriter(target) as writer:
        writer.write(np.full((HEIGHT, WIDTH), 200, np.uint8))
    image = read_all(target)[1][0].image
    assert abs(int(image[10, 10, 0]) - 200) <= 3 and abs(int(image[10, 10, 0]) - int(image[10, 10, 2])) <= 3


# ---------------------------------------------------------------------------------------- PNG folders


def test_image_sequence_numbers_frames_and_keeps_rgba(tmp_path):
    folder = tmp_path / "com"
    with ImageSequenceWriter(folder) as writer:
        for index in range(3):
            writer.write(rgba(index))
    assert sorted(path.name for path in folder.iterdir()) == ["0001.png", "0002.png", "0003.png"]
    saved = cv2.imread(str(folder / "0002.png"), cv2.IMREAD_UNCHANGED)
    assert saved.shape == (HEIGHT, WIDTH, 4)
    assert np.array_equal(cv2.cvtColor(saved, cv2.COLOR_BGRA2RGBA), rgba(1))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["com"]


def test_image_sequence_can_use_source_names(tmp_path):
    folder = tmp_path / "out"
    with ImageSequenceWriter(folder) as writer:
        writer.write(pattern(0), name="beach")
        writer.write(pattern(1), name="office")
        with pytest.raises(BgmatteError, match="beach.png"):
            writer.write(pattern(2), name="beach")
    assert sorted(path.name for path in folder.iterdir()) == ["beach.png", "office.png"]


def test_image_sequence_appears_only_when_closed(tmp_path):
    folder = tmp_path / "pha"
    writer = ImageSequenceWriter(folder)
    writer.write(pattern(0))
    time.sleep(0.2)
    assert not folder.exists()
    writer.close()
    assert [path.name for path in folder.iterdir()] == ["0001.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pha"]


def test_image_sequence_refuses_an_existing_folder_unless_overwrite(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.png").write_bytes(b"old")
    with pytest.raises(BgmatteError, match="out: already exists"):
        ImageSequenceWriter(folder)
    with ImageSequenceWriter(folder, overwrite=True) as writer:
        writer.write(pattern(0))
    assert [path.name for path in folder.iterdir()] == ["0001.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_image_sequence_keeps_frames_written_before_an_error(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(RuntimeError, match="model failed"):
        with ImageSequenceWriter(folder) as writer:
            writer.write(pattern(0))
            writer.write(pattern(1))
            raise RuntimeError("model failed")
    assert sorted(path.name for path in folder.iterdir()) == ["0001.png", "0002.png"]


class _FailingClose(ClosesOnExit):
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        raise OSError("disk full")


def test_closes_on_exit_keeps_the_first_error(caplog: pytest.LogCaptureFixture) -> None:
    """Leaving a block by an exception closes the object and keeps that exception; a failure to close is logged
    with the file's name. Leaving it normally lets the failure to close through."""
    shut = _FailingClose(Path("out.mp4"))
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="first"):
        with shut:
            raise ValueError("first")
    assert shut.closed == 1
    assert "out.mp4: while closing after an error: disk full" in caplog.text
    quiet = _FailingClose(None)
    with pytest.raises(OSError, match="disk full"):
        with quiet:
            pass
    assert quiet.closed == 1
