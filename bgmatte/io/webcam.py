"""Live matting from a camera: capture with OpenCV, matte each frame against a plate, composite it, and send it
to a virtual camera (pyvirtualcam), a preview window and/or a recording.

The loop is `WebcamSession`, whose parts are injected so that it runs without a camera or a display: the
source is any iterator of uint8 RGB frames, the sinks are objects with `send(frame)`, and the keys come
from a function. `run_webcam` puts the live parts together (`CameraSource` read on a thread that keeps
only the newest frame, `VirtualCamera`, `Recording`, `PreviewWindow`); `bgmatte webcam` calls it.

The plate: a file (`bgr=`); in the preview, key b takes the current frame; headless with no file, the
plate is taken automatically: after `auto_plate_delay` seconds (time to step out of view), the median of
the next `auto_plate_frames` frames. Until there is a plate, frames pass through unchanged. On request
(`match_exposure`, as for `bgmatte video`) the plate is brought to each frame's exposure and white balance,
which a webcam's automatic exposure changes once the subject steps in (`bgmatte.pipeline.ExposureFeedback`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from torch import Tensor

from bgmatte.composite import TargetBackground, parse_target_background
from bgmatte.errors import BgmatteError
from bgmatte.io.files import check_destination, refuse_overwriting_inputs
from bgmatte.io.images import DEFAULT_MAX_PIXELS, megapixels_above
from bgmatte.io.video import ClosesOnExit
from bgmatte.pipeline import ExposureFeedback, TargetFrames, render_outputs
from bgmatte.plate import ExposureOptions
from bgmatte.predictor import Matte

logger = logging.getLogger(__name__)

KEY_PLATE = ord("b")  # take the current frame as the plate
KEY_TARGET = ord("t")  # the next target background
KEYS_QUIT = (ord("q"), 27)  # q or Esc
NO_KEY = -1

INSTALL_HINT = 'pip install "bgmatte[webcam]"'
VIRTUAL_CAM_BACKENDS = ("v4l2loopback", "obs", "unitycapture")

_CAMERA_RETRIES = 5  # consecutive failed reads a live camera may have before it counts as gone
_CHECKER_LIGHT, _CHECKER_DARK = 0.8, 0.6
_CHECKERBOARD = TargetBackground("image", path=Path("checkerboard"))  # composited like an image backdrop
# Exposure matching live: the fit on 10,000 background pixels, not a video's 50,000. On synthetic 720p frames (gains
# 0.7-1.3, a white-balance shift, subjects over 11-75% of the frame) it came as close (0.17-0.25 levels, rounding)
# in less than half the time: 3-4% of the model's time per 720p frame on the project's 2-core CPU, against 8%.
LIVE_EXPOSURE = ExposureOptions(max_samples=10_000)


class FrameSink(Protocol):
    """Where output frames go: a virtual camera, a recording, a preview window, a list in a test."""

    def send(self, frame: np.ndarray) -> None:
        """Take one (H, W, 3) uint8 RGB frame."""


# ------------------------------------------------------------------------------------------------ capture


@runtime_checkable
class StoppableSource(Protocol):
    """A frame source that `LatestFrameReader` can shut down within a time limit (`CameraSource` is one):
    any other iterable of frames is read through `_PlainSource`, which gives it the same two methods."""

    def __iter__(self) -> Iterator[np.ndarray]:
        """The frames, read on the reader's thread."""

    def stop(self) -> None:
        """From another thread: make a read under way the last."""

    def close(self, timeout: float | None = None) -> None:
        """Release what the source holds, waiting at most `timeout` seconds for a read under way."""


class _PlainSource:
    """Any iterable of frames as a `StoppableSource`: it has no read to cut short, and closing it calls its
    own `close()`, if it has one."""

    def __init__(self, frames: Iterable[np.ndarray]):
        self.frames = frames

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.frames)

    def stop(self) -> None:
        """Nothing to do: the reader stops between frames."""

    def close(self, timeout: float | None = None) -> None:
        """Close the iterable, if it can be closed (no time limit can be kept: it is its own business)."""
        close = getattr(self.frames, "close", None)
        if close is not None:
            close()


