"""Video reading and writing: every frame, timestamps (VFR too), audio, rotation, alpha, safe files."""
from __future__ import annotations

import logging
import math
import struct
import sys
import threading
import time
import zlib
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import bgmatte.io.video as video_io
from bgmatte.errors import BgmatteError
from bgmatte.io.video import (
    ClosesOnExit,
    EncoderOptions,
    Frame,
    FrameClock,
    ImageSequenceWriter,
    VideoReader,
    VideoWriter,
    choose_encoder,
    lower_thread_priority,
    rates_differ,
    to_yuv420p,
)

from media import (
    decode_order_copy,
    audio_seconds,
    copy_from,
    make_clip as make_subject_clip,
    plate_image,
    decode_times,
    dominant_frequency,
    mono_samples,
    read_frames,
    stepped_tone,
    write_clip,
    write_vfr_mkv,
)

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
    assert not reader.variable_rate
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


# Millisecond stamps of a variable-rate recording: 40 ms apart, with a gap of dropped frames and a burst.
VFR_MS = [0, 40, 80, 120, 160, 300, 340, 380, 390, 400, 440, 480, 520, 560, 600, 700, 740, 780, 820, 860]


@pytest.mark.parametrize(("rate", "pts_ms", "fps"), [(None, VFR_MS, 25), (1000, VFR_MS, 25),
                                                     (1000, [round(i * 1001 / 30) for i in range(20)],
                                                      Fraction(30000, 1001)),
                                                     (1000, list(range(20)), 1000)],
                         ids=["no-rate", "tick-rate", "ntsc-in-ms", "high-speed"])
def test_a_variable_rate_mkv_in_milliseconds_reports_the_rate_its_frames_have(tmp_path, rate, pts_ms, fps):
    """A Matroska file of millisecond stamps whose header gives no rate, or one frame a millisecond, said 1000 fps, and
    1000 frames a second of it: its rate is now the spacing of its first stamps (the usual rate that is within 1% of
    it), which a gap or a burst does not move; a clip that is 1000 fps keeps that."""
    clip = tmp_path / "vfr.mkv"
    make_clip(clip, pts_ms=pts_ms, rate=rate, audio=False)
    reader, frames = read_all(clip)
    assert reader.fps == fps and reader.variable_rate
    assert abs(reader.frame_count - 20) <= 2 and len(frames) == 20 and reader.error is None
    assert [round(frame.time * 1000) for frame in frames] == pts_ms


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


def test_empty_video_file_is_named_empty(tmp_path):
    """A 0-byte file (a copy that never finished) says so, as an empty image does, not FFmpeg's 'Invalid data'."""
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(BgmatteError, match=r"empty.mp4: empty file \(0 bytes\), not a video"):
        VideoReader(empty)


