"""Video in and out with PyAV: a threaded reader and writers that keep timestamps, audio, rotation and alpha.

Decoding and encoding each run on a background thread behind a bounded queue, so that they overlap
with inference and memory stays flat however long the clip. Both ends carry each frame's own
presentation timestamp (pts and time base), so variable frame rate survives a round trip. The
reader's `Display` (pixel shape, colour matrix, primaries and transfer) goes to the writers, which make
their YUV with the source's matrix (else BT.709 for HD and BT.601 below, as players assume) and tag their
streams with all of it, so that players show what was read.

Writers never leave a half-written file under the final name: they write to a hidden temporary
name in the same folder and rename it on `close()`, which also runs after an exception or Ctrl-C
(through `with`), flushing the encoder so that every frame written so far is playable. A file that
cannot even be started (its header refused) fails the first `write` and leaves nothing.
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
import queue
import re
import shutil
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Self

import av
import cv2
import numpy as np

from bgmatte.errors import BgmatteError
from bgmatte.io.files import check_destination, temporary_sibling
from bgmatte.io.images import DEFAULT_MAX_PIXELS, megapixels_above, image_header_size, write_png

logger = logging.getLogger(__name__)

# The suffixes of files that are taken for videos wherever a path could be an image or a video (a plate, a target
# background, a training folder): the one list, which the reader's containers all have a place in. MPEG program
# streams (.mpg, .mpeg, .vob, .m2p) are read as such by their demuxer's name, not by these.
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".vob", ".m2p", ".ts", ".mts",
     ".m2ts", ".wmv", ".flv", ".ogv"}
)
# Output containers by extension, as FFmpeg muxer names.
OUTPUT_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}

_END = object()  # queue sentinel
_POLL_S = 0.1
# Damaged packets in a row after which a stream is given up: one bad packet costs a frame, not the rest of the clip.
_MAX_BAD_PACKETS = 50
# How far a time may fall short of a span's bound and still count as on it: decimal seconds and timestamps in
# their own time base round differently (0.4 + 0.2 is not 0.6 in floats).
_TIME_SLACK = 1e-6
# Seeks tried before the start of a span, in seconds before it, when one lands after it (an index that is off);
# the file is then read from its beginning.
_SEEK_BACK = (0.0, 1.0, 10.0)
# How far before a span's start the audio is sought (some demuxers, MPEG-PS's, give malformed packets just after a
# seek), and how much of it a transcoded track decodes and cuts off (a decoder that starts cold, AAC's overlapping
# windows, gets its first packets wrong); a copied track drops every packet before the start.
_AUDIO_SEEK_BACK_S = 0.5
_AUDIO_PREROLL_S = 0.1
# How far out of time order a file may give the packets of its tracks (muxers interleave them by time, QuickTime's
# demuxer within about a second), in seconds: the shared audio demuxer reads this far past the time a track asked up
# to, and no further, for that track's next packet, so that a track that has ended never piles up the others' packets.
_AUDIO_INTERLEAVE_S = 2.0
# How many packets a carried track's queue may hold while the shared audio demuxer reads on for another track. Only a
# badly interleaved file (whole tracks one after another) fills one that far; the track that asked is then read through
# a demuxer of its own, so that memory stays bounded however long the file is. 500 packets: some 10 s of AAC.
_AUDIO_QUEUE_CAP = 500
# How many of its first packets' stamps time a stream whose header gives no usable rate (`_rate_of_stamps`), and the
# rates such a stream is taken to have when its spacing is within 1% of one.
_RATE_STAMPS = 64
_USUAL_RATES = tuple(Fraction(rate) for rate in (
    Fraction(24000, 1001), 24, 25, Fraction(30000, 1001), 30, 48, 50, Fraction(60000, 1001), 60, 90, 100, 120, 144,
    240))


class StartPastEnd(BgmatteError):
    """A span of a video asked to start at or past its end (`VideoReader(start=...)`)."""


def check_span(start: float, duration: float | None) -> None:
    """Refuse a span of a video that cannot be read: a start that is negative or not a number of seconds, or a
    duration that is not more than 0."""
    if not math.isfinite(start) or start < 0:
        raise BgmatteError(f"the start must be 0 or more seconds from the first frame, not {start:g}")
    if duration is not None and (not math.isfinite(duration) or duration <= 0):
        raise BgmatteError(f"the duration must be more than 0 seconds, not {duration:g}")


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Frame:
    """One decoded frame: upright RGB pixels and the timestamp it had in the source."""

    image: np.ndarray  # (H, W, 3) uint8 RGB, rotation already applied
    index: int  # 0-based position in decoding order (from a span's first frame: `VideoReader(start=...)`)
    pts: int | None  # presentation timestamp in `time_base` units (None if the container gave none)
    time_base: Fraction | None
    seconds: float = 0.0  # from the clip's (or span's) first frame, by `FrameClock`: never going back
    duration: int | None = None  # how long it shows, in `time_base` units (None if the container does not say)

    @property
    def time(self) -> float | None:
        """Presentation time in seconds, or None when the source had no timestamp."""
        if self.pts is None or self.time_base is None:
            return None
        return float(self.pts * self.time_base)


@dataclass(frozen=True)
class Display:
    """How players should show a video's pixels: their shape, the matrix their YUV was made with and the colour
    primaries and transfer curve they were made for. Writers make and tag their output with it, so that
    anamorphic or tagged sources keep their look."""

    sample_aspect_ratio: Fraction = Fraction(1)  # a pixel's width over its height
    color_primaries: int | None = None  # FFmpeg's AVCOL_PRI_* code; None when the source does not say
    color_trc: int | None = None  # FFmpeg's AVCOL_TRC_* code; None when the source does not say
    colorspace: int | None = None  # FFmpeg's AVCOL_SPC_* code of the YUV matrix; None when the source does not say


@dataclass(frozen=True)
class AudioInfo:
    """What the source's first audio track is (codec 'unknown' when FFmpeg cannot decode it); give the source path
    to `VideoWriter(audio_from=...)` to carry that track and every other one."""

    codec: str
    sample_rate: int
    channels: int


class VideoReader:
    """Decode a video on a background thread and iterate over its frames as `Frame`s (upright uint8 RGB).

    Arguments:
        path: the video file.
        queue_size: how many decoded frames may wait for the consumer.
        apply_rotation: turn frames upright according to the display-matrix rotation.
        niceness: run the decoding at this much lower priority, on the reading thread alone
            (`lower_thread_priority`); 0 leaves priority and FFmpeg's decoding threads as they are.
        max_pixels: refuse frames larger than this (the still images' limit by default; None: no limit),
            from the size the file declares before anything is decoded, and again for every frame.
        start, duration: read only the frames whose time is in [start, start + duration) seconds from the
            video's first frame (duration None: to the end). The reader seeks to the keyframe at or before the
            start and decodes and drops the frames before it, so that the first frame is exact inside a long
            group of pictures; an MPEG program stream (.mpg, .vob), whose stamps after a seek are guesses, is
            demuxed from its beginning instead, without decoding, which takes time in proportion to the start.
            A start at or past the end of the video is a `StartPastEnd` (a `BgmatteError`).

    A span's frames are given as a clip of their own: `Frame.index` counts from its first frame and the
    timestamps are shifted so that it is at 0 (in the same time base); `offset` is that frame's time in the
    source's timeline (0.0 for a whole read, whose timestamps are the source's own), where the writer takes
    the audio from (`VideoWriter(audio_start=...)`). `duration` and `frame_count` then estimate the span's.
    Either is None where the file does not say it before it is read (an MPEG program stream's length, which
    FFmpeg only guesses), unless a span's duration gives it.

    The file's best video stream is read (FFmpeg's choice, never a cover picture). A damaged packet is
    skipped, its frame lost, with one warning at the end that counts them (`skipped`); a truncated input,
    or one damaged beyond that, ends the iteration at the last decodable frame, and `error` then holds a
    `BgmatteError` that says what happened (None after a clean end). Use it as a context manager, or
    call `close()`, so that stopping early also stops the thread.

    `display` says how the upright frames are meant to be shown (pixel shape, colour tags) for the
    writers to carry on; `display_at` gives the same for frames resized to another size.
    """

    def __init__(self, path: str | os.PathLike, *, queue_size: int = 8, apply_rotation: bool = True,
                 niceness: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS, start: float = 0.0,
                 duration: float | None = None):
        check_span(start, duration)
        self.path = Path(path)
        self.niceness = niceness
        self.max_pixels = max_pixels
        self.start = float(start)
        self._span = float(duration) if duration is not None else None  # seconds asked for; None: to the end
        self._trimmed = self.start > 0 or self._span is not None
        self.offset = 0.0  # the first frame's time in the source, taken off every timestamp of a span
        self._shift = Fraction(0)  # the same, exact
        self._origin = 0.0  # the time of the video's first frame, which the start counts from
        self._span_ended = False  # a frame after the span was met: the rest is not read
        self._next_time = 0.0  # that frame's time in the source's seconds
        self._by_dts = False  # an AVI's frames are timed by the decoding stamps of its packets (`_place`)
        # The own stamps of the latest video packets, in decoding order (the decoding one in an AVI, the presentation
        # one elsewhere), and how many packets were numbered before the first of them since the start or a seek.
        self._packet_stamps: deque[int | None] = deque(maxlen=128)
        self._noted = 0
        self._given: int | None = None  # the number of the packet whose stamp the latest frame took (`_place`)
        self._presented = False  # the packets' own stamps went back: they are presentation stamps (never in an AVI)
        self._last_packet: int | None = None  # the own stamp of the latest packet since the start or a seek
        self.error: BgmatteError | None = None
        self.frames_read = 0
        self.skipped = 0  # damaged packets left out
        self._hidden = 0  # packets of frames that an edit list hides (MP4, MOV), which the decoder never gives out
        self._bad_in_a_row = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._stop = threading.Event()
        self._iterated = False
        self._held: Frame | None = None  # the latest frame decoded, put when the next one is (`_give`)
        self._container = _open_input(self.path, max_pixels)
        try:
            self._stream = _video_stream(self.path, self._container)
            self._refuse_size(self._stream.codec_context.width, self._stream.codec_context.height)
            self._prepare_decoder()
            self._packets = self._container.demux(self._stream)
            # Whether the header gives no rate of its own, as a variable-rate recording's (`_frame_rate`): `fps` is
            # then estimated, and other videos go with the frames by time, not one for one.
            self.variable_rate = False
            self.fps: Fraction | None = self._frame_rate()
            self._step = 1 / float(self.fps) if self.fps else 1 / 30  # a frame's length when nothing says
            self._timer = FrameClock(self.fps)  # the decoding thread's, once started
            self._by_dts = self._container.format.name == "avi"
            self._pending = self._decode_first()
            self._origin = self._time_of(self._pending[0])
            if self.start > 0:
                self._pending = self._seek_start(self._pending)
            if self._span is not None and self._time_of(self._pending[0]) >= self._span_end():
                raise BgmatteError(f"{self.path}: has no frame from {self.start:g} s to {self.start + self._span:g} s "
                                   "(a gap in its timestamps); choose a longer duration")
            self._refuse_size(self._pending[0].width, self._pending[0].height)
        except BaseException:
            self._container.close()
            raise
        first = self._pending[0]
        self.span_start = 0.0  # seconds from the video's first frame to the span's
        self._zero = self._origin  # the time `Frame.seconds` counts from
        if self._trimmed:
            self.offset = self._zero = self._time_of(first)
            self.span_start = self.offset - self._origin
            base = first.time_base or self._stream.time_base
            pts = self._pts_at(first, self.offset)
            self._shift = pts * base if pts is not None and base else Fraction(self.offset)
        self.rotation: int = _frame_rotation(first)
        self._turns = (self.rotation // 90) % 4 if apply_rotation else 0
        width, height = first.width, first.height
        self.size: tuple[int, int] = (height, width) if self._turns % 2 else (width, height)
        self.time_base: Fraction | None = self._stream.time_base
        self.duration: float | None = self._duration()
        self.frame_count: int | None = self._frame_count()
        if self._trimmed:
            self.duration, self.frame_count = self._span_length()
        context = self._stream.codec_context  # ProRes frames lack the colour tags the container gives
        self.display = Display(_pixel_shape(self._stream.sample_aspect_ratio, self._turns),
                               _known(first.color_primaries) or _known(context.color_primaries),
                               _known(first.color_trc) or _known(context.color_trc),
                               _known_matrix(first.colorspace) or _known_matrix(context.colorspace))
        # What frames that do not say their matrix are read with: the container's, else what players assume.
        self._matrix = int(context.colorspace) if _says_matrix(context.colorspace) \
            else _matrix_for(self.display, first.width, first.height)
        audio = self._container.streams.audio
        self.audio: AudioInfo | None = _audio_info(audio[0]) if audio else None
        self._thread = threading.Thread(target=self._run, name=f"bgmatte-read-{self.path.name}", daemon=True)
        self._thread.start()

    @property
    def still(self) -> bool:
        """Whether the file is a still image that FFmpeg reads as a one-frame video (its image demuxers: png_pipe,
        image2, ...; not GIF, which may be animated)."""
        name = self._container.format.name
        return name in ("image2", "image2pipe") or (name.endswith("_pipe") and name != "gif_pipe")

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def display_at(self, width: int, height: int) -> Display:
        """`display` for the frames resized to width x height: the pixel shape changes so that the picture
        keeps the source's display aspect ratio (square pixels again when the new size has that ratio)."""
        stretch = Fraction(self.width * height, self.height * width)
        return replace(self.display, sample_aspect_ratio=_storable(self.display.sample_aspect_ratio * stretch))

    def _frame_rate(self) -> Fraction | None:
        """The stream's frame rate: its header's average (an AVI's guessed rate: its average may be its tick rate).
        A stream whose header gives no average, or one frame a tick of its time base (a variable-rate Matroska
        file in milliseconds says 1000 fps, FFmpeg's guess the stamps' common divisor), is timed by the spacing of
        its first stamps (`_rate_of_stamps`), and by the header's guesses only where that finds none; it is then
        `variable_rate`."""
        stream = self._stream
        if self._container.format.name == "avi" and stream.guessed_rate:
            return stream.guessed_rate
        average, base = stream.average_rate, stream.time_base
        if average and not (base and average * base >= 1):
            return average
        estimated = _rate_of_stamps(self.path, stream.index)
        self.variable_rate = estimated is not None
        return estimated or average or stream.guessed_rate or stream.base_rate

    def _refuse_size(self, width: int, height: int) -> None:
        """Refuse a stream whose frames are above `max_pixels`, before they are decoded (0 x 0: not known yet)."""
        excess = _excess_pixels(width, height, self.max_pixels)
        if excess:
            raise BgmatteError(f"{self.path}: {width}x{height} is {excess} (refused as a possible decompression bomb)")

    def _decode_first(self) -> list[av.VideoFrame]:
        """Decode up to the first frame now, so that size and rotation are known before iteration starts."""
        frames = self._decode_next("")
        if frames is None:
            raise BgmatteError(f"{self.path}: the video stream has no frames")
        return frames

    def _decode(self, packet: av.Packet) -> list[av.VideoFrame]:
        """The frames of one packet. A damaged one (invalid data) is skipped and counted, and the decoder goes on
        with the next: only `_MAX_BAD_PACKETS` in a row end the stream, with that error."""
        self._note_stamps(packet)
        hidden = packet.is_discard and packet.size > 0
        self._hidden += hidden
        try:
            frames = self._placed(self._stream.decode(packet))
        except av.InvalidDataError:
            # A frame of the span (or one whose time is unknown) was lost; one an edit list hides does not count.
            if not hidden and not self._before_start(packet):
                self.skipped += 1
            self._bad_in_a_row += 1
            if self._bad_in_a_row >= _MAX_BAD_PACKETS:
                raise
            return []
        self._bad_in_a_row = 0
        return frames

    def _note_stamps(self, packet: av.Packet) -> None:
        """See whether the packets' stamps are presentation stamps (those of a stream with B-frames go back in decoding
        order, before the decoder gives out the first frame that comes earlier), and where they may be in decoding
        order instead, keep a packet's stamp for `_place` and give the packet its number as its decoding stamp: the
        decoder hands that on to the frame it lets out with the packet, which then tells where the frame goes, however
        many threads decode and whatever stamps FFmpeg made up (MPEG-TS's come twice over)."""
        if not packet.size:
            return
        own = packet.dts if self._by_dts else packet.pts
        if own is not None and not self._by_dts:
            if self._last_packet is not None and own < self._last_packet:
                self._presented = True
            self._last_packet = own
        if self._by_dts or (not self._presented and self._stream.codec_context.reorder_depth > 0):
            self._packet_stamps.append(own)
            packet.dts = self._noted + len(self._packet_stamps) - 1
            if len(self._packet_stamps) == self._packet_stamps.maxlen:
                self._packet_stamps.popleft()
                self._noted += 1

    def _forget_stamps(self) -> None:
        """Start the packets' stamps again, after a seek (whether the file's stamps are presentation ones stays
        known)."""
        self._packet_stamps.clear()
        self._noted, self._given, self._last_packet = 0, None, None

    def _before_start(self, packet: av.Packet) -> bool:
        """Whether a packet's frame is known to come before the span's start, which drops it anyway (never for a
        whole read)."""
        if self.start <= 0 or packet.pts is None or packet.time_base is None:
            return False
        return float(packet.pts * packet.time_base) < self._origin + self.start - _TIME_SLACK

    def _prepare_decoder(self) -> None:
        self._stream.thread_type = "AUTO"
        if self.niceness > 0:  # decode on the reading thread itself, whose priority is lowered, not in FFmpeg's
            self._stream.codec_context.thread_count = 1

    def _placed(self, frames: list[av.VideoFrame]) -> list[av.VideoFrame]:
        """Frames just given out by the decoder, each with its timestamp (`_place`) worked out once, now, in the order
        they came, and carried with it (in its opaque slot) through the seek, drop and flush paths."""
        for frame in frames:
            frame.opaque = (self._place(frame),)
        return frames

    def _stamp(self, frame: av.VideoFrame) -> float | None:
        """A decoded frame's timestamp in the source's seconds (None: none), as `_place` gave it."""
        placed = frame.opaque
        return placed[0] if isinstance(placed, tuple) else None

    def _place(self, frame: av.VideoFrame) -> float | None:
        """The timestamp of the frame the decoder gives out next, in the source's seconds (None: none). Where the
        packets' stamps are in decoding order, they are the frames' places in time taken in the order the decoder
        gives the frames out: an AVI's (AVI has no presentation stamps, and those FFmpeg makes up go back on every
        B-frame), and those of a stream that reorders (B-frames) whose packets' stamps have not gone back, such as an
        AVI copied into Matroska or MP4, whose frames decode to its stamps in decoding order. A decoded frame carries,
        as its decoding stamp, the number of the packet that let the decoder give it out (`_note_stamps`), which
        comes as many packets after the one holding the frame's place in time as the decoder holds back for
        reordering; that packet's stamp is the frame's time (gaps of dropped frames included). A frame without that
        packet (drained from the decoder at the end) takes the stamp after the one the frame before took."""
        base = frame.time_base or self._stream.time_base
        if base is None:
            return None
        own = float(frame.pts * base) if frame.pts is not None else None
        held = self._stream.codec_context.reorder_depth
        if not self._by_dts and (self._presented or held == 0 or not self._packet_stamps):  # none numbered: own stamps
            return own
        seen, first = self._packet_stamps, self._noted
        number = frame.dts - held if frame.dts is not None else self._given + 1 if self._given is not None else None
        if number is not None and first <= number < first + len(seen) and seen[number - first] is not None:
            self._given = number
            return float(seen[number - first] * base)
        return None if self._by_dts else own  # an AVI's is counted at the frame rate

    def _time_of(self, frame: av.VideoFrame) -> float:
        """A decoded frame's time in the source's seconds (`FrameClock.peek`), before it is placed."""
        return self._timer.peek(self._stamp(frame))

    def _seek_start(self, first: list[av.VideoFrame]) -> list[av.VideoFrame]:
        """The frames from the span's start on, those of its packet: seek to the keyframe at or before it, then
        decode and drop the frames before it. A seek that lands after the start (an index that is off) is tried
        further back, and then the file is read from its beginning, so that no frame of the span is missed; so is
        a video without timestamps, which can only be timed by counting its frames. An MPEG program stream is never
        sought (`_read_to_start`). `first`: the first frame's packet, decoded."""
        whole = self._duration()
        if whole and self.start >= whole - _TIME_SLACK:
            raise self._past_the_end()
        target = self._origin + self.start
        base = self._stream.time_base
        if self._stamp(first[0]) is None or not base:
            return self._drop_before(first, target)
        skipped = self.skipped
        if self._program_stream:
            return self._read_to_start(target, skipped)
        for back in _SEEK_BACK:
            self._timer.last, self.skipped = None, skipped  # a damaged packet that each try decodes again counts once
            self._forget_stamps()
            try:
                self._container.seek(math.floor((target - back) / base), stream=self._stream)
            except av.FFmpegError:
                break
            self._packets = self._container.demux(self._stream)
            frames = self._decode_next()
            if frames and self._stamp(frames[0]) is not None and self._time_of(frames[0]) <= target + _TIME_SLACK:
                return self._drop_before(frames, target)
        logger.debug("%s: seeking missed %.3f s; reading from the beginning", self.path, target)
        self._reopen()
        self.skipped = skipped
        return self._drop_before(self._decode_first(), target)

    @property
    def _program_stream(self) -> bool:
        """Whether the file is an MPEG program stream (.mpg, .vob: FFmpeg's "mpeg"), which has no index: a seek lands
        at a byte position, and the stamps after it are FFmpeg's guesses, counted on from the first packet header met
        there, until a later header carries a stamp of its own (up to 0.1 s off for a second, when small frames share
        a pack); its stream's length is estimated from the last stamps found near the end of the file."""
        return self._container.format.name == "mpeg"

    def _read_to_start(self, target: float, skipped: int) -> list[av.VideoFrame]:
        """`_seek_start` for an MPEG program stream: demux from the beginning, whose stamps FFmpeg counts right, without
        decoding, keeping the packets from the last keyframe at or before `target`, and decode those on to it. The
        demuxer stops at the first packet decoded after the start, whose frame and all that follow come after it."""
        self._reopen()
        self.skipped = skipped
        held: list[av.Packet] = []
        for packet in self._packets:
            stamp = packet.pts if packet.pts is not None else packet.dts
            moment = float(stamp * packet.time_base) if stamp is not None and packet.time_base else None
            if packet.is_keyframe and moment is not None and moment <= target + _TIME_SLACK:
                held = []
            held.append(packet)
            if packet.dts is not None and packet.time_base and float(packet.dts * packet.time_base) > target:
                break
        self._packets = itertools.chain(held, self._packets)
        return self._drop_before(self._decode_next(), target)

    def _reopen(self) -> None:
        """Open the file again, to read it from its very beginning."""
        index = self._stream.index
        self._container.close()
        self._container = _open_input(self.path, self.max_pixels)
        self._stream = next(stream for stream in self._container.streams.video if stream.index == index)
        self._prepare_decoder()
        self._packets = self._container.demux(self._stream)
        self._timer.last = None
        self._forget_stamps()
        self._bad_in_a_row = 0
        self._hidden = 0

    def _decode_next(self, where: str | None = None) -> list[av.VideoFrame] | None:
        """The frames of the next packet that gives any; None at the end of the file. A decoder that fails for good
        is a `BgmatteError` saying `where` (by default: at the span's start)."""
        try:
            for packet in self._packets:
                frames = self._decode(packet)
                if frames:
                    return frames
        except av.FFmpegError as exc:
            where = f" at {self.start:g} s" if where is None else where
            raise BgmatteError(f"{self.path}: no decodable video frame{where} ({_reason(exc)})") from None
        return None

    def _drop_before(self, frames: list[av.VideoFrame] | None, target: float) -> list[av.VideoFrame]:
        """Decode on from `frames` to the first frame at or after `target` (the source's seconds) and return it with
        the rest of its packet's frames; those before it are dropped."""
        while frames is not None:
            for position, frame in enumerate(frames):
                if self._time_of(frame) >= target - _TIME_SLACK:
                    return frames[position:]
                self._timer.take(self._stamp(frame))
            frames = self._decode_next()
        raise self._past_the_end()

    def _past_the_end(self) -> StartPastEnd:
        """The error for a start at or past the end of the video, with its length: the header's, or how far it
        could be decoded when that is less (a truncated file) or the header does not say."""
        whole = self._duration()
        clock = self._timer.last
        reached = clock - self._origin + self._step if clock is not None else None
        length = reached if reached is not None and (not whole or reached < whole - _TIME_SLACK) else whole
        lasts = f"; the video lasts {length:.2f} s" if length else ""
        last = f", its last frame starting at {clock - self._origin:.2f} s" if clock is not None else ""
        cut = f" (its header says {whole:.2f} s: the file looks truncated)" if length and whole and length < whole - \
            max(2 * self._step, 0.25) else ""
        return StartPastEnd(f"{self.path}: no frame starts at or after {self.start:g} s{lasts}{last}{cut}")

    def _span_length(self) -> tuple[float | None, int | None]:
        """The span's estimated duration and frame count, from the header's duration and frame rate: what is left
        after the start, or the duration asked for when less (None when neither is known)."""
        left = self.duration - self.start if self.duration else None
        length = min(left, self._span) if left is not None and self._span is not None else \
            left if left is not None else self._span
        if length is None:
            return None, None
        length = max(0.0, length)  # frames start within it: 0.1 s at 25 fps holds 3 (at 0, 0.04 and 0.08)
        return length, max(1, math.ceil(length * float(self.fps) - 1e-3)) if self.fps else None

    def _duration(self) -> float | None:
        """How long the video lasts by its header, from its first frame; None when that is not known. An MPEG program
        stream's length is FFmpeg's estimate from the last stamps it finds near the end of the file, which says
        nothing (3.36 s of 4 s; 0.04 s of 1 s; a cut file's is as long as what is left), so it is not taken."""
        if self._program_stream:
            return None
        stream = self._stream
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        tagged = self._tagged_end()
        if tagged is not None:
            return tagged - self._matroska_start()
        if self._container.duration:
            return self._container.duration / av.time_base - self._matroska_start()
        return None

    def _tagged_end(self) -> float | None:
        """Where the video track ends by its own DURATION tag ('HH:MM:SS.nnnnnnnnn', which Matroska muxers write
        per track: the end of its last frame, without the audio's tail), in seconds; None when it has none."""
        tag = self._stream.metadata.get("DURATION") or self._stream.metadata.get("duration")
        if not tag:
            return None
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            return None

    def _matroska_start(self) -> float:
        """Where a Matroska stream's timestamps start (0 elsewhere): its DURATION tag and segment duration say where
        it ends (a remuxed MPEG-TS may start at 10 s), not how long it lasts."""
        stream = self._stream
        if "matroska" not in self._container.format.name or not stream.start_time or not stream.time_base:
            return 0.0
        return max(0.0, float(stream.start_time * stream.time_base))

    def _frame_count(self) -> int | None:
        """The container's frame count, or one estimated from duration and frame rate (None if neither). An MP4's or
        MOV's index also counts the frames its edit list hides (`ffmpeg -ss 2 -c copy` keeps those from the keyframe
        before the cut), while its stream's duration is what the list shows: the count is no more than that holds."""
        if self._stream.frames:
            shown = int(self._stream.frames)
            if "mp4" in self._container.format.name.split(",") and self.duration and self.fps:
                shown = min(shown, max(1, round(self.duration * float(self.fps))))
            return shown
        if self.duration and self.fps:
            return max(1, round(self.duration * float(self.fps)))
        return None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        if self._iterated:
            raise RuntimeError("a VideoReader can only be iterated once")
        self._iterated = True
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return
                continue
            if item is _END:
                return
            self.frames_read += 1
            yield item

    def close(self) -> None:
        """Stop decoding (if still running) and release the file; safe to call twice."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)

    # Everything below runs on the decoding thread.

    def _run(self) -> None:
        lower_thread_priority(self.niceness)
        index = 0
        failure: str | None = None
        flush = True  # after a failure: whether the frames the decoder still holds are worth taking
        try:
            frames: list[av.VideoFrame] = self._pending
            self._pending = []
            while True:
                for frame in frames:
                    if self._after_span(frame):
                        return
                    excess = _excess_pixels(frame.width, frame.height, self.max_pixels)
                    if excess:  # the size may change in mid-stream
                        failure, flush = f"frame {index + 1} is {frame.width}x{frame.height}, {excess}", False
                        return
                    if not self._give(self._to_frame(frame, index)):
                        return
                    index += 1
                try:
                    packet = next(self._packets)
                except StopIteration:
                    break
                if self._stop.is_set():
                    return
                frames = self._decode(packet)
        except av.FFmpegError as exc:
            failure = _reason(exc)
            if self._bad_in_a_row >= _MAX_BAD_PACKETS:
                failure = f"{self._bad_in_a_row} damaged packets in a row: {failure}"
        except Exception as exc:  # noqa: BLE001 - reported to the consumer, never lost
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            if failure is not None:
                # Frames the decoder still holds (reordering delay) were decoded fine; keep them.
                try:
                    for frame in self._placed(self._stream.decode(None)) if flush else ():
                        if self._after_span(frame) or _excess_pixels(frame.width, frame.height, self.max_pixels):
                            break
                        if not self._give(self._to_frame(frame, index)):
                            break
                        index += 1
                except Exception:  # noqa: BLE001 - the decoder is already broken; we tried
                    pass
                frames = f"{index} frame{'s' if index != 1 else ''}"
                self.error = BgmatteError(f"{self.path}: decoding stopped after {frames} ({failure})")
            elif not self._stop.is_set():
                self.error = self._check_complete(index)
            self._give_last(clean=failure is None and self.error is None and not self._stop.is_set())
            if self.skipped:
                lost = "packet that could not be decoded; its frame is" if self.skipped == 1 else \
                    "packets that could not be decoded; their frames are"
                logger.warning("%s: skipped %d damaged video %s missing", self.path, self.skipped, lost)
            self._container.close()
            self._put(_END)

    def _give(self, frame: Frame) -> bool:
        """Put the frame held back before `frame` and hold `frame`, so that the last one is still there for
        `_give_last`; False when the consumer went away."""
        held, self._held = self._held, frame
        return held is None or self._put(held)

    def _give_last(self, clean: bool) -> None:
        """Put the held frame, the last one. Where the reading ended `clean` after it and it does not say how long it
        shows (a variable-rate Matroska file's frames do not), it lasts to the next frame where a span ended at one,
        else to the video's end by the header's own length of the video track (not the container's, which the audio
        may make longer)."""
        frame, self._held = self._held, None
        if frame is None:
            return
        stream = self._stream
        own = bool(stream.duration and stream.time_base) or self._tagged_end() is not None
        end = None  # where it stops showing, in seconds from the one `Frame.seconds` count from
        if clean and frame.duration is None and frame.time_base:
            if self._span_ended:
                end = self._next_time - self._zero
            elif own and self._duration():
                end = self._origin + self._duration() - self._zero
        ticks = round(Fraction(end - frame.seconds) / frame.time_base) if end is not None else 0
        self._put(replace(frame, duration=ticks) if ticks > 0 else frame)

    def _after_span(self, frame: av.VideoFrame) -> bool:
        """Whether `frame` comes after the span, which then ends (`_span_ended`); else it is placed in time (`_timer`)."""
        moment = self._time_of(frame)
        if moment >= self._span_end():
            self._span_ended, self._next_time = True, moment
            return True
        self._timer.take(self._stamp(frame))
        return False

    def _span_end(self) -> float:
        """Where the span ends, in the source's seconds, less the slack for rounding (infinite with no duration)."""
        return self._origin + self.start + self._span - _TIME_SLACK if self._span is not None else math.inf

    def _check_complete(self, decoded: int) -> BgmatteError | None:
        """A file cut short decodes without an error; compare with what the header promised."""
        if self._trimmed:
            return self._check_span_complete()
        if self._by_dts:
            return self._check_avi_complete()
        # The index counts the frames an edit list hides too, which the demuxer marks and the decoder drops: they
        # were read, not lost. Frames lost to damaged packets were in the file all the same (the warning counts
        # them). The slack of old stays on top: two frames, or 1% of a long clip.
        expected = max(0, int(self._stream.frames or 0) - self._hidden)
        if expected and decoded + self.skipped < expected - max(2, expected // 100):
            return BgmatteError(f"{self.path}: ended after {decoded} of {expected} frames (the file looks truncated or damaged)")
        last_time = self._timer.last
        if not expected and self.duration and last_time is not None and self.fps:
            start = float(self._stream.start_time * self._stream.time_base) if self._stream.start_time else 0.0
            # The duration counts from the stream's start; a damaged file's start may come after its first frame
            # (FFmpeg takes it from a later packet), and then the first frame is where the times count from.
            start = min(start, self._origin)
            step = 1.0 / float(self.fps)
            if last_time - start + step * (1 + self.skipped) < self.duration - self._time_slack():
                return BgmatteError(
                    f"{self.path}: ended at {last_time - start:.2f} s of {self.duration:.2f} s (the file looks truncated or damaged)"
                )
        return None

    def _check_avi_complete(self) -> BgmatteError | None:
        """`_check_complete` for an AVI, by time: its header's length counts ticks of its time base, the empty chunks
        of frames a capture dropped included (FFmpeg gives them no packet), and stays whole in a file cut short.
        Frames lost to damaged packets were in the file all the same."""
        stream, last = self._stream, self._timer.last
        if not stream.frames or not stream.time_base or last is None:
            return None
        length = float(stream.frames * stream.time_base)
        reached = last + self._step * (1 + self.skipped)
        if reached < length - max(2 * self._step, length / 100):
            return BgmatteError(f"{self.path}: ended at {reached:.2f} s of {length:.2f} s (the file looks truncated or "
                                "damaged)")
        return None

    def _check_span_complete(self) -> BgmatteError | None:
        """`_check_complete` for a span, by time: one that a later frame ended is whole; otherwise the file ended
        first, and is truncated if its header says that it goes on past where the decoding stopped, by more than the
        whole read's slack (`_time_slack`). Frames lost to damaged packets were in the file all the same."""
        whole = self._duration()
        if self._span_ended or not whole or self._timer.last is None:
            return None
        end = whole if self._span is None else min(whole, self.start + self._span)  # from the first frame
        last = self._timer.last - self._origin
        if last + self._step * (1 + self.skipped) < end - self._time_slack():
            return BgmatteError(f"{self.path}: ended at {last:.2f} s of {end:.2f} s (the file looks truncated or "
                                "damaged)")
        return None

    def _time_slack(self) -> float:
        """How far the decoding may stop short of `_duration` in a whole file: two frames against the video's own
        length (the track duration of a container that indexes its frames, MP4's or AVI's, or Matroska's DURATION
        tag), so that a short clip cut by a third shows; a quarter of a second against a length that may run on with
        the audio (the container's) or is estimated from the last timestamps FFmpeg finds (MPEG-TS's, among others)."""
        stream = self._stream
        indexed = bool(stream.duration and stream.time_base and stream.frames)
        own = indexed or (not (stream.duration and stream.time_base) and self._tagged_end() is not None)
        return 2 * self._step if own else max(2 * self._step, 0.25)

    def _to_frame(self, frame: av.VideoFrame, index: int) -> Frame:
        """The consumer's frame for one just placed in time (`_after_span`): its pts is that time, the file's own
        stamp where the clock took it, and a span's start at 0."""
        if not _says_matrix(frame.colorspace) and not frame.format.is_rgb and len(frame.format.components) >= 3:
            frame.colorspace = self._matrix  # FFmpeg's scaler would take BT.601 at any size
        image = frame.to_ndarray(format="rgb24")
        if self._turns:
            image = np.ascontiguousarray(np.rot90(image, self._turns))
        # Frames drained from the decoder at the end come without a time base; theirs is the stream's.
        base = frame.time_base or self._stream.time_base
        moment = self._timer.last
        pts = self._pts_at(frame, moment)
        if pts is not None and self._shift and base:  # a span starts at 0
            pts -= round(self._shift / base)
        return Frame(image=image, index=index, pts=pts, time_base=base, seconds=moment - self._zero,
                     duration=frame.duration or None)

    def _pts_at(self, frame: av.VideoFrame, moment: float) -> int | None:
        """The pts, in the frame's time base, of a frame placed at `moment`: the file's own where the clock took it."""
        if frame.pts is not None and frame.time_base is not None and float(frame.pts * frame.time_base) == moment:
            return frame.pts
        base = frame.time_base or self._stream.time_base
        return round(Fraction(moment) / base) if base else None

    def _put(self, item: object) -> bool:
        """Put with a timeout loop so that a consumer that went away (close) never leaves us blocked."""
        while True:
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if self._stop.is_set():
                    if item is _END:
                        continue  # close() drains the queue; the end marker still has to get in
                    return False


def rates_differ(first: Fraction | None, second: Fraction | None, frames: int | None = None) -> bool:
    """Whether pairing a clip of `frames` frames at rate `first` frame for frame with a video at rate `second` would
    drift half a frame or more by its end (29.97 against 30 fps does after 500 frames); when the count is not known,
    whether the rates differ by more than 1%. False when either rate is unknown."""
    if not first or not second:
        return False
    drift = abs(float(second) / float(first) - 1)
    return drift * frames >= 0.5 if frames else drift > 0.01


class FrameClock:
    """Places a video's frames in time, in decoding order, so that times never go back: each at its timestamp while
    those go forward. A frame without one goes one frame period after the frame before; a frame whose stamp is not
    after the time already given (a stamp repeated, or two swapped, in a variable-rate recording) half a period
    after it, so that the next stamps are theirs again. Stamps that go back twice within `SCRAMBLED_WITHIN` frames
    come from a demuxer that mixes up the order: every frame is counted from then on. `peek` says where a frame
    would go, `take` places it; setting `last` to None starts again (after a seek: the next frame goes at its own
    stamp, else at 0)."""

    SCRAMBLED_WITHIN = 16

    def __init__(self, fps: Fraction | None):
        self.step = 1 / float(fps) if fps else 1 / 30
        self.last: float | None = None  # the time of the last frame placed
        self.scrambled = False  # stamps went back twice close together: frames are counted from then on
        self._placed = 0
        self._stamp: float | None = None  # the last frame's own stamp
        self._went_back: int | None = None  # the number of the last frame whose stamp went back

    def peek(self, stamp: float | None) -> float:
        """The time a frame with this timestamp (in seconds; None: none) would take next."""
        if self.last is None:
            return stamp if stamp is not None else 0.0
        if stamp is None or self.scrambled:
            return self.last + self.step
        return stamp if stamp > self.last else self.last + self.step / 2

    def take(self, stamp: float | None) -> float:
        """Place the next frame; its time."""
        moment = self.peek(stamp)
        if stamp is not None and self._stamp is not None and self.last is not None and stamp <= self._stamp:
            if self._went_back is not None and self._placed - self._went_back <= self.SCRAMBLED_WITHIN:
                self.scrambled = True
            self._went_back = self._placed
        if stamp is not None:
            self._stamp = stamp
        self.last = moment
        self._placed += 1
        return moment


class TimedFrames:
    """A video's frames looked up by time instead of position, for pairing it with a clip of another frame rate.

    `at(seconds)` gives the frame nearest that time, counted from the video's first frame (the earlier one on
    a tie); the times asked for must not go back. Past the end (the last frame shows as long as the one before
    it, or one frame period) the last frame is given again and `ended` turns True. Frames are placed in time by
    their `seconds`.
    """

    def __init__(self, reader: VideoReader):
        self.ended = False
        self.count = 0  # frames read so far
        self._frames = iter(reader)
        self._current: tuple[float, Frame] | None = None
        self._last_step = 1 / float(reader.fps) if reader.fps else 1 / 30  # how long the current frame shows
        self._next = self._pull()

    def _pull(self) -> tuple[float, Frame] | None:
        frame = next(self._frames, None)
        if frame is None:
            return None
        self.count += 1
        return frame.seconds, frame

    @property
    def duration(self) -> float | None:
        """How long the video lasted (to the end of its last frame), once it has been read to the end; else None."""
        if self._next is not None or self._current is None:
            return None
        return self._current[0] + self._last_step

    def _advance(self) -> None:
        if self._current is not None and self._next[0] > self._current[0]:
            self._last_step = self._next[0] - self._current[0]
        self._current, self._next = self._next, self._pull()

    def at(self, seconds: float) -> Frame | None:
        """The frame showing at `seconds` after the first; None only for a video without frames."""
        if self._current is None:
            if self._next is None:
                return None
            self._advance()
        while self._next is not None and self._next[0] - seconds < seconds - self._current[0]:
            self._advance()
        if self._next is None and seconds >= self._current[0] + self._last_step - 1e-6:  # a microsecond for rounding
            self.ended = True
        return self._current[1]


def _open_input(path: Path, max_pixels: int | None) -> av.container.InputContainer:
    if not path.exists():
        raise BgmatteError(f"{path}: no such file")
    if path.is_dir():
        raise BgmatteError(f"{path}: is a folder, not a video file")
    if path.is_file() and path.stat().st_size == 0:  # FFmpeg would only say "Invalid data found"
        raise BgmatteError(f"{path}: empty file (0 bytes), not a video")
    _refuse_large_picture(path, max_pixels)
    try:
        container = av.open(str(path), mode="r")
    except PermissionError:
        raise BgmatteError(f"{path}: permission denied") from None
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise BgmatteError(f"{path}: not a video file that can be read ({_reason(exc)})") from None
    if not container.streams.video:
        container.close()
        raise BgmatteError(f"{path}: has no video stream")
    return container


def _refuse_large_picture(path: Path, max_pixels: int | None) -> None:
    """Refuse a still image given as a video (a PNG, a JPEG...) whose header declares more than `max_pixels`, before
    FFmpeg opens it: its probe decodes the whole picture to learn the stream's format."""
    if max_pixels is None:
        return
    try:
        with open(path, "rb") as file:
            head = file.read(65536)
    except OSError:
        return  # FFmpeg says why when it opens the file
    size = image_header_size(head)
    excess = _excess_pixels(*size, max_pixels) if size is not None else None
    if excess:
        raise BgmatteError(f"{path}: {size[0]}x{size[1]} is {excess} (refused as a possible decompression bomb)")


def _excess_pixels(width: int, height: int, max_pixels: int | None) -> str | None:
    """In words, how frames of `width` x `height` exceed `max_pixels` ("120 megapixels, above the limit of 100"),
    or None when they do not."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    return megapixels_above(width * height, max_pixels)


def _video_stream(path: Path, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The video stream to read: FFmpeg's best one (the most frames, the default), never a cover picture; which one
    is logged when the file has several."""
    streams = container.streams.video
    moving = [stream for stream in streams if not stream.disposition & av.stream.Disposition.attached_pic]
    if not moving:
        raise BgmatteError(f"{path}: has no video stream, only a cover picture")
    best = container.streams.best("video")
    chosen = next((stream for stream in moving if stream is best), moving[0])
    if len(streams) > 1:
        context = chosen.codec_context
        logger.info("%s: reading video stream #%d (%s %dx%d) of its %d video streams", path, chosen.index,
                    context.name, context.width, context.height, len(streams))
    return chosen


def _rate_of_stamps(path: Path, index: int) -> Fraction | None:
    """The frame rate of video stream `index` by the timestamps of its first `_RATE_STAMPS` packets (demuxed from a
    file opened again, not decoded): `_rate_of_spacings` of them in presentation order. None when fewer than two
    packets are stamped, or the file cannot be read again."""
    try:
        with av.open(str(path)) as container:
            stream = next(stream for stream in container.streams.video if stream.index == index)
            packets = (packet for packet in container.demux(stream) if packet.size and packet.pts is not None)
            stamps = sorted({packet.pts for packet in itertools.islice(packets, _RATE_STAMPS)})
            base = stream.time_base
    except (av.FFmpegError, OSError, StopIteration):
        return None
    return _rate_of_spacings([later - earlier for earlier, later in zip(stamps, stamps[1:])], base)


def _rate_of_spacings(spacings: list[int], time_base: Fraction | None) -> Fraction | None:
    """A frame rate from the spacings of consecutive stamps (in `time_base` units): one over the mean of those within
    10% of their median, so that a gap of dropped frames or a burst does not move it, and the usual rate
    (`_USUAL_RATES`) where that is within 1% of it (29.97 fps in milliseconds is 33 and 34 apart); None without
    spacings."""
    if not spacings or not time_base:
        return None
    middle = sorted(spacings)[len(spacings) // 2]
    regular = [spacing for spacing in spacings if abs(spacing - middle) * 10 <= middle]
    rate = 1 / (Fraction(sum(regular), len(regular)) * time_base)
    usual = min(_USUAL_RATES, key=lambda candidate: abs(candidate / rate - 1))
    return usual if abs(usual / rate - 1) <= Fraction(1, 100) else Fraction(round(rate * 1000), 1000)


def _pixel_shape(ratio: Fraction | None, turns: int) -> Fraction:
    """The stream's sample aspect ratio for the frames as the reader gives them (inverted when a quarter turn
    made the rows columns); 1 when the stream gives none or an unusable one."""
    if not ratio or ratio <= 0 or not Fraction(1, 100) <= ratio <= 100:
        return Fraction(1)
    return 1 / ratio if turns % 2 else Fraction(ratio)


def _storable(ratio: Fraction) -> Fraction:
    """A ratio whose terms fit the 16 bits some formats (H.264's VUI) store them in, nearest to `ratio`."""
    limit = 65535
    while max(ratio.numerator, ratio.denominator) > 65535:
        limit //= 2
        ratio = ratio.limit_denominator(limit)
    return ratio


def _known(code: int | None) -> int | None:
    """An FFmpeg primaries or transfer code, or None for the codes that say nothing (0, 2 and 3 in both)."""
    return None if code is None or int(code) in (0, 2, 3) else int(code)


def _says_matrix(code: int | None) -> bool:
    """Whether an FFmpeg YUV matrix code (AVCOL_SPC_*) says anything: not unspecified (2) or reserved (3)."""
    return code is not None and int(code) not in (2, 3)


def _known_matrix(code: int | None) -> int | None:
    """An FFmpeg YUV matrix code that the writers can make YUV with (`_LUMA_WEIGHTS`), else None: unspecified,
    RGB, or one they cannot make (YCgCo, BT.2020 constant luminance, ICtCp), for which the size decides."""
    return int(code) if code is not None and int(code) in _LUMA_WEIGHTS else None


def _codec_name(stream: av.stream.Stream) -> str:
    """The codec's own name ('mp3'), not its decoder's ('mp3float'), which is what muxers list; 'unknown' for a
    stream FFmpeg has no decoder for (PyAV gives it no codec context)."""
    if stream.codec_context is None:
        return "unknown"
    codec = stream.codec_context.codec
    return getattr(codec, "canonical_name", None) or stream.codec_context.name


def _audio_info(stream: av.audio.stream.AudioStream) -> AudioInfo:
    """An audio stream's codec, rate and channels; rate and channels are 0 when FFmpeg cannot decode it."""
    if stream.codec_context is None:
        return AudioInfo(_codec_name(stream), 0, 0)
    return AudioInfo(_codec_name(stream), stream.rate or 0, stream.channels or 0)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).strip().splitlines()[0]


def _frame_rotation(frame: av.VideoFrame) -> int:
    """The display-matrix rotation in degrees counterclockwise, snapped to a multiple of 90."""
    try:
        degrees = float(frame.rotation or 0)
    except (AttributeError, ValueError, TypeError):
        return 0
    if degrees != degrees:  # NaN: a singular matrix
        return 0
    snapped = int(round(degrees / 90.0)) * 90
    if abs(degrees - snapped) > 1:
        logger.warning("rotation of %.1f degrees is not a multiple of 90; ignored", degrees)
        return 0
    return ((snapped + 179) % 360) - 179  # in (-180, 180]


# ----------------------------------------------------------------------------------------------- writing


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class EncoderOptions:
    """Choices for video encoding; the defaults suit review copies that still edit well.

    `even` is what becomes of an odd width or height where the encoder cannot store it: libx264 and libx265
    need both sides even in 4:2:0 and an even width in 4:2:2; the frames are padded by one row or column (a copy
    of the last, so that no colour bleeds in) or cropped by one, with a warning that says how to keep the size.
    Cropping the padded picture in the bitstream cannot keep the exact size: H.264's frame crop and HEVC's
    conformance window count in CropUnitX/Y = SubWidthC/SubHeightC, two pixels in 4:2:0 (one only in 4:0:0 and
    4:4:4), and FFmpeg's h264_metadata and hevc_metadata filters refuse an odd crop, as libx264 does an odd
    crop-rect. (A container size one pixel below the SPS's decodes to it in FFmpeg's H.264 decoder alone, and
    makes a non-conforming file: not done.) ProRes 4:2:2 of an odd width is written as ProRes 4444 instead
    (`_for_size`): FFmpeg's prores_ks spoils the last column of an odd width in 4:2:2.
    VP8, VP9, MPEG-4 part 2, MPEG-2, MJPEG, FFV1 and MagicYUV store any size and keep it; other encoders are
    given even sides where their format halves the colour, the safe guess.
    """

    codec: str | None = None  # force an encoder (e.g. "mpeg4"); None chooses by extension
    crf: int | None = None  # quality for libx264 (default 18) and VP9 (default 30); lower is better
    preset: str | None = None  # libx264 speed preset (default veryfast; see X264_PRESETS)
    threads: int | None = None  # encoder threads; None leaves it to FFmpeg (about one per core and a half)
    even: Literal["pad", "crop"] = "pad"  # how to reach the even size that H.264, HEVC and ProRes need (see above)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in X264_PRESETS:
            raise BgmatteError(f"unknown x264 preset {self.preset!r}: choose one of {', '.join(X264_PRESETS)}")
        if self.crf is not None and not 0 <= self.crf <= 63:
            raise BgmatteError(f"crf must be between 0 and 63 (51 for H.264), not {self.crf}")
        if self.threads is not None and self.threads < 1:
            raise BgmatteError(f"encoder threads must be at least 1, not {self.threads}")
        if self.even not in ("pad", "crop"):
            raise BgmatteError(f"even must be 'pad' or 'crop', not {self.even!r}")


@dataclass(frozen=True)
class EncoderChoice:
    """The container and encoder a path and alpha wish lead to."""

    container: str  # FFmpeg muxer name
    codec: str
    pix_fmt: str
    even_sides: tuple[bool, bool]  # whether the width and the height must be even (`_even_sides`)
    options: dict[str, str] = field(default_factory=dict)
    # A forced encoder that the early check, made before the frames' size was known, saw refuse its usual
    # stand-in size but take another (H.263 takes only a few): the writer tries it at the frames' own size.
    provisional: bool = False


# The pixel formats tried, in this order, for an encoder given by name that does not take the usual one; the
# writer makes each of them from RGB or RGBA (`_video_frame`).
_OPAQUE_FORMATS = ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "yuv420p10le",
                   "yuv422p10le", "yuv444p10le", "gbrp", "rgb24", "bgr24", "rgb0", "bgr0", "rgba", "bgra")
_ALPHA_FORMATS = ("yuva420p", "yuva422p", "yuva444p", "yuva444p10le", "gbrap", "rgba", "bgra", "argb", "abgr")
_PROBE_SIZE = (320, 240)  # a size every general-purpose encoder takes
# Stand-ins tried when the frame size is not known yet and an encoder refuses _PROBE_SIZE: CIF, which H.261 and
# H.263 take, and PAL, which DV takes. An encoder that works at one of them is left for the real size to decide.
_OTHER_PROBE_SIZES = ((352, 288), (720, 576))
# Encoders that store the pixel shape in the video itself: PyAV gives Matroska no other way to record it.
_SAR_IN_BITSTREAM = frozenset({"libx264", "libx265", "mpeg4", "mpeg2video", "mjpeg"})


def _encoder_available(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises different types across versions
        return False
    return True


def choose_encoder(path: str | os.PathLike, *, alpha: bool, options: EncoderOptions = EncoderOptions(),
                   size: tuple[int, int] | None = None) -> EncoderChoice:
    """Pick the encoder for an output path: H.264 in .mp4/.mov/.mkv, VP9 in .webm, with alpha ProRes 4444 in .mov.

    Transparency needs .webm (VP9 yuva420p), .mov (ProRes 4444) or .mkv (lossless FFV1); .mp4 is
    refused with a message that says why. An encoder forced by `options.codec` is tried at once on a
    blank frame in memory, in the first pixel format it takes, so that one that cannot work here is
    refused now, with the file's name, instead of after the model has loaded. The frame is of `size`
    (width, height: the frames that will be written) when given, since some encoders take only a few
    sizes; without it a stand-in size is tried, and an encoder that refuses only that is left
    `provisional`, for the writer to try at the real size.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_CONTAINERS:
        raise BgmatteError(f"{path}: cannot write video with extension {path.suffix or '(none)'}; use .mp4, .mov, .mkv or .webm")
    container = OUTPUT_CONTAINERS[suffix]
    if alpha and container == "mp4":
        raise BgmatteError(
            f"{path}: MP4 cannot keep transparency (its H.264 video has no alpha channel); "
            "write .webm (VP9 with alpha), .mov (ProRes 4444) or a folder of PNGs instead"
        )
    h264 = "libx264" if _encoder_available("libx264") else "mpeg4"
    if options.codec is not None:
        codec = options.codec
        if not _encoder_available(codec):
            raise BgmatteError(f"{path}: the encoder {codec!r} is not available in this PyAV build")
        if av.Codec(codec, "w").type != "video":
            raise BgmatteError(f"{path}: {codec!r} is an {av.Codec(codec, 'w').type} encoder, not a video one")
        # A format's name (h264, vp9, hevc, as ffmpeg's -c:v takes it) opens FFmpeg's encoder for it: that encoder's
        # own name, so that it gets its settings (crf, preset, VP9's any size) as when it is named or chosen.
        codec = av.Codec(codec, "w").name
    elif container == "webm":
        codec = "libvpx-vp9"
    elif alpha and container == "mov":
        codec = "prores_ks"
    elif alpha and container == "matroska":
        codec = "ffv1"
    else:
        codec = h264
    pix_fmt = {
        "libvpx-vp9": "yuva420p" if alpha else "yuv420p",
        "prores_ks": "yuva444p10le" if alpha else "yuv422p10le",
        "ffv1": "bgra" if alpha else "yuv420p",
    }.get(codec, "yuva420p" if alpha and options.codec is not None else "yuv420p")
    settings: dict[str, str] = {}
    if codec == "libx264":
        if options.crf is not None and options.crf > 51:
            raise BgmatteError(f"{path}: crf {options.crf} is out of H.264's range (0-51)")
        settings = {"crf": str(options.crf if options.crf is not None else 18), "preset": options.preset or "veryfast"}
    elif codec == "libvpx-vp9":
        settings = {"crf": str(options.crf if options.crf is not None else 30), "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "1"}
        if alpha:
            settings["auto-alt-ref"] = "0"  # libvpx cannot combine alternate reference frames with alpha
    elif codec == "prores_ks":
        settings = {"profile": "4444" if alpha else "3"}
    elif codec == "libx265":
        settings = {"x265-params": "log-level=error"}  # x265 reports on stderr itself, past FFmpeg's logging
    provisional = False
    if options.codec is not None:
        pix_fmt, provisional = _working_pixel_format(path, container, codec, alpha, pix_fmt, settings, size,
                                                     options.even)
    if alpha and not _has_alpha(pix_fmt):
        raise BgmatteError(f"{path}: the encoder {codec} cannot keep transparency; leave the encoder to the extension")
    return EncoderChoice(container=container, codec=codec, pix_fmt=pix_fmt, even_sides=_even_sides(codec, pix_fmt),
                         options=settings, provisional=provisional)


# Encoders that store the exact size of a picture whatever its chroma subsampling, checked by encoding 97x65,
# 98x65 and 97x66 frames of a gradient in each and decoding them back to the same size and pixels (within the
# codec's loss, the last row and column too). ProRes is not among them: it takes an odd width in 4:2:2 and
# spoils the picture.
_ANY_SIZE = frozenset({"libvpx", "libvpx-vp9", "mpeg4", "mpeg2video", "mjpeg", "ffv1", "magicyuv"})


def _even_sides(codec: str, pix_fmt: str) -> tuple[bool, bool]:
    """Whether frames must have an even width and an even height: those the format keeps half the colour of,
    unless the encoder stores any size (`_ANY_SIZE`)."""
    if codec in _ANY_SIZE or not _is_yuv(pix_fmt):
        return False, False
    pixel_format = av.VideoFormat(pix_fmt)
    return pixel_format.chroma_width(2) < 2, pixel_format.chroma_height(2) < 2


def _encoded_size(size: tuple[int, int], even_sides: tuple[bool, bool], even: str) -> tuple[int, int]:
    """The size frames of `size` are encoded at: each side that must be even (`_even_sides`) made so, by padding
    or cropping one pixel (`EncoderOptions.even`)."""
    step = -1 if even == "crop" else 1
    return tuple(side + step * (side % 2) if must else side for side, must in zip(size, even_sides))


def _for_size(choice: EncoderChoice, size: tuple[int, int]) -> EncoderChoice:
    """`choice` for frames of `size`: ProRes 4:2:2 of an odd width becomes ProRes 4444, which keeps the exact size,
    since FFmpeg's prores_ks takes an odd width in 4:2:2 but spoils its last column (prores_aw refuses it)."""
    if choice.codec == "prores_ks" and choice.pix_fmt == "yuv422p10le" and size[0] % 2:
        return replace(choice, pix_fmt="yuv444p10le", options={**choice.options, "profile": "4444"},
                       even_sides=_even_sides("prores_ks", "yuv444p10le"))
    return choice


def _resize_note(choice: EncoderChoice, size: tuple[int, int], encoded: tuple[int, int]) -> str:
    """Why frames of `size` are encoded at `encoded` (`_encoded_size`), what the change is, and how to keep the
    exact size: said once per output, since a user who asked for 641x361 gets 642x362."""
    chroma = {(True, True): "4:2:0", (True, False): "4:2:2"}.get(choice.even_sides, "its pixel format")
    name = {"libx264": "H.264", "libx265": "HEVC"}.get(choice.codec, choice.codec)
    why = (f"{choice.codec} in {choice.pix_fmt} cannot store an odd "
           f"{'width and height' if all(choice.even_sides) else 'width' if choice.even_sides[0] else 'height'} "
           f"({chroma} keeps one colour sample per 2 pixels, and {name}'s crop counts in 2 pixels)")
    if encoded[0] >= size[0] and encoded[1] >= size[1]:
        change = (f"the output is {encoded[0]}x{encoded[1]}, one pixel larger than {size[0]}x{size[1]}: the added "
                  "row or column is copies of the last")
    else:
        change = f"the output is cropped to {encoded[0]}x{encoded[1]}, one pixel smaller than {size[0]}x{size[1]}"
    return (f"{why}; {change}. For exactly {size[0]}x{size[1]} write .webm (VP9), .mkv with --codec ffv1 "
            "(lossless), .mov with --codec prores_ks (ProRes 4444 at an odd width) or a folder of PNG frames")


def _working_pixel_format(path: Path, container: str, codec: str, alpha: bool, preferred: str,
                          settings: dict[str, str], size: tuple[int, int] | None, even: str) -> tuple[str, bool]:
    """The first pixel format that `codec` encodes a frame of `size` in and `container` takes: `preferred`, when
    the encoder lists it (or lists nothing), then those it lists among the ones the writer can make.

    Returned with whether the choice is provisional: with no `size`, stand-ins are tried, and an encoder that
    works at one of them but not at the first may still work at the real size, which the writer tries."""
    listed = [pixel_format.name for pixel_format in av.Codec(codec, "w").video_formats or ()]
    candidates = [preferred] if not listed or preferred in listed else []
    makeable = _ALPHA_FORMATS if alpha else _OPAQUE_FORMATS
    candidates += [name for name in makeable if name in listed and name not in candidates]
    if not candidates:
        if alpha:
            raise BgmatteError(f"{path}: the encoder {codec} cannot keep transparency; "
                               "leave the encoder to the extension")
        raise BgmatteError(f"{path}: the encoder {codec} takes none of the pixel formats bgmatte makes "
                           f"(it takes {', '.join(listed[:8])}); choose another encoder or leave it to the extension")
    options = tuple(sorted(settings.items()))
    at_size = size or _PROBE_SIZE
    failure = ""
    for pix_fmt in candidates:
        probe_size = _encoded_size(at_size, _even_sides(codec, pix_fmt), even) if size is not None else at_size
        failure = _try_encoder(container, codec, pix_fmt, options, probe_size)
        if not failure:
            if pix_fmt != preferred:
                logger.debug("%s: %s does not take %s; using %s", path, codec, preferred, pix_fmt)
            return pix_fmt, False
    # Some encoders take only a few sizes. One that works at another stand-in (tried in the first format only:
    # a size refused is refused in every format) fails here for its size alone.
    stand_ins = [stand_in for stand_in in (_PROBE_SIZE, *_OTHER_PROBE_SIZES) if stand_in != at_size]
    elsewhere = next((stand_in for stand_in in stand_ins
                      if not _try_encoder(container, codec, candidates[0], options, stand_in)), None)
    if elsewhere is not None and size is None:
        logger.debug("%s: %s refuses %dx%d frames but takes %dx%d; it is tried again at the frames' own size",
                     path, codec, *at_size, *elsewhere)
        return candidates[0], True
    if elsewhere is not None:
        raise BgmatteError(f"{path}: the encoder {codec} does not take {size[0]}x{size[1]} frames ({failure}); "
                           "choose another encoder or size, or leave the encoder to the extension")
    raise BgmatteError(f"{path}: the encoder {codec} does not work in {path.suffix.lower()} files here ({failure}); "
                       "choose another encoder or leave it to the extension")


@functools.lru_cache(maxsize=64)
def _try_encoder(container: str, codec: str, pix_fmt: str, settings: tuple[tuple[str, str], ...],
                 size: tuple[int, int]) -> str:
    """Encode one blank frame of `size` with `codec` in `pix_fmt`, tagged as the writer tags it, into an
    in-memory `container`: '' when that works, else the reason it failed. Flushing and closing are not part of
    the test: some muxers refuse to finish a one-frame in-memory file (x265 in MP4) that a real run finishes."""
    width, height = size
    output = None
    try:
        output = av.open(io.BytesIO(), mode="w", format=container)
        stream = output.add_stream(codec, rate=25, options=dict(settings))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        _tag_colours(stream.codec_context, pix_fmt, Display(), width, height)
        output.start_encoding()
        blank = np.zeros((height, width, 4 if _has_alpha(pix_fmt) else 3), np.uint8)
        frame = _video_frame(blank, pix_fmt, _matrix_for(Display(), width, height))
        frame.pts = 0
        output.mux(stream.encode(frame))
    except Exception as exc:  # noqa: BLE001 - any failure means the encoder cannot be used so
        return _reason(exc)
    finally:
        if output is not None:
            try:
                output.close()
            except Exception:  # noqa: BLE001 - the probe already failed; its leftovers do not matter
                pass
    return ""


def _has_alpha(pix_fmt: str) -> bool:
    return len(av.VideoFormat(pix_fmt).components) in (2, 4)


def _is_yuv(pix_fmt: str) -> bool:
    pixel_format = av.VideoFormat(pix_fmt)
    return not pixel_format.is_rgb and not pixel_format.has_palette and len(pixel_format.components) >= 3


def _as_fraction(rate: Fraction | float | int) -> Fraction:
    value = rate if isinstance(rate, Fraction) else Fraction(rate).limit_denominator(100_000)
    if value <= 0:
        raise ValueError(f"frame rate must be positive, not {rate}")
    return value


def lower_thread_priority(niceness: int) -> None:
    """Lower the calling thread's scheduling priority by ``niceness`` (Linux, where priorities are per thread;
    elsewhere nothing happens). Threads it starts later, FFmpeg's among them, inherit the lower priority.

    The pipeline does this to its decoding, converting and encoding threads when the model runs on the
    CPU: they then run in the gaps of the model's work instead of interrupting one of its threads while
    the other waits for it (measured at 1080p: end-to-end 95% of model-only throughput instead of 90%).
    """
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + niceness))
    except OSError as exc:  # pragma: no cover - lowering one's own priority is always allowed on Linux
        logger.debug("could not lower the priority of thread %d: %s", thread, exc)