def _requested_size(native: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The output size: as asked, the missing side following the camera's aspect ratio."""
    if width is None and height is None:
        return native
    if width is None:
        width = max(1, round(native[0] * height / native[1]))
    if height is None:
        height = max(1, round(native[1] * width / native[0]))
    return int(width), int(height)


def _open_capture(camera: int | str) -> cv2.VideoCapture:
    """cv2.VideoCapture with OpenCV's own warnings silenced: our error says what went wrong in one line."""
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        return cv2.VideoCapture(camera)
    finally:
        cv2.utils.logging.setLogLevel(previous)


class CameraSource:
    """Frames from an OpenCV capture, a camera index or a video file used as a camera, as uint8 RGB.

    Arguments:
        camera: a camera index (0 is the first camera) or the path of a video file.
        width, height: the frame size wanted; asked of a camera, and frames of another size are resized.
        fps: the frame rate asked of a camera; a file is played at this rate (default: its own).
        max_pixels: refuse frames, as delivered or as resized, above this many pixels (the still images'
            limit by default; None: no limit); a file's size is checked from its header, before a frame is decoded.

    A file is paced to its frame rate so that it behaves like a live camera. Iterating ends when the
    file ends or the camera stops delivering frames; `close()` releases the device.
    """

    def __init__(self, camera: int | str | os.PathLike, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.is_file = not isinstance(camera, int)
        if self.is_file:
            path = Path(camera)
            self.name = str(path)
            if not path.exists():
                raise BgmatteError(f"{path}: no such file (to use as the camera)")
            if not path.is_file():
                raise BgmatteError(f"{path}: is not a file (to use as the camera)")
            self._capture = _open_capture(str(path))
            if not self._capture.isOpened():
                raise BgmatteError(f"{path}: not a video file OpenCV can read (to use as the camera)")
        else:
            self.name = f"camera {camera}"
            self._capture = _open_capture(int(camera))
            if not self._capture.isOpened():
                raise BgmatteError(f"{self.name}: cannot be opened (no such camera, it is in use, "
                                   "or access was denied)")
            if width is not None:
                self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            if height is not None:
                self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            if fps is not None:
                self._capture.set(cv2.CAP_PROP_FPS, fps)
            self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # fewer frames queued in the driver: less lag
        stated = (int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self._refuse_above(max_pixels, stated)  # 0x0 when the capture does not say
        ok, first = self._capture.read()
        if not ok or first is None:
            self._capture.release()
            raise BgmatteError(f"{self.name}: no frame could be read")
        native = (first.shape[1], first.shape[0])
        self._refuse_above(max_pixels, native)
        self.size: tuple[int, int] = _requested_size(native, width, height)  # (width, height)
        self._refuse_above(max_pixels, self.size, f"gives {native[0]}x{native[1]} frames; asked for ")
        if self.size != native:
            logger.info("%s gives %dx%d frames; resizing them to %dx%d", self.name, *native, *self.size)
        self._native = native  # the size of the frames delivered last, to tell when the camera changes it
        reported = self._capture.get(cv2.CAP_PROP_FPS)
        reported = float(reported) if reported and 0 < reported < 1000 else None
        if fps and reported and not self.is_file and abs(reported - fps) > 0.01 * fps:
            # The camera settled on another rate: announcing the one asked would time the virtual camera wrongly.
            logger.warning("%s gives %.3g fps, not the %.3g asked for (--fps); using %.3g", self.name, reported, fps,
                           reported)
            fps = reported
        self.fps: float = float(fps) if fps else reported or 30.0
        self.frames_read = 0
        self._pending: np.ndarray | None = first
        self._start: float | None = None
        self._released = False
        self._closing = False  # stop() or close() was called: a read under way is the last, and its tries stop
        self._release_left_to_reader = False  # close() gave up waiting for a read, which releases when it returns
        self._lock = threading.Lock()  # held by each read and by the release: they never overlap

    def _refuse_above(self, max_pixels: int | None, size: tuple[int, int], what: str = "") -> None:
        """Release the capture and refuse frames of `size` above `max_pixels` (a possible decompression bomb, or a
        size no frame of which fits in memory); `what` says how the size came about."""
        pixels = size[0] * size[1]
        if max_pixels is not None and pixels > max_pixels:
            self._capture.release()
            raise BgmatteError(f"{self.name}: {what}{size[0]}x{size[1]}{': ' if what else ' is '}"
                               f"{megapixels_above(pixels, max_pixels)}")

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self._closing:  # set before any release
            raise StopIteration
        frame, self._pending = self._pending, None
        if frame is None:
            frame = self._read()
        if self.is_file:
            now = time.perf_counter()
            if self._start is None:
                self._start = now
            delay = self._start + self.frames_read / self.fps - now
            if delay > 0:
                time.sleep(delay)
        self.frames_read += 1
        native = (frame.shape[1], frame.shape[0])
        if native != self._native:  # a camera that renegotiated its format, a file whose frames change size
            logger.warning("%s changed its frames from %dx%d to %dx%d after %d frames; %s", self.name,
                           *self._native, *native, self.frames_read - 1,
                           f"resizing them to {self.size[0]}x{self.size[1]}" + (
                               ", stretched: their aspect ratio differs"
                               if native[0] * self.size[1] != native[1] * self.size[0] else ""))
            self._native = native
        if native != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def _read(self) -> np.ndarray:
        """The next frame; a live camera has a few tries. The lock is held for each try, not across them, so
        that `close()` gets in between; a try that ends once closing has begun releases the capture itself."""
        for attempt in range(1 if self.is_file else _CAMERA_RETRIES):
            if attempt:
                time.sleep(0.01)
            with self._lock:
                if self._closing:
                    self._release()
                    raise StopIteration
                ok, frame = self._capture.read()
                if self._closing:  # close() may have stopped waiting for this read: the release is left to it
                    self._release()
            if ok and frame is not None:
                return frame
        if not self.is_file and not self._closing:
            logger.warning("%s stopped delivering frames", self.name)
        raise StopIteration

    def _release(self) -> None:
        """Release the capture, once; the caller holds the lock."""
        if not self._released:
            self._released = True
            self._capture.release()

    def stop(self) -> None:
        """Make a read under way the last, from any thread: no try follows it, and the capture is released when
        it returns (or by `close()`, if no read is under way)."""
        self._closing = True

    def close(self, timeout: float | None = None) -> None:
        """Release the camera or file, never during a read: one under way is waited for (at most `timeout`
        seconds; past that it releases the capture itself when it returns), and no try follows it. Safe to
        call twice."""
        self._closing = True
        if self._release_left_to_reader:
            return
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._release_left_to_reader = True
            logger.warning("%s: a read is still under way; the capture is released when it returns", self.name)
            return
        try:
            self._release()
        finally:
            self._lock.release()


def open_camera(camera: int | str | os.PathLike, *, width: int | None = None, height: int | None = None,
                fps: float | None = None) -> CameraSource:
    """Open a camera index, or a video file as a camera; a string of digits is an index."""
    if isinstance(camera, str) and camera.strip().isdigit():
        camera = int(camera)
    return CameraSource(camera, width=width, height=height, fps=fps)


class LatestFrameReader:
    """Read a source on a background thread and hand out only its newest frame.

    Frames that arrive while the consumer is busy are dropped (counted in `dropped`), so the output
    follows the camera instead of lagging further behind with every slow frame. An exception in the
    source is raised to the consumer after the frames read before it.
    """

    def __init__(self, source: Iterable[np.ndarray]):
        self._source: StoppableSource = source if isinstance(source, StoppableSource) else _PlainSource(source)
        self._condition = threading.Condition()
        self._latest: np.ndarray | None = None
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="bgmatte-camera", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self._source:
                with self._condition:
                    if self._latest is not None:
                        self.dropped += 1
                    self._latest = frame
                    self._condition.notify()
                if self._stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._error = exc
        finally:
            with self._condition:
                self._done = True
                self._condition.notify_all()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        with self._condition:
            while self._latest is None and not self._done:
                self._condition.wait(timeout=0.1)
            if self._latest is not None:
                frame, self._latest = self._latest, None
                return frame
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopIteration

    def close(self, timeout: float = 2.0) -> None:
        """Stop reading, wait for the thread, and close the source (if it can be closed), all within about
        `timeout` seconds, for a `StoppableSource`: one stuck in a read (a `CameraSource`) is left to release
        itself when the read returns. A second call (the session and the command both close it) returns at
        once instead of waiting again."""
        if self._stop.is_set():
            return
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._source.stop()  # a camera that keeps failing would otherwise go on trying while we wait
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the camera thread did not stop within %.0f s", timeout)
        self._source.close(timeout=max(0.0, deadline - time.monotonic()))


# -------------------------------------------------------------------------------------------------- sinks


def import_pyvirtualcam() -> Any:
    """The pyvirtualcam module, or a one-line BgmatteError saying how to install it."""
    try:
        import pyvirtualcam
    except ImportError:
        raise BgmatteError(f"the virtual camera needs pyvirtualcam, which is not installed: {INSTALL_HINT}") from None
    return pyvirtualcam


def _virtual_cam_setup_hint() -> str:
    if sys.platform.startswith("linux"):
        return "load v4l2loopback first (sudo modprobe v4l2loopback devices=1 exclusive_caps=1)"
    return "install OBS Studio and start and stop its virtual camera once"


class VirtualCamera:
    """Send frames to a virtual camera through pyvirtualcam: v4l2loopback on Linux, OBS on macOS and Windows.

    Arguments:
        width, height, fps: the format the virtual camera announces.
        backend: ``v4l2loopback``, ``obs`` or ``unitycapture``; None tries each available one.
        device: a device such as ``/dev/video2`` (v4l2loopback); None takes the first free one.
    """

    def __init__(self, width: int, height: int, fps: float, *, backend: str | None = None,
                 device: str | None = None):
        if backend is not None and backend not in VIRTUAL_CAM_BACKENDS:
            raise BgmatteError(f"unknown virtual camera backend {backend!r}: choose {', '.join(VIRTUAL_CAM_BACKENDS)}")
        pyvirtualcam = import_pyvirtualcam()
        try:
            self._camera = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB,
                                               backend=backend, device=device)
        except (RuntimeError, ValueError, OSError) as exc:
            where = f" {device}" if device else f" ({backend})" if backend else ""
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BgmatteError(f"virtual camera{where}: cannot start ({reason}); {_virtual_cam_setup_hint()}") from None
        self.device = getattr(self._camera, "device", device)
        self._closed = False
        logger.info("sending to the virtual camera %s (%dx%d at %.3g fps)", self.device, width, height, fps)

    def send(self, frame: np.ndarray) -> None:
        """Send one uint8 RGB frame."""
        self._camera.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        """Close the virtual camera; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._camera.close()


class Recording:
    """Record the output to a video file, timed by the wall clock so that it plays back at the speed it was seen.

    The file is finished on `close()` (also after Ctrl-C), through `VideoWriter`.
    """

    def __init__(self, path: str | os.PathLike, *, fps: float = 30, overwrite: bool = False):
        from bgmatte.io.video import VideoWriter

        self._writer = VideoWriter(path, fps=fps, overwrite=overwrite)
        self.path = self._writer.path
        self._start: float | None = None
        self._closed = False

    def send(self, frame: np.ndarray) -> None:
        """Queue one uint8 RGB frame with its time since the first one."""
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        self._writer.write(frame, pts=round((now - self._start) * 1000), time_base=Fraction(1, 1000))

    def close(self) -> Path | None:
        """Finish the file; returns its path, or None if nothing was recorded. Safe to call twice."""
        already, self._closed = self._closed, True
        written = self._writer.close()
        if written is not None and not already:
            logger.info("recorded %d frames to %s", self._writer.frames_written, written)
        return written


def display_available() -> bool:
    """Whether a window could be shown: on Linux and BSD, an X11 or Wayland display must be set."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def opencv_has_windows() -> bool:
    """Whether this OpenCV build can open windows (opencv-python-headless cannot)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            return line.split(":", 1)[1].strip().upper() not in ("", "NONE")
    return False


class PreviewWindow:
    """An OpenCV window showing the output; `poll_key` pumps its events and returns the key pressed (or -1).

    Closing the window counts as pressing q.
    """

    def __init__(self, title: str = "bgmatte webcam"):
        self.title = title
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error:
            raise BgmatteError("the preview needs OpenCV with window support (opencv-python), not "
                               "opencv-python-headless; or run with --no-preview") from None
        self._open = True

    def send(self, frame: np.ndarray) -> None:
        """Show one uint8 RGB frame."""
        cv2.imshow(self.title, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def poll_key(self) -> int:
        """The key pressed since the last call (a character code, `key_code`), or -1. The full code of
        cv2.waitKeyEx: cv2.waitKey keeps only its lower 8 bits, which cannot tell the arrow keys from letters."""
        key = cv2.waitKeyEx(1)
        if key != -1:
            return key_code(key)
        try:
            if cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
                return KEYS_QUIT[0]
        except cv2.error:
            return KEYS_QUIT[0]
        return NO_KEY

    def close(self) -> None:
        """Close the window; safe to call twice."""
        if self._open:
            self._open = False
            try:
                cv2.destroyWindow(self.title)
                cv2.waitKey(1)
            except cv2.error:
                pass


def key_code(key: int) -> int:
    """The character of a cv2.waitKeyEx code, or -1 for a key that is none (an arrow, a function key). With GTK the
    code is the X key symbol with the modifiers above bit 16: its lower 8 bits alone made the arrow keys, symbols
    0xFF51 to 0xFF54, read as Q, R, S and T, so that the left arrow quit and the down arrow changed the target."""
    symbol = key & 0xFFFF
    return symbol if 0 <= symbol <= 0xFF else NO_KEY


def draw_status(frame: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """A copy of an RGB frame with lines of text in its top-left corner, readable on any background."""
    out = np.ascontiguousarray(frame).copy()
    scale = max(0.3, out.shape[1] / 1600)
    thickness = max(1, round(scale * 2))
    step = max(10, round(28 * scale / 0.8))
    for index, line in enumerate(lines):
        origin = (max(4, round(10 * scale)), step * (index + 1))
        cv2.putText(out, line, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, line, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


# ---------------------------------------------------------------------------------------------- compositing


def describe_target(target: TargetBackground) -> str:
    """A short name for a target background, for the log and the preview."""
    if target.kind == "colour":
        return "#{:02x}{:02x}{:02x}".format(*target.colour)
    if target.path is not None:
        return f"{target.path.name}"
    return target.kind


def checkerboard(height: int, width: int, *, device: torch.device | str = "cpu", square: int | None = None) -> Tensor:
    """A grey checkerboard (1, 3, H, W) in [0, 1], the usual picture of transparency."""
    square = square or max(4, min(height, width) // 12)
    rows = (torch.arange(height, device=device) // square)[:, None]
    columns = (torch.arange(width, device=device) // square)[None, :]
    light = ((rows + columns) % 2 == 0).float()
    board = _CHECKER_DARK + (_CHECKER_LIGHT - _CHECKER_DARK) * light
    return board.expand(3, height, width)[None].contiguous()


class Backdrop:
    """One target background for the live output: `TargetFrames` of the video pipeline (images scaled to
    cover the frame, videos looped and played in real time by `clock`, however fast frames are matted), and
    `transparent` shown over a checkerboard, as a camera sends RGB."""

    def __init__(self, target: TargetBackground, size: tuple[int, int], device: torch.device | str = "cpu", *,
                 clock: Callable[[], float] = time.monotonic, picture: np.ndarray | None = None):
        self.target = target
        self.frames = TargetFrames(target, *size, device, live=True, picture=picture)
        self._board = checkerboard(size[1], size[0], device=device) if target.kind == "transparent" else None
        self._clock = clock
        self._start: float | None = None

    def render(self, matte: Matte, frame: np.ndarray) -> np.ndarray:
        """The composite of the first matte over this background ((H, W, 3) uint8; `frame` is the source)."""
        matte = Matte(matte.pha[:1], matte.fgr[:1], matte.err_sm, matte.ref_sm)
        if self._board is not None:
            target, backdrop = _CHECKERBOARD, self._board
        else:
            now = self._clock()
            self._start = now if self._start is None else self._start
            target, backdrop = self.target, self.frames.take(1, [now - self._start])
        return render_outputs(matte, ["com"], target=target, backdrop=backdrop, src=frame[None])["com"][0]

    def close(self) -> None:
        """Stop reading a video background; safe to call twice."""
        self.frames.close()


def median_plate(frames: Sequence[np.ndarray]) -> np.ndarray:
    """The per-pixel median of a few frames: a plate with the sensor noise averaged out."""
    return np.median(np.stack(frames), axis=0).round().astype(np.uint8)


def load_plate(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Read a plate image as uint8 RGB, resized to the camera's (width, height) with a warning if it differs."""
    from bgmatte.io.images import read_image

    return fit_plate(read_image(path), size, path)


def fit_plate(plate: np.ndarray, size: tuple[int, int], path: str | os.PathLike) -> np.ndarray:
    """A plate read before the camera opened, resized to the camera's (width, height) with a warning naming `path`
    if it differs."""
    if (plate.shape[1], plate.shape[0]) != tuple(size):
        logger.warning("%s: the plate is %dx%d but the camera gives %dx%d; resizing the plate",
                       path, plate.shape[1], plate.shape[0], *size)
        plate = cv2.resize(plate, tuple(size), interpolation=cv2.INTER_AREA)
    return plate


# ------------------------------------------------------------------------------------------------ session


@dataclass(frozen=True)
class AutoPlate:
    """Headless plate capture: wait `delay` seconds (to step out of view), then take the median of `frames` frames."""

    delay: float = 3.0
    frames: int = 10

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay) and self.delay >= 0):  # NaN would never come, infinity never end
            raise BgmatteError(f"the automatic plate delay must be 0 s or more, not {self.delay}")
        if self.frames < 1:
            raise BgmatteError(f"the automatic plate needs at least 1 frame, not {self.frames}")