@pytest.mark.parametrize("kind", ["mkv", "faststart-mp4", "avi"])
def test_truncated_input_keeps_decoded_frames_and_reports_it(tmp_path, kind):
    clip = tmp_path / ("whole.mp4" if kind == "faststart-mp4" else f"whole.{kind}")
    make_clip(clip, count=25, options={"movflags": "faststart"} if kind == "faststart-mp4" else None)
    data = clip.read_bytes()
    cut = tmp_path / f"cut{clip.suffix}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    reader, frames = read_all(cut)
    assert 5 <= len(frames) < 25
    assert reader.error is not None and "cut" in str(reader.error) and "truncated" in str(reader.error)
    # What was decoded is intact and in order.
    assert np.all(np.diff([int(frame.image[30, 40, 0]) for frame in frames]) > 5)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_copied_audio_of_a_truncated_file_leaves_out_its_cut_packet(tmp_path, caplog, suffix):
    """A faststart MP4 cut in half: its index lists the audio packet the cut went through, which the demuxer gives short
    and flagged corrupt. It was copied as it was, so that the output's audio failed to decode there ('Invalid data
    found'); now it is left out, as a damaged packet of a transcoded track is, with the same warning."""
    clip = tmp_path / "whole.mp4"
    make_clip(clip, count=25, options={"movflags": "faststart"})
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with av.open(str(cut)) as container:
        assert any(packet.is_corrupt for packet in container.demux(container.streams.audio[0]))
    output = tmp_path / f"out{suffix}"
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        with VideoReader(cut) as reader, VideoWriter(output, fps=reader.fps, audio_from=cut) as writer:
            for frame in reader:
                writer.write(frame.image, frame.pts, frame.time_base)
    with av.open(str(output)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "aac"  # copied
        frames = [frame for packet in container.demux(stream) for frame in packet.decode()]  # every packet decodes
    assert sum(frame.samples for frame in frames) / stream.rate > 0.3
    assert f"{cut}: audio has damaged packets; 1 left out" in caplog.messages


def test_an_mp4_whose_edit_list_hides_its_first_frames_is_whole_and_starts_at_its_first_shown_frame(tmp_path):
    """`ffmpeg -ss 1.4 -i in.mp4 -c copy out.mp4` copies from the keyframe at 1 s and writes an edit list that hides
    the ten frames before 1.4 s: the file holds 50 frames, its index counts them all, and 40 are shown. A whole read
    called it truncated ("ended after 40 of 50 frames"); the hidden frames are never given out, and are not missing."""
    source, copied = tmp_path / "source.mp4", tmp_path / "copied.mp4"
    muxed_clip(source, "libx264", "aac", 75, 3.0, video_options={"g": "25", "bf": "2"})
    copy_from(source, copied, 1.4)
    with av.open(str(copied)) as container:
        assert container.streams.video[0].frames == 50
    reader, frames = read_all(copied)
    assert [code_of(frame.image) for frame in frames] == list(range(35, 75))
    assert [round(frame.seconds, 4) for frame in frames] == [round(0.04 * index, 4) for index in range(40)]
    assert reader.error is None and reader.frame_count == 40 and reader.duration == pytest.approx(1.6)
    with VideoReader(copied, start=0.5, duration=0.4) as reader:
        assert [code_of(frame.image) for frame in reader] == list(range(48, 58)) and reader.error is None
    with VideoReader(copied, start=1.2) as reader:
        assert [code_of(frame.image) for frame in reader] == list(range(65, 75)) and reader.error is None
    # Cut short, such a file is still truncated (its index comes first, so that what is left can be read).
    faststart = tmp_path / "faststart.mp4"
    copy_from(source, faststart, 1.4, options={"movflags": "faststart"})
    data = faststart.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    reader, frames = read_all(cut)
    assert 10 <= len(frames) < 38 and code_of(frames[0].image) == 35
    assert str(reader.error) == f"{cut}: ended after {len(frames)} of 40 frames (the file looks truncated or damaged)"


def test_a_short_mkv_cut_by_a_third_is_reported(tmp_path):
    # Matroska gives no frame count: the reader compares by time, against the video track's own DURATION tag
    # (0.48 s here, while the container's 0.51 s includes the audio's tail), so three frames lost of twelve show.
    clip = tmp_path / "whole.mkv"
    make_subject_clip(clip, 12, plate=plate_image(160, 96))
    reader, frames = read_all(clip)
    assert len(frames) == 12 and reader.error is None
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    reader, frames = read_all(cut)
    assert 5 <= len(frames) < 12
    last = round(0.04 * (len(frames) - 1), 2)
    assert str(reader.error) == f"{cut}: ended at {last:.2f} s of 0.48 s (the file looks truncated or damaged)"


def test_a_span_of_a_short_mkv_cut_by_a_third_is_reported(tmp_path):
    # A span's check by time has the whole read's slack against the video track's DURATION tag (two frames): a span
    # from 0.08 s of the cut file lost the same three frames of twelve, and passed within its 0.25 s of slack.
    clip = tmp_path / "whole.mkv"
    make_subject_clip(clip, 12, plate=plate_image(160, 96))
    for start, duration in [(0.08, None), (0.08, 0.4), (0.2, 0.28)]:
        with VideoReader(clip, start=start, duration=duration) as reader:
            assert len(list(reader)) == round(12 - start / 0.04) and reader.error is None
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    for start, duration in [(0.08, None), (0.08, 0.4)]:
        with VideoReader(cut, start=start, duration=duration) as reader:
            frames = list(reader)
        assert 3 <= len(frames) < 10
        last = round(start + 0.04 * (len(frames) - 1), 2)
        assert str(reader.error) == f"{cut}: ended at {last:.2f} s of 0.48 s (the file looks truncated or damaged)"


def test_a_damaged_mkv_says_where_its_last_frame_was(tmp_path):
    # Damage in the first cluster leaves one frame, at 0 s, and a stream whose start time FFmpeg puts later
    # (85 ms): the time said is the last frame's from the first, never that start subtracted from it (-0.09 s).
    clip = tmp_path / "whole.mkv"
    make_subject_clip(clip, 12, plate=plate_image(160, 96))
    data = bytearray(clip.read_bytes())
    for position in range(3000, 6000, 7):
        data[position] ^= 0x55
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(bytes(data))
    with VideoReader(broken, niceness=5) as reader:  # decoded on one thread, as the CLI does with --nice
        frames = list(reader)
    assert [frame.seconds for frame in frames] == [0.0]
    assert str(reader.error).startswith(f"{broken}: ended at 0.00 s of ")


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


def intra_clip(path: Path, count: int = 8, damaged: tuple[int, ...] = ()) -> None:
    """An all-intra H.264 clip of `pattern` frames (each packet decodes alone) whose `damaged` packets (0-based)
    are overwritten in place with random bytes, as a bad sector or a broken download leaves them."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "1", "crf": "12"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(pattern(index), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        packets = [bytes(packet) for packet in container.demux(video=0) if packet.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(1)
    for index in damaged:
        start = data.find(packets[index])
        data[start : start + len(packets[index])] = rng.integers(0, 256, len(packets[index]), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", [0, 3], ids=["first", "fourth"])
def test_a_damaged_packet_costs_its_frame_and_nothing_more(tmp_path, caplog, damaged):
    clip = tmp_path / "bad.mkv"
    intra_clip(clip, 8, damaged=(damaged,))
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        reader, frames = read_all(clip)
    assert len(frames) == 7 and reader.skipped == 1 and reader.error is None
    # The frames that survive are the other seven, with their own timestamps.
    assert [round(frame.time, 2) for frame in frames] == [0.04 * index for index in range(8) if index != damaged]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"{clip}: skipped 1 damaged video packet that could not be decoded; its frame is missing"]


def test_many_damaged_packets_in_a_row_end_the_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "_MAX_BAD_PACKETS", 3)
    clip = tmp_path / "bad.mkv"
    intra_clip(clip, 10, damaged=(2, 3, 4, 5, 6))
    reader, frames = read_all(clip)
    # The decoder's threads report an error a packet or two late; the frames they still held are kept.
    assert [round(frame.time, 2) for frame in frames[:2]] == [0.0, 0.04] and len(frames) < 5
    assert all(frame.time is not None for frame in frames)
    assert f"bad.mkv: decoding stopped after {len(frames)} frames (3 damaged packets in a row" in str(reader.error)
    intra_clip(clip, 8, damaged=(0, 1, 2))
    with pytest.raises(BgmatteError, match="bad.mkv: no decodable video frame"):
        VideoReader(clip)


def huge_png(path: Path, width: int, height: int) -> None:
    """A small PNG whose header declares `width` x `height` (with a valid checksum), like a decompression bomb's."""
    data = bytearray(cv2.imencode(".png", np.zeros((2, 2), np.uint8))[1].tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_a_picture_declaring_too_many_pixels_is_refused_before_ffmpeg_opens_it(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    huge_png(bomb, 12000, 10000)
    opened = []
    monkeypatch.setattr(video_io.av, "open", lambda *args, **kwargs: opened.append(args))
    with pytest.raises(BgmatteError) as caught:
        VideoReader(bomb)
    assert str(caught.value) == (f"{bomb}: 12000x10000 is 120 megapixels, above the limit of 100 "
                                 "(refused as a possible decompression bomb)")
    assert opened == []


def test_a_video_above_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mkv"
    make_clip(clip, count=3, audio=False)
    decoded = []
    original = VideoReader._decode
    monkeypatch.setattr(VideoReader, "_decode", lambda self, packet: decoded.append(packet) or original(self, packet))
    with pytest.raises(BgmatteError, match=r"clip.mkv: 64x48 is 0.003072 megapixels, above the limit of 0.003 "):
        VideoReader(clip, max_pixels=3000)
    assert decoded == []
    with VideoReader(clip, max_pixels=None) as reader:
        assert len(list(reader)) == 3


def test_a_frame_that_grows_past_the_pixel_limit_in_mid_stream_ends_the_stream(tmp_path):
    parts = []
    for name, size in (("small.h264", (WIDTH, HEIGHT)), ("large.h264", (2 * WIDTH, 2 * HEIGHT))):
        part = tmp_path / name
        write_clip(part, [pattern(index, *size) for index in range(4)], audio=False)
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.h264"  # a raw stream whose size changes after four frames
    joined.write_bytes(b"".join(parts))
    reader, frames = read_all(joined)
    assert [frame.image.shape[:2] for frame in frames] == [(HEIGHT, WIDTH)] * 4 + [(2 * HEIGHT, 2 * WIDTH)] * 4
    with VideoReader(joined, max_pixels=WIDTH * HEIGHT) as reader:
        frames = list(reader)
    assert len(frames) == 4
    assert str(reader.error) == (f"{joined}: decoding stopped after 4 frames (frame 5 is 128x96, 0.01229 megapixels, "
                                 "above the limit of 0.003072)")


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_the_best_video_stream_is_read_never_a_cover_picture(tmp_path, suffix, caplog):
    """Matroska keeps a cover picture as a plain one-frame stream, here the first; MP4 marks it as one (and puts it
    last)."""
    clip = tmp_path / f"covered{suffix}"
    with av.open(str(clip), mode="w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        if suffix == ".mp4":
            cover.disposition = av.stream.Disposition.attached_pic
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        picture = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        picture.pts = 0
        container.mux(cover.encode(picture) + cover.encode(None))
        for index in range(5):
            frame = av.VideoFrame.from_ndarray(pattern(index), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    with caplog.at_level(logging.INFO, logger="bgmatte"):
        reader, frames = read_all(clip)
    assert len(frames) == 5 and reader.size == (WIDTH, HEIGHT) and reader.fps == 25
    index = 1 if suffix == ".mkv" else 0
    assert f"{clip}: reading video stream #{index} (h264 64x48) of its 2 video streams" in caplog.messages


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


@pytest.mark.parametrize("suffix", [".mkv", ".mp4", ".mov"])
@pytest.mark.parametrize("count", [8, 9, 11])  # x264's last frames: two B-frames after the last one, one, none
def test_the_file_ends_when_its_last_frame_has_shown_for_its_duration(tmp_path, suffix, count):
    """A frame written with its duration is the last: the file ends that long after it, whether B-frames are
    decoded after it or not (`write` took no duration, and the muxers gave the last frame a frame period: 0.32 s
    for 0.38 at 8 frames). Without one, it lasts the step from the frame before."""
    for duration, length in ((100, 0.04 * (count - 1) + 0.1), (None, 0.04 * count)):
        target = tmp_path / f"out{duration}{suffix}"
        with VideoWriter(target, fps=25, options=EncoderOptions(preset="medium", crf=30)) as writer:
            for index in range(count):
                image = pattern(index)
                image[20:40, 5 * index : 5 * index + 16] = 255  # motion, so that x264 chooses B-frames
                writer.write(image, 40 * index, MS, duration if index == count - 1 else None)
        with av.open(str(target)) as container:
            assert container.duration / 1e6 == pytest.approx(length, abs=1e-3), duration
        assert decode_times(target) == [round(0.04 * index, 4) for index in range(count)]


def test_the_last_frame_of_a_variable_rate_mkv_lasts_to_its_end(tmp_path):
    """Its frames do not say how long they show (the muxer wrote none but the DURATION tag): the last one, which the
    file ended after, lasts to the tagged end, and the last of a span to the frame that ended the span; the others
    say nothing."""
    clip = tmp_path / "vfr.mkv"
    durations = [later - earlier for earlier, later in zip(VFR_MS, VFR_MS[1:])] + [60]
    write_vfr_mkv(clip, [pattern(index) for index in range(len(VFR_MS))], VFR_MS, durations)
    _, frames = read_all(clip)
    assert [frame.duration for frame in frames] == [None] * (len(VFR_MS) - 1) + [60]
    with VideoReader(clip, start=0.2, duration=0.3) as reader:  # from 300 ms to 480 ms; 520 ms ends it
        span = list(reader)
    assert [frame.pts for frame in span] == [0, 40, 80, 90, 100, 140, 180]
    assert [frame.duration for frame in span] == [None] * 6 + [40]


def test_a_one_frame_clip_keeps_the_audio_of_its_frame(tmp_path):
    """Until a second frame gives the step, the last frame lasts one frame period: one at 1 fps keeps 1 s of audio."""
    source = tmp_path / "still.mp4"
    with av.open(str(source), mode="w") as container:
        video = container.add_stream("libx264", rate=1)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream("aac", rate=48000)
        sound.layout = "mono"
        frame = av.VideoFrame.from_ndarray(pattern(0), format="rgb24")
        frame.pts = 0
        container.mux(video.encode(frame) + video.encode(None))
        for start in range(0, 48960, 1024):  # 1.02 s
            tone = np.sin(np.arange(start, start + 1024) / 20).astype(np.float32)[None]
            chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, start
            container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
    target = tmp_path / "out.mp4"
    reader = copy_clip(source, target)
    assert reader.fps == 1 and reader.frames_read == 1
    assert audio_seconds(target) == pytest.approx(1.0, abs=0.05)


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


@pytest.mark.parametrize("pix_fmt", ["yuv422p10le", "yuva444p10le"])
def test_the_writers_conversion_by_ffmpegs_scaler_is_the_same_every_time(pix_fmt):
    """FFmpeg's scaler on several threads now and then garbles the rows where its slices meet, at heights such as
    66 (into these 10-bit formats, ProRes's, in about one conversion of ten here): the writer's runs on one."""
    rows, columns = np.mgrid[0:66, 0:98]
    image = np.dstack([40 + columns, 60 + rows * 2, 200 - columns, np.full_like(rows, 200)]).astype(np.uint8)
    image = image if video_io._has_alpha(pix_fmt) else np.ascontiguousarray(image[:, :, :3])

    def numbers(frame: av.VideoFrame) -> list[bytes]:
        return [np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width * 2].tobytes()
                for plane in frame.planes]

    first = numbers(video_io._video_frame(image, pix_fmt))
    assert all(numbers(video_io._video_frame(image, pix_fmt)) == first for _ in range(200))


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
    # Lossless (crf 0): x264's lossy output is not always bit-identical from one run to the next on a loaded
    # machine, while what a lower priority must not change is the frames.
    lossless = EncoderOptions(crf=0)
    with VideoWriter(tmp_path / "a.mp4", fps=25, options=lossless) as writer, \
            VideoWriter(tmp_path / "b.mp4", fps=25, niceness=5, options=lossless) as nicer:
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
    with pytest.raises(BgmatteError, match=r"a.mp4: crf 55 is out of H.264's range \(0-51\)"):
        choose_encoder(Path("a.mp4"), alpha=False, options=EncoderOptions(crf=55))
    assert choose_encoder(Path("a.webm"), alpha=False, options=EncoderOptions(crf=55)).options["crf"] == "55"


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


@pytest.mark.parametrize("codec", ["mpeg1video", "mpeg2video"])
@pytest.mark.parametrize(("suffix", "base", "fps"), [(".mkv", Fraction(1, 90000), 25),
                                                     (".mp4", Fraction(1, 30000), Fraction(30000, 1001))])
def test_mpeg_1_and_2_are_timed_in_frames_of_the_clips_rate(tmp_path, codec, suffix, base, fps):
    """MPEG-1 and MPEG-2 open only with a time base of one frame at one of their rates; given the source's (an MP4's
    1/12800, a transport stream's 1/90000) they refused to start, after the model had loaded."""
    target = tmp_path / f"out{suffix}"
    step = round(1 / (fps * base))
    with VideoWriter(target, fps=fps, options=EncoderOptions(codec=codec)) as writer:
        for index in range(5):
            writer.write(pattern(index), pts=step * index, time_base=base)
    assert decode_times(target) == [round(float(index / fps), 4) for index in range(5)]
    assert len(read_frames(target)) == 5


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
    if choose_encoder("a.mp4", alpha=False).codec != "libx264":
        pytest.skip("this PyAV has no libx264; its stand-in, MPEG-4 part 2, keeps odd sizes")
    target = tmp_path / "odd.mp4"
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.video"):
        with VideoWriter(target, fps=25, options=EncoderOptions(even=even)) as writer:
            for index in range(3):
                writer.write(pattern(index, 65, 47))
    reader, frames = read_all(target)
    assert reader.size == expected and len(frames) == 3
    told = [record.message for record in caplog.records if "65x47" in record.message]
    assert len(told) == 1 and f"{expected[0]}x{expected[1]}" in told[0]
    # It says why, what the extra or missing row and column are, and how to keep the exact size.
    assert "4:2:0" in told[0] and "2 pixels" in told[0]
    if even == "pad":
        assert "one pixel larger" in told[0] and "copies of the last" in told[0]
    else:
        assert "one pixel smaller" in told[0]
    assert all(way in told[0] for way in (".webm", "--codec ffv1", "--codec prores_ks", "PNG"))


def test_vp9_keeps_odd_sizes(tmp_path):
    target = tmp_path / "odd.webm"
    with VideoWriter(target, fps=25) as writer:
        for index in range(3):
            writer.write(pattern(index, 65, 47))
    assert read_all(target)[0].size == (65, 47)


def gradient(width: int, height: int) -> np.ndarray:
    """A smooth picture whose last row and column are the ends of its ramps, so that a lost or doubled edge shows."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.dstack([40 + 150 * columns / width, 60 + 130 * rows / height, 200 - 150 * columns / width]).astype(np.uint8)


@pytest.mark.parametrize(("suffix", "codec", "expected"), [
    (".mp4", "mpeg4", (97, 65)), (".mov", "mpeg4", (97, 65)), (".mkv", "mpeg4", (97, 65)), (".mkv", "ffv1", (97, 65)),
    (".mkv", "mjpeg", (97, 65)), (".webm", "libvpx", (97, 65)), (".mov", "prores_ks", (97, 65)),
    (".mkv", "libx264", (98, 66))])
def test_odd_sizes_are_kept_where_the_encoder_stores_them(tmp_path, suffix, codec, expected):
    """Encoders that store any size keep 97x65 exactly, edges included; ProRes keeps it in 4444 (4:2:2 cannot keep
    an odd width), and H.264 4:2:0 pads both sides (`EncoderOptions.even`) with copies of the last row and column."""
    target = tmp_path / f"odd{suffix}"
    image = gradient(97, 65)
    with VideoWriter(target, fps=25, options=EncoderOptions(codec=codec)) as writer:
        for _ in range(2):
            writer.write(image)
    with av.open(str(target)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == expected
        decoded = next(container.decode(video=0))
        assert (decoded.width, decoded.height) == expected
    reader, frames = read_all(target)
    assert reader.size == expected and frames[-1].image.shape == (expected[1], expected[0], 3)
    kept = frames[-1].image[:65, :97].astype(int)
    assert np.abs(kept - image).max() <= 10  # lossy, but the same picture
    assert np.abs(kept[:, -1] - image[:, -1]).mean() <= 4 and np.abs(kept[-1] - image[-1]).mean() <= 4
    padded = frames[-1].image.astype(int)
    if expected[0] > 97:  # the added column repeats the last one, not black
        assert np.abs(padded[:65, 97] - image[:, -1]).mean() <= 4
    if expected[1] > 65:
        assert np.abs(padded[65, :97] - image[-1]).mean() <= 4


def test_prores_keeps_an_odd_width_in_4444_and_says_so(tmp_path, caplog):
    """ProRes 4:2:2 cannot keep an odd width (FFmpeg's prores_ks spoils its last column), so such frames go to ProRes
    4444, which keeps the size; an even width stays 422 HQ, and odd heights need nothing."""
    kept = {}
    for width, height in ((97, 65), (98, 65)):
        target = tmp_path / f"prores{width}.mov"
        with caplog.at_level(logging.WARNING, logger="bgmatte.io.video"):
            with VideoWriter(target, fps=25, options=EncoderOptions(codec="prores_ks")) as writer:
                writer.write(gradient(width, height))
        with av.open(str(target)) as container:
            stream = container.streams.video[0]
            kept[width] = (stream.codec_context.width, stream.codec_context.height, stream.codec_context.profile,
                           stream.codec_context.pix_fmt[:7])  # FFmpeg decodes 4444 to 12 bits
    assert kept == {97: (97, 65, "4444", "yuv444p"), 98: (98, 65, "HQ", "yuv422p")}
    told = [record.message for record in caplog.records if "prores97.mov" in record.message]
    assert len(told) == 1 and "4444" in told[0] and "97x65" in told[0]
    assert not any("prores98.mov" in record.message for record in caplog.records)


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
    for name in ("0001.png", "0002.png", "00003.png"):  # an older, longer run
        (folder / name).write_bytes(b"old")
    with pytest.raises(BgmatteError, match="out: already exists"):
        ImageSequenceWriter(folder)
    with ImageSequenceWriter(folder, overwrite=True) as writer:
        writer.write(pattern(0))
    assert [path.name for path in folder.iterdir()] == ["0001.png"]
    assert (folder / "0001.png").read_bytes() != b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("other", ["clip.mp4", "notes.txt", "plate.png", ".hidden", "sub/",
                                   ".DS_Store/", "DS_Store", "Thumbs.db.bak"])  # only OS metadata files pass
def test_overwriting_an_image_sequence_never_deletes_anything_but_its_frames(tmp_path, other):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "0001.png").write_bytes(b"old frame")
    if other.endswith("/"):
        (folder / other).mkdir()
        (folder / other / "keep.txt").write_text("precious")
    else:
        (folder / other).write_text("precious")
    with pytest.raises(BgmatteError, match=rf"out: holds more than numbered PNG frames \({other.rstrip('/')}\)") as caught:
        ImageSequenceWriter(folder, overwrite=True)
    assert "\n" not in str(caught.value)
    assert sorted(path.name for path in folder.iterdir()) == sorted(["0001.png", other.rstrip("/")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no temporary folder left


@pytest.mark.parametrize("metadata", [".DS_Store", "Thumbs.db", "desktop.ini", "._0001.png"])
def test_overwriting_an_image_sequence_tolerates_os_metadata_files(tmp_path, metadata):
    """Finder and Explorer leave files in a folder merely opened: they must not block a rerun, and go with it."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "0001.png").write_bytes(b"old frame")
    (folder / metadata).write_bytes(b"\0" * 10)
    with ImageSequenceWriter(folder, overwrite=True) as writer:
        writer.write(pattern(0))
    assert [path.name for path in folder.iterdir()] == ["0001.png"]
    assert (folder / "0001.png").read_bytes() != b"old frame"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_overwriting_a_file_with_an_image_sequence_is_refused(tmp_path):
    notes = tmp_path / "notes"
    notes.write_text("precious")
    with pytest.raises(BgmatteError, match="notes: is a file, not a folder of PNG frames"):
        ImageSequenceWriter(notes, overwrite=True)
    assert notes.read_text() == "precious"


def test_something_put_in_the_folder_during_the_run_is_kept(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "0001.png").write_bytes(b"old frame")
    writer = ImageSequenceWriter(folder, overwrite=True)
    writer.write(pattern(0))
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(BgmatteError, match="holds more than numbered PNG frames.*the new frames are in"):
        writer.close()
    assert sorted(path.name for path in folder.iterdir()) == ["0001.png", "notes.txt"]
    assert (folder / "0001.png").read_bytes() == b"old frame"


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


# ------------------------------------------------------------------------------- audio the container refuses


def clip_with_audio(path: Path, codec: str, count: int = 10) -> None:
    """A `pattern` clip (H.264, 25 fps) whose sound, a 440 Hz tone as long as the video, is in `codec`."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream(codec, rate=48000)
        sound.layout = "stereo"
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(pattern(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        resampler = av.AudioResampler(format=sound.format.name, layout="stereo", rate=48000)
        for start in range(0, 48000 * count // 25, 1024):
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(start, start + 1024) / 48000)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
            for part in resampler.resample(frame):
                container.mux(sound.encode(part))
        container.mux(sound.encode(None))


@pytest.mark.parametrize(
    ("codec", "suffix", "expected"),
    [("flac", ".mov", "aac"), ("libopus", ".mov", "aac"), ("pcm_s16le", ".mp4", "aac"),
     ("flac", ".mp4", "flac"), ("libopus", ".mp4", "opus"), ("pcm_s16le", ".mov", "pcm_s16le"), ("flac", ".mkv", "flac")],
)
def test_audio_is_copied_only_where_the_container_takes_it_and_transcoded_elsewhere(tmp_path, codec, suffix, expected):
    """QuickTime lists Opus and FLAC and MP4 lists PCM, but their muxers refuse them when the header is written."""
    source = tmp_path / "src.mkv"
    clip_with_audio(source, codec)
    target = tmp_path / f"out{suffix}"
    copy_clip(source, target)
    assert [path.name for path in tmp_path.iterdir() if path.name != "src.mkv"] == [target.name]
    with av.open(str(target)) as container:
        assert container.streams.audio[0].codec_context.codec.canonical_name == expected
    assert len(read_all(target)[1]) == 10
    assert audio_seconds(target) == pytest.approx(0.4, abs=0.06)


def test_audio_the_muxer_refuses_at_the_header_is_transcoded_instead(tmp_path, monkeypatch, caplog):
    """Should a muxer refuse a codec believed to fit, the file is started again with the audio transcoded."""
    monkeypatch.setitem(video_io._COPIED_AUDIO, "mov", video_io._COPIED_AUDIO["mov"] | {"flac"})
    source = tmp_path / "src.mkv"
    clip_with_audio(source, "flac")
    target = tmp_path / "out.mov"
    with caplog.at_level(logging.INFO, logger="bgmatte.io.video"):
        copy_clip(source, target)
    with av.open(str(target)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    assert "refused the flac audio" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.mov", "src.mkv"]


def test_a_file_that_cannot_start_fails_the_first_write_once_and_leaves_nothing(tmp_path, caplog):
    folder = tmp_path / "gone"
    target = folder / "out.mp4"
    writer = VideoWriter(target, fps=25)
    folder.rmdir()  # the folder disappears before the first frame
    with caplog.at_level(logging.WARNING), pytest.raises(BgmatteError) as caught:
        with writer:
            writer.write(pattern(0))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{target}: could not start the file") and "nothing was written" in message
    assert "while closing" not in caplog.text and "no frames were written" not in caplog.text
    assert writer.close() is None and list(tmp_path.iterdir()) == []


def test_a_failure_is_raised_once_even_when_close_follows(tmp_path):
    folder = tmp_path / "gone"
    writer = VideoWriter(folder / "out.mp4", fps=25)
    folder.rmdir()
    with pytest.raises(BgmatteError, match="could not start"):
        writer.write(pattern(0))
    with pytest.raises(BgmatteError, match="could not start"):  # the worker keeps refusing frames
        writer.write(pattern(1))
    assert writer.close() is None  # no third time


def test_the_first_write_raises_a_start_failure_the_worker_records_late(tmp_path, monkeypatch):
    """The worker records a failure only once `_encode` has returned; the first write must not depend on it."""
    encode = VideoWriter._encode

    def late(self, item):
        try:
            encode(self, item)
        except BaseException:
            time.sleep(0.3)  # the window in which the worker has not stored the error yet, made wide
            raise

    monkeypatch.setattr(VideoWriter, "_encode", late)
    folder = tmp_path / "gone"
    writer = VideoWriter(folder / "out.mp4", fps=25)
    folder.rmdir()
    with pytest.raises(BgmatteError, match="could not start the file"):
        writer.write(pattern(0))
    assert writer.close() is None  # raised once, by the write
    assert list(tmp_path.iterdir()) == []


def counted_starts(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every `VideoWriter._start`, which still runs."""
    calls: list[dict] = []
    start = VideoWriter._start

    def counting(self, **kwargs):
        calls.append(kwargs)
        return start(self, **kwargs)

    monkeypatch.setattr(VideoWriter, "_start", counting)
    return calls


def test_a_start_that_fails_for_the_video_does_not_blame_copied_audio(tmp_path, monkeypatch, caplog):
    """x264 refuses a 20000x16 frame: the file is not started again with the audio transcoded, nor said to be."""
    source = tmp_path / "src.mp4"
    make_clip(source, count=3)
    starts = counted_starts(monkeypatch)
    target = tmp_path / "wide.mp4"
    with caplog.at_level(logging.INFO, logger="bgmatte.io.video"), pytest.raises(BgmatteError) as caught:
        with VideoWriter(target, fps=25, audio_from=source) as writer:
            writer.write(np.zeros((16, 20000, 3), np.uint8))
    assert str(caught.value).startswith(f"{target}: could not start the file (libx264 video 20000x16)")
    assert len(starts) == 1 and "refused the aac audio" not in caplog.text and "transcoding" not in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src.mp4"]


def test_a_file_that_cannot_be_created_does_not_blame_copied_audio_and_warns_once(tmp_path, monkeypatch, caplog):
    """With copied audio, a failed start is tried once without audio: failing too, it is not the audio's, and the
    file is not started again with the audio transcoded; the warning about the pixel shape comes once."""
    source = tmp_path / "src.mp4"
    make_clip(source, count=3)
    starts = counted_starts(monkeypatch)
    folder = tmp_path / "gone"
    folder.mkdir()
    writer = VideoWriter(folder / "out.mkv", fps=25, audio_from=source, options=EncoderOptions(codec="ffv1"),
                         display=video_io.Display(Fraction(4, 3)))
    folder.rmdir()
    with caplog.at_level(logging.INFO, logger="bgmatte.io.video"), pytest.raises(BgmatteError) as caught:
        with writer:
            writer.write(pattern(0))
    assert "could not start the file (ffv1 video 64x48 with aac audio)" in str(caught.value)
    assert starts == [{"copy_audio": True}, {"copy_audio": False, "audio": False}]
    assert "refused the aac audio" not in caplog.text
    assert caplog.text.count("cannot record the source's non-square pixels") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src.mp4"]


def test_a_pipeline_output_that_cannot_start_gives_one_error_and_no_frame_count(tmp_path, monkeypatch, caplog):
    from media import DifferenceModel, make_clip as make_scene, plate_image

    from bgmatte.pipeline import convert_video

    def refuse(self, *, copy_audio, audio=True):
        raise OSError("the muxer refused")

    monkeypatch.setattr(VideoWriter, "_start", refuse)
    clip = tmp_path / "clip.mp4"
    make_scene(clip, count=4)
    with caplog.at_level(logging.WARNING), pytest.raises(BgmatteError) as caught:
        convert_video(clip, plate_image(), output=tmp_path / "out.mov", model=DifferenceModel(), progress=False)
    assert str(caught.value) == f"{tmp_path / 'out.mov'}: could not start the file (libx264 video 96x64): " \
                                "the muxer refused; nothing was written"
    assert "outputs hold" not in caplog.text and "while closing" not in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clip.mp4"]


# ------------------------------------------------------------------------------------------- forced encoders


def test_a_forced_encoder_gets_a_pixel_format_it_opens_with(tmp_path):
    """MJPEG lists yuv420p but opens only with full-swing YUV: it gets yuvj420p, and its colours stay right."""
    options = EncoderOptions(codec="mjpeg")
    assert choose_encoder(tmp_path / "a.mkv", alpha=False, options=options).pix_fmt == "yuvj420p"
    target = tmp_path / "a.mkv"
    with VideoWriter(target, fps=25, options=options) as writer:
        for index in range(3):
            writer.write(pattern(index))
    reader, frames = read_all(target)
    assert len(frames) == 3
    assert np.abs(frames[2].image.astype(int) - pattern(2).astype(int))[16:, 16:].max() <= 3


@pytest.mark.parametrize(
    ("name", "codec", "alpha", "expected"),
    [
        ("a.mov", "libvpx-vp9", False, "libvpx-vp9 does not work in .mov files"),
        ("a.webm", "mjpeg", False, "mjpeg does not work in .webm files"),
        ("a.mkv", "gif", False, "gif takes none of the pixel formats"),
        ("a.mkv", "aac", False, "'aac' is an audio encoder"),
        ("a.mkv", "libx264", True, "libx264 cannot keep transparency"),
    ],
)
def test_a_forced_encoder_that_cannot_work_is_refused_at_once(tmp_path, name, codec, alpha, expected):
    with pytest.raises(BgmatteError) as caught:
        VideoWriter(tmp_path / name, alpha=alpha, options=EncoderOptions(codec=codec))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name}: ") and expected in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "alias", "encoder", "settings", "any_size"), [
    ("a.mp4", "h264", "libx264", {"crf": "10", "preset": "slow"}, False),
    ("a.webm", "vp9", "libvpx-vp9", {"crf": "10", "deadline": "good", "row-mt": "1"}, True),
    ("a.mov", "hevc", "libx265", {"x265-params": "log-level=error"}, False),
])
def test_a_forced_encoder_named_by_its_format_is_the_encoder_ffmpeg_gives_for_it(name, alias, encoder, settings,
                                                                                  any_size):
    """`--codec h264` (as ffmpeg's -c:v takes it) opens libx264, but was taken for a foreign encoder: --crf and --preset
    were dropped, with a warning that only H.264 takes a crf, and so were the defaults (x264's medium preset ran on
    the CPU); vp9 lost its settings and padded odd sizes that VP9 keeps, hevc let x265 fill stderr. Now the name is
    the encoder's own."""
    if not video_io._encoder_available(encoder):
        pytest.skip(f"no {encoder} in this PyAV")
    choice = choose_encoder(name, alpha=False, options=EncoderOptions(codec=alias, crf=10, preset="slow"))
    assert choice.codec == encoder
    assert settings.items() <= choice.options.items()
    assert choice.even_sides == ((False, False) if any_size else (True, True))


needs_h263 = pytest.mark.skipif(not video_io._encoder_available("h263"), reason="no H.263 encoder in this PyAV")


@needs_h263
def test_a_forced_encoder_that_takes_only_some_sizes_is_tried_at_the_frames_size(tmp_path):
    """H.263 takes 352x288 (CIF) but not the 320x240 of the early check: the frames' own size decides."""
    options = EncoderOptions(codec="h263")
    assert choose_encoder(tmp_path / "a.mov", alpha=False, options=options).provisional
    assert not choose_encoder(tmp_path / "a.mov", alpha=False, options=options, size=(352, 288)).provisional
    target = tmp_path / "cif.mov"
    with VideoWriter(target, fps=25, options=options) as writer:
        for index in range(3):
            writer.write(pattern(index, 352, 288))
    reader, frames = read_all(target)
    assert reader.size == (352, 288) and len(frames) == 3
    with av.open(str(target)) as container:
        assert container.streams.video[0].codec_context.name == "h263"
    # A size it does not take is refused at the first frame, in one line, with nothing left behind.
    other = tmp_path / "other.mov"
    writer = VideoWriter(other, fps=25, options=options)
    with pytest.raises(BgmatteError) as caught:
        writer.write(pattern(0, 300, 200))
    message = str(caught.value)
    assert message.startswith(f"{other}: the encoder h263 does not take 300x200 frames") and "\n" not in message
    assert writer.close() is None
    with pytest.raises(BgmatteError, match=r"other\.mov: the encoder h263 does not take 300x200 frames"):
        choose_encoder(other, alpha=False, options=options, size=(300, 200))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cif.mov"]


@needs_h263
def test_the_pipeline_tries_a_forced_encoder_at_the_output_size(tmp_path, monkeypatch):
    from media import DifferenceModel, make_clip as make_scene, plate_image

    import bgmatte.pipeline as pipeline

    clip = tmp_path / "clip.mp4"
    make_scene(clip, count=3)  # 96x64, which H.263 does not take
    load_predictor = pipeline.load_predictor

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_predictor", no_model)
    with pytest.raises(BgmatteError, match=r"out\.mov: the encoder h263 does not take 96x64 frames"):
        pipeline.convert_video(clip, plate_image(), output=tmp_path / "out.mov", encoder=EncoderOptions(codec="h263"),
                               progress=False)
    monkeypatch.setattr(pipeline, "load_predictor", load_predictor)
    pipeline.convert_video(clip, plate_image(), output=tmp_path / "out.mov", encoder=EncoderOptions(codec="h263"),
                           resize=(176, 144), model=DifferenceModel(), progress=False)
    reader, frames = read_all(tmp_path / "out.mov")
    assert reader.size == (176, 144) and len(frames) == 3


def test_the_pipeline_tries_a_forced_encoder_once_per_output_with_the_settings_it_encodes_with(tmp_path, monkeypatch):
    """The early check is the only try: made at the frames' size with the CPU run's settings (x264's
    ultrafast preset), whose choice the writers then take as it is."""
    from media import HEIGHT, WIDTH, DifferenceModel, make_clip as make_scene, plate_image

    import bgmatte.pipeline as pipeline

    clip = tmp_path / "clip.mp4"
    make_scene(clip, count=3)
    probe, tries = video_io._try_encoder.__wrapped__, []  # the probe itself, past its cache

    def counted(container, codec, pix_fmt, settings, size):
        tries.append((codec, dict(settings).get("preset"), size))
        return probe(container, codec, pix_fmt, settings, size)

    monkeypatch.setattr(video_io, "_try_encoder", counted)
    codec = "libx264" if video_io._encoder_available("libx264") else "mpeg4"
    result = pipeline.convert_video(clip, plate_image(), output=tmp_path / "out.mp4", outputs=["com", "pha"],
                                    encoder=EncoderOptions(codec=codec), model=DifferenceModel(), progress=False)
    preset = "ultrafast" if codec == "libx264" else None
    assert tries == [(codec, preset, (WIDTH, HEIGHT))] * 2  # two outputs, one try each
    assert [len(read_all(path)[1]) for path in result.outputs.values()] == [3, 3]


def test_the_pipeline_refuses_a_forced_encoder_before_loading_the_model(tmp_path, monkeypatch):
    from media import make_clip as make_scene, plate_image

    import bgmatte.pipeline as pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_predictor", no_model)
    clip = tmp_path / "clip.mp4"
    make_scene(clip, count=3)
    with pytest.raises(BgmatteError, match=r"out\.mov: the encoder libvpx-vp9 does not work in \.mov files"):
        pipeline.convert_video(clip, plate_image(), output=tmp_path / "out.mov", encoder=EncoderOptions(codec="libvpx-vp9"),
                               progress=False)


# ------------------------------------------------------------------------------------ pixel shape and colour


def anamorphic_clip(path: Path, ratio: Fraction, *, rotation: float | None = None, count: int = 3,
                    tags: tuple[int, int, int] | None = None) -> None:
    """A `pattern` clip (H.264) whose pixels are `ratio` times as wide as high, optionally rotated and tagged
    with (matrix, primaries, transfer) codes, its pixels converted with that matrix (BT.709 or BT.601)."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=25, options={"crf": "12"})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.codec_context.sample_aspect_ratio = ratio
        if tags is not None:
            context = video.codec_context
            context.colorspace, context.color_primaries, context.color_trc, context.color_range = (*tags, 1)
        if rotation is not None:
            video.set_display_rotation(rotation)
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(pattern(index), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709" if tags and tags[0] == 1 else "ITU601")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))


def stream_shape(path: Path) -> tuple[tuple[int, int], Fraction | None]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return (stream.codec_context.width, stream.codec_context.height), stream.sample_aspect_ratio


def test_the_reader_gives_the_pixel_shape_upright_and_at_other_sizes(tmp_path):
    clip = tmp_path / "wide.mp4"
    anamorphic_clip(clip, Fraction(4, 3))
    with VideoReader(clip) as reader:
        assert reader.display.sample_aspect_ratio == Fraction(4, 3)  # 64x48 shown as 85x48
        assert reader.display_at(WIDTH // 2, HEIGHT // 2).sample_aspect_ratio == Fraction(4, 3)
        assert reader.display_at(128, 72).sample_aspect_ratio == 1  # resized to the display shape
        assert reader.display_at(WIDTH, WIDTH).sample_aspect_ratio == Fraction(16, 9)
    turned = tmp_path / "turned.mp4"
    anamorphic_clip(turned, Fraction(4, 3), rotation=90)
    with VideoReader(turned) as reader:
        assert reader.size == (HEIGHT, WIDTH) and reader.display.sample_aspect_ratio == Fraction(3, 4)
    make_clip(tmp_path / "square.mp4", count=2, audio=False)
    with VideoReader(tmp_path / "square.mp4") as reader:
        assert reader.display.sample_aspect_ratio == 1


@pytest.mark.parametrize(("suffix", "alpha"), [(".mp4", False), (".mov", False), (".mkv", False), (".mov", True)])
def test_non_square_pixels_are_carried_to_the_output(tmp_path, suffix, alpha):
    source = tmp_path / "wide.mp4"
    anamorphic_clip(source, Fraction(4, 3))
    target = tmp_path / f"out{suffix}"
    with VideoReader(source) as reader, VideoWriter(target, fps=25, alpha=alpha, display=reader.display) as writer:
        for frame in reader:
            writer.write(np.dstack([frame.image, np.full(frame.image.shape[:2], 255, np.uint8)]) if alpha else frame.image)
    assert stream_shape(target) == ((WIDTH, HEIGHT), Fraction(4, 3))


def test_formats_that_cannot_record_the_pixel_shape_say_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.video"):
        with VideoWriter(tmp_path / "out.webm", fps=25, display=video_io.Display(Fraction(4, 3))) as writer:
            writer.write(pattern(0))
    assert "out.webm: libvpx-vp9 in .webm cannot record the source's non-square pixels" in caplog.text


def test_the_pipeline_keeps_the_display_shape_also_when_resizing(tmp_path):
    from media import DifferenceModel

    from bgmatte.pipeline import convert_video

    clip = tmp_path / "wide.mp4"
    anamorphic_clip(clip, Fraction(4, 3), count=4)
    plate = pattern(0)
    convert_video(clip, plate, output=tmp_path / "same.mp4", outputs=["com", "pha"], model=DifferenceModel(), progress=False)
    assert stream_shape(tmp_path / "same.mp4") == ((WIDTH, HEIGHT), Fraction(4, 3))
    assert stream_shape(tmp_path / "same_pha.mp4") == ((WIDTH, HEIGHT), Fraction(4, 3))
    convert_video(clip, plate, output=tmp_path / "square.mp4", resize=(128, 72), model=DifferenceModel(), progress=False)
    assert stream_shape(tmp_path / "square.mp4") == ((128, 72), None)  # square pixels: nothing to record


COLOURS = [(200, 60, 40), (40, 200, 60), (40, 60, 200), (120, 250, 155), (230, 180, 140)]


def colour_bars(width: int, height: int, alpha: bool = False) -> np.ndarray:
    image = np.zeros((height, width, 4 if alpha else 3), np.uint8)
    for index, colour in enumerate(COLOURS):
        image[:, index * width // 5:(index + 1) * width // 5, :3] = colour
    if alpha:
        image[..., 3] = 255
    return image


def bar_colours(image: np.ndarray) -> np.ndarray:
    width = image.shape[1]
    return np.array([image[image.shape[0] // 2, (2 * index + 1) * width // 10, :3] for index in range(5)], int)


@pytest.mark.parametrize(
    ("suffix", "alpha", "size", "matrix", "primaries"),
    [(".mp4", False, (1280, 720), 1, 1), (".mp4", False, (320, 240), 6, 6), (".webm", False, (1280, 720), 1, 1),
     (".webm", True, (320, 240), 6, 6), (".mov", True, (1280, 720), 1, 1), (".mkv", True, (320, 240), 0, 6)],
    ids=["h264-hd", "h264-sd", "vp9-hd", "vp9-alpha", "prores-hd", "ffv1-rgb"],
)
def test_outputs_are_tagged_with_the_colours_their_numbers_are_in(tmp_path, suffix, alpha, size, matrix, primaries):
    """Untagged HD is taken for BT.709 by players: the writers make HD with it, SD with BT.601, and say so;
    decoding by the tags must give back the colours written."""
    target = tmp_path / f"bars{suffix}"
    with VideoWriter(target, fps=25, alpha=alpha) as writer:
        for _ in range(2):
            writer.write(colour_bars(*size, alpha))
    with av.open(str(target)) as container:
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_primaries, context.color_trc) == (matrix, primaries, primaries)
        assert context.color_range == (0 if matrix == 0 else 1)
    _, frames = read_all(target)  # the reader decodes by the tags
    assert np.abs(bar_colours(frames[-1].image) - np.array(COLOURS)).max() <= 3


def test_the_sources_matrix_primaries_and_transfer_are_carried(tmp_path):
    source = tmp_path / "tagged.mp4"
    anamorphic_clip(source, Fraction(1), tags=(1, 1, 1))  # BT.709 throughout, at SD size
    target = tmp_path / "out.mp4"
    with VideoReader(source) as reader, VideoWriter(target, fps=25, display=reader.display) as writer:
        assert (reader.display.colorspace, reader.display.color_primaries, reader.display.color_trc) == (1, 1, 1)
        images = [frame.image for frame in reader]
        for image in images:
            writer.write(image)
    assert np.abs(images[1].astype(int) - pattern(1).astype(int))[16:, 16:].max() <= 3  # read by its BT.709 tag
    with av.open(str(target)) as container:
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_primaries, context.color_trc, context.color_range) == (1, 1, 1, 1)
    _, frames = read_all(target)
    assert np.abs(frames[1].image.astype(int) - images[1].astype(int))[16:, 16:].max() <= 3


# (Kr, Kb) of the matrices the colour tests use, to make and check Y'CbCr numbers without FFmpeg or the writer.
LUMA_WEIGHTS = {1: (0.2126, 0.0722), 6: (0.299, 0.114)}
PATCHES = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 120, 40)]  # saturated red, green and blue, and a skin tone


def patches(width: int, height: int) -> np.ndarray:
    """`PATCHES` as four bands side by side, each a whole number of 16-pixel blocks wide where the size allows."""
    image = np.zeros((height, width, 3), np.uint8)
    for index, colour in enumerate(PATCHES):
        image[:, index * width // 4:(index + 1) * width // 4] = colour
    return image


def patch_colours(image: np.ndarray) -> np.ndarray:
    width = image.shape[1]
    return np.array([image[image.shape[0] // 2, (2 * index + 1) * width // 8, :3] for index in range(4)], int)


def ycbcr(image: np.ndarray, matrix: int, full: bool = False) -> list[np.ndarray]:
    """Y', Cb and Cr planes (full size) of uint8 RGB by the textbook formulas for `matrix`, studio or full swing."""
    kr, kb = LUMA_WEIGHTS[matrix]
    r, g, b = (image[..., channel].astype(np.float64) / 255 for channel in range(3))
    y = kr * r + (1 - kr - kb) * g + kb * b
    cb, cr = (b - y) / (2 * (1 - kb)), (r - y) / (2 * (1 - kr))
    luma, chroma = (255, 255) if full else (219, 224)
    planes = (16 * (not full) + luma * y, 128 + chroma * cb, 128 + chroma * cr)
    return [np.clip(np.round(plane), 0, 255).astype(np.uint8) for plane in planes]


def matrix_clip(path: Path, size: tuple[int, int], matrix: int, tag: int | None, *, full: bool = False) -> None:
    """Two frames of `patches` in H.264, their Y'CbCr made here with `matrix` and tagged `tag` (None: untagged),
    full swing in yuvj420p when `full`."""
    width, height = size
    pix_fmt = "yuvj420p" if full else "yuv420p"
    y, cb, cr = ycbcr(patches(width, height), matrix, full)
    planes = np.concatenate([y, cb[::2, ::2].reshape(height // 4, width), cr[::2, ::2].reshape(height // 4, width)])
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=25, options={"crf": "10", "preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        if tag is not None:
            video.codec_context.colorspace = tag
        video.codec_context.color_range = 2 if full else 1
        for index in range(2):
            frame = av.VideoFrame.from_ndarray(planes, format=pix_fmt)
            frame.colorspace = tag if tag is not None else 2
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))


@pytest.mark.parametrize(("size", "matrix", "tag", "full"), [
    ((320, 240), 1, 1, False), ((1280, 720), 1, 1, False), ((1280, 720), 1, None, False),
    ((320, 240), 6, None, False), ((320, 240), 6, 6, True), ((1280, 720), 1, 1, True)],
    ids=["bt709-tagged-sd", "bt709-tagged-hd", "untagged-hd", "untagged-sd", "yuvj-bt601", "yuvj-bt709"])
def test_the_reader_converts_by_the_sources_matrix(tmp_path, size, matrix, tag, full):
    """Tagged sources are read by their tag; untagged ones as players take them (BT.709 for HD, BT.601 below)."""
    clip = tmp_path / "patches.mp4"
    matrix_clip(clip, size, matrix, tag, full=full)
    with VideoReader(clip) as reader:
        assert reader.display.colorspace == tag
        images = [frame.image for frame in reader]
    assert np.abs(patch_colours(images[-1]) - np.array(PATCHES)).max() <= 3


@pytest.mark.parametrize(("size", "matrix", "primaries"), [((1280, 720), 1, 1), ((640, 360), 6, 6), ((720, 576), 6, 5)],
                         ids=["hd", "sd", "pal"])
def test_the_writer_uses_the_matrix_players_assume_at_the_size(tmp_path, size, matrix, primaries):
    """HD outputs are BT.709 throughout, which players that ignore the matrix tag assume for HD; smaller ones
    BT.601: their numbers are made with that matrix, so that they are right also for a player that ignores
    the tags, and the round trip through the reader keeps the colours."""
    target = tmp_path / "patches.mp4"
    with VideoWriter(target, fps=25) as writer:
        for _ in range(2):
            writer.write(patches(*size))
    with av.open(str(target)) as container:
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_primaries) == (matrix, primaries)
        assert context.color_trc == (1 if matrix == 1 else 6)
        frame = next(container.decode(video=0))
    width, height = size
    numbers = frame.to_ndarray(format="yuv420p")
    expected = ycbcr(patches(*size), matrix)
    centres = [(2 * index + 1) * width // 8 for index in range(4)]
    luma = numbers[height // 2, centres].astype(int)
    cb = numbers[height + height // 8, [centre // 2 for centre in centres]].astype(int)  # rows of two halves each
    assert np.abs(luma - expected[0][height // 2, centres]).max() <= 2
    assert np.abs(cb - expected[1][height // 2, centres]).max() <= 2
    _, frames = read_all(target)
    assert np.abs(patch_colours(frames[-1].image) - np.array(PATCHES)).max() <= 3


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_a_source_matrix_is_kept_whatever_the_size(tmp_path, pix_fmt):
    """A source that says its matrix keeps it (BT.709 at an SD size here, BT.601 at HD), the pixels made with it."""
    for size, matrix in (((320, 240), 1), ((1280, 720), 6)):
        target = tmp_path / f"{matrix}.mkv"
        choice = replace(choose_encoder(target, alpha=False), pix_fmt=pix_fmt)  # the scaler makes yuv444p
        with VideoWriter(target, fps=25, choice=choice, display=video_io.Display(colorspace=matrix)) as writer:
            writer.write(patches(*size))
        with av.open(str(target)) as container:
            assert container.streams.video[0].codec_context.colorspace == matrix
            frame = next(container.decode(video=0))
        plane = frame.planes[0]
        luma = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :size[0]]  # Y' as it is
        expected = ycbcr(patches(*size), matrix)[0]
        assert np.abs(luma[size[1] // 2].astype(int) - expected[size[1] // 2]).max() <= 2
        _, frames = read_all(target)
        assert np.abs(patch_colours(frames[0].image) - np.array(PATCHES)).max() <= 3


@pytest.mark.parametrize("matrix", [1, 6])
def test_yuv_conversion_takes_the_matrix(matrix):
    """`to_yuv420p`'s numbers are those of the textbook formulas for the matrix it is given."""
    image = patches(64, 32)
    ours = to_yuv420p(image, matrix)
    y, cb, cr = ycbcr(image, matrix)
    assert np.abs(ours[:32].astype(int) - y).max() <= 1
    assert np.abs(ours[32:40].reshape(16, 32).astype(int) - cb[::2, ::2]).max() <= 1
    assert np.abs(ours[40:].reshape(16, 32).astype(int) - cr[::2, ::2]).max() <= 1


def test_a_forced_encoder_is_not_refused_for_a_muxer_that_cannot_finish_a_one_frame_probe():
    # x265 into MP4 fails only when a one-frame in-memory file is finished; real files of it are fine.
    choice = choose_encoder(Path("a.mp4"), alpha=False, options=EncoderOptions(codec="libx265"), size=(64, 64))
    assert choice.codec == "libx265"


# ------------------------------------------------------------------------------------------- several audio tracks


# (codec, frequency, sample rate, layout, language, title) of each track of `clip_with_tracks`'s source.
TRACKS = [("aac", 440, 48000, "stereo", "eng", "Mic"), ("flac", 1000, 44100, "mono", "fra", "Desktop")]


def clip_with_tracks(path: Path, tracks: list[tuple] = TRACKS, count: int = 10, seconds: float = 0.6, *,
                     image=pattern, video_options: dict[str, str] | None = None, interleaved: bool = True,
                     lengths: list[float] | None = None) -> None:
    """A clip of `image(index)` frames (H.264, 25 fps) with one tone per entry of `tracks` (its frequency a number,
    or a function of the times), each `seconds` long (longer than the video, so that the writer must cut them) or as
    long as `lengths` says, tagged with its language and title where given. Not `interleaved`: the file holds the
    video, then the whole of each track, one after another (the muxer writes each packet as it comes)."""
    options = {} if interleaved else {"max_interleave_delta": "1"}
    with av.open(str(path), mode="w", options=options) as container:
        video = container.add_stream("libx264", rate=25, options=video_options or {})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sounds = []
        for codec, _, rate, layout, language, title in tracks:
            sound = container.add_stream(codec, rate=rate)
            sound.layout = layout
            for key, value in (("language", language), ("title", title)):
                if value:
                    sound.metadata[key] = value
            sounds.append(sound)
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(image(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for sound, (_, frequency, rate, layout, _, _), length in zip(sounds, tracks, lengths or [seconds] * len(tracks)):
            resampler = av.AudioResampler(format=sound.format.name, layout=layout, rate=rate)
            channels = 1 if layout == "mono" else 2
            for start in range(0, int(rate * length), 1024):
                times = np.arange(start, start + 1024) / rate
                pitch = frequency(times) if callable(frequency) else frequency
                tone = (0.2 * np.sin(2 * np.pi * pitch * times)).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(np.stack([tone] * channels), format="fltp", layout=layout)
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                for part in resampler.resample(frame):
                    container.mux(sound.encode(part))
            container.mux(sound.encode(None))


def surround_clip(path: Path, codec: str, layout: str, channels: int) -> list[float]:
    """A 0.4 s clip with one audio track of `channels` channels, each a tone of its own, 0.6 s long (the writer cuts
    it); the tones."""
    tones = [300.0 + 200 * channel for channel in range(channels)]
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream(codec, rate=48000)
        sound.layout = layout
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(pattern(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        resampler = av.AudioResampler(format=sound.format.name, layout=layout, rate=48000)
        for start in range(0, 48000 * 3 // 5, 1024):
            times = np.arange(start, start + 1024) / 48000
            samples = np.stack([0.2 * np.sin(2 * np.pi * tone * times) for tone in tones], -1).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout=layout)  # interleaved
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
            for part in resampler.resample(frame):
                container.mux(sound.encode(part))
        container.mux(sound.encode(None))
    return tones


def channel_tones(path: Path) -> tuple[str, list[float]]:
    """The first audio track's codec and the dominant frequency of each of its channels."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packed = av.AudioResampler(format="flt", rate=stream.rate)  # PyAV crashes on planar arrays of 8 channels
        samples = np.concatenate([part.to_ndarray().reshape(-1, stream.channels) for frame in container.decode(stream)
                                  for part in packed.resample(frame)])
        return stream.codec_context.name, [dominant_frequency(channel, stream.rate) for channel in samples.T]


@pytest.mark.parametrize(("source_name", "codec", "layout", "suffix", "low"), [
    ("camera.mov", "pcm_s24le", "4.0", ".mp4", None),  # four microphones: AAC 4.0
    ("camera.mov", "pcm_s24le", "4.0", ".webm", None),  # Opus takes them as "quad"
    ("mix.mkv", "pcm_s16le", "5.1", ".mp4", 3),  # Matroska names no PCM channel: AAC 5.1
    ("mix.mkv", "flac", "5.1", ".mov", 3),
    ("wide.mp4", "aac", "7.1(wide)", ".webm", None),  # AAC read back as "8 channels", planar: Opus 7.1
    ("mix.mkv", "pcm_s16le", "7.1", ".mp4", 3),  # eight planar channels cut at the video's end
    ("rear.mov", "pcm_s16le", "quad", ".mp4", None),  # its own layouts where AAC keeps them: the rear pair
    ("hex.mov", "pcm_s16le", "6.0", ".mp4", None),  # and a back-centre channel, not low-passed as 5.1's fourth
])
def test_a_transcoded_track_keeps_each_of_its_channels(tmp_path, source_name, codec, layout, suffix, low):
    """More than two channels were mixed down to stereo whenever the track was transcoded; now each channel goes
    through as it is, under the standard layout of its count (AAC's low-frequency channel, the fourth of 5.1,
    keeps only its lowest notes)."""
    source = tmp_path / source_name
    tones = surround_clip(source, codec, layout, len(av.AudioLayout(layout).channels))
    target = tmp_path / f"out{suffix}"
    copy_clip(source, target)
    name, heard = channel_tones(target)
    assert name == ("opus" if suffix == ".webm" else "aac") and len(heard) == len(tones)
    assert mono_samples(target)[0].size == pytest.approx(0.4 * 48000, abs=1100)  # cut with the video
    if layout == "quad":
        with av.open(str(target)) as container:
            assert container.streams.audio[0].layout.name == "quad"  # not 4.0, which has no rear pair
    for channel, (tone, got) in enumerate(zip(tones, heard)):
        if channel != low:
            assert got == pytest.approx(tone, abs=15)


@pytest.mark.parametrize(("layout", "suffix", "codec"), [("5.1.4", ".mp4", "aac"), ("5.0", ".webm", "libopus")])
def test_a_track_whose_channels_the_encoder_cannot_keep_is_mixed_down_to_stereo_with_a_warning(tmp_path, caplog,
                                                                                              layout, suffix, codec):
    """More than 8 channels; or 5 (and 7) into Opus, which FFmpeg's libopus gives back shuffled."""
    source = tmp_path / "array.mkv"
    count = len(av.AudioLayout(layout).channels)
    surround_clip(source, "pcm_s16le", layout, count)
    target = tmp_path / f"out{suffix}"
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        copy_clip(source, target)
    assert len(channel_tones(target)[1]) == 2
    assert f"{source}: audio has {count} channels, which {codec} cannot keep; they are mixed down to stereo" in \
        caplog.text


def audio_tracks(path: Path) -> list[dict]:
    """Each audio track of a file, in order: codec, language, title (MP4 reads it back as 'name'), the seconds
    it decodes to and its dominant frequency."""
    with av.open(str(path)) as container:
        count = len(container.streams.audio)
    tracks = []
    for track in range(count):
        samples, rate = mono_samples(path, track)
        with av.open(str(path)) as container:
            stream = container.streams.audio[track]
            tracks.append({
                "codec": stream.codec_context.name,
                "language": stream.metadata.get("language"),
                "title": stream.metadata.get("title") or stream.metadata.get("name"),
                "seconds": samples.size / rate,
                "frequency": dominant_frequency(samples, rate),
            })
    return tracks


@pytest.mark.parametrize(("suffix", "codecs"), [(".mp4", ["aac", "flac"]), (".mkv", ["aac", "flac"]),
                                                (".mov", ["aac", "aac"]), (".webm", ["opus", "opus"])])
def test_every_audio_track_is_carried_in_order_with_its_language_and_cut_to_the_video(tmp_path, suffix, codecs):
    """Mic and desktop, or several languages: each track is copied where the container takes it (FLAC is
    transcoded in .mov, both in .webm), keeps its language and title, and ends with the video (0.4 s)."""
    source = tmp_path / "src.mkv"
    clip_with_tracks(source)
    target = tmp_path / f"out{suffix}"
    copy_clip(source, target)
    tracks = audio_tracks(target)
    assert [track["codec"] for track in tracks] == codecs
    assert [track["language"] for track in tracks] == ["eng", "fra"]
    assert [track["title"] for track in tracks] == ["Mic", "Desktop"]
    assert [track["frequency"] for track in tracks] == [pytest.approx(440, abs=15), pytest.approx(1000, abs=15)]
    assert [track["seconds"] for track in tracks] == [pytest.approx(0.4, abs=0.04)] * 2  # within a frame
    assert len(read_all(target)[1]) == 10


def test_quicktime_keeps_german_and_chinese_under_the_codes_of_its_language_list(tmp_path):
    """QuickTime stores a language as an entry of its old Macintosh list, which has German and Chinese only as
    'ger' and 'chi' (ISO 639-2/B): FFmpeg's muxer drops 'deu' and 'zho' (ISO 639-2/T). MP4 keeps either form."""
    source = tmp_path / "src.mkv"
    clip_with_tracks(source, [("aac", 440, 48000, "stereo", "deu", "Mic"), ("aac", 1000, 48000, "mono", "zho", None)])
    for suffix, languages in ((".mov", ["ger", "chi"]), (".mp4", ["deu", "zho"])):
        target = tmp_path / f"out{suffix}"
        copy_clip(source, target)
        assert [track["language"] for track in audio_tracks(target)] == languages


def test_copied_tracks_the_muxer_refuses_at_the_header_are_all_transcoded_instead(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(video_io._COPIED_AUDIO, "mov", video_io._COPIED_AUDIO["mov"] | {"flac"})
    source = tmp_path / "src.mkv"
    clip_with_tracks(source)
    target = tmp_path / "out.mov"
    with caplog.at_level(logging.INFO, logger="bgmatte.io.video"):
        copy_clip(source, target)
    assert "refused the aac and flac audio" in caplog.text
    tracks = audio_tracks(target)
    assert [(track["codec"], track["language"]) for track in tracks] == [("aac", "eng"), ("aac", "fra")]
    assert [track["frequency"] for track in tracks] == [pytest.approx(440, abs=15), pytest.approx(1000, abs=15)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.mov", "src.mkv"]


def test_an_audio_track_that_cannot_be_read_is_left_out_with_a_warning_and_the_others_kept(tmp_path, caplog):
    """A first track whose codec FFmpeg does not know (its Matroska codec id altered) costs only itself."""
    source = tmp_path / "src.mkv"
    clip_with_tracks(source)
    data = source.read_bytes()
    assert data.count(b"A_AAC") == 1
    source.write_bytes(data.replace(b"A_AAC", b"A_XYZ"))
    target = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.video"):
        reader = copy_clip(source, target)
    assert reader.audio is not None and reader.audio.codec == "unknown"
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{source}: audio track 1 ") and "\n" not in warnings[0]
    tracks = audio_tracks(target)
    assert [(track["codec"], track["language"]) for track in tracks] == [("flac", "fra")]
    assert tracks[0]["frequency"] == pytest.approx(1000, abs=15)
    assert tracks[0]["seconds"] == pytest.approx(0.4, abs=0.04)


def test_a_damaged_packet_in_a_transcoded_track_costs_its_sound_not_the_file(tmp_path, caplog):
    source = tmp_path / "src.mkv"
    clip_with_tracks(source)
    with av.open(str(source)) as container:
        flac = [bytes(packet) for packet in container.demux(container.streams.audio[1]) if packet.size]
    data = source.read_bytes()
    middle = data.index(flac[1]) + len(flac[1]) // 2
    source.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])  # the FLAC decoder refuses the packet
    target = tmp_path / "out.mov"  # FLAC is transcoded into QuickTime
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.video"):
        copy_clip(source, target)
    assert f"{source}: audio track 2 of 2 has damaged packets; 1 left out" in caplog.text
    tracks = audio_tracks(target)
    assert [track["frequency"] for track in tracks] == [pytest.approx(440, abs=15), pytest.approx(1000, abs=15)]
    assert tracks[0]["seconds"] == pytest.approx(0.4, abs=0.04) and 0.25 < tracks[1]["seconds"] < 0.35


def test_a_track_left_out_is_warned_about_once_when_the_start_is_retried(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(video_io._COPIED_AUDIO, "mov", video_io._COPIED_AUDIO["mov"] | {"flac"})
    source = tmp_path / "src.mkv"
    clip_with_tracks(source)
    source.write_bytes(source.read_bytes().replace(b"A_AAC", b"A_XYZ"))
    target = tmp_path / "out.mov"
    with caplog.at_level(logging.INFO, logger="bgmatte.io.video"):
        copy_clip(source, target)
    assert "refused the flac audio" in caplog.text
    assert caplog.text.count("audio track 1 of 2 (unknown) cannot be carried (FFmpeg cannot decode it)") == 1
    assert [(track["codec"], track["language"]) for track in audio_tracks(target)] == [("aac", "fra")]


def test_two_aac_tracks_of_an_mp4_keep_their_titles_in_matroska(tmp_path):
    """As OBS records them (microphone and desktop, both AAC): MP4 gives the titles back as 'name'."""
    source = tmp_path / "obs.mp4"
    clip_with_tracks(source, [("aac", 440, 48000, "stereo", "eng", "Mic"),
                              ("aac", 1500, 48000, "stereo", "eng", "Desktop")])
    target = tmp_path / "out.mkv"
    copy_clip(source, target)
    tracks = audio_tracks(target)
    assert [(track["codec"], track["title"]) for track in tracks] == [("aac", "Mic"), ("aac", "Desktop")]
    assert [track["frequency"] for track in tracks] == [pytest.approx(440, abs=15), pytest.approx(1500, abs=15)]
    assert [track["seconds"] for track in tracks] == [pytest.approx(0.4, abs=0.04)] * 2
    with av.open(str(target)) as container:
        assert [stream.metadata.get("title") for stream in container.streams.audio] == ["Mic", "Desktop"]


def test_frame_clock_follows_timestamps_and_counts_frames_once_they_keep_going_back():
    clock = FrameClock(Fraction(50))
    assert [clock.take(stamp) for stamp in (0.2, 0.22, 0.3)] == pytest.approx([0.2, 0.22, 0.3])  # variable rate kept
    assert clock.peek(0.4) == 0.4 and clock.last == pytest.approx(0.3)  # a peek places nothing
    # A lone stamp that repeats (a variable-rate recording's glitch) costs its own frame: half a period after the
    # last, so that the next stamp is its own again.
    assert [clock.take(stamp) for stamp in (0.3, 0.32, 0.9)] == pytest.approx([0.31, 0.32, 0.9])
    assert not clock.scrambled
    # Stamps that go back again soon after (a demuxer that mixes up the order): counted from then on, even stamps
    # that go forward.
    assert [clock.take(stamp) for stamp in (0.85, 1.2, 1.5)] == pytest.approx([0.91, 0.93, 0.95])
    assert clock.scrambled
    unstamped = FrameClock(None)  # no rate either: 30 fps
    assert [unstamped.take(None) for _ in range(3)] == pytest.approx([0, 1 / 30, 2 / 30])
    restarted = FrameClock(Fraction(25))
    restarted.take(1.0)
    restarted.last = None  # after a seek: the next frame goes at its own stamp
    assert restarted.take(0.4) == 0.4 and restarted.take(None) == pytest.approx(0.44)


@pytest.mark.parametrize("damaged", [1, 3])
def test_an_avi_whose_first_frames_are_lost_keeps_the_rest_at_their_times(tmp_path, damaged):
    """The first keyframe (and the frames after it) of an H.264 AVI damaged, as in a clip cut from a longer one: the
    frames decoded from the next keyframe on keep their own times (the decoder's delay is its own, not counted from
    the file's first packet, which put them up to a GOP early, ahead of their sound)."""
    source = tmp_path / "cut.avi"
    span_clip(source, count=40, tracks=(), video_options={"bf": "2", "g": "12"})
    data = bytearray(source.read_bytes())
    at = data.find(b"movi")
    for _ in range(damaged):
        at = data.find(b"00dc", at + 4)
        size = int.from_bytes(data[at + 4:at + 8], "little")
        data[at + 12:at + 8 + size] = b"\xff" * (size - 4)  # after the start code: no picture the decoder takes
    source.write_bytes(bytes(data))
    with VideoReader(source) as reader:
        frames = list(reader)
    numbers = [number_of(frame.image) for frame in frames]
    assert numbers[0] >= 1 and numbers == list(range(numbers[0], 40))
    assert [frame.pts for frame in frames] == numbers  # the time base is 1/25
    assert [frame.seconds for frame in frames] == pytest.approx([0.04 * (n - numbers[0]) for n in numbers])


def test_an_avi_with_frames_dropped_by_its_capture_is_whole(tmp_path):
    """A capture that dropped frames 10 to 13 leaves empty chunks that its header counts and FFmpeg skips: the frames
    keep their times across the gap, and the file is not called truncated (4 of 30 frames looked missing)."""
    source = tmp_path / "capture.avi"
    kept = [index for index in range(30) if not 10 <= index < 14]
    with av.open(str(source), mode="w") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
        for index in kept:
            frame = av.VideoFrame.from_ndarray(numbered(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(source)) as container:
        assert container.streams.video[0].frames == 30
    with VideoReader(source) as reader:
        frames = list(reader)
    assert [frame.pts for frame in frames] == kept and reader.error is None


def test_an_avi_in_milliseconds_keeps_its_frame_rate_and_times(tmp_path):
    """FFmpeg writes an AVI of 1 ms ticks when the frames carry millisecond times: its average rate is the tick
    rate (1000), its header counts ticks, and the reorder delay spans 40 ticks a frame. The frames keep their times
    to the last ones drained from the decoder (they were 1 ms apart), and the whole file is not called truncated
    (it was: 25 of 1000 frames)."""
    clip = tmp_path / "ticks.avi"
    make_clip(clip, count=25)
    with av.open(str(clip)) as container:
        assert container.streams.video[0].time_base == Fraction(1, 1000)
    with VideoReader(clip) as reader:
        frames = list(reader)
    assert reader.fps == 25 and reader.error is None
    assert [frame.pts for frame in frames] == [40 * index for index in range(25)]


def test_a_repeated_stamp_in_a_variable_rate_clip_moves_only_its_own_frame(tmp_path):
    """One frame of a variable-rate recording repeats the stamp before it, and later two stamps are swapped: the
    frames after each keep their own stamps (the first glitch had every later frame counted at the nominal rate,
    squeezing 1.54 s into 0.48 s against the sound; a swapped pair, once, made every later frame a frame late)."""
    source = tmp_path / "glitch.mkv"
    stamps = [0, 40, 80, 80, 200, 240, 400, 440] + [440 + 40 * i for i in range(1, 20)] + [1280, 1240, 1320, 1360]
    expected = [0, 40, 80, 100, 200, 240, 400, 440] + [440 + 40 * i for i in range(1, 20)] + [1280, 1300, 1320, 1360]
    with av.open(str(source), mode="w") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": "12", "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        packets = []
        for index in range(len(stamps)):
            frame = av.VideoFrame.from_ndarray(numbered(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            packets += stream.encode(frame)
        packets += stream.encode(None)
        for number, (packet, stamp) in enumerate(zip(packets, stamps)):  # without B-frames: in display order
            packet.time_base, packet.pts, packet.dts = Fraction(1, 1000), stamp, number  # the muxer wants dts to rise
            container.mux(packet)
    with VideoReader(source) as reader:
        frames = list(reader)
    assert [number_of(frame.image) for frame in frames] == list(range(len(stamps)))
    assert [round(frame.time * 1000) for frame in frames] == expected
    assert [round(frame.seconds * 1000) for frame in frames] == expected


@pytest.mark.parametrize(("start", "first"), [(0.0, 0), (0.36, 9), (0.5, 13), (1.0, 25)])
def test_h264_with_b_frames_in_avi_is_timed_by_its_decoding_stamps(tmp_path, start, first):
    """AVI stores no presentation times: FFmpeg gives H.264's B-frames made-up stamps that go back. The frames are
    timed by their decoding stamps less the decoder's delay, so that a whole read gives each frame at its place and a
    span starts at the exact frame (it started up to two frames early, and a whole run's frames were a frame or two
    late against their sound)."""
    source = tmp_path / "camera.avi"
    span_clip(source, count=40, tracks=(), video_options={"bf": "2", "g": "12"})
    with av.open(str(source)) as container:  # what the demuxer gives: stamps that go back
        stream = container.streams.video[0]
        stamps = [frame.pts for frame in container.decode(stream)]
    assert stamps != sorted(stamps)
    with VideoReader(source, start=start, duration=0.4 if start else None) as reader:
        frames = list(reader)
    expected = list(range(first, first + 10 if start else 40))
    assert [number_of(frame.image) for frame in frames] == expected
    assert [frame.pts for frame in frames] == [number - (first if start else 0) for number in expected]
    assert [frame.seconds for frame in frames] == pytest.approx([0.04 * i for i in range(len(expected))])
    assert reader.offset == pytest.approx(0.04 * first) and reader.error is None


def numbered_avi(path: Path, codec: str, b_frames: int, count: int = 40) -> None:
    """An AVI of `numbered` frames at 25 fps, with up to `b_frames` B-frames in a row and a keyframe every 12."""
    with av.open(str(path), mode="w") as container:
        options = {"crf": "12"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=25, options={"bf": str(b_frames), "g": "12", **options})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.max_b_frames = b_frames
        if codec != "libx264":
            stream.codec_context.qscale = 2  # fine enough for the levels to tell the frames apart
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(numbered(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize(("suffix", "codec", "b_frames"),
                         [(".mkv", "libx264", 2), (".mp4", "libx264", 2), (".ts", "libx264", 1), (".mkv", "mpeg4", 2)])
@pytest.mark.parametrize(("start", "first"), [(0.0, 0), (0.04, 1), (0.12, 3), (0.36, 9), (0.4, 10), (0.44, 11), (1.0, 25)])
def test_b_frames_stamped_in_decoding_order_are_timed_as_presented(tmp_path, suffix, codec, b_frames, start, first):
    """An AVI's H.264 with B-frames copied into Matroska or MP4 keeps the AVI's stamps, which are in decoding order:
    the frames are timed by those stamps in the order the decoder gives the frames out, as an AVI's are, from the
    first frame on. A whole read placed frames 1 to 4 at 0.08, 0.12, 0.14 and 0.20 s (half a period after a stamp
    that went back), a span from 0.12 s began at frame 2, a frame early, and one from 0.04 s began at frame 1 but
    took its sound from 0.08 s; every span now starts at the exact frame, at the time the whole read gives it. In
    MPEG-TS FFmpeg makes up decoding stamps that come twice, which do not tell which packet gave a frame out: the
    frame takes the stamp after its predecessor's (frames 1 to 4 were at 0.08, 0.10, 0.16 and 0.18 s). MPEG-4 Part 2
    drops the B-frames after a span's keyframe that lean on the group before: the frames keep their places all the
    same (a span from 0.44 s began at frame 13, not 11)."""
    avi, source = tmp_path / "camera.avi", tmp_path / f"copy{suffix}"
    numbered_avi(avi, codec, b_frames)
    decode_order_copy(avi, source)
    with av.open(str(source)) as container:  # what the demuxer gives: stamps that go back
        stamps = [frame.pts for frame in container.decode(video=0)]
    assert stamps != sorted(stamps)
    with VideoReader(source) as whole:
        times = {number_of(frame.image): frame.seconds for frame in whole}
    assert times == pytest.approx({number: 0.04 * number for number in range(40)})
    with VideoReader(source, start=start, duration=0.4 if start else None) as reader:
        frames = list(reader)
    expected = list(range(first, first + 10 if start else 40))
    assert [number_of(frame.image) for frame in frames] == expected
    assert [frame.seconds for frame in frames] == pytest.approx([0.04 * i for i in range(len(expected))])
    assert [round(frame.time, 4) for frame in frames] == pytest.approx([0.04 * i for i in range(len(expected))])
    assert reader.offset == pytest.approx(times[first]) and reader.error is None


def test_rates_differ_when_frame_for_frame_would_drift_half_a_frame_over_the_clip():
    ntsc, film = Fraction(30000, 1001), Fraction(30)
    assert not rates_differ(ntsc, film, 400) and rates_differ(ntsc, film, 600)  # 0.1%: half a frame after 500
    assert rates_differ(Fraction(25), Fraction(50), 2)
    assert not rates_differ(ntsc, film) and rates_differ(Fraction(25), Fraction(24))  # no count: more than 1%
    assert not rates_differ(None, film, 1000) and not rates_differ(Fraction(25), Fraction(25), 10**6)



def test_a_track_at_a_rate_the_encoder_lacks_is_resampled_and_the_others_kept(tmp_path):
    source, output = tmp_path / "src.mov", tmp_path / "out.mp4"
    clip_with_tracks(source, [("aac", 440, 48000, "stereo", "eng", "Mic"), ("pcm_s24le", 1000, 192000, "stereo", "eng",
                                                                             "Recorder")])
    with VideoReader(source) as reader, VideoWriter(output, fps=reader.fps, audio_from=source) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    tracks = audio_tracks(output)  # AAC stops at 96 kHz: the 192 kHz PCM is transcoded at 48 kHz
    assert [track["codec"] for track in tracks] == ["aac", "aac"]
    assert [round(track["frequency"], -1) for track in tracks] == [440, 1000]
    with av.open(str(output)) as container:
        assert [stream.rate for stream in container.streams.audio] == [48000, 48000]


# ------------------------------------------------------------------------------------------- a span of a video


def numbered(index: int) -> np.ndarray:
    """A flat grey frame whose level tells its index (16 + 4 per frame, so up to 59 frames)."""
    image = np.full((HEIGHT, WIDTH, 3), 16 + 4 * index, np.uint8)
    image[:8, :8] = 255
    return image


def number_of(image: np.ndarray) -> int:
    return round((int(image[30, 40, 0]) - 16) / 4)


def span_clip(path: Path, count: int = 25, tracks: tuple[tuple[str, int, str], ...] = (("aac", 48000, "stereo"),),
              video_options: dict[str, str] | None = None) -> None:
    """A clip of `numbered` frames (H.264, 25 fps) with one `stepped_tone` track, as long as the video, for each
    (codec, sample rate, layout) of `tracks`."""
    clip_with_tracks(path, [(codec, stepped_tone, rate, layout, None, None) for codec, rate, layout in tracks], count,
                     count / 25, image=numbered, video_options={"crf": "12", **(video_options or {})})


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".webm"])
def test_a_span_gives_exactly_its_frames_from_zero_with_the_sound_of_that_span(tmp_path, suffix):
    """0.4 s for 0.2 s of a 25 fps clip: frames 10 to 14, timed from 0, and 0.2 s of each track's sound from that same
    span (1000 Hz; 440 Hz before it, 2500 Hz after), copied (AAC and FLAC into .mp4) or transcoded (FLAC into .mov,
    both into .webm)."""
    source = tmp_path / "src.mkv"
    span_clip(source, tracks=(("aac", 48000, "stereo"), ("flac", 44100, "mono")))
    with VideoReader(source, start=0.4, duration=0.2) as reader:
        frames = list(reader)
    assert [number_of(frame.image) for frame in frames] == [10, 11, 12, 13, 14]
    assert [frame.index for frame in frames] == [0, 1, 2, 3, 4]
    assert [round(frame.time, 4) for frame in frames] == [0.0, 0.04, 0.08, 0.12, 0.16] and frames[0].pts == 0
    assert reader.offset == pytest.approx(0.4) and reader.error is None
    assert reader.frame_count == 5 and reader.duration == pytest.approx(0.2, abs=0.01)
    target = tmp_path / f"out{suffix}"
    with VideoReader(source, start=0.4, duration=0.2) as reader, \
            VideoWriter(target, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    assert decode_times(target) == [0.0, 0.04, 0.08, 0.12, 0.16]
    assert [number_of(image) for image in read_frames(target)] == [10, 11, 12, 13, 14]
    tracks = audio_tracks(target)
    assert [track["frequency"] for track in tracks] == [pytest.approx(1000, abs=30)] * 2
    assert [track["seconds"] for track in tracks] == [pytest.approx(0.2, abs=0.04)] * 2  # within a frame


def test_a_start_inside_a_group_of_pictures_still_gives_the_exact_frames(tmp_path):
    """Keyframes only at 0 and 2 s (frame 50), B-frames between: the seek lands on the keyframe before the start and
    the frames up to it are decoded and dropped; a span across the keyframe is whole too."""
    source = tmp_path / "long_gop.mp4"
    span_clip(source, count=60, tracks=(), video_options={"g": "50", "keyint_min": "50", "sc_threshold": "0",
                                                            "bf": "2"})
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        keyframes = sorted(float(packet.pts * stream.time_base) for packet in container.demux(stream)
                           if packet.size and packet.is_keyframe)
    assert keyframes == [0.0, 2.0]
    _, whole = read_all(source)
    for start, duration, expected in [(0.84, 0.4, range(21, 31)), (1.8, 0.32, range(45, 53))]:
        with VideoReader(source, start=start, duration=duration) as reader:
            frames = list(reader)
        assert [number_of(frame.image) for frame in frames] == list(expected)
        assert all(np.array_equal(frame.image, whole[index].image) for frame, index in zip(frames, expected))
        assert [round(frame.time, 4) for frame in frames] == [round(0.04 * index, 4) for index in range(len(expected))]
        assert reader.offset == pytest.approx(start) and reader.error is None


@pytest.mark.parametrize("start", [0.46, 0.48, 5.0])
def test_a_start_at_or_past_the_end_is_one_line_naming_the_file_the_start_and_the_length(tmp_path, start):
    clip = tmp_path / "short.mp4"
    make_clip(clip, count=12)  # frames from 0 to 0.44 s, lasting 0.48 s
    with pytest.raises(BgmatteError) as caught:
        VideoReader(clip, start=start)
    message = str(caught.value)
    assert message.startswith(f"{clip}: ") and "\n" not in message
    assert f"{start:g} s" in message and "0.48 s" in message


@pytest.mark.parametrize(("start", "duration", "words"), [(-1, None, "start"), (0, 0, "duration"),
                                                          (0, -2.5, "duration"), (float("nan"), None, "start")])
def test_a_negative_start_or_an_empty_span_is_refused(tmp_path, start, duration, words):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, count=3)
    with pytest.raises(BgmatteError, match=words):
        VideoReader(clip, start=start, duration=duration)


def test_a_span_that_ends_before_the_file_is_no_truncation_but_a_file_cut_inside_the_span_is(tmp_path):
    clip = tmp_path / "whole.mkv"
    make_clip(clip, count=25)
    for start, duration, count in [(0.2, 0.2, 5), (0.0, 0.2, 5), (0.8, 5.0, 5)]:
        with VideoReader(clip, start=start, duration=duration) as reader:
            frames = list(reader)
        assert len(frames) == count and reader.error is None, (start, duration, reader.error)
        assert reader.frame_count == count
    cut = tmp_path / "cut.mkv"
    data = clip.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with VideoReader(cut) as reader:
        decodable = len(list(reader))
    assert 8 <= decodable <= 17  # at least 0.25 s (the slack for edit lists) short of 0.96 s
    with VideoReader(cut, start=0.12, duration=0.2) as reader:  # inside what is left: whole
        assert len(list(reader)) == 5 and reader.error is None
    with VideoReader(cut, start=0.12, duration=0.84) as reader:  # past what is left, although the header says more
        frames = list(reader)
    assert len(frames) == decodable - 3
    assert reader.error is not None and "cut.mkv" in str(reader.error) and "truncated" in str(reader.error)


def test_a_span_keeps_rotation_size_limits_and_damaged_packet_skipping(tmp_path, caplog):
    rotated = tmp_path / "rotated.mp4"
    make_clip(rotated, count=12, rotation=90)
    with VideoReader(rotated, start=0.2) as reader:
        frames = list(reader)
    assert reader.rotation == 90 and reader.size == (HEIGHT, WIDTH) and len(frames) == 7
    assert all(frame.image.shape == (WIDTH, HEIGHT, 3) for frame in frames)
    with pytest.raises(BgmatteError, match="decompression bomb"):
        VideoReader(rotated, start=0.2, max_pixels=1000)
    damaged = tmp_path / "bad.mkv"
    intra_clip(damaged, 12, damaged=(2, 7))  # one packet before the span, one in it
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        with VideoReader(damaged, start=0.2) as reader:
            frames = list(reader)
    assert [round(frame.time, 2) for frame in frames] == [0.0, 0.04, 0.12, 0.16, 0.2, 0.24]
    assert reader.skipped == 1 and reader.error is None
    assert f"{damaged}: skipped 1 damaged video packet" in caplog.text


def test_a_span_of_an_mpeg_program_stream_copies_its_audio_into_mp4(tmp_path):
    # Just after a seek, MPEG-PS gives malformed audio packets, two with one timestamp, which MP4 refuses.
    source, output = tmp_path / "tape.mpg", tmp_path / "out.mp4"
    with av.open(str(source), mode="w") as container:
        video = container.add_stream("mpeg2video", rate=25, options={"g": "15", "bf": "2"})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream("mp2", rate=48000)
        sound.layout = "stereo"
        for index in range(500):
            container.mux(video.encode(av.VideoFrame.from_ndarray(numbered(index % 50), format="rgb24")))
        container.mux(video.encode(None))
        for start in range(0, 48000 * 20, 1152):
            times = np.arange(start, start + 1152) / 48000
            tone = (0.2 * np.sin(2 * np.pi * 440 * times)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
            container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    with VideoReader(source, start=17.0, duration=1.0) as reader, \
            VideoWriter(output, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
        numbers = []
        for frame in reader:
            numbers.append(number_of(frame.image))
            writer.write(frame.image, frame.pts, frame.time_base)
    # Frames 425-449 (MPEG-2 at 64x48 blurs these levels: `test_a_span_of_an_mpeg_program_stream_has_its_exact_frames_
    # and_sound` tells them apart), a second of sound with them.
    assert len(numbers) == 25 and numbers[-1] - numbers[0] >= 20
    assert audio_seconds(output) == pytest.approx(1.0, abs=0.03)


def coded(index: int) -> np.ndarray:
    """A frame whose index is written in 12 black or white blocks of 16x16 pixels, one bit each: coarse codecs
    (MPEG-2 at 64x48) blur flat grey levels into their neighbours', never these."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(12):
        if index >> bit & 1:
            row, column = divmod(bit, 4)
            image[16 * row:16 * row + 16, 16 * column:16 * column + 16] = 255
    return image


def code_of(image: np.ndarray) -> int:
    return sum(1 << bit for bit in range(12) if image[16 * (bit // 4) + 8, 16 * (bit % 4) + 8, 0] > 128)


def muxed_clip(path: Path, video_codec: str, audio_codec: str | None, count: int = 25, sound_seconds: float = 0.0,
               video_options: dict[str, str] | None = None) -> None:
    """`coded` frames at 25 fps and a 440 Hz stereo tone `sound_seconds` long (none when 0), the two interleaved by
    time as muxers write them, so that each demuxer sees what it would see in a file from the wild."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream(video_codec, rate=25, options=video_options or {})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.codec_context.bit_rate = 2_000_000
        sound = container.add_stream(audio_codec, rate=48000) if audio_codec and sound_seconds else None
        if sound is not None:
            sound.layout = "stereo"
            size = sound.codec_context.frame_size or 1024
            samples = av.AudioResampler(format=sound.format.name, layout="stereo", rate=48000)
        done, total = 0, round(48000 * sound_seconds)

        def sound_until(seconds: float) -> None:
            nonlocal done
            while sound is not None and done < min(total, 48000 * seconds):
                times = np.arange(done, done + size) / 48000
                tone = (0.2 * np.sin(2 * np.pi * 440 * times)).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = 48000, done, Fraction(1, 48000)
                for part in samples.resample(frame):
                    container.mux(sound.encode(part))
                done += size

        for index in range(count):
            frame = av.VideoFrame.from_ndarray(coded(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(video.encode(frame))
            sound_until((index + 1) / 25)
        container.mux(video.encode(None))
        sound_until(math.inf)
        if sound is not None:
            container.mux(sound.encode(None))


# Healthy clips of the common containers, each with sound 0.3 s longer than its 25 frames (1 s).
HEALTHY = [(".mp4", "libx264", "aac"), (".mov", "libx264", "pcm_s16le"), (".mkv", "libx264", "flac"),
           (".webm", "libvpx-vp9", "libopus"), (".avi", "mpeg4", "mp3"), (".mpg", "mpeg2video", "mp2")]


@pytest.mark.parametrize(("suffix", "video_codec", "audio_codec"), HEALTHY)
def test_spans_of_healthy_files_to_their_end_are_whole(tmp_path, suffix, video_codec, audio_codec):
    """A span that reaches the end of a whole file is never called truncated: the check by time has two frames of
    slack against the video's own length, and a quarter of a second against a length that includes the sound."""
    source = tmp_path / f"clip{suffix}"
    muxed_clip(source, video_codec, audio_codec, 25, 1.3, video_options={"g": "12", "bf": "2"})
    for start, duration, expected in [(0.2, None, range(5, 25)), (0.2, 0.8, range(5, 25)), (0.52, 0.48, range(13, 25)),
                                      (0.9, 5.0, range(23, 25))]:
        with VideoReader(source, start=start, duration=duration) as reader:
            frames = list(reader)
        assert [code_of(frame.image) for frame in frames] == list(expected), (start, duration)
        assert reader.error is None, (start, duration, reader.error)


def test_a_span_of_an_mpeg_program_stream_has_its_exact_frames_and_sound(tmp_path):
    """MPEG-PS has no index: FFmpeg seeks to a byte position, and the stamps after it are its guesses, counted on
    from the first packet header it meets, until a later header carries a stamp of its own. With frames small enough
    to share packs (64x48 MPEG-2) every span below began a frame late, and two lost another to a 0.1 s jump in the
    stamps (9 frames of 10); the stream's estimated length, 3.36 s of 4 s, refused a start at 3.5 s. Each span now
    has exactly its frames, one frame period apart, and its sound is as long as they are."""
    source = tmp_path / "tape.mpg"
    muxed_clip(source, "mpeg2video", "mp2", 100, 4.0, video_options={"g": "15", "bf": "2"})
    for start, duration in [(1.77, 0.4), (1.89, 0.4), (2.01, 0.4), (2.97, 0.4), (3.09, 0.4), (1.9, 1.0), (3.5, None)]:
        first = math.ceil(start * 25 - 1e-6)
        expected = list(range(first, min(100, math.ceil((start + (duration or 9)) * 25 - 1e-6))))
        with VideoReader(source, start=start, duration=duration) as reader:
            frames = list(reader)
        assert [code_of(frame.image) for frame in frames] == expected, (start, duration)
        assert [round(frame.seconds, 4) for frame in frames] == [round(0.04 * step, 4) for step in range(len(expected))]
        assert reader.offset - reader._origin == pytest.approx(first * 0.04) and reader.error is None
    with pytest.raises(BgmatteError, match=r"no frame starts at or after 4.1 s; the video lasts 4.00 s"):
        VideoReader(source, start=4.1)
    output = tmp_path / "out.mp4"
    with VideoReader(source, start=1.9, duration=1.0) as reader, \
            VideoWriter(output, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    assert decode_times(output) == [round(0.04 * index, 4) for index in range(25)]
    assert [code_of(image) for image in read_frames(output)] == list(range(48, 73))
    assert audio_seconds(output) == pytest.approx(1.0, abs=0.03)


def test_an_mpeg_program_streams_estimated_length_is_never_its_length(tmp_path):
    """FFmpeg estimates a program stream's length from the last stamps it finds near its end: 3.36 s of the 4 s
    tape, 0.04 s of a 1 s clip, whose progress total was then 1 frame, and so was that of every span past the
    estimate; an automatic plate, sampled over the frames the count promised, got its first frame alone. Neither the
    length nor the count is known before the file is read, unless a span's duration says it; the frames all come."""
    from media import DifferenceModel
    from bgmatte.pipeline import convert_video

    tape, clip = tmp_path / "tape.mpg", tmp_path / "clip.mpg"
    muxed_clip(tape, "mpeg2video", "mp2", 100, 4.0, video_options={"g": "15", "bf": "2"})
    muxed_clip(clip, "mpeg2video", "mp2", 25, 1.3, video_options={"g": "12", "bf": "2"})
    for source, start, duration, frames, length in [(tape, 0.0, None, 100, None), (tape, 3.5, None, 12, None),
                                                    (tape, 1.0, 0.4, 10, 0.4), (clip, 0.0, None, 25, None),
                                                    (clip, 0.5, None, 12, None)]:
        with VideoReader(source, start=start, duration=duration) as reader:
            assert (reader.duration, reader.frame_count) == (length, length and 10), (source.name, start)
            assert len(list(reader)) == frames and reader.error is None, (source.name, start)
    result = convert_video(clip, "auto", output=tmp_path / "pha.mp4", outputs=["pha"], model=DifferenceModel(),
                           progress=False)
    assert len(read_frames(result.outputs["pha"])) == 25


def test_a_span_counts_every_frame_that_starts_in_it_and_names_the_last_one_past_the_end(tmp_path):
    source = tmp_path / "clip.mp4"
    span_clip(source, count=25)
    with VideoReader(source, start=0.4, duration=0.1) as reader:  # 0.40, 0.44 and 0.48
        assert reader.frame_count == 3 and len(list(reader)) == 3
    with pytest.raises(BgmatteError, match=r"no frame starts at or after 0.99 s; the video lasts 1.00 s, its last "
                                           r"frame starting at 0.96 s"):
        VideoReader(source, start=0.99)


def test_a_matroska_stream_that_starts_late_is_as_long_as_its_frames(tmp_path):
    source = tmp_path / "late.mkv"  # a remuxed broadcast: its times start at 10 s, its DURATION tag says 11 s
    with av.open(str(source), mode="w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(25):
            frame = av.VideoFrame.from_ndarray(numbered(index), format="rgb24")
            frame.pts, frame.time_base = 250 + index, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    with VideoReader(source) as whole:
        assert whole.duration == pytest.approx(1.0, abs=0.05) and len(list(whole)) == 25 and whole.error is None
    with VideoReader(source, start=0.5) as span:
        assert span.frame_count == pytest.approx(12, abs=1) and len(list(span)) == 12 and span.error is None


def test_every_audio_track_is_carried_from_one_opening_of_the_source(tmp_path, monkeypatch):
    """Four tracks, copied and transcoded, come from one opened source read once, not one opening per track: a
    multi-track 4K master on network storage is then read once for its sound, and closed once it is written."""
    tracks = [("aac", 440, 48000, "stereo", "eng", "Mic"), ("flac", 1000, 44100, "mono", "fra", "Desktop"),
              ("aac", 1500, 48000, "stereo", "ita", "Room"), ("flac", 2500, 44100, "stereo", "spa", "Music")]
    source = tmp_path / "src.mkv"
    clip_with_tracks(source, tracks)
    opened: list[av.container.InputContainer] = []
    original = video_io._open_audio_source

    def counted(path: Path) -> av.container.InputContainer:
        opened.append(original(path))
        return opened[-1]

    monkeypatch.setattr(video_io, "_open_audio_source", counted)
    target = tmp_path / "out.mov"  # AAC copied, FLAC transcoded
    copy_clip(source, target)
    assert len(opened) == 1
    with pytest.raises(AssertionError, match="not open"):  # closed once the writer is done
        next(opened[0].demux())
    carried = audio_tracks(target)
    assert [(track["codec"], track["language"], track["title"]) for track in carried] == \
        [("aac", "eng", "Mic"), ("aac", "fra", "Desktop"), ("aac", "ita", "Room"), ("aac", "spa", "Music")]
    assert [track["frequency"] for track in carried] == [pytest.approx(frequency, abs=15)
                                                        for _, frequency, *_ in tracks]
    assert [track["seconds"] for track in carried] == [pytest.approx(0.4, abs=0.04)] * 4


def test_a_track_leaving_a_source_its_last_track_closed_does_nothing(tmp_path):
    """A writer's finish leaves the source (the last track closes it), then its clean-up leaves it again; the second
    leave must not touch the closed file (PyAV 18 refuses even a closed stream's index: every clip with sound failed
    with 'encoding failed (Container is not open)')."""
    source = tmp_path / "src.mp4"
    make_subject_clip(source, 2)
    media = video_io._AudioSource(source)
    stream = media.input.streams.audio[0]
    media.join(stream)
    media.leave(stream)
    with pytest.raises(AssertionError, match="not open"):  # closed by its last track
        next(media.input.demux())
    media.leave(stream)  # as a failed or finished carrier's discard does


def decoded_track(path: Path, track: int = 0) -> tuple[float, np.ndarray, int]:
    """An audio track of `path` decoded as a player would (edit lists and codec delay applied), its channels mixed
    down: the time of its first sample, the samples and the rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[track]
        mono = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        frames = list(container.decode(stream))
        first = float(frames[0].pts * frames[0].time_base)
        samples = np.concatenate([part.to_ndarray()[0] for frame in frames for part in mono.resample(frame)])
        return first, samples, stream.rate


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "aac"), (".mp4", "flac"), (".mp4", "libopus"),
                                               (".mov", "aac"), (".mkv", "aac"), (".mkv", "flac"), (".mkv", "libopus")])
def test_copied_audio_of_a_span_starts_with_its_first_frame(tmp_path, suffix, codec):
    """A span from 0.4 s, inside a packet of each codec (AAC's 21 ms, FLAC's 104 ms, Opus's 20 ms): the copied track
    keeps the packet under the start, so its sound begins at the first frame (MP4: trimmed there by an edit list) or
    up to a packet before it (Matroska), never after it (it was 5 to 27 ms late), and in time with the source."""
    source, output = tmp_path / "src.mkv", tmp_path / f"out{suffix}"
    rate = 44100 if codec == "flac" else 48000
    clip_with_tracks(source, [(codec, lambda times: 300 + 2000 * times, rate, "stereo", None, None)], 25, 1.0,
                     image=numbered)  # a rising pitch: each moment sounds unlike any other
    with VideoReader(source, start=0.4, duration=0.2) as reader, \
            VideoWriter(output, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    assert reader.offset == pytest.approx(0.4)
    with av.open(str(output)) as container:
        assert container.streams.audio[0].codec_context.name == codec.removeprefix("lib")  # copied
    first, samples, _ = decoded_track(output)
    if suffix in (".mp4", ".mov"):
        assert first == pytest.approx(0.0, abs=0.001)  # 1 ms: the source's Matroska times are in milliseconds
    else:
        assert -0.11 < first <= 0.001
    # 0.05 s to 0.15 s of the output, past the decoder's warm-up, is 0.45 s to 0.55 s of the source, to a millisecond
    whole_first, whole, _ = decoded_track(source)
    part = samples[round((0.05 - first) * rate):][:round(0.1 * rate)]
    origin = round((0.45 - whole_first) * rate)
    misses = {shift: np.abs(part - whole[origin + shift:][:part.size]).max() for shift in range(-rate // 50, rate // 50)}
    best = min(misses, key=misses.get)
    assert abs(best) <= rate // 1000 and misses[best] < 0.02


def copied_packets(path: Path) -> list[list[tuple[int, bytes]]]:
    """The stamp and bytes of every audio packet of `path`, track by track."""
    with av.open(str(path)) as container:
        count = len(container.streams.audio)
    tracks = []
    for track in range(count):
        with av.open(str(path)) as container:
            tracks.append([(packet.pts, bytes(packet)) for packet in container.demux(container.streams.audio[track])
                           if packet.size])
    return tracks


@pytest.mark.parametrize("suffix", [".mkv", ".webm"])
@pytest.mark.parametrize("start", [0.0, 0.6])
def test_a_source_with_its_tracks_one_after_another_gives_whole_tracks_from_bounded_queues(tmp_path, monkeypatch,
                                                                                          suffix, start):
    """Four 2 s tracks stored whole one after another: the shared demuxer, reading on for a track at the end, queued
    every packet of the tracks stored after it (95 of an AAC track, 10 times the cap set here), and would queue whole
    tracks of a long file; now the track that asked goes on through a demuxer of its own past the cap, and the output
    (copied into .mkv, transcoded into .webm, whole or a span) has the sound of the same tracks interleaved."""
    monkeypatch.setattr(video_io, "_AUDIO_QUEUE_CAP", 10, raising=False)
    tracks = [("aac", 440, 48000, "stereo", None, None), ("flac", 1000, 44100, "mono", None, None),
              ("aac", 1500, 48000, "stereo", None, None), ("flac", 2500, 44100, "stereo", None, None)]
    outputs = {}
    for interleaved in (True, False):
        source = tmp_path / f"{'interleaved' if interleaved else 'apart'}.mkv"
        clip_with_tracks(source, tracks, count=50, seconds=2.0, image=numbered, interleaved=interleaved)
        with av.open(str(source)) as container:
            order = [packet.stream_index for packet in container.demux(*container.streams.audio) if packet.size]
        changes = sum(1 for before, after in zip(order, order[1:]) if before != after)
        assert changes < 10 if not interleaved else changes > 100  # whole tracks, or packets of each in turn
        longest: list[int] = []
        original = video_io._AudioSource._read

        def measured(self, *args, **kwargs):
            try:
                return original(self, *args, **kwargs)
            finally:
                longest.append(max((len(queue) for queue in self._queues.values()), default=0))

        monkeypatch.setattr(video_io._AudioSource, "_read", measured)
        outputs[interleaved] = tmp_path / f"out_{source.stem}{suffix}"
        with VideoReader(source, start=start) as reader, \
                VideoWriter(outputs[interleaved], fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
            for frame in reader:
                writer.write(frame.image, frame.pts, frame.time_base)
        monkeypatch.setattr(video_io._AudioSource, "_read", original)
        assert max(longest) <= 11
    for track in range(4):
        kept, rate = mono_samples(outputs[True], track)
        apart, _ = mono_samples(outputs[False], track)
        assert kept.size / rate == pytest.approx(2.0 - start, abs=0.13)  # copied FLAC: up to a packet more
        assert np.array_equal(apart, kept)
    if suffix == ".mkv":
        assert copied_packets(outputs[False]) == copied_packets(outputs[True])


@pytest.mark.parametrize(("suffix", "kept"), [(".mkv", [True, False]), (".mp4", [True]), (".mov", [True]),
                                              (".webm", [True, False])])
def test_a_track_with_no_sound_in_the_span_is_warned_about_with_what_the_output_makes_of_it(tmp_path, caplog,
                                                                                          suffix, kept):
    """A 0.1 s second track and a span from 0.52 s: it has nothing to give; MP4 and QuickTime leave such a track out
    (the tracks after it move up), Matroska and WebM keep it empty. Both happened silently; now one warning says so."""
    source, output = tmp_path / "src.mkv", tmp_path / f"out{suffix}"
    clip_with_tracks(source, count=25, image=numbered, lengths=[1.0, 0.1])
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        with VideoReader(source, start=0.5) as reader, \
                VideoWriter(output, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
            for frame in reader:
                writer.write(frame.image, frame.pts, frame.time_base)
    what = "leaves it out" if len(kept) == 1 else "keeps it, empty"
    assert caplog.messages == [f"{source}: audio track 2 of 2 has no sound from 0.52 s to 1.00 s; the output {what}"]
    assert [bool(packets) for packets in copied_packets(output)] == kept  # which tracks it has, and which have sound


@pytest.mark.parametrize("suffix", [".mov", ".webm"])
@pytest.mark.parametrize(("count", "start"), [(10, 0.0), (9, 0.0), (9, 0.12)])
def test_transcoded_sound_ends_with_the_video_at_the_sample(tmp_path, suffix, count, start):
    # FLAC at 48 kHz comes in packets of 96 ms: whole packets overran the video by up to one of them.
    source, output = tmp_path / "src.mkv", tmp_path / f"out{suffix}"
    clip_with_tracks(source, [("flac", 1000, 48000, "stereo", None, None)], count=count + 5)
    with VideoReader(source, start=start, duration=count / 25) as reader, \
            VideoWriter(output, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    (track,) = audio_tracks(output)
    assert track["codec"] in ("aac", "opus") and track["seconds"] == pytest.approx(count / 25, abs=0.01)


def stated_length(path: Path, kind: str) -> float:
    """How long the first `kind` track of `path` lasts as its container says (for MP4, its edit list): what a player
    plays, whatever the last packet holds."""
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        return float(stream.duration * stream.time_base)


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "flac"), (".mp4", "aac"), (".mov", "aac")])
@pytest.mark.parametrize(("start", "duration"), [(None, None), (0.4, 0.2)])
def test_copied_audio_in_mp4_ends_with_the_video(tmp_path, suffix, codec, start, duration):
    """A copied packet cannot be cut, and the last one that starts before the video's end was kept whole: FLAC ran up
    to 0.1 s past it (its 104 ms packets), AAC up to 21 ms. MP4 and QuickTime can end a track inside its last packet
    (its edit list ends where the packet's duration says), so that packet is given the duration up to the end."""
    source, output = tmp_path / "src.mkv", tmp_path / f"out{suffix}"
    rate = 44100 if codec == "flac" else 48000
    clip_with_tracks(source, [(codec, 440, rate, "mono", None, None)], 25, 1.3)  # sound past the video's 1 s
    with VideoReader(source, start=start or 0.0, duration=duration) as reader, \
            VideoWriter(output, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    with av.open(str(output)) as container:
        assert container.streams.audio[0].codec_context.name == codec  # copied
    end = 1.0 if start is None else 0.2
    assert stated_length(output, "video") == pytest.approx(end, abs=0.001)
    assert stated_length(output, "audio") == pytest.approx(end, abs=0.0015)  # the source's Matroska ms stamps


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
@pytest.mark.parametrize("codec", ["mp3", "ac3"])
@pytest.mark.parametrize(("start", "duration"), [(None, None), (0.4, 0.2)])
def test_copied_audio_of_an_avi_counted_in_packets_is_cut_at_the_sample(tmp_path, suffix, codec, start, duration):
    """An AVI's MP3 or AC-3 track is stamped in whole packets (a tick of 24 or 32 ms): the end the last packet was
    given and a span's shift were rounded to those ticks, so that the copied sound ran up to a packet past the video
    (1.008 s of MP3, 1.024 s of AC-3 for 1 s) or stopped short of it, and a span's sound was up to half a packet out
    of time with its frames. Now each copied packet is placed in samples."""
    source, output = tmp_path / "src.avi", tmp_path / f"out{suffix}"
    clip_with_tracks(source, [(codec, lambda times: 300 + 2000 * times, 48000, "mono", None, None)], 25, 1.3)
    with av.open(str(source)) as container:
        assert container.streams.audio[0].time_base > Fraction(1, 1000)  # a tick is a packet
    with VideoReader(source, start=start or 0.0, duration=duration) as reader, \
            VideoWriter(output, fps=reader.fps, audio_from=source, audio_start=reader.offset) as writer:
        for frame in reader:
            writer.write(frame.image, frame.pts, frame.time_base)
    with av.open(str(output)) as container:
        assert container.streams.audio[0].codec_context.name.startswith(codec)  # copied (mp3float decodes MP3)
    end = 1.0 if start is None else 0.2
    assert stated_length(output, "video") == pytest.approx(end, abs=0.001)
    assert stated_length(output, "audio") == pytest.approx(end, abs=0.001)
    first, samples, rate = decoded_track(output)
    whole_first, whole, _ = decoded_track(source)
    part = samples[round((0.1 - first) * rate):][:round(0.08 * rate)]  # past the decoder's warm-up (MP3's reservoir)
    origin = round(((start or 0.0) + 0.1 - whole_first) * rate)
    misses = {shift: np.abs(part - whole[origin + shift:][:part.size]).max() for shift in range(-rate // 50, rate // 50)}
    best = min(misses, key=misses.get)
    assert abs(best) <= rate // 1000 and misses[best] < 0.02  # in time with the source, to a millisecond