class ClosesOnExit:
    """Context-manager behaviour of writers and sessions: `close()` on leaving the block; when an exception is
    already on its way out, a failure to close is logged instead of replacing it."""

    path: Path | None = None  # named in the log line, when there is one

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_error:  # noqa: BLE001 - do not hide the exception already on its way
            where = f"{self.path}: " if self.path is not None else ""
            logger.error("%swhile closing after an error: %s", where, close_error)


class _Worker:
    """Run `handle(item)` on a background thread for each queued item, then `finish()` once.

    After a failure the remaining items are drained without handling, so that producers never block;
    `finish()` always runs so that what was done so far is finalized.
    """

    interrupted: KeyboardInterrupt | None = None
    """A Ctrl-C or signal (`Terminated`) that came while `close` waited, for the writer to raise once its output
    is in place."""

    def __init__(self, name: str, handle: Callable[[Any], None], finish: Callable[[], None], queue_size: int,
                 niceness: int = 0):
        self._handle = handle
        self._niceness = niceness
        self._finish = finish
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.error: BaseException | None = None
        self._done = threading.Event()  # set once `finish()` has returned
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: object) -> None:
        while True:
            if self.error is not None and item is not _END:
                raise self.error
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> BaseException | None:
        """Wait for every item and `finish()`; returns the failure, if any. A KeyboardInterrupt meanwhile (a second
        Ctrl-C, SIGTERM as `Terminated`) does not cut the wait short, which would leave the output a hidden
        temporary file that nobody renames: it is kept as `interrupted`. The wait is on an event, not on
        `Thread.join`, which an exception interrupting it in Python 3.11 leaves saying the thread has ended."""
        ended = False
        while not self._done.is_set():
            try:
                if not ended:
                    self.put(_END)
                    ended = True
                self._done.wait(_POLL_S)
            except KeyboardInterrupt as exc:
                self.interrupted = self.interrupted or exc
        return self.error

    def _run(self) -> None:
        lower_thread_priority(self._niceness)
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    break
                if self.error is None:
                    try:
                        self._handle(item)
                    except BaseException as exc:  # noqa: BLE001 - handed to the producer
                        self.error = exc
        finally:
            try:
                self._finish()
            except BaseException as exc:  # noqa: BLE001
                if self.error is None:
                    self.error = exc
            finally:
                self._done.set()