@dataclass(frozen=True)
class WebcamReport:
    """What a session did: frames sent, seconds from the first to the last, their rate, frames dropped."""

    frames: int
    seconds: float
    fps: float
    dropped: int
    plate: bool  # whether a plate was set by the end

    def summary(self) -> str:
        """One line for the log."""
        dropped = f"; {self.dropped} camera frames dropped to keep up" if self.dropped else ""
        return f"{self.frames} frames in {self.seconds:.1f} s: {self.fps:.1f} fps{dropped}"


class WebcamSession(ClosesOnExit):
    """The live loop: take a frame, matte it against the plate, composite it onto the current target, send it.

    Arguments:
        source: an iterator of (H, W, 3) uint8 RGB frames (live: a `LatestFrameReader` over a `CameraSource`).
        predictor: ``predictor(frame, plate) -> Matte``, such as `bgmatte.predictor.Predictor`.
        targets: the target backgrounds that key t cycles through (at least one).
        sinks: objects with ``send(frame)`` that get every output frame (virtual camera, recording).
        preview: a sink that gets the output with a status overlay (the preview window), or None.
        keys: returns the key pressed since the last call (-1 for none); None when headless.
        plate: the plate, (H, W, 3) uint8 RGB, or None to wait for one.
        auto_plate: when there are no keys and no plate, how to take one automatically (None: never).
        max_frames: stop after this many frames (None: until the source ends or q).
        clock: seconds as a float (injectable for tests).
        pictures: image targets' pixels already read, by path (`run_webcam` reads them before the camera opens, to
            check them); each is used once, for its backdrop, and let go.
        exposure: bring the plate to each frame's exposure and white balance, fitted on the background of the
            last matte (None: the plate as it is).

    Until there is a plate, frames are sent unchanged. The session owns what it is given:
    `close()` closes the source, the sinks and the preview (each that has a `close`).
    """

    def __init__(self, source: Iterable[np.ndarray], predictor: Callable[[Any, Any], Matte],
                 targets: Sequence[TargetBackground], *, sinks: Sequence[FrameSink] = (),
                 preview: FrameSink | None = None, keys: Callable[[], int] | None = None,
                 plate: np.ndarray | None = None, auto_plate: AutoPlate | None = AutoPlate(),
                 max_frames: int | None = None, clock: Callable[[], float] = time.perf_counter,
                 pictures: Mapping[Path, np.ndarray] | None = None, exposure: ExposureFeedback | None = None):
        if not targets:
            raise BgmatteError("give at least one target background")
        if max_frames is not None and max_frames < 1:
            raise BgmatteError(f"--max-frames must be at least 1, not {max_frames}")
        self.source = source
        self.predictor = predictor
        self.targets = list(targets)
        self.sinks = list(sinks)
        self.preview = preview
        self.keys = keys
        self.auto_plate = auto_plate if keys is None else None
        self.max_frames = max_frames
        self.clock = clock
        self.exposure = exposure
        self.device = torch.device(getattr(predictor, "device", "cpu"))
        self.target_index = 0
        self.frames = 0
        self._first_time: float | None = None  # when the first frame went out
        self.plate: np.ndarray | None = None
        self._plate_tensor: Tensor | None = None
        self._backdrops: dict[int, Backdrop] = {}
        self._pictures = dict(pictures or {})
        self._size: tuple[int, int] | None = None
        self._started: float | None = None
        self._collected: list[np.ndarray] = []
        self._fps = 0.0
        self._last: float | None = None
        self._stop = False
        if plate is not None:
            self.set_plate(plate)

    # -- state

    def set_plate(self, plate: np.ndarray) -> None:
        """Use `plate` (uint8 RGB, the frames' size) from the next frame on."""
        plate = np.ascontiguousarray(plate)
        if plate.dtype != np.uint8 or plate.ndim != 3 or plate.shape[2] != 3:
            raise BgmatteError(f"the plate must be (H, W, 3) uint8 RGB, not {plate.dtype} {plate.shape}")
        if self._size is not None and (plate.shape[1], plate.shape[0]) != self._size:
            raise BgmatteError(f"the plate is {plate.shape[1]}x{plate.shape[0]} but the camera gives "
                               f"{self._size[0]}x{self._size[1]}")
        self.plate = plate
        # Kept on the device as uint8: the predictor converts it there, without a copy from the host per frame.
        self._plate_tensor = torch.from_numpy(plate.copy())[None].to(self.device)

    @property
    def target(self) -> TargetBackground:
        """The target background in use."""
        return self.targets[self.target_index]

    def next_target(self) -> None:
        """Move to the next target background, wrapping around."""
        self.target_index = (self.target_index + 1) % len(self.targets)
        logger.info("target background: %s (%d of %d)", describe_target(self.target), self.target_index + 1,
                    len(self.targets))

    def _backdrop(self) -> Backdrop:
        backdrop = self._backdrops.get(self.target_index)
        if backdrop is None:
            picture = self._pictures.pop(self.target.path, None) if self.target.kind == "image" else None
            backdrop = Backdrop(self.target, self._size, self.device, picture=picture)
            self._backdrops[self.target_index] = backdrop
        return backdrop

    # -- one frame

    def _begin(self, frame: np.ndarray) -> None:
        """On the first frame: learn the size, check the plate against it, say what happens without one."""
        self._started = self.clock()
        self._size = (frame.shape[1], frame.shape[0])
        if self.plate is not None and (self.plate.shape[1], self.plate.shape[0]) != self._size:
            raise BgmatteError(f"the plate is {self.plate.shape[1]}x{self.plate.shape[0]} but the camera "
                               f"gives {self._size[0]}x{self._size[1]}")
        if self.plate is None:
            self._log_waiting()

    def process(self, frame: np.ndarray) -> np.ndarray:
        """The output for one frame: the composite once there is a plate, the frame itself before."""
        if self._size is None:
            self._begin(frame)
        if self.plate is None:
            self._auto_plate(frame)
            return frame
        matte = self.predictor(frame, self._plate_for(frame))
        if self.exposure is not None:
            self.exposure.update(matte.pha[-1])
        return self._backdrop().render(matte, frame)

    def _plate_for(self, frame: np.ndarray) -> np.ndarray | Tensor:
        """The plate to matte `frame` against: as set, already on the device, or brought to the frame's exposure
        when matching it (the camera's automatic exposure and white balance drift from the plate's)."""
        if self.exposure is None:
            return self._plate_tensor
        return self.exposure.match(self.plate, frame)

    def _auto_plate(self, frame: np.ndarray) -> None:
        if self.auto_plate is None:
            return
        if self.clock() - self._started < self.auto_plate.delay:
            return
        self._collected.append(frame)
        if len(self._collected) >= self.auto_plate.frames:
            self.set_plate(median_plate(self._collected))
            self._collected = []
            logger.info("plate captured: the median of %d frames", self.auto_plate.frames)

    def handle_key(self, key: int, frame: np.ndarray) -> None:
        """Act on a key: b takes `frame` as the plate, t cycles the target, q or Esc stops the session."""
        if key in (NO_KEY, None):
            return
        key = key_code(key)
        if key in (KEY_PLATE, ord("B")):
            self.set_plate(frame)
            logger.info("plate captured from the current frame")
        elif key in (KEY_TARGET, ord("T")):
            self.next_target()
        elif key in (*KEYS_QUIT, ord("Q")):
            self._stop = True

    def status_lines(self) -> list[str]:
        """What the preview overlay says: the plate's state or the target, and the frame rate."""
        if self.plate is None:
            if self.auto_plate is not None:
                left = self.auto_plate.delay - (self.clock() - (self._started or self.clock()))
                first = (f"no plate: step out of view, taking it in {left:.0f} s" if left > 0
                         else "no plate: taking it now, stay out of view")
            else:
                first = "no plate (frames pass through): step out of view, press b"
        else:
            first = f"target {describe_target(self.target)} ({self.target_index + 1}/{len(self.targets)})"
        return [first, f"{self._fps:.1f} fps  b: plate  t: target  q: quit"]

    def _tick(self) -> None:
        now = self.clock()
        if self._last is not None and now > self._last:
            rate = 1.0 / (now - self._last)
            self._fps = rate if self._fps == 0 else 0.9 * self._fps + 0.1 * rate
        self._last = now

    # -- the loop

    def run(self) -> WebcamReport:
        """Run until the source ends, q is pressed or `max_frames` frames are out; returns what happened. Ctrl-C
        (the usual way to stop a headless session) still gets the count of frames without exposure matching, and
        `report()` still tells what went out before it."""
        try:
            for frame in self.source:
                output = self.process(frame)
                for sink in self.sinks:
                    sink.send(output)
                self._tick()
                if self.preview is not None:
                    self.preview.send(draw_status(output, self.status_lines()))
                self.frames += 1
                if self._first_time is None:
                    self._first_time = self.clock()
                if self.keys is not None:
                    self.handle_key(self.keys(), frame)
                if self._stop or (self.max_frames is not None and self.frames >= self.max_frames):
                    break
        except KeyboardInterrupt:  # SIGTERM and SIGHUP too (`Terminated`)
            if self.exposure is not None:
                self.exposure.report()
            raise
        if self.exposure is not None:
            self.exposure.report()
        return self.report()

    def report(self) -> WebcamReport:
        """What the session has done so far: frames sent, and their rate from the first to now."""
        seconds = self.clock() - self._first_time if self._first_time is not None else 0.0
        fps = (self.frames - 1) / seconds if self.frames > 1 and seconds > 0 else 0.0
        dropped = int(getattr(self.source, "dropped", 0))
        return WebcamReport(self.frames, seconds, fps, dropped, self.plate is not None)

    def _log_waiting(self) -> None:
        if self.auto_plate is not None:
            logger.info("no plate yet: frames pass through unchanged; step out of view: the plate is the median "
                        "of %d frames taken in %.3g s", self.auto_plate.frames, self.auto_plate.delay)
        elif self.keys is not None:
            logger.info("no plate yet: frames pass through unchanged; step out of view and press b in the preview")
        else:
            logger.info("no plate: frames pass through unchanged")

    def close(self) -> None:
        """Close the backgrounds, the source, the preview and the sinks; every one is tried, the first error raised."""
        error: BaseException | None = None
        for backdrop in self._backdrops.values():
            backdrop.close()
        for part in (self.source, self.preview, *self.sinks):
            close = getattr(part, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - close the rest first
                if error is None:
                    error = exc
                else:
                    logger.error("while closing: %s", exc)
        if error is not None:
            raise error


# -------------------------------------------------------------------------------------------- one call


def run_webcam(
    checkpoint: str | os.PathLike | None = None,
    *,
    camera: int | str | os.PathLike = 0,
    bgr: str | os.PathLike | None = None,
    target_bgr: Sequence[str] = ("green",),
    virtual_cam: bool = False,
    virtual_cam_backend: str | None = None,
    virtual_cam_device: str | None = None,
    preview: bool | None = None,
    record: str | os.PathLike | None = None,
    overwrite: bool = False,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    backbone: str | None = None,
    backbone_scale: float = 0.25,
    refine_mode: str = "sampling",
    refine_sample_pixels: int = 80_000,
    refine_threshold: float = 0.1,
    plate_solve: bool | None = None,
    device: str = "auto",
    precision: str = "fp32",
    max_frames: int | None = None,
    auto_plate_delay: float = 3.0,
    auto_plate_frames: int = 10,
    match_exposure: bool = False,
) -> WebcamReport:
    """Matte a camera live and send the composite to a virtual camera, a preview window and/or a recording.

    Arguments:
        checkpoint: the model's weights (None: the embedded default model).
        camera: a camera index, or a video file played as a camera.
        bgr: a plate image, read before the camera opens (one that cannot be is refused then); without one, key b
            in the preview takes it, or headless it is taken automatically (`auto_plate_delay` seconds, then the
            median of `auto_plate_frames` frames).
        target_bgr: target backgrounds (colour, image, video, ``blur``, ``transparent``), cycled with key t; image
            and video files are read before the camera opens, and one that cannot be is refused then.
        virtual_cam: send to a virtual camera (needs ``pip install "bgmatte[webcam]"``), through
            `virtual_cam_backend` (``v4l2loopback``, ``obs``, ``unitycapture``; None: any) and `virtual_cam_device`.
        preview: show a window with keys (b plate, t target, q quit); None shows it when a display
            and a windowed OpenCV are present.
        record: also write the output to this video file (`overwrite` to replace it; never one of the inputs).
        width, height, fps: the capture format asked of the camera; frames are resized to width x height.
        backbone, backbone_scale, refine_mode, refine_sample_pixels, refine_threshold, plate_solve, device,
            precision: the model's settings, as for `bgmatte.load_model` and `Predictor` (the threshold's default
            is the model's own 0.1, as in ``bgmatte webcam``).
        max_frames: stop after this many frames.
        match_exposure: bring the plate to each frame's exposure and white balance, as ``bgmatte video
            --match-exposure`` does (`WebcamSession`'s `exposure`).

    Ctrl-C stops it: the camera is released and the virtual camera and the recording are closed
    (the recording finished and playable) before KeyboardInterrupt goes on. Returns a `WebcamReport`.
    """
    # NaN passes no comparison: finiteness is asked for (an infinite or NaN rate cannot time a recording).
    for name, value in (("--width", width), ("--height", height), ("--fps", fps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BgmatteError(f"{name} must be a positive number, not {value}")
    if not (math.isfinite(auto_plate_delay) and auto_plate_delay >= 0):  # NaN: the plate would never be taken
        raise BgmatteError(f"--auto-plate-delay must be a number of seconds, 0 or more, not {auto_plate_delay}")
    _refuse_large_capture(width, height)
    from bgmatte.model.matting import RefineOptions

    try:  # before the camera opens, not when the weights load
        RefineOptions(backbone_scale, refine_mode, refine_sample_pixels, refine_threshold)
    except ValueError as exc:
        raise BgmatteError(str(exc)) from None
    from bgmatte.model.build import resolve_device

    resolve_device(device)  # CUDA without a GPU: one line now, not after the camera opened and the weights were read
    if bgr is not None and str(bgr).strip().lower() == "auto" and not Path(bgr).exists():
        # `bgmatte video --bgr auto` estimates a plate from the whole clip; live, the plate is taken by itself.
        raise BgmatteError("--bgr auto is for videos: for the webcam leave --bgr out, and key b in the preview takes "
                           "the plate, or headless (--no-preview) it is taken after --auto-plate-delay seconds")
    if max_frames is not None and max_frames < 1:
        raise BgmatteError(f"--max-frames must be at least 1, not {max_frames}")
    for name, value in (("--virtual-cam-backend", virtual_cam_backend), ("--virtual-cam-device", virtual_cam_device)):
        if value is not None and not virtual_cam:  # the user means a virtual camera: ignoring it would hide that
            raise BgmatteError(f"{name} goes with --virtual-cam, which was not given")
    targets = [parse_target_background(spec) for spec in target_bgr] or [parse_target_background("green")]
    auto_plate = AutoPlate(auto_plate_delay, auto_plate_frames)
    if virtual_cam:
        import_pyvirtualcam()  # the install hint before anything slow
    show, why_not = _resolve_preview(preview)
    if not (show or virtual_cam or record is not None):
        raise BgmatteError("nothing to show or send: ask for --virtual-cam, --record FILE or --preview "
                           "(the preview needs a display)")
    if record is not None:
        _check_recording(Path(record), overwrite, camera, bgr, targets)
    _refuse_still_camera(camera)
    pictures = _read_targets(targets)
    plate_image = _read_plate(bgr) if bgr is not None else None

    from bgmatte.model.build import load_model
    from bgmatte.predictor import Predictor, check_frame_size

    with ExitStack() as stack:
        source = open_camera(camera, width=width, height=height, fps=fps)
        stack.callback(source.close)
        plate = fit_plate(plate_image, source.size, bgr) if plate_image is not None else None
        # What depends on the camera's size and rate is refused once it is open, but before the weights are read
        # and the warm-up is run: frames too small for the backbone scale, a virtual camera that cannot start.
        check_frame_size(*source.size, backbone_scale)
        sinks: list[FrameSink] = []
        if virtual_cam:
            virtual = VirtualCamera(*source.size, source.fps, backend=virtual_cam_backend, device=virtual_cam_device)
            stack.callback(virtual.close)
            sinks.append(virtual)
        model = load_model(checkpoint, backbone=backbone, backbone_scale=backbone_scale, refine_mode=refine_mode,
                           refine_sample_pixels=refine_sample_pixels, refine_threshold=refine_threshold,
                           plate_solve=plate_solve, device=device)
        predictor = Predictor(model, precision=precision)
        # The first inference is slow (allocation, kernel choice); do it now, not on the first live frame.
        blank = np.zeros((source.size[1], source.size[0], 3), np.uint8)
        predictor(blank, blank)
        if record is not None:
            recording = Recording(record, fps=source.fps, overwrite=overwrite)
            stack.callback(recording.close)
            sinks.append(recording)
        window = PreviewWindow() if show else None
        if window is not None:
            stack.callback(window.close)
        else:
            logger.info("no preview window (%s): press Ctrl-C to stop", why_not)
        reader = LatestFrameReader(source)
        # Its thread reads the camera from now on: whatever fails next, the thread is stopped and joined
        # before the camera is released (the stack unwinds in reverse), never released under a read.
        stack.callback(reader.close)
        session = WebcamSession(reader, predictor, targets, sinks=sinks, preview=window,
                                keys=window.poll_key if window is not None else None, plate=plate,
                                auto_plate=auto_plate, max_frames=max_frames, pictures=pictures,
                                exposure=ExposureFeedback(source.name, LIVE_EXPOSURE) if match_exposure else None)
        stack.push(session.__exit__)
        logger.info("matting %s at %dx%d on %s (%s)", source.name, *source.size, predictor.device, precision)
        try:
            report = session.run()
        except KeyboardInterrupt:  # the figures of the frames sent before the stop, then the stop goes on
            logger.info("%s", session.report().summary())
            raise
    logger.info("%s", report.summary())
    return report


def _refuse_large_capture(width: int | None, height: int | None) -> None:
    """Refuse, before the camera opens, a size asked for that is above the pixel limit of still images (a side given
    alone counts as that many pixels at least): every frame, plate and composite would be that large."""
    pixels = (width or 1) * (height or 1)
    if pixels <= DEFAULT_MAX_PIXELS:
        return
    asked = " ".join(f"{name} {value}" for name, value in (("--width", width), ("--height", height)) if value)
    size = f"{width}x{height} is" if width and height else "frames of at least"
    raise BgmatteError(f"{asked}: {size} {megapixels_above(pixels, DEFAULT_MAX_PIXELS)}")


def _check_recording(path: Path, overwrite: bool, camera: int | str | os.PathLike, bgr: str | os.PathLike | None,
                     targets: Sequence[TargetBackground]) -> None:
    """Refuse, before the camera opens and the model loads, a recording that cannot be written (its extension, its
    folder), that exists (unless `overwrite`), or that is one of the inputs (the video file played as the camera,
    the plate, a target image or video), even with `overwrite`: recording over it would destroy what is read."""
    from bgmatte.io.video import choose_encoder

    choose_encoder(path, alpha=False)
    inputs = [] if isinstance(camera, int) or str(camera).strip().isdigit() else [("camera file", Path(camera))]
    if bgr is not None:
        inputs.append(("plate", Path(bgr)))
    inputs += [("target background", target.path) for target in targets if target.path is not None]
    refuse_overwriting_inputs([path], inputs, advice="choose another --record file")
    check_destination(path, overwrite)


def _refuse_still_camera(camera: int | str | os.PathLike) -> None:
    """Refuse a photo given as the camera file, which OpenCV plays as a video of one frame (a recording of it, passed
    through, and exit 0). A file that cannot be opened is left to `CameraSource`, which says why."""
    if isinstance(camera, int) or str(camera).strip().isdigit() or not Path(camera).is_file():
        return
    from bgmatte.io.video import VideoReader

    try:
        reader = VideoReader(camera, queue_size=1)
    except BgmatteError:
        return
    try:
        still = reader.still
    finally:
        reader.close()
    if still:
        raise BgmatteError(f"{camera}: a still image, not a video to play as the camera: give it as --bgr or "
                           "--target-bgr, or matte it with `bgmatte image`")


def _read_targets(targets: Sequence[TargetBackground]) -> dict[Path, np.ndarray]:
    """Read the image targets and open the video ones before the camera opens and the model loads, so that one that
    cannot be read is refused at once, not at its first composite; the images' pixels are returned for the session
    to use, not read twice (a video is only opened: its header and first frame)."""
    from bgmatte.io.images import read_image
    from bgmatte.io.video import VideoReader

    pictures: dict[Path, np.ndarray] = {}
    for target in targets:
        try:
            if target.kind == "image" and target.path not in pictures:
                pictures[target.path] = read_image(target.path)
            elif target.kind == "video":
                VideoReader(target.path, queue_size=1).close()
        except BgmatteError as exc:
            raise BgmatteError(f"{exc} (for the target background)") from None
    return pictures


def _read_plate(bgr: str | os.PathLike) -> np.ndarray:
    """Read the plate file before the camera opens and the model loads, so that a missing or damaged one is refused
    at once, not after the camera was opened (and its light came on) for nothing; it is fitted to the camera's size
    once that is known (`fit_plate`)."""
    from bgmatte.io.images import read_image

    try:
        return read_image(bgr)
    except BgmatteError as exc:
        raise BgmatteError(f"{exc} (for the plate, --bgr)") from None


def _resolve_preview(preview: bool | None) -> tuple[bool, str]:
    """Whether to show the preview (asked for, and then it must work; refused; or wherever it can), and why not."""
    if preview is False:
        return False, "--no-preview"
    display, windows = display_available(), opencv_has_windows()
    if preview:
        if not display:
            raise BgmatteError("--preview needs a display, and none was found (DISPLAY is not set); "
                               "use --no-preview with --virtual-cam or --record")
        if not windows:
            raise BgmatteError("--preview needs OpenCV with window support (opencv-python), "
                               "not opencv-python-headless")
        return True, ""
    why_not = "" if display and windows else "no display" if not display else "this OpenCV cannot open windows"
    return display and windows, why_not
