"""Small media made on the spot for the pipeline and CLI tests: a plate, clips of a subject moving over it
(with audio, rotation, variable frame rate), readers for what came out, and a model double whose matte is
known in advance."""
from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WIDTH, HEIGHT = 96, 64
MS = Fraction(1, 1000)
SUBJECT = (255, 0, 255)  # magenta, far from every plate colour
SIDE = 20  # the subject's square side


def plate_image(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """A textured but smooth background (8x8 tiles of muted colours over a gradient), uint8 RGB."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(60, 180, ((height + 7) // 8, (width + 7) // 8, 3))
    image = np.kron(tiles, np.ones((8, 8, 1)))[:height, :width]
    image = image + np.linspace(0, 40, width)[None, :, None]
    return np.clip(image, 0, 255).astype(np.uint8)


def subject_box(index: int, width: int = WIDTH, height: int = HEIGHT) -> tuple[slice, slice]:
    """Where the subject is in frame `index`: a square moving left to right, row slice and column slice."""
    left = (4 + 7 * index) % max(1, width - SIDE)
    top = (height - SIDE) // 2
    return slice(top, top + SIDE), slice(left, left + SIDE)


def subject_frame(plate: np.ndarray, index: int, gain: float = 1.0) -> np.ndarray:
    """The plate (times `gain`, an exposure change) with the subject in it at frame `index`."""
    frame = np.clip(plate.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    rows, columns = subject_box(index, plate.shape[1], plate.shape[0])
    frame[rows, columns] = SUBJECT
    return frame


def write_clip(
    path: Path,
    images: list[np.ndarray],
    *,
    pts_ms: list[int] | None = None,
    audio: bool = True,
    rotation: float | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    tone: Callable[[np.ndarray], np.ndarray] | None = None,
    rate: int | None = 25,
) -> list[int]:
    """Encode `images` (25 fps unless `pts_ms` says otherwise) with an AAC tone, 440 Hz unless `tone` (the
    frequency at each sample's time in seconds) says otherwise; returns the pts in ms. `rate` is the rate the
    header gives (None: none, as in a variable-rate recording)."""
    pts_ms = pts_ms if pts_ms is not None else [40 * index for index in range(len(images))]
    height, width = images[0].shape[:2]
    container = av.open(str(path), mode="w", options=options or {})
    video = container.add_stream(codec, rate=rate or 25, options={"crf": "12"} if codec == "libx264" else {})
    if rate is None:
        video.codec_context.framerate = Fraction(0, 1)
    video.width, video.height = width, height
    video.pix_fmt = pix_fmt
    video.time_base = MS
    video.codec_context.time_base = MS
    if rotation is not None:
        video.set_display_rotation(rotation)
    sound = container.add_stream("aac", rate=48000) if audio else None
    if sound is not None:
        sound.layout = "stereo"
    for image, pts in zip(images, pts_ms):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, MS
        container.mux(video.encode(frame))
    container.mux(video.encode(None))
    if sound is not None:
        total = int(48000 * (pts_ms[-1] + 40) / 1000)
        for start in range(0, total, 1024):
            times = np.arange(start, start + 1024) / 48000
            frequency = tone(times) if tone is not None else 440
            tone_samples = np.sin(2 * np.pi * frequency * times).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([tone_samples, tone_samples]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
            container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    container.close()
    return pts_ms


def write_vfr_mkv(path: Path, images: list[np.ndarray], pts_ms: list[int], durations_ms: list[int], *,
                  rate: int | None = None) -> None:
    """A Matroska file of `images` at the millisecond stamps `pts_ms`, each packet lasting `durations_ms`, as a
    variable-rate recording is muxed: a header with no frame rate, or `rate` (1000: one frame a tick). No audio."""
    height, width = images[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=rate or 25, options={"crf": "12", "bf": "0"})
        if rate is None:
            video.codec_context.framerate = Fraction(0, 1)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        packets = []
        for index, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            packets += video.encode(frame)
        packets += video.encode(None)
        for packet, pts, duration in zip(packets, pts_ms, durations_ms):  # without B-frames: in display order
            packet.time_base, packet.pts, packet.dts, packet.duration = MS, pts, pts, duration
            container.mux(packet)


def make_clip(path: Path, count: int = 12, *, plate: np.ndarray | None = None, gain: float = 1.0, **kwargs) -> list[int]:
    """A clip of the subject moving over `plate` (default `plate_image()`); see `write_clip` for the options."""
    plate = plate_image() if plate is None else plate
    return write_clip(path, [subject_frame(plate, index, gain) for index in range(count)], **kwargs)


def decode_order_copy(source: Path, target: Path) -> None:
    """Copy the video packets of an AVI into another container as a stream copy of it does: each packet stamped with
    the AVI's decoding stamp (its chunk's place), so that B-frames decode to stamps that go back."""
    with av.open(str(source)) as avi, av.open(str(target), mode="w") as copy:
        stream = avi.streams.video[0]
        out = copy.add_stream_from_template(stream)
        for packet in avi.demux(stream):
            if packet.dts is None:  # the flushing packet at the end
                continue
            packet.pts = packet.dts
            packet.stream = out
            copy.mux(packet)


def read_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video as stored (no rotation applied), RGB uint8."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def decode_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [round(float(frame.time), 4) for frame in container.decode(video=0)]


def audio_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return 0.0
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


def alpha_planes(path: Path) -> list[np.ndarray]:
    """The alpha of every frame; VP9 alpha needs the libvpx decoder, which reads the side data."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.codec_context.name == "vp9":
            decoder = av.CodecContext.create("libvpx-vp9", "r")
            frames = [frame for packet in container.demux(stream) for frame in decoder.decode(packet)]
        else:
            frames = list(container.decode(stream))
        return [frame.to_ndarray(format="rgba")[:, :, 3] for frame in frames]


class DifferenceModel(nn.Module):
    """A stand-in for MattingRefine whose matte is known: alpha 1 where src and bgr differ by more than
    `threshold` in some channel, else 0; the foreground is the source. It can also raise
    KeyboardInterrupt on its `interrupt_on`-th call, as Ctrl-C would, and records each call's batch size."""

    def __init__(self, threshold: float = 0.1, interrupt_on: int | None = None):
        super().__init__()
        self.threshold = threshold
        self.interrupt_on = interrupt_on
        self.calls: list[int] = []
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives Predictor a device

    def forward(self, src: torch.Tensor, bgr: torch.Tensor):
        self.calls.append(src.shape[0])
        if self.interrupt_on is not None and len(self.calls) >= self.interrupt_on:
            raise KeyboardInterrupt
        pha = ((src - bgr).abs().amax(dim=1, keepdim=True) > self.threshold).to(src.dtype)
        small = (max(1, src.shape[2] // 4), max(1, src.shape[3] // 4))
        pha_sm = F.interpolate(pha, small, mode="area")
        fgr_sm = F.interpolate(src, small, mode="area")
        return pha, src.clone(), pha_sm, fgr_sm, pha_sm, (pha_sm > 0).to(src.dtype)


def stepped_tone(times: np.ndarray) -> np.ndarray:
    """A tone that tells where its sound came from: 440 Hz before 0.4 s, 1000 Hz up to 0.6 s, 2500 Hz after."""
    return np.where(times < 0.4, 440.0, np.where(times < 0.6, 1000.0, 2500.0))


def mono_samples(path: Path, track: int = 0) -> tuple[np.ndarray, int]:
    """An audio track of `path` decoded, its channels mixed down, and its sample rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[track]
        mono = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        samples = np.concatenate([part.to_ndarray()[0] for frame in container.decode(stream)
                                  for part in mono.resample(frame)])
        return samples, stream.rate


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """The frequency (Hz) with the most energy in `samples`."""
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


def audio_frequency(path: Path, track: int = 0) -> float:
    """The dominant frequency (Hz) of an audio track of `path`, its channels mixed down."""
    return dominant_frequency(*mono_samples(path, track))


def copy_from(source: Path, target: Path, seconds: float, options: dict[str, str] | None = None) -> None:
    """Remux `source` from `seconds` on without re-encoding, as `ffmpeg -ss SECONDS -i SOURCE -c copy TARGET` does:
    every track is copied from the last video keyframe at or before that time, its stamps moved back by it, so that
    the MP4 muxer writes an edit list that hides the frames before it (still in the file, and in its frame count)."""
    with av.open(str(source)) as reader, av.open(str(target), mode="w", options=options or {}) as writer:
        video = reader.streams.video[0]
        tracks = {stream.index: writer.add_stream_from_template(stream) for stream in (video, *reader.streams.audio)}
        cut = max(float(packet.pts * video.time_base) for packet in reader.demux(video)
                  if packet.is_keyframe and packet.pts is not None and packet.pts * video.time_base <= seconds)
        reader.seek(0)
        for packet in reader.demux(*(reader.streams[index] for index in tracks)):
            if packet.dts is None or float(packet.pts * packet.time_base) < cut - 1e-6:
                continue
            shift = round(Fraction(seconds) / packet.time_base)
            packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
            packet.stream = tracks[packet.stream_index]
            writer.mux(packet)