def _frame_pixels(image: np.ndarray, channels: int) -> np.ndarray:
    """Check a frame for a writer; grey frames stay (H, W) for an RGB writer (encoded as grey, which
    gives the same pixels as expanding them, in a third of the time) and gain colour and alpha for RGBA."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, not {image.dtype} (see bgmatte.composite.to_uint8)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2 and channels == 3:
        return image
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGBA)
    if image.ndim != 3 or image.shape[2] != channels:
        kind = "RGBA (H, W, 4)" if channels == 4 else "RGB (H, W, 3)"
        raise ValueError(f"this writer takes {kind} frames, not shape {image.shape}")
    return image


# FFmpeg's colour codes (AVCOL_*), as the writers tag their streams.
_SPC_RGB, _SPC_BT709, _SPC_SMPTE170M = 0, 1, 6  # matrix: none (RGB), BT.709, BT.601
_RANGE_MPEG, _RANGE_JPEG = 1, 2  # studio swing, full swing
_PRI_BT709, _PRI_BT470BG, _PRI_SMPTE170M = 1, 5, 6
_TRC_BT709, _TRC_SMPTE170M = 1, 6
# The YUV matrices the writers make, by their AVCOL_SPC_* code: their red and blue weights (Kr, Kb), and their
# name for FFmpeg's scaler, which makes the formats `to_yuv420p` does not. These are all the scaler knows.
_LUMA_WEIGHTS = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087),
                 9: (0.2627, 0.0593)}
_SCALER_MATRICES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "SMPTE170M", 7: "SMPTE240M", 9: "BT2020"}


@functools.lru_cache(maxsize=None)
def _studio_ycbcr(matrix: int) -> np.ndarray:
    """The 3x4 matrix (cv2.transform's) from uint8 RGB to studio-swing Y'CbCr with `matrix`'s weights: a 3x3
    one with offsets is the case OpenCV runs in fixed point on SIMD, some fifteen times faster than one row."""
    red, blue = _LUMA_WEIGHTS[matrix]
    luma = np.array([red, 1 - red - blue, blue])
    blue_difference = (np.array([0, 0, 1]) - luma) / (2 * (1 - blue))
    red_difference = (np.array([1, 0, 0]) - luma) / (2 * (1 - red))
    return np.array([[*(luma * 219 / 255), 16], [*(blue_difference * 224 / 255), 128],
                     [*(red_difference * 224 / 255), 128]], np.float32)


@functools.lru_cache(maxsize=None)
def _grey_luma(matrix: int) -> np.ndarray:
    """The luma `to_yuv420p` gives each grey RGB pixel, so that grey frames encode exactly as their RGB
    expansion does."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    return np.ascontiguousarray(cv2.transform(ramp, _studio_ycbcr(matrix))[0, :, 0])


def to_yuv420p(image: np.ndarray, matrix: int = _SPC_SMPTE170M) -> np.ndarray:
    """uint8 RGB (H, W, 3) or grey (H, W) with even sides to planar YUV 4:2:0, studio swing, with the YUV matrix
    of FFmpeg's code `matrix` (AVCOL_SPC_*: BT.601 by default, 1 for BT.709; any of `_LUMA_WEIGHTS`), as the
    (3H/2, W) array ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes.

    These are the pixels FFmpeg's scaler makes with the same matrix (luma within 1, chroma the mean
    of each 2x2 block), in well under half its time: at 1080p the scaler alone costs about a
    third of an x264 'veryfast' encode, time the model would otherwise have on a CPU.
    """
    height, width = image.shape[:2]
    if image.ndim == 2:
        out = np.full((height * 3 // 2, width), 128, np.uint8)
        out[:height] = cv2.LUT(image, _grey_luma(matrix))
        return out
    weights = _studio_ycbcr(matrix)
    out = np.empty((height * 3 // 2, width), np.uint8)
    out[:height] = cv2.extractChannel(cv2.transform(image, weights), 0)
    half = cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    _, cb, cr = cv2.split(cv2.transform(half, weights))
    flat = out.reshape(-1)  # the chroma planes need not fill whole rows: write them as the flat buffer they are
    start, size = height * width, cb.size
    flat[start:start + size] = cb.reshape(-1)
    flat[start + size:] = cr.reshape(-1)
    return out


def _high_definition(width: int, height: int) -> bool:
    """Whether players take a picture of this size for HD, and so untagged colours for BT.709: from 1280 wide or
    577 high (576 is PAL's SD height)."""
    return width >= 1280 or height > 576


def _matrix_for(display: Display, width: int, height: int) -> int:
    """The YUV matrix (AVCOL_SPC_*) for frames of this size: the source's (`display`), or when it does not say,
    the one players assume there, BT.709 for HD and BT.601 below, so that players that ignore the tag (many do
    for HD) still show the right colours."""
    source = _known_matrix(display.colorspace)
    if source is not None:
        return source
    return _SPC_BT709 if _high_definition(width, height) else _SPC_SMPTE170M


def _video_frame(pixels: np.ndarray, pix_fmt: str, matrix: int = _SPC_SMPTE170M) -> av.VideoFrame:
    """uint8 grey, RGB or RGBA pixels as a frame for an encoder of `pix_fmt`: YUV is made with `matrix`
    (`_matrix_for`), studio swing (full swing for the yuvj formats), by `to_yuv420p` where it can and by FFmpeg's
    scaler elsewhere, and the frame says so; other formats are left to the encoder's own conversion."""
    if pix_fmt == "yuv420p" and (pixels.ndim == 2 or pixels.shape[2] == 3) and pixels.shape[0] % 2 == 0 \
            and pixels.shape[1] % 2 == 0:
        frame = av.VideoFrame.from_ndarray(to_yuv420p(pixels, matrix), format="yuv420p")
    else:
        layout = "gray" if pixels.ndim == 2 else "rgba" if pixels.shape[2] == 4 else "rgb24"
        frame = av.VideoFrame.from_ndarray(pixels, format=layout)
        if not _is_yuv(pix_fmt):
            return frame
        swing = _RANGE_JPEG if pix_fmt.startswith("yuvj") else _RANGE_MPEG
        # On one thread: on several, FFmpeg's scaler now and then garbles the rows where its slices meet (into
        # ProRes's 10-bit formats at heights such as 66 or 722, about one conversion in ten).
        frame = frame.reformat(format=pix_fmt, dst_colorspace=_SCALER_MATRICES[matrix], dst_color_range=swing,
                               threads=1)
    frame.colorspace = matrix
    frame.color_range = _RANGE_JPEG if pix_fmt.startswith("yuvj") else _RANGE_MPEG
    return frame


def _tag_colours(context: Any, pix_fmt: str, display: Display, width: int, height: int) -> None:
    """Tag an encoder with what its numbers are (`_video_frame`): the YUV matrix (`_matrix_for`) and its swing,
    or RGB; the primaries and transfer are the source's (`display`), or when it does not say, those players
    assume at this size (BT.709 for HD, BT.601 below), so that all three tags are set: MP4 and QuickTime files
    carry none of them otherwise, and players guess BT.709 for HD."""
    if _is_yuv(pix_fmt):
        context.colorspace = _matrix_for(display, width, height)
        context.color_range = _RANGE_JPEG if pix_fmt.startswith("yuvj") else _RANGE_MPEG
    elif av.VideoFormat(pix_fmt).is_rgb:
        context.colorspace = _SPC_RGB
    high_definition = _high_definition(width, height)
    context.color_primaries = display.color_primaries or (
        _PRI_BT709 if high_definition else _PRI_BT470BG if height == 576 else _PRI_SMPTE170M)
    context.color_trc = display.color_trc or (_TRC_BT709 if high_definition else _TRC_SMPTE170M)


class VideoWriter(ClosesOnExit):
    """Encode frames to a video file on a background thread, keeping source timestamps and audio.

    Arguments:
        path: the output file; its extension picks the container and encoder (`choose_encoder`).
        fps: the nominal frame rate (stream metadata, and timing for frames written without pts).
        alpha: frames are RGBA and the transparency is kept (.webm, .mov or .mkv).
        audio_from: a media file whose audio tracks are all carried into the output, in their order and with
            their language and title: each copied when the container can hold its codec, else transcoded (AAC,
            or Opus in .webm); trimmed to the video. A track FFmpeg cannot read is left out with a warning. The file
            is opened and demuxed once for all its tracks (`_AudioSource`), however many it has; once more for a
            track stored far from the others' sound of the same time (a badly interleaved file), which keeps the
            packets held for the others bounded.
        audio_start: where in `audio_from`'s timeline (seconds) the output's time 0 is: the `VideoReader.offset`
            of a span. The audio before it is left out and the rest moved back by it. Copied audio cannot be cut
            inside a packet, so it starts with the packet under it, before the output's 0: MP4 and QuickTime trim
            it there (an edit list), Matroska and WebM start up to a packet early (some 20 ms for AAC, 100 ms for
            FLAC); transcoded audio is cut at the sample. At the video's end likewise: a copied track ends with it in
            MP4 and QuickTime (its last packet's duration, which the edit list follows), and in Matroska and WebM up
            to a packet after it (their players would need DiscardPadding, which PyAV cannot write).
        overwrite: replace an existing file instead of refusing.
        options: encoder choices (`EncoderOptions`).
        choice: what `choose_encoder` already gave for this path, alpha and `options` (the pipeline's early
            check), so that a forced encoder is not tried a second time; None chooses here.
        display: the pixel shape and colour tags to give the stream (`VideoReader.display`); square
            pixels and the usual colours for the size when None.
        niceness: encode at this much lower priority (`lower_thread_priority`).

    `write(image, pts, time_base, duration)` takes uint8 (H, W, 3) RGB, or (H, W, 4) RGBA with alpha=True;
    grey (H, W) frames are expanded. Give each frame its source pts and time base to keep variable
    frame rate, and its duration (`Frame.duration`) to keep the source's length: the last frame shows that long
    (else as long as the step from the frame before it), and the audio ends with it; frames without pts follow
    `fps`. The stream is tagged with the colours its numbers are
    in (YUV by the source's matrix, else BT.709 for HD and BT.601 below; see `_tag_colours`), so that players
    show the frames' RGB.

    The file is started (encoder opened, header written) on the first `write`, which waits for that:
    a file that cannot be started fails there, and leaves nothing behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fps: Fraction | float | int = 30,
        alpha: bool = False,
        audio_from: str | os.PathLike | None = None,
        audio_start: float = 0.0,
        overwrite: bool = False,
        options: EncoderOptions = EncoderOptions(),
        choice: EncoderChoice | None = None,
        display: Display | None = None,
        queue_size: int = 8,
        niceness: int = 0,
    ):
        self.path = Path(path)
        self.alpha = alpha
        self.fps = _as_fraction(fps)
        self.choice = choice if choice is not None else choose_encoder(self.path, alpha=alpha, options=options)
        self.options = options
        self.display = display or Display()
        self.audio_from = Path(audio_from) if audio_from is not None else None
        if not math.isfinite(audio_start):  # negative is fine: a source whose first frame is before its 0
            raise ValueError(f"audio_start must be a number of seconds, not {audio_start}")
        self.audio_start = float(audio_start)
        if self.audio_from is not None and not self.audio_from.is_file():
            raise BgmatteError(f"{self.audio_from}: no such file (to take the audio from)")
        check_destination(self.path, overwrite)
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (width, height) as encoded
        self._temporary = temporary_sibling(self.path)
        self._input_shape: tuple[int, ...] | None = None
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._audio: list[_AudioCarrier] = []  # one per audio track carried
        self._tracks_warned: set[int] = set()  # audio tracks left out and warned about, so that a retry warns once
        self._time_base: Fraction | None = None
        self._last_pts: int | None = None
        self._last_step = 1
        self._tail: list[av.Packet] = []  # the latest frame's packet and those after it, held to set its duration
        self._delay: int | None = None  # how far the first packet's decoding stamp is before its presentation one
        self._closed = False
        self._opened = threading.Event()  # the encoding thread has tried to start the file
        self._start_error: BaseException | None = None  # why it could not, recorded before `_opened` is set
        self._reported: BaseException | None = None  # the failure already raised to the caller
        self._worker = _Worker(f"bgmatte-write-{self.path.name}", self._encode, self._finish, queue_size, niceness)

    def write(self, image: np.ndarray, pts: int | None = None, time_base: Fraction | None = None,
              duration: int | None = None) -> None:
        """Queue one frame for encoding (blocks while the queue is full; the first waits for the file to start);
        `duration`, in `time_base` units, is how long it shows (None: as long as the step from the frame before)."""
        if self._closed:
            raise RuntimeError(f"{self.path}: the writer is closed")
        image = _frame_pixels(image, 4 if self.alpha else 3)
        first = self._input_shape is None
        if first:
            self._input_shape = image.shape
        elif image.shape[:2] != self._input_shape[:2]:
            raise ValueError(f"{self.path}: frame size changed from {self._input_shape[:2]} to {image.shape[:2]}")
        try:
            self._worker.put((image, pts, time_base, duration))
        except Exception as exc:
            raise self._report(exc)
        if first:
            while not self._opened.wait(_POLL_S) and self._worker.alive:
                pass
            # The worker records a failure only after the signal; the writer's own record comes before it.
            error = self._start_error or self._worker.error
            if error is not None:
                raise self._report(error)

    @property
    def failed(self) -> bool:
        """Whether encoding or finishing the file failed, so that `close` leaves nothing under its name."""
        return self._worker.error is not None

    def close(self) -> Path | None:
        """Finish the file (flush, audio, trailer) and rename it to its final name; returns it, or None if empty.

        A file whose encoding failed is removed rather than renamed: its encoder broke off at a frame of its own,
        and with `overwrite` it would have replaced a whole earlier output with a broken one. A failure that
        `write` has already raised is not raised again."""
        if self._closed:
            return self.path if self.path.exists() and not self.failed else None
        self._closed = True
        error = self._worker.close()
        produced = self.frames_written > 0 and self._temporary.exists()  # frames are counted once the header is out
        if produced and error is None:
            os.replace(self._temporary, self.path)
        else:
            produced = False
            self._temporary.unlink(missing_ok=True)
            if self.frames_written == 0 and error is None:
                logger.warning("%s: no frames were written; no file was made", self.path)
        if self._worker.interrupted is not None:  # the file is whole and in place: now the stop goes on
            raise self._worker.interrupted
        if error is not None and error is not self._reported:
            raise self._report(error)
        return self.path if produced else None

    def _report(self, exc: BaseException) -> BgmatteError:
        """The encoding thread's failure as the caller sees it, remembered so that it is raised only once."""
        self._reported = exc
        if isinstance(exc, BgmatteError):
            return exc
        error = BgmatteError(f"{self.path}: encoding failed ({_reason(exc)})")
        error.__cause__ = exc
        return error

    # Everything below runs on the encoding thread.

    def _open(self, image: np.ndarray, time_base: Fraction | None) -> None:
        height, width = image.shape[:2]
        if self.choice.provisional:
            # The early check found this encoder only at a stand-in size; try it at the frames' own size, which
            # refuses it here, in one line and before any file exists, if it cannot take them.
            self.choice = choose_encoder(self.path, alpha=self.alpha, options=self.options, size=(width, height))
        exact = _for_size(self.choice, (width, height))
        if exact is not self.choice:
            logger.warning("%s: ProRes 422 cannot keep an odd width; writing ProRes 4444 instead, which keeps %dx%d "
                           "(larger files; give an even width for 422 HQ)", self.path, width, height)
            self.choice = exact
        self.size = _encoded_size((width, height), self.choice.even_sides, self.options.even)
        if self.size != (width, height):
            logger.warning("%s: %s", self.path, _resize_note(self.choice, (width, height), self.size))
        tb = time_base if time_base is not None else 1 / self.fps
        if self.choice.codec == "mpeg4" and tb.denominator > 65535:
            tb = Fraction(1, 1000)  # MPEG-4 part 2 allows time bases up to 1/65535; milliseconds keep VFR
        elif self.choice.codec in ("mpeg1video", "mpeg2video"):
            tb = 1 / self.fps  # they open only with a time base of one frame at one of their rates: no VFR
        self._time_base = tb
        # How long the last frame shows, and so where the video and audio end: its own duration when `write` gives
        # one, else the step between the last two frames, or one frame period until there are two (a one-frame
        # clip keeps the audio of that frame, not 1 tick of it).
        self._last_step = max(1, round(1 / (self.fps * tb)))
        if self.display.sample_aspect_ratio != 1 and self.choice.container in ("matroska", "webm") \
                and self.choice.codec not in _SAR_IN_BITSTREAM:
            logger.warning("%s: %s in %s cannot record the source's non-square pixels (aspect %s); players will "
                           "show it as square pixels: write .mp4 or .mov, or H.264, to keep its shape", self.path,
                           self.choice.codec, self.path.suffix.lower(), self.display.sample_aspect_ratio)
        try:
            self._start(copy_audio=True)
        except Exception as exc:  # noqa: BLE001 - nothing is written yet: undo, and retry or report
            copied = [carrier.codec for carrier in self._audio if carrier.copy]
            audio = _tracks_named(self._audio)
            self._abandon()
            if not copied or not self._starts_without_audio():
                raise self._start_failure(exc, audio) from exc
            # A muxer may list a codec it refuses when the header is written (QuickTime lists Opus and FLAC). Which
            # copied track it refused is not said, so every track is transcoded.
            logger.info("%s: %s refused the %s audio as it is (%s); transcoding it",
                        self.path, self.choice.container, _and_joined(copied), _reason(exc))
            try:
                self._start(copy_audio=False)
            except Exception as again:  # noqa: BLE001
                audio = _tracks_named(self._audio) or audio
                self._abandon()
                raise self._start_failure(again, audio) from again

    def _starts_without_audio(self) -> bool:
        """Whether the file starts with no audio track (and is dropped again): only then was a start that failed
        with copied audio refused for the audio, and worth trying again with the audio transcoded."""
        try:
            self._start(copy_audio=False, audio=False)
        except Exception:  # noqa: BLE001 - the failure with the audio is the one reported
            return False
        finally:
            self._abandon()
        return True

    def _start(self, *, copy_audio: bool, audio: bool = True) -> None:
        """Create the file, its video stream (opened first, so that the encoder's own refusal is never taken
        for the audio's) and audio (unless `audio` is False), and write its header."""
        width, height = self.size
        # Matroska would otherwise shift every stream when copied audio starts before zero (AAC priming, the packet
        # under a span's start), moving the video off its source timestamps; MP4 keeps them with an edit list.
        muxer_options = {"avoid_negative_ts": "disabled"} if self.choice.container in ("matroska", "webm") else {}
        container = av.open(str(self._temporary), mode="w", format=self.choice.container, options=muxer_options)
        self._container = container
        stream = container.add_stream(self.choice.codec, rate=self.fps, options=dict(self.choice.options))
        stream.width, stream.height = width, height
        stream.pix_fmt = self.choice.pix_fmt
        stream.time_base = self._time_base
        stream.codec_context.time_base = self._time_base
        if self.display.sample_aspect_ratio != 1:
            stream.codec_context.sample_aspect_ratio = self.display.sample_aspect_ratio
        _tag_colours(stream.codec_context, self.choice.pix_fmt, self.display, width, height)
        if self.choice.codec == "mpeg4":
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 3 * 118  # qscale 3 (FF_QP2LAMBDA = 118)
        stream.thread_type = "AUTO"
        if self.options.threads is not None:
            stream.codec_context.thread_count = self.options.threads
        self._stream = stream
        stream.codec_context.open()
        if self.audio_from is not None and audio:
            self._audio = _audio_carriers(self.audio_from, container, self.choice.container, allow_copy=copy_audio,
                                          warned=self._tracks_warned, start=self.audio_start)
        container.start_encoding()

    def _abandon(self) -> None:
        """Drop a file whose header could not be written, and everything opened for it."""
        for carrier in self._audio:
            carrier.discard()
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass
        self._container, self._stream, self._audio = None, None, []
        self._temporary.unlink(missing_ok=True)

    def _start_failure(self, exc: BaseException, audio: str | None) -> BgmatteError:
        """`audio` names the audio tracks the failed start had (`_tracks_named`), None if it had none."""
        if isinstance(exc, BgmatteError):
            return exc
        width, height = self.size
        streams = f"{self.choice.codec} video {width}x{height}" + (f" with {audio}" if audio else "")
        return BgmatteError(f"{self.path}: could not start the file ({streams}): {_reason(exc)}; nothing was written")

    def _fit(self, image: np.ndarray) -> np.ndarray:
        width, height = self.size
        if image.shape[1] == width and image.shape[0] == height:
            return image
        image = image[:height, :width]
        pad_y, pad_x = height - image.shape[0], width - image.shape[1]
        if pad_y or pad_x:
            image = np.pad(image, ((0, pad_y), (0, pad_x)) + ((0, 0),) * (image.ndim - 2), mode="edge")
        return np.ascontiguousarray(image)

    def _next_pts(self, pts: int | None, time_base: Fraction | None, duration: int | None = None) -> int:
        """The frame's pts in the stream's time base, kept strictly increasing; `_last_step` becomes how long it
        shows: its `duration` when given (at least a tick), else the step from the frame before."""
        tb = self._time_base
        if pts is not None:
            if time_base is not None and time_base != tb:
                pts = round(pts * time_base / tb)
        elif self._last_pts is None:
            pts = 0
        else:
            pts = self._last_pts + max(1, round((1 / self.fps) / tb))
        if self._last_pts is not None:
            if pts <= self._last_pts:
                logger.debug("%s: timestamp %d is not after %d; moved forward", self.path, pts, self._last_pts)
                pts = self._last_pts + 1
            self._last_step = pts - self._last_pts
        if duration and time_base is not None:
            self._last_step = max(1, round(duration * time_base / tb))
        self._last_pts = pts
        return pts

    def _encode(self, item: tuple[np.ndarray, int | None, Fraction | None, int | None]) -> None:
        image, pts, time_base, duration = item
        if self._container is None:
            try:
                self._open(image, time_base)
            except BaseException as exc:
                self._start_error = exc  # before the signal, so that the first write() cannot miss it
                raise
            finally:
                self._opened.set()
        frame = _video_frame(self._fit(image), self.choice.pix_fmt, _matrix_for(self.display, *self.size))
        frame.pts = self._next_pts(pts, time_base, duration)
        frame.time_base = self._time_base
        packets = self._stream.encode(frame)
        for carrier in self._audio:
            carrier.carry(until=float(frame.pts * self._time_base))
        self._mux_video(packets)
        self.frames_written += 1

    def _mux_video(self, packets: list[av.Packet]) -> None:
        """Mux the encoder's packets in their order, except the one of the latest frame in time and those after it
        (B-frames before it), which wait in `_tail` until a later frame's packet comes: the last frame's packet is
        then still there for `_finish` to give its duration, which the file's length ends with (encoders leave it
        0, and muxers then give it a frame period, 1 ms at 1000 fps)."""
        for packet in packets:
            if self._delay is None and packet.pts is not None and packet.dts is not None:
                self._delay = packet.pts - packet.dts
            if self._tail and (packet.pts is None or self._tail[0].pts is None or packet.pts > self._tail[0].pts):
                self._container.mux(self._tail)
                self._tail = []
            self._tail.append(packet)

    def _last_duration(self) -> None:
        """Make the file end `_last_step` ticks after the last frame, by the durations of packets in `_tail`: the last
        frame's own, and in MP4 and QuickTime also that of the packet last in decoding order when B-frames come
        after the last frame (their samples last from one decoding stamp to the next: it lasts to the end less the
        encoder's delay, `_delay`)."""
        latest, last = self._tail[0] if self._tail else None, self._tail[-1] if self._tail else None
        if latest is None or latest.pts is None:
            return
        base = latest.time_base or self._time_base
        end = round((self._last_pts + self._last_step) * self._time_base / base)
        latest.duration = max(1, end - latest.pts)
        if last is not latest and self.choice.container in ("mp4", "mov") and last.dts is not None \
                and self._delay is not None:
            last.duration = max(1, end - self._delay - last.dts)

    def _finish(self) -> None:
        if self._container is None:
            return
        try:
            self._mux_video(self._stream.encode(None))
            self._last_duration()
            self._container.mux(self._tail)
            self._tail = []
            end = float((self._last_pts + self._last_step) * self._time_base)
            for carrier in self._audio:
                carrier.finish(until=end)
        finally:
            for carrier in self._audio:  # the sources a failure above left open
                carrier.discard()
            try:
                self._container.close()
            except Exception as exc:  # noqa: BLE001
                raise _FinalizeError(f"{self.path}: could not finish the file ({_reason(exc)})") from exc


class _FinalizeError(BgmatteError):
    """The trailer could not be written: the temporary file is not playable and is removed."""


# Audio codecs that FFmpeg's MP4 and QuickTime muxers really write as they are, checked by muxing each: both
# list more (QuickTime lists Opus and FLAC, which it takes only in MP4 mode; MP4 lists PCM and refuses it), and
# a codec they list but refuse fails only when the header is written. QuickTime also takes the PCM it lists;
# Matroska and WebM take what they list. Anything else is transcoded.
_COPIED_AUDIO = {
    "mov": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "alac"}),
    "mp4": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "alac", "opus", "flac"}),
}


def _copies_audio(codec: str, container: str, output: av.container.OutputContainer) -> bool:
    """Whether `codec` audio goes into `container` as it is (else it is transcoded)."""
    if codec not in output.supported_codecs:
        return False
    if container in _COPIED_AUDIO:
        return codec in _COPIED_AUDIO[container] or (container == "mov" and codec.startswith("pcm_"))
    return True


def _audio_carriers(source: Path, output: av.container.OutputContainer, container: str, *, allow_copy: bool,
                    warned: set[int], start: float = 0.0) -> list[_AudioCarrier]:
    """A carrier for every audio track of `source`, in the source's order, from `start` seconds of its timeline
    (`VideoWriter.audio_start`). They share one `_AudioSource`, so that the file is opened and read once however many
    tracks it has, and each is still cut exactly at the video's end. A track that cannot be carried costs only
    itself: it is left out with a warning, given once for each track (those warned about go into `warned`)."""
    media = _AudioSource(source, start)
    count = len(media.input.streams.audio)
    if count == 0:
        logger.info("%s: has no audio track; the output has none either", source)
        media.close()
        return []
    carriers: list[_AudioCarrier] = []
    try:
        for track in range(count):
            codec = _codec_name(media.input.streams.audio[track])
            try:
                carriers.append(_AudioCarrier(media, track, count, output, container, allow_copy=allow_copy))
            except (av.FFmpegError, ValueError) as exc:  # it has not joined `media`, which stays open for the others
                if track not in warned:
                    warned.add(track)
                    logger.warning("%s: %s (%s) cannot be carried (%s); the output leaves it out", source,
                                   _track_label(track, count), codec, _reason(exc))
    except BaseException:
        for carrier in carriers:
            carrier.discard()
        media.close()
        raise
    if not carriers:
        media.close()
    return carriers


def _open_audio_source(source: Path) -> av.container.InputContainer:
    try:
        return av.open(str(source), mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise BgmatteError(f"{source}: cannot read its audio ({_reason(exc)})") from None


def _track_label(track: int, count: int) -> str:
    """How messages name the 0-based audio `track` of `count`: 'audio' when it is the only one."""
    return "audio" if count == 1 else f"audio track {track + 1} of {count}"


def _tracks_named(carriers: list[_AudioCarrier]) -> str | None:
    """The audio a file was started with, for an error: 'aac audio' or '2 audio tracks (aac, flac)'; None if none."""
    if not carriers:
        return None
    if len(carriers) == 1:
        return f"{carriers[0].codec} audio"
    return f"{len(carriers)} audio tracks ({', '.join(carrier.codec for carrier in carriers)})"


def _and_joined(names: list[str]) -> str:
    """'aac', 'aac and flac', 'aac, flac and opus': each name once, in order."""
    names = list(dict.fromkeys(names))
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


class _SpanUnreachable(Exception):
    """The audio source could be read neither from a span's start nor from its beginning (`_AudioSource`)."""


class _OverQueued(Exception):
    """Reading on for one track would queue more than `_AUDIO_QUEUE_CAP` packets of another (`_AudioSource._read`)."""


class _AudioSource:
    """A media file opened once for all the audio tracks carried from it, read by one demuxer over those tracks
    alone: a multi-track master is then read once, not once per track. Each `_AudioCarrier` joins it and asks for
    its track's next packet; the packets of the other carried tracks read on the way wait in their queues. A track
    whose next packet lies past `_AUDIO_QUEUE_CAP` packets of another track's (a badly interleaved file) goes on
    through a demuxer of its own (`_detach`). The file is closed when the last carrier leaves (finished or discarded).
    `start` is as for `VideoWriter.audio_start`; `resume` (a track's own demuxer) skips the packets up to that stamp,
    given out already."""

    def __init__(self, path: Path, start: float = 0.0, *, resume: int | None = None):
        self.path = path
        self.start = start
        self.input = _open_audio_source(path)
        self._resume = resume
        self._streams: list[av.audio.stream.AudioStream] = []  # those carried, in the order they joined
        self._queues: dict[int, deque[av.Packet]] = {}  # by stream index, for the carried tracks only
        self._own: dict[int, _AudioSource] = {}  # by stream index, the tracks gone on through a demuxer of their own
        self._given: dict[int, int] = {}  # by stream index, the stamp of the latest packet given out
        self._packets: Iterator[av.Packet] | None = None  # the demuxer, started by the first request
        self._begun = False
        self._error: av.FFmpegError | None = None  # what ended the demuxer before the end of the file
        self._unreachable: av.FFmpegError | None = None  # why the file could not even be sought back to its beginning
        self._closed = False

    def join(self, stream: av.audio.stream.AudioStream) -> None:
        """Keep `stream`'s packets for its carrier, from the first request on (all tracks join before it)."""
        self._streams.append(stream)
        self._queues[stream.index] = deque()

    def leave(self, stream: av.audio.stream.AudioStream) -> None:
        """Stop keeping `stream`'s packets; the last track to leave closes the file. Leaving twice does nothing."""
        if self._closed:  # the last track left already: the closed file's streams can no longer be asked anything
            return
        own = self._own.pop(stream.index, None)
        if own is not None:
            own.close()
        elif self._queues.pop(stream.index, None) is None:
            return
        if not self._queues and not self._own:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._packets = None
            self._queues.clear()
            for own in self._own.values():
                own.close()
            self._own.clear()
            self.input.close()

    def next_packet(self, stream: av.audio.stream.AudioStream, until: float, *,
                    final: bool = False) -> av.Packet | None:
        """`stream`'s next packet, or None when the file has none left for it or none up to `_AUDIO_INTERLEAVE_S`
        past `until` (seconds of the output's time; it may come later). `final` (the output ends at `until`) reads
        on to the end of the file if need be, so that a badly interleaved file loses nothing. Raises the demuxer's
        error, once the packets read before it are given out, and `_SpanUnreachable` when the file cannot be sought."""
        own = self._own.get(stream.index)
        if own is not None:
            return own.next_packet(stream, until, final=final)
        queue = self._queues[stream.index]
        if not queue:
            try:
                self._read(queue, until, final, capped=True)
            except _OverQueued:
                own = self._detach(stream)
                if own is not None:
                    return own.next_packet(stream, until, final=final)
                self._read(queue, until, final, capped=False)
        if queue:
            packet = queue.popleft()
            if _decoding_stamp(packet) is not None:
                self._given[stream.index] = _decoding_stamp(packet)
            return packet
        if self._unreachable is not None:
            raise _SpanUnreachable(_reason(self._unreachable))
        if self._error is not None:
            raise self._error
        return None

    def _detach(self, stream: av.audio.stream.AudioStream) -> _AudioSource | None:
        """Go on reading `stream` through a demuxer of its own, from the packet after the latest one given out: the
        shared one stays where it is, with the other tracks' packets queued. None when the file cannot be opened
        again (then the shared demuxer reads on, queueing what it must)."""
        try:
            own = _AudioSource(self.path, self.start, resume=self._given.get(stream.index))
        except BgmatteError as exc:
            logger.debug("%s", exc)
            return None
        logger.info("%s: its audio tracks are far apart in the file; reading audio track %d through a demuxer of "
                    "its own", self.path, self.input.streams.audio.index(stream) + 1)
        own.join(own.input.streams[stream.index])
        del self._queues[stream.index]  # empty: its packets are no longer kept here
        self._own[stream.index] = own
        return own

    def _given_already(self, packet: av.Packet) -> bool:
        """Whether `packet` was given out before this track went on through this demuxer of its own (`resume`)."""
        stamp = _decoding_stamp(packet)
        return self._resume is not None and stamp is not None and stamp <= self._resume

    def _moment(self, packet: av.Packet) -> float | None:
        """When `packet` starts in the output's time; None for the demuxer's flush packets, which have no time."""
        stamp = packet.pts if packet.pts is not None else packet.dts
        return None if stamp is None else float(stamp * packet.time_base) - self.start

    def _ends_before_use(self, packet: av.Packet) -> bool:
        """Whether `packet`'s sound ends more than `_AUDIO_PREROLL_S` before the span's start, where no carrier uses
        it (`_AudioCarrier.carry`); a flush packet, which has no time, does not."""
        moment = self._moment(packet)
        return moment is not None and moment + _seconds(packet.duration, packet) < -_AUDIO_PREROLL_S

    def _reaches(self, packet: av.Packet, until: float) -> bool:
        """Whether `packet` starts at or after `until` (a flush packet, which has no time, does not)."""
        moment = self._moment(packet)
        return moment is not None and moment >= until

    def _read(self, queue: deque[av.Packet], until: float, final: bool, *, capped: bool = False) -> None:
        """Demux into the carried tracks' queues until `queue` has a packet, the file is read up to
        `_AUDIO_INTERLEAVE_S` past `until` (unless `final`), or it ends. When `final`, a track keeps only its first
        packet at or after `until`, which ends it: the output has no room for the rest. `capped` raises `_OverQueued`
        once another track's queue holds more than `_AUDIO_QUEUE_CAP` packets (none is lost: it keeps them)."""
        if self._packets is None:
            if self._begun or self._closed:
                return
            self._begin()
            if self._packets is None:  # the file could not be sought
                return
        if capped and any(len(waiting) > _AUDIO_QUEUE_CAP for waiting in self._queues.values()):
            raise _OverQueued  # reading on could only make that queue longer
        try:
            for packet in self._packets:
                waiting = self._queues.get(packet.stream_index)  # None for a track left out, or finished
                if self.start and self._ends_before_use(packet):
                    continue  # before any carrier's use (`_AudioCarrier.carry`): read from the beginning after a miss
                if self._given_already(packet):
                    continue
                if waiting is not None and not (final and waiting and self._reaches(waiting[-1], until)):
                    waiting.append(packet)
                    if capped and waiting is not queue and len(waiting) > _AUDIO_QUEUE_CAP:
                        raise _OverQueued
                if queue or (not final and self._reaches(packet, until + _AUDIO_INTERLEAVE_S)):
                    return
        except av.FFmpegError as exc:
            self._error = exc
        self._packets = None

    def _begin(self) -> None:
        """Start the demuxer over the carried tracks: from a little before the span's start when there is one (sought
        rather than demuxed all the way to it in a long file), else, or when that fails, from the beginning."""
        self._begun = True
        streams, first = self._streams, self._streams[0]
        if self.start > 0 and first.time_base:
            packets = self._sought()
            if packets is not None:
                self._packets = packets
                return
            logger.debug("%s: seeking the audio missed %.3f s; demuxing from the beginning", self.path, self.start)
            try:
                self.input.seek(first.start_time if first.start_time is not None else 0, stream=first)
            except av.FFmpegError as exc:
                self._unreachable = exc
                return
        self._packets = self.input.demux(*streams)

    def _sought(self) -> Iterator[av.Packet] | None:
        """The demuxer from `_AUDIO_SEEK_BACK_S` before the span's start, the packets read to check the seek given
        first; None when it fails, or when no track shows a packet at or before the start (an index that is off).
        The check reads until each track has shown its first packet, or to `_AUDIO_INTERLEAVE_S` after the start (a
        track unseen by then has nothing near it: it ended, or starts later), and keeps only what a carrier would
        use, so it never holds much."""
        first = self._streams[0]
        unseen = set(self._queues)
        read: list[av.Packet] = []
        before = False  # a track showed a packet at or before the start: the seek landed before it
        try:
            self.input.seek(math.floor((self.start - _AUDIO_SEEK_BACK_S) / first.time_base), stream=first)
            packets = self.input.demux(*self._streams)
            for packet in packets:
                moment = self._moment(packet)
                if moment is None:
                    continue  # a flush packet: the end of the file
                if packet.stream_index in unseen:
                    unseen.discard(packet.stream_index)
                    before = before or moment <= _TIME_SLACK
                if not self._ends_before_use(packet):
                    read.append(packet)
                if not unseen or moment > _AUDIO_INTERLEAVE_S:
                    return itertools.chain(read, packets) if before else None
        except av.FFmpegError as exc:
            logger.debug("%s: cannot seek the audio to %.3f s (%s)", self.path, self.start, _reason(exc))
            return None
        return iter(read) if before else None  # the file ended: unseen tracks have nothing after the start


class _AudioCarrier:
    """Carry one audio track of a media file into an output container, interleaved with the video and with the
    track's language and title: copied when `allow_copy` and the container takes its codec as it is
    (`_copies_audio`), else transcoded. `media` is the source it shares with the file's other carried tracks: the
    carrier joins it once it can carry the track, and leaves it when finished or discarded; one that raises
    (av.FFmpegError or ValueError: the track cannot be carried) never joins, and leaves it open for the others.
    `media.start` (seconds of the source's timeline) is the output's time 0: the sound before it is left out
    (`VideoWriter.audio_start`)."""

    def __init__(self, media: _AudioSource, track: int, count: int, output: av.container.OutputContainer,
                 container: str, *, allow_copy: bool = True):
        self.source = media.path
        self.label = _track_label(track, count)
        self._media = media
        self._in_stream = media.input.streams.audio[track]
        self.codec = _codec_name(self._in_stream)
        self.copy = False
        self._output = output
        self._container = container
        self._muxed = 0  # packets put into the output
        self._held: av.Packet | None = None
        self._relabel: _Relabeller | None = None  # gives transcoded frames the output's layout
        self._damaged = 0  # damaged packets left out: refused by the decoder, or flagged corrupt where copied
        self._start = media.start
        self._last_dts: int | None = None  # of the latest copied packet, in the source's time base
        self._end: float | None = None  # where the output ends (its time), once `finish` says
        self._reading = False  # joined `media` and asking it for packets
        if self._in_stream.codec_context is None:
            raise ValueError("FFmpeg cannot decode it")
        self.copy = allow_copy and _copies_audio(self.codec, container, output)
        # MP4 and QuickTime end a track where its last packet's duration says (their edit list), inside the packet:
        # copied sound is made to end with the video there. Matroska's BlockDuration does not cut sound (its
        # DiscardPadding would, but PyAV cannot add that side data), so there the last packet stays whole: up to a
        # packet (some 20 ms of AAC, 100 ms of FLAC) past the video, rather than that much silence before its end.
        self._ends_inside_packets = container in ("mp4", "mov")
        # How much sooner than the output's 0 a copied span's track starts, for the samples its decoder drops first.
        rate = self._in_stream.codec_context.sample_rate
        self._lead = min(_AUDIO_PREROLL_S, self._in_stream.codec_context.delay / rate) if rate else 0.0
        if self.copy:
            self._out_stream = output.add_stream_from_template(self._in_stream)
        else:
            target = "aac" if container != "webm" else "libopus" if _encoder_available("libopus") else "opus"
            rates = av.codec.Codec(target, "w").audio_rates  # AAC stops at 96 kHz, Opus takes 48 kHz and less
            rate = self._in_stream.rate if self._in_stream.rate in (rates or ()) and target == "aac" else 48000
            # The decoder, and the encoder on a trial context, are opened before the track joins the output:
            # a stream added and then refused would be left in the file, whose header would fail.
            self._in_stream.codec_context.open(strict=False)
            layout = _encoder_layout(target, rate, self._in_stream)
            if layout == "stereo" and self._in_stream.channels > 2:
                logger.warning("%s: %s has %d channels, which %s cannot keep; they are mixed down to stereo",
                               self.source, self.label, self._in_stream.channels, target)
            self._out_stream = output.add_stream(target, rate=rate)
            self._out_stream.layout = layout
            self._resampler = av.AudioResampler(format=self._out_stream.format.name, layout=layout, rate=rate)
            self._relabel = _Relabeller(layout)
            self._out_stream.codec_context.open()
            logger.info("%s: %s (%s) cannot go into %s as is; transcoding to %s", self.source, self.label,
                        self.codec, container, target)
        for key, value in _track_names(self._in_stream, container).items():
            self._out_stream.metadata[key] = value
        media.join(self._in_stream)
        self._reading = True

    def discard(self) -> None:
        """Carry nothing more and leave the source, closing it if no other track is carried from it (the output is
        being thrown away, or has failed)."""
        self._reading = False
        self._media.leave(self._in_stream)

    def carry(self, until: float, *, final: bool = False) -> None:
        """Mux the track up to `until` seconds (exclusive); `final` when the output ends there (`finish`), where
        transcoded sound is then cut at the sample."""
        if final:
            self._end = until
        if not self._reading:
            return
        while True:
            packet = self._held
            self._held = None
            if packet is None:
                try:
                    packet = self._media.next_packet(self._in_stream, until, final=final)
                except _SpanUnreachable as exc:
                    logger.warning("%s: %s cannot be read from %.2f s (%s); the output leaves it out", self.source,
                                   self.label, self._start, exc)
                    self._reading = False
                    return
                except av.FFmpegError as exc:
                    logger.warning("%s: %s ends early (%s)", self.source, self.label, _reason(exc))
                    self._reading = False
                    return
                if packet is None:  # none before `until` yet, or none left
                    return
                if self.copy:
                    packet = _in_samples(packet, self._in_stream.rate)
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None:
                continue  # the demuxer's flush packet
            moment = float(stamp * packet.time_base) - self._start  # in the output's time
            # A packet that runs past `until` waits too, so that the end of the output, once it is known (`finish`),
            # cuts its sound there: at the sample when transcoded, by the last packet's duration when copied into MP4.
            runs_past = packet.duration and moment + _seconds(packet.duration, packet) > until + _TIME_SLACK
            waits = runs_past and not final and (not self.copy or self._ends_inside_packets)
            if moment >= until - _TIME_SLACK or waits:  # one starting at the end has no sound in the output
                self._held = packet
                return
            if self._start and (self._before_copy(packet, moment) if self.copy else moment < -_AUDIO_PREROLL_S):
                continue
            if self.copy and self._start and packet.dts is not None:
                if self._last_dts is not None and packet.dts <= self._last_dts:
                    continue  # a muxer refuses a copied packet that does not move on (MPEG-PS's, after a seek)
                self._last_dts = packet.dts
            if runs_past and final and self.copy and self._ends_inside_packets:
                packet.duration = max(1, round((until - moment) / packet.time_base))  # the edit list ends there
            self._write(packet)

    def _before_copy(self, packet: av.Packet, moment: float) -> bool:
        """Whether a copied packet of a span, starting at `moment` of the output's time, is left out as before its
        sound: a packet cannot be cut, so the one under the output's 0 is kept, starting before it (MP4's edit list
        trims it at 0; in Matroska it starts a packet's part early, not late), and so are those under the samples the
        decoder drops at the track's start (its codec delay, Matroska's CodecDelay: AAC's 1,024, Opus's pre-skip)."""
        if not packet.duration:
            return moment < -_TIME_SLACK  # how far it reaches is unknown: from the first at or after 0, as it can
        return moment + _seconds(packet.duration, packet) <= _TIME_SLACK - self._lead

    def _write(self, packet: av.Packet) -> None:
        if self.copy:
            if packet.is_corrupt:  # cut short (a truncated file's last one): copied, it would not decode in the output
                self._damaged += 1
                return
            if self._start:
                ticks = round(Fraction(self._start) / packet.time_base)
                if packet.pts is not None:
                    packet.pts -= ticks
                if packet.dts is not None:
                    packet.dts -= ticks
            packet.stream = self._out_stream
            self._mux([packet])
            return
        try:
            frames = self._in_stream.decode(packet)
        except av.FFmpegError:  # a damaged packet costs its own sound, not the track or the file
            self._damaged += 1
            return
        for frame in frames:
            for named in self._relabel(frame):
                self._encode(self._resampler.resample(named))

    def _encode(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            frame = self._in_output(frame)
            if frame is not None:
                self._mux(self._out_stream.encode(frame))

    def _mux(self, packets: list[av.Packet]) -> None:
        self._output.mux(packets)
        self._muxed += len(packets)

    def _warn_silent(self, until: float) -> None:
        """Say that the track has no sound in the output (one that ends before a span, or starts after it), and what
        the container makes of that: MP4 and QuickTime leave out a track without a packet, moving the next ones up;
        Matroska and WebM keep it, empty."""
        kept = "the output leaves it out" if self._container in ("mp4", "mov") else "the output keeps it, empty"
        logger.warning("%s: %s has no sound from %.2f s to %.2f s; %s", self.source, self.label, self._start,
                       self._start + until, kept)

    def _in_output(self, frame: av.AudioFrame) -> av.AudioFrame | None:
        """A transcoded frame in the output's time, cut at the sample: moved back by `start`, without its samples
        before it or after the output's end (`_end`, once known); None when nothing of it is left."""
        if frame.pts is None or (not self._start and self._end is None):
            return frame
        rate = frame.sample_rate
        first = round(frame.pts * (frame.time_base or Fraction(1, rate)) * rate)  # its first sample, in the source
        start = round(self._start * rate)
        end = round((self._start + self._end) * rate) if self._end is not None else first + frame.samples
        keep_from, keep_to = max(first, start), min(first + frame.samples, end)
        if keep_to <= keep_from:
            return None
        if (keep_from, keep_to) != (first, first + frame.samples):
            frame = _cut(frame, keep_from - first, keep_to - first)
        frame.pts, frame.time_base = keep_from - start, Fraction(1, rate)
        return frame

    def finish(self, until: float) -> None:
        """Carry the rest up to `until`, flush a transcoder and leave the source (the last track closes it)."""
        try:
            self.carry(until, final=True)
            if not self.copy:
                self._encode(self._resampler.resample(None))
                self._mux(self._out_stream.encode(None))
            if self._reading and not self._muxed:  # a track that stopped early was warned about then
                self._warn_silent(until)
        finally:
            self.discard()
        if self._damaged:
            logger.warning("%s: %s has damaged packets; %d left out", self.source, self.label, self._damaged)


# The channel layout a transcoded track of each channel count gets when its own cannot be kept: the standard ones,
# which players know, and for Opus only those that FFmpeg's libopus gives back in their order (5.0 and 6.1 come
# back shuffled). AAC keeps only the lowest notes of the fourth channel of 5.1 and 7.1, their low-frequency one.
# A count with no layout here is mixed down to stereo.
_LAYOUTS = {
    "aac": {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"},
    "opus": {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 6: "5.1", 8: "7.1"},
}
# Layouts that are a standard one with side channels for its back ones (what FFmpeg's AC-3, DTS and FLAC decoders
# give): they take the standard layout channel for channel, which AAC writes as players expect.
_SIDE_FOR_BACK = {"5.0(side)": "5.0", "5.1(side)": "5.1"}


def _encoder_layout(codec: str, rate: int, stream: av.audio.stream.AudioStream) -> str:
    """The layout a transcoded track gets: its own where the encoder keeps it (6.0 keeps its back-centre channel
    whole, quad its rear pair), else the standard one of its channel count (a layout that names no channel: a
    camera's four discrete microphones stay four channels), else stereo, mixed down."""
    family = "aac" if codec == "aac" else "opus"
    layouts = _LAYOUTS[family]
    own = stream.layout.name
    own = _SIDE_FOR_BACK.get(own, own)
    keep_own = stream.channels > 2 and not own.endswith("channels") and (
        family == "aac" or own in layouts.values())
    for layout in (own if keep_own else None, layouts.get(stream.channels), "stereo"):
        if layout is None:
            continue
        trial = av.CodecContext.create(codec, "w")
        trial.rate, trial.layout, trial.format = rate, layout, trial.codec.audio_formats[0]
        try:
            trial.open()
        except (av.FFmpegError, ValueError):
            if layout == "stereo":
                raise  # as before: the track is left out, with a warning
            continue
        return layout
    raise AssertionError("unreachable")


class _Relabeller:
    """Gives a track's frames another layout of as many channels, the samples channel for channel, so that the
    resampler passes them through instead of mixing them (a layout that names no channel, "6 channels", or 5.1
    with side channels going into 5.1). Through the packed sample format: PyAV cannot hand out planar frames of
    eight channels as arrays."""

    def __init__(self, layout: str):
        self.layout = layout
        self._packer: av.AudioResampler | None = None

    def __call__(self, frame: av.AudioFrame) -> list[av.AudioFrame]:
        if frame.layout.name == self.layout or len(frame.layout.channels) != len(av.AudioLayout(self.layout).channels):
            return [frame]
        if self._packer is None:
            self._packer = av.AudioResampler(format=frame.format.packed.name)
        named = []
        for packed in self._packer.resample(frame):
            part = av.AudioFrame.from_ndarray(packed.to_ndarray(), format=packed.format.name, layout=self.layout)
            part.sample_rate, part.pts, part.time_base = packed.sample_rate, packed.pts, packed.time_base
            named.append(part)
        return named


def _cut(frame: av.AudioFrame, start: int, stop: int) -> av.AudioFrame:
    """Samples `start` to `stop` of an audio frame, in its format and layout. Through the packed format: PyAV
    cannot hand out planar frames of eight channels as arrays (it crashes)."""
    planar = frame.format.is_planar
    packed = av.AudioResampler(format=frame.format.packed.name).resample(frame)[0] if planar else frame
    channels = len(frame.layout.channels)
    samples = packed.to_ndarray()[:, start * channels:stop * channels]  # (1, samples * channels)
    part = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format=packed.format.name,
                                      layout=frame.layout.name)
    part.sample_rate = frame.sample_rate
    return av.AudioResampler(format=frame.format.name).resample(part)[0] if planar else part


def _in_samples(packet: av.Packet, rate: int | None) -> av.Packet:
    """A copied packet stamped in samples (a time base of 1/`rate`) where its own time base is coarser: an AVI counts
    its MP3 or AC-3 sound in whole packets (a tick of 24 or 32 ms), in which neither a span's start nor the video's
    end can be placed inside one, so that copied sound was up to half a packet out of time and ran a packet past the
    video. The stamps are whole packets of samples, so nothing is rounded."""
    base = packet.time_base
    if not rate or base is None or base <= Fraction(1, rate):
        return packet
    scale = base * rate
    if packet.pts is not None:
        packet.pts = round(packet.pts * scale)
    if packet.dts is not None:
        packet.dts = round(packet.dts * scale)
    if packet.duration:  # None or 0: not stated
        packet.duration = round(packet.duration * scale)
    packet.time_base = Fraction(1, rate)
    return packet


def _decoding_stamp(packet: av.Packet) -> int | None:
    """A packet's dts, else its pts: what orders a track's packets; None for a flush packet."""
    return packet.dts if packet.dts is not None else packet.pts


def _seconds(ticks: int | None, packet: av.Packet) -> float:
    """`ticks` of `packet`'s time base in seconds; 0 when unknown."""
    return float(ticks * packet.time_base) if ticks and packet.time_base else 0.0


# QuickTime stores a language as an entry of its old Macintosh list, which FFmpeg's muxer matches by ISO 639-2 code,
# dropping a code it lacks: for these languages the list holds the other of the two codes ISO 639-2 gives them.
_QUICKTIME_LANGUAGES = {
    "sqi": "alb", "hye": "arm", "eus": "baq", "mya": "bur", "zho": "chi", "cze": "ces", "nld": "dut", "fre": "fra",
    "kat": "geo", "deu": "ger", "ell": "gre", "isl": "ice", "mkd": "mac", "msa": "may", "fas": "per", "rum": "ron",
    "slo": "slk", "bod": "tib", "cym": "wel",
}


def _track_names(stream: av.stream.Stream, container: str | None = None) -> dict[str, str]:
    """A track's language and title, as the output's metadata; MP4 and QuickTime files give the title as 'name'.
    Into QuickTime (`container` "mov") a language goes under the code its list holds (`_QUICKTIME_LANGUAGES`)."""
    language = stream.metadata.get("language")
    if container == "mov" and language:
        language = _QUICKTIME_LANGUAGES.get(language.lower(), language)
    names = {"language": language, "title": stream.metadata.get("title") or stream.metadata.get("name")}
    return {key: value for key, value in names.items() if value}


class ImageSequenceWriter(ClosesOnExit):
    """Write frames as numbered PNGs (or named after their sources) into a folder that appears on `close()`.

    Arguments:
        folder: the output folder; it is built under a hidden temporary name beside it and renamed.
        overwrite: replace an existing folder of numbered PNG frames instead of refusing; a folder that holds
            anything else is refused all the same (`check_frame_folder`), since replacing it would delete that.
        start: the number of the first file (0001.png by default).
        digits: zero-padding of the numbers.

    Frames are uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA; PNG encoding runs on a background thread.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        overwrite: bool = False,
        start: int = 1,
        digits: int = 4,
        queue_size: int = 8,
        niceness: int = 0,
    ):
        self.path = Path(folder)
        check_destination(self.path, overwrite, folder=True)
        check_frame_folder(self.path)
        self.frames_written = 0
        self._next = start
        self._digits = digits
        self._names: set[str] = set()
        self._temporary = temporary_sibling(self.path)
        self._temporary.mkdir()
        self._closed = False
        self._worker = _Worker(f"bgmatte-png-{self.path.name}", self._save, lambda: None, queue_size, niceness)

    def write(self, image: np.ndarray, name: str | None = None) -> None:
        """Queue one frame; `name` (a file stem) replaces the running number."""
        if self._closed:
            raise RuntimeError(f"{self.path}: the writer is closed")
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, not {image.dtype}")
        stem = name if name is not None else str(self._next).zfill(self._digits)
        self._next += 1
        if stem in self._names:
            raise BgmatteError(f"{self.path}: two frames would both be named {stem}.png")
        if "/" in stem or os.sep in stem or stem in ("", ".", ".."):
            raise ValueError(f"{stem!r} is not a file name")
        self._names.add(stem)
        try:
            self._worker.put((image, stem))
        except BgmatteError:
            raise
        except Exception as exc:
            raise BgmatteError(f"{self.path}: writing PNG failed ({_reason(exc)})") from exc

    def _save(self, item: tuple[np.ndarray, str]) -> None:
        image, stem = item
        write_png(self._temporary / f"{stem}.png", image, overwrite=True)
        self.frames_written += 1

    def close(self) -> Path | None:
        """Wait for the last PNGs and move the folder into place; returns it, or None if nothing was written."""
        if self._closed:
            return self.path if self.path.exists() else None
        self._closed = True
        error = self._worker.close()
        if self.frames_written == 0:
            shutil.rmtree(self._temporary, ignore_errors=True)
            if error is None:
                logger.warning("%s: no frames were written; no folder was made", self.path)
        else:
            self._move_into_place()
        if self._worker.interrupted is not None:  # the folder is in place: now the stop goes on
            raise self._worker.interrupted
        if error is not None:
            if isinstance(error, BgmatteError):
                raise error
            raise BgmatteError(f"{self.path}: writing PNG failed ({_reason(error)})") from error
        return self.path if self.frames_written else None

    def _move_into_place(self) -> None:
        old: Path | None = None
        if os.path.lexists(self.path):
            try:  # again: something else may have been put there during the run
                check_frame_folder(self.path)
            except BgmatteError as exc:
                raise BgmatteError(f"{exc}; the new frames are in {self._temporary}") from None
            old = temporary_sibling(self.path)
            os.replace(self.path, old)
        os.replace(self._temporary, self.path)
        if old is not None:
            self._remove_replaced(old)

    def _remove_replaced(self, old: Path) -> None:
        """Delete the folder this one replaced: its numbered PNGs and OS metadata files one by one, then the
        folder itself, so that nothing else could ever go with it (a link is removed, never what it points to)."""
        if old.is_symlink() or not old.is_dir():
            old.unlink(missing_ok=True)
            return
        for entry in os.scandir(old):
            if _is_replaceable(entry):
                Path(entry.path).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:
            logger.warning("%s: the folder it replaced held other files at the end; they are kept in %s",
                           self.path, old)


_FRAME_NAME = re.compile(r"[0-9]+\.png")  # what ImageSequenceWriter names its frames by default
_OS_METADATA = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})  # left by Finder and Explorer on browsing


def _is_frame_file(entry: os.DirEntry) -> bool:
    return _FRAME_NAME.fullmatch(entry.name) is not None and entry.is_file(follow_symlinks=False)


def _is_os_metadata(entry: os.DirEntry) -> bool:
    """A file the desktop writes on its own (Finder, Explorer, AppleDouble ``._*``): nothing a user would miss."""
    named = entry.name in _OS_METADATA or entry.name.startswith("._")
    return named and entry.is_file(follow_symlinks=False)


def _is_replaceable(entry: os.DirEntry) -> bool:
    return _is_frame_file(entry) or _is_os_metadata(entry)


def check_frame_folder(folder: Path) -> None:
    """Refuse to replace `folder` unless it holds nothing but numbered PNG frames (0001.png...), which is what
    `ImageSequenceWriter` writes: overwriting a sequence must never delete a video, a plate or a note that sits
    in the same folder, nor a file of that name. Files the OS drops on browsing (.DS_Store, Thumbs.db,
    desktop.ini, ``._*``) are allowed and go with the frames. A link is replaced itself, so what it points to
    is not checked."""
    if not os.path.lexists(folder) or folder.is_symlink():
        return
    if not folder.is_dir():
        raise BgmatteError(f"{folder}: is a file, not a folder of PNG frames (only such a folder is replaced); "
                           "remove it or choose another output")
    try:
        others = sorted(entry.name for entry in os.scandir(folder) if not _is_replaceable(entry))
    except OSError as exc:
        raise BgmatteError(f"{folder}: cannot list this folder ({exc.strerror or exc})") from None
    if others:
        named = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise BgmatteError(f"{folder}: holds more than numbered PNG frames ({named}), which replacing it would "
                           "delete; empty it or choose another output folder")
