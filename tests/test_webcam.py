"""`bgmatte webcam`: the live loop with a video file as the camera and recording sinks in place of the devices."""
from __future__ import annotations

import logging
import re
import sys
import threading
import time
import types
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from bgmatte.cli import main
from bgmatte.composite import parse_target_background
from bgmatte.errors import BgmatteError
from bgmatte.io import webcam
from bgmatte.io.video import VideoReader
from bgmatte.io.webcam import (
    AutoPlate,
    Backdrop,
    CameraSource,
    LatestFrameReader,
    Recording,
    VirtualCamera,
    WebcamSession,
    load_plate,
    run_webcam,
)
from bgmatte.pipeline import cover
from bgmatte.predictor import Matte, Predictor, frames_to_tensor

pytestmark = pytest.mark.timeout(120)

WIDTH, HEIGHT = 96, 64
GREEN = np.array([0, 255, 0])
BLUE = np.array([0, 0, 255])
CPU = torch.device("cpu")


def scene(index: int) -> np.ndarray:
    """A grey-blue background with a red square that moves right one step per frame."""
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = (90, 110, 130)
    image[20:44, 8 + 2 * index : 32 + 2 * index] = (220, 40, 40)
    return image


def make_clip(path: Path, count: int, *, fps: int = 30, frame=scene) -> Path:
    """A small MPEG-4 clip made with PyAV."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frame(0).shape[1], frame(0).shape[0]
        stream.pix_fmt = "yuv420p"
        for index in range(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame(index), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def clip_frames(path: Path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return [frame.image for frame in reader]


@pytest.fixture
def camera_frames(tmp_path) -> list[np.ndarray]:
    """Frames of a video file, as the session's camera."""
    return clip_frames(make_clip(tmp_path / "camera.mp4", 8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Random weights, saved as the docs say a user's checkpoint would be."""
    from bgmatte.model.build import save_weights
    from bgmatte.model.matting import MattingRefine

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random.safetensors"
    save_weights(MattingRefine("mobilenetv2"), path)
    return path


class ConstantMatte:
    """A stand-in predictor: alpha `alpha` everywhere and the frame as foreground; remembers each plate."""

    device = CPU

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha
        self.plates: list[np.ndarray] = []

    def __call__(self, src, bgr) -> Matte:
        src_t = frames_to_tensor(src, CPU, torch.float32)
        bgr_t = frames_to_tensor(bgr, CPU, torch.float32)
        self.plates.append((bgr_t[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        pha = torch.full_like(src_t[:, :1], self.alpha)
        return Matte(pha, src_t, torch.zeros_like(pha), torch.zeros_like(pha))


def over(src: np.ndarray, background, alpha: float = 0.5) -> np.ndarray:
    return src.astype(np.float64) * alpha + np.asarray(background, np.float64) * (1 - alpha)


class Collect:
    """A recording sink that keeps frames in memory."""

    def __init__(self):
        self.frames: list[np.ndarray] = []
        self.closed = False

    def send(self, frame: np.ndarray) -> None:
        assert frame.dtype == np.uint8 and frame.ndim == 3
        self.frames.append(frame.copy())

    def close(self) -> None:
        self.closed = True


def scripted(*keys):
    """A key function that plays `keys` (characters or codes) one per frame, then reports no key."""
    codes = iter(ord(key) if isinstance(key, str) else key for key in keys)
    return lambda: next(codes, -1)


def targets(*specs: str):
    return [parse_target_background(spec) for spec in specs]


# ------------------------------------------------------------------------------------------- the session


def test_frames_pass_through_unchanged_until_a_plate_is_set(camera_frames):
    predictor, sink = ConstantMatte(), Collect()
    with WebcamSession(iter(camera_frames), predictor, targets("green"), sinks=[sink], keys=scripted()) as session:
        report = session.run()
    assert report.frames == len(camera_frames) and not report.plate
    assert all(np.array_equal(out, src) for out, src in zip(sink.frames, camera_frames, strict=True))
    assert predictor.plates == []
    assert sink.closed


def test_b_key_takes_the_current_frame_as_the_plate(camera_frames):
    predictor, sink = ConstantMatte(), Collect()
    session = WebcamSession(iter(camera_frames[:4]), predictor, targets("green"), sinks=[sink],
                            keys=scripted(-1, "b"))
    report = session.run()
    assert report.plate
    assert np.array_equal(sink.frames[0], camera_frames[0]) and np.array_equal(sink.frames[1], camera_frames[1])
    assert np.array_equal(predictor.plates[0], camera_frames[1])
    for out, src in zip(sink.frames[2:], camera_frames[2:4], strict=True):
        assert out.shape == (HEIGHT, WIDTH, 3)
        assert np.abs(out - over(src, GREEN)).max() <= 1


def test_t_key_cycles_the_target_backgrounds_and_wraps(camera_frames):
    sink = Collect()
    session = WebcamSession(iter(camera_frames[:5]), ConstantMatte(), targets("green", "blue"), sinks=[sink],
                            keys=scripted(-1, "t", -1, "t"), plate=camera_frames[0])
    session.run()
    expected = [GREEN, GREEN, BLUE, BLUE, GREEN]
    for out, src, background in zip(sink.frames, camera_frames[:5], expected, strict=True):
        assert np.abs(out - over(src, background)).max() <= 1


@pytest.mark.parametrize("key", ["q", 27], ids=["q", "escape"])
def test_q_and_escape_stop_the_session(camera_frames, key):
    sink = Collect()
    report = WebcamSession(iter(camera_frames), ConstantMatte(), targets("green"), sinks=[sink],
                           keys=scripted(-1, key)).run()
    assert report.frames == 2 and len(sink.frames) == 2


def test_max_frames_stops_the_session(camera_frames):
    sink = Collect()
    report = WebcamSession(iter(camera_frames), ConstantMatte(), targets("green"), sinks=[sink],
                           plate=camera_frames[0], max_frames=3).run()
    assert report.frames == 3 and len(sink.frames) == 3


def test_headless_plate_is_the_median_of_frames_taken_after_the_delay():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(7)]
    now = [0.0]

    def source():
        for index, frame in enumerate(frames):
            now[0] = float(index)  # one second per frame
            yield frame

    predictor, sink = ConstantMatte(), Collect()
    session = WebcamSession(source(), predictor, targets("green"), sinks=[sink],
                            auto_plate=AutoPlate(delay=2.0, frames=3), clock=lambda: now[0])
    session.run()
    # Frames 0 and 1 come before the delay; 2, 3 and 4 make the plate; 5 and 6 are composited.
    for index in range(5):
        assert np.array_equal(sink.frames[index], frames[index])
    expected_plate = np.median(np.stack(frames[2:5]), axis=0).round().astype(np.uint8)
    assert len(predictor.plates) == 2 and np.array_equal(predictor.plates[0], expected_plate)
    assert np.abs(sink.frames[5] - over(frames[5], GREEN)).max() <= 1


def test_real_model_composite_differs_from_the_input_once_a_plate_is_set(checkpoint, camera_frames):
    from bgmatte.model.build import load_model

    predictor = Predictor(load_model(checkpoint, device="cpu"))
    sink = Collect()
    WebcamSession(iter(camera_frames[:4]), predictor, targets("green"), sinks=[sink], keys=scripted("b")).run()
    assert len(sink.frames) == 4
    assert np.array_equal(sink.frames[0], camera_frames[0])
    for out, src in zip(sink.frames[1:], camera_frames[1:4], strict=True):
        assert out.shape == (HEIGHT, WIDTH, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - src).mean() > 5


def test_preview_gets_a_status_overlay_and_the_sinks_do_not(camera_frames):
    sink, preview = Collect(), Collect()
    WebcamSession(iter(camera_frames[:2]), ConstantMatte(), targets("green"), sinks=[sink], preview=preview,
                  keys=scripted()).run()
    assert np.array_equal(sink.frames[0], camera_frames[0])
    assert preview.frames[0].shape == camera_frames[0].shape
    assert not np.array_equal(preview.frames[0], camera_frames[0])


def test_transparent_target_shows_a_checkerboard(camera_frames):
    sink = Collect()
    WebcamSession(iter(camera_frames[:1]), ConstantMatte(alpha=0.0), targets("transparent"), sinks=[sink],
                  plate=camera_frames[0]).run()
    out = sink.frames[0]
    assert set(np.unique(out)) == {153, 204}  # two greys, 0.6 and 0.8
    assert not np.array_equal(out[0, 0], out[0, -1]) or not np.array_equal(out[0, 0], out[-1, 0])


def test_blur_target_is_the_frame_blurred(camera_frames):
    sink = Collect()
    WebcamSession(iter(camera_frames[:1]), ConstantMatte(alpha=0.0), targets("blur"), sinks=[sink],
                  plate=camera_frames[0]).run()
    from bgmatte.composite import blur, to_uint8

    src = frames_to_tensor(camera_frames[0], CPU, torch.float32)
    expected = to_uint8(blur(src))[0].permute(1, 2, 0).numpy()
    out = sink.frames[0].astype(int)
    assert np.abs(out - expected).max() <= 1
    assert np.abs(out - camera_frames[0]).max() > 40  # the square's edges are soft


def test_video_target_is_looped_and_played_in_real_time(tmp_path):
    def level(index: int) -> np.ndarray:
        return np.full((HEIGHT, WIDTH, 3), 40 + 60 * index, np.uint8)

    video = make_clip(tmp_path / "loop.mp4", 3, frame=level)
    with VideoReader(video) as reader:
        period = 1 / float(reader.fps)
    now = [100.0]
    backdrop = Backdrop(parse_target_background(str(video)), (WIDTH, HEIGHT), clock=lambda: now[0])
    pha = torch.zeros(1, 1, HEIGHT, WIDTH)
    matte = Matte(pha, torch.zeros(1, 3, HEIGHT, WIDTH), pha, pha)
    # Matted at half the video's rate, then at its rate: every other frame of the background, then every one; then a
    # stall of five loops and a half.
    moments = [0, 2, 4, 6, 7, 8, 9, 10, 26]
    try:
        means = []
        for moment in moments:
            now[0] = 100.0 + moment * period
            means.append(float(backdrop.render(matte, np.zeros((HEIGHT, WIDTH, 3), np.uint8)).mean()))
    finally:
        backdrop.close()
    expected = [40 + 60 * (moment % 3) for moment in moments]
    assert np.allclose(means, expected, atol=6), str(list(zip(means, expected)))  # mpeg4 is lossy


def test_image_target_is_scaled_to_cover_the_frame_keeping_its_aspect():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 140:160] = 255  # a centred white band
    fitted = cover(image, WIDTH, HEIGHT)
    assert fitted.shape == (HEIGHT, WIDTH, 3)
    columns = np.flatnonzero(fitted[HEIGHT // 2, :, 0] > 128)
    assert abs((columns.min() + columns.max()) / 2 - (WIDTH - 1) / 2) <= 1
    assert 11 <= columns.size <= 15  # 20 px at a scale of 0.64: the aspect ratio was kept


def test_plate_of_another_size_is_resized_with_a_warning(tmp_path, caplog):
    path = tmp_path / "plate.png"
    cv2.imwrite(str(path), np.full((40, 50, 3), 77, np.uint8))
    with caplog.at_level(logging.WARNING):
        plate = load_plate(path, (WIDTH, HEIGHT))
    assert plate.shape == (HEIGHT, WIDTH, 3) and plate.dtype == np.uint8
    assert "resizing the plate" in caplog.text


def test_keyboard_interrupt_finishes_the_recording_and_closes_everything(tmp_path, camera_frames):
    class Interrupt:
        def __init__(self):
            self.sent = 0

        def send(self, frame):
            self.sent += 1
            if self.sent == 3:
                raise KeyboardInterrupt

    class Source:
        closed = False

        def __iter__(self):
            return iter(camera_frames)

        def close(self):
            Source.closed = True

    out = tmp_path / "recorded.mp4"
    with pytest.raises(KeyboardInterrupt):
        with WebcamSession(Source(), ConstantMatte(), targets("green"), sinks=[Recording(out), Interrupt()],
                           plate=camera_frames[0]) as session:
            session.run()
    assert Source.closed
    assert len(clip_frames(out)) == 3


# ---------------------------------------------------------------------------------------------- capture


def test_latest_frame_reader_drops_stale_frames_and_keeps_the_newest():
    def fast_source():
        for index in range(40):
            yield index
            time.sleep(0.002)

    reader = LatestFrameReader(fast_source())
    received = []
    for item in reader:
        received.append(item)
        time.sleep(0.02)  # a slow model
    reader.close()
    assert received[-1] == 39
    assert received == sorted(received) and len(set(received)) == len(received)
    assert len(received) < 40 and reader.dropped == 40 - len(received)


def test_latest_frame_reader_raises_the_source_error_after_its_frames():
    def failing_source():
        yield "frame"
        raise KeyboardInterrupt

    reader = LatestFrameReader(failing_source())
    iterator = iter(reader)
    assert next(iterator) == "frame"
    with pytest.raises(KeyboardInterrupt):
        next(iterator)
    reader.close()


def test_camera_source_reads_a_file_as_rgb_at_the_requested_size(tmp_path):
    source = CameraSource(make_clip(tmp_path / "camera.mp4", 6), width=48)
    try:
        frames = list(source)
    finally:
        source.close()
    assert source.size == (48, 32) and len(frames) == 6
    assert all(frame.shape == (32, 48, 3) and frame.dtype == np.uint8 for frame in frames)
    red, green, blue = frames[0][16, 10].astype(int)  # inside the red square
    assert red > 180 and green < 90 and blue < 90


def test_camera_source_plays_a_file_at_its_frame_rate(tmp_path):
    source = CameraSource(make_clip(tmp_path / "camera.mp4", 7, fps=20))
    start = time.perf_counter()
    count = sum(1 for _ in source)
    elapsed = time.perf_counter() - start
    source.close()
    assert count == 7 and elapsed >= 6 / 20 - 0.02


# ------------------------------------------------------------------------------------------------- sinks


def fake_pyvirtualcam(monkeypatch, error: Exception | None = None) -> types.SimpleNamespace:
    module = types.ModuleType("pyvirtualcam")
    calls = types.SimpleNamespace(args=None, kwargs=None, frames=[], closed=False)

    class Camera:
        def __init__(self, *args, **kwargs):
            if error is not None:
                raise error
            calls.args, calls.kwargs = args, kwargs
            self.device = kwargs.get("device") or "/dev/video7"

        def send(self, frame):
            calls.frames.append(frame)

        def close(self):
            calls.closed = True

    module.Camera = Camera
    module.PixelFormat = types.SimpleNamespace(RGB="rgb", BGR="bgr")
    monkeypatch.setitem(sys.modules, "pyvirtualcam", module)
    return calls


@pytest.mark.parametrize("backend, device", [("v4l2loopback", "/dev/video9"), ("obs", None)])
def test_virtual_camera_passes_backend_and_device_and_sends_rgb(monkeypatch, backend, device):
    calls = fake_pyvirtualcam(monkeypatch)
    camera = VirtualCamera(WIDTH, HEIGHT, 30.0, backend=backend, device=device)
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    camera.send(frame)
    camera.close()
    camera.close()
    assert calls.args == (WIDTH, HEIGHT, 30.0)
    assert calls.kwargs == {"fmt": "rgb", "backend": backend, "device": device}
    assert len(calls.frames) == 1 and calls.frames[0].shape == (HEIGHT, WIDTH, 3) and calls.closed


def test_virtual_camera_that_cannot_start_is_a_one_line_error(monkeypatch):
    fake_pyvirtualcam(monkeypatch, error=RuntimeError("no v4l2 loopback device found\nmore detail"))
    with pytest.raises(BgmatteError, match="cannot start") as caught:
        VirtualCamera(WIDTH, HEIGHT, 30.0, backend="v4l2loopback")
    assert "\n" not in str(caught.value)


def test_preview_window_shows_bgr_and_reads_keys(monkeypatch):
    shown, keys = [], iter([ord("b") | 0x100000])
    monkeypatch.setattr(cv2, "namedWindow", lambda *args: None)
    monkeypatch.setattr(cv2, "imshow", lambda title, image: shown.append(image))
    monkeypatch.setattr(cv2, "waitKeyEx", lambda delay: next(keys, -1))
    visible = iter([1.0, 0.0])
    monkeypatch.setattr(cv2, "getWindowProperty", lambda *args: next(visible))
    monkeypatch.setattr(cv2, "destroyWindow", lambda *args: None)
    window = webcam.PreviewWindow()
    window.send(np.tile(np.array([255, 0, 0], np.uint8), (HEIGHT, WIDTH, 1)))
    assert tuple(shown[0][0, 0]) == (0, 0, 255)  # red, in OpenCV's BGR order
    assert window.poll_key() == ord("b")
    assert window.poll_key() == -1
    assert window.poll_key() == ord("q")  # the window was closed
    window.close()


@pytest.mark.parametrize("code", [0xFF51, 0xFF54, 0x10FF51], ids=["left", "down", "left-numlock"])
def test_arrow_keys_neither_quit_nor_change_the_target(monkeypatch, camera_frames, code):
    """OpenCV's GTK windows give a key's X symbol: the left arrow, 0xFF51, read by its lower 8 bits (all that
    cv2.waitKey gives) as Q, quit the session, and the down arrow, 0xFF54 (T), changed the target."""
    monkeypatch.setattr(cv2, "namedWindow", lambda *args: None)
    monkeypatch.setattr(cv2, "waitKey", lambda delay: code & 0xFF)  # what OpenCV's waitKey gives of it
    monkeypatch.setattr(cv2, "waitKeyEx", lambda delay: code)
    monkeypatch.setattr(cv2, "getWindowProperty", lambda *args: 1.0)
    monkeypatch.setattr(cv2, "destroyWindow", lambda *args: None)
    window = webcam.PreviewWindow()
    assert window.poll_key() == -1
    session = WebcamSession(iter(camera_frames[:4]), ConstantMatte(), targets("green", "blue"), sinks=[Collect()],
                            keys=lambda: code, plate=camera_frames[0])
    assert session.run().frames == 4 and session.target_index == 0
    monkeypatch.setattr(cv2, "waitKeyEx", lambda delay: ord("q") | 0x100000)  # q, with NumLock on
    assert window.poll_key() == ord("q")
    window.close()


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_records_composites_from_a_video_file_camera(tmp_path, checkpoint, caplog):
    clip = make_clip(tmp_path / "camera.mp4", 600)  # 20 s: time for a slow, busy machine to reach --max-frames
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="bgmatte"):
        code = main(["webcam", "--camera", str(clip), "--checkpoint", str(checkpoint), "--record", str(out),
                     "--no-preview", "--max-frames", "6", "--auto-plate-delay", "0", "--auto-plate-frames", "2",
                     "--target-bgr", "green", "--device", "cpu"])
    assert code == 0
    recorded = clip_frames(out)
    assert len(recorded) == 6 and all(frame.shape == (HEIGHT, WIDTH, 3) for frame in recorded)
    inputs = clip_frames(clip)
    # The first two frames make the plate and pass through; the rest are composites.
    assert min(np.abs(recorded[0].astype(int) - frame).mean() for frame in inputs) < 4
    assert min(np.abs(recorded[-1].astype(int) - frame).mean() for frame in inputs) > 20
    assert "plate captured" in caplog.text and "fps" in caplog.text


@pytest.mark.parametrize("camera", ["missing.mp4", "9"], ids=["file", "index"])
def test_cli_missing_camera_is_a_one_line_error_with_exit_code_2(tmp_path, checkpoint, capsys, camera):
    camera = str(tmp_path / camera) if camera.endswith(".mp4") else camera
    code = main(["webcam", "--camera", camera, "--checkpoint", str(checkpoint),
                 "--record", str(tmp_path / "out.mp4"), "--no-preview"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("bgmatte webcam: error:")
    assert (camera if camera.endswith(".mp4") else "camera 9") in err
    assert not (tmp_path / "out.mp4").exists()


def test_cli_unreadable_camera_file_is_one_line_without_ffmpeg_s_own(tmp_path):
    """OpenCV's FFmpeg printed '[mov,mp4,m4a,3gp,3g2,mj2 @ 0x...] moov atom not found' above the error line."""
    import os
    import subprocess

    camera = tmp_path / "broken.mp4"
    camera.write_bytes(b"not a video")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-m", "bgmatte", "webcam", "--camera", str(camera), "--no-preview",
                           "--record", str(tmp_path / "out.mp4")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr == (f"bgmatte webcam: error: {camera}: not a video file OpenCV can read "
                           "(to use as the camera)\n")


def test_cli_virtual_cam_without_pyvirtualcam_gives_the_install_hint(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # importing it now fails, installed or not
    code = main(["webcam", "--camera", str(make_clip(tmp_path / "camera.mp4", 2)), "--checkpoint",
                 str(checkpoint), "--virtual-cam", "--no-preview"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert 'pip install "bgmatte[webcam]"' in err


@pytest.mark.slow
def test_cli_ctrl_c_finishes_the_recording_releases_the_camera_and_exits_130(tmp_path, checkpoint, capsys,
                                                                          monkeypatch):
    class InterruptedCamera:
        """Three frames, then Ctrl-C (as the camera thread hands it on)."""

        size, fps, name = (WIDTH, HEIGHT), 30.0, "fake camera"
        closed = False

        def __iter__(self):
            for index in range(3):
                yield scene(index)
                time.sleep(0.3)
            raise KeyboardInterrupt

        def close(self):
            InterruptedCamera.closed = True

    monkeypatch.setattr(webcam, "open_camera", lambda *args, **kwargs: InterruptedCamera())
    out = tmp_path / "out.mp4"
    code = main(["webcam", "--checkpoint", str(checkpoint), "--record", str(out), "--no-preview",
                 "--device", "cpu"])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert InterruptedCamera.closed
    assert 1 <= len(clip_frames(out)) <= 3  # finished and playable, with the frames sent before Ctrl-C
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_headless_with_nothing_to_send_is_an_error(tmp_path, capsys):
    code = main(["webcam", "--camera", str(make_clip(tmp_path / "camera.mp4", 2)), "--no-preview"])
    assert code == 2 and "nothing to show or send" in capsys.readouterr().err


def test_preview_asked_for_without_a_display_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(webcam, "display_available", lambda: False)
    with pytest.raises(BgmatteError, match="needs a display"):
        run_webcam(camera=make_clip(tmp_path / "camera.mp4", 2), preview=True)


def test_cli_help_lists_the_webcam_options(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["webcam", "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0
    for option in ("--camera", "--virtual-cam-backend", "--target-bgr", "--record", "--max-frames", "--bgr"):
        assert option in text


# ------------------------------------------------------------------------------------ start-up and shutdown


class TinyModel(torch.nn.Module):
    """A model double for `run_webcam`: alpha 1/2 everywhere, the source as foreground."""

    def forward(self, src, bgr):
        pha = torch.full_like(src[:, :1], 0.5)
        return pha, src, pha, src, pha, torch.zeros_like(pha)


class WatchedCamera:
    """An endless camera that records whether it was released while its reader thread was inside a read."""

    size, fps, name = (WIDTH, HEIGHT), 30.0, "watched camera"

    def __init__(self):
        self.reading = False
        self.released_while_reading = False
        self.closed = False
        self.reads = 0
        self.thread: threading.Thread | None = None

    def __iter__(self):
        self.thread = threading.current_thread()
        while not self.closed:
            self.reading = True
            time.sleep(0.005)  # a read takes a while; a release now would pull the device from under it
            self.reads += 1
            self.reading = False
            yield scene(self.reads % 8)

    def close(self):
        self.released_while_reading = self.released_while_reading or self.reading
        self.closed = True


def test_run_webcam_refuses_max_frames_below_one_before_opening_the_camera(monkeypatch, tmp_path):
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    for value in (0, -1):
        with pytest.raises(BgmatteError, match=f"--max-frames must be at least 1, not {value}"):
            run_webcam(camera="0", record=tmp_path / "out.mp4", max_frames=value, preview=False)


def test_run_webcam_explains_bgr_auto_before_opening_the_camera(monkeypatch, tmp_path):
    """`--bgr auto`, as for `bgmatte video`, was read as a file named auto: "auto: no such image file"."""
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    with pytest.raises(BgmatteError, match=r"^--bgr auto is for videos: for the webcam leave --bgr out, and key b"):
        run_webcam(camera="0", bgr="auto", record=tmp_path / "out.mp4", preview=False)


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_run_webcam_refuses_an_existing_recording_before_opening_the_camera(monkeypatch, tmp_path, kind):
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    out = tmp_path / "out.mp4"
    if kind == "file":
        out.write_bytes(b"kept")
    else:
        out.symlink_to(tmp_path / "nowhere.mp4")  # replacing it would write through the link
    with pytest.raises(BgmatteError) as refused:
        run_webcam(camera="0", record=out, preview=False)
    assert str(refused.value) == f"{out}: already exists (pass overwrite=True to replace it)"  # in Python's terms


@pytest.mark.parametrize("option", ["--virtual-cam-backend", "--virtual-cam-device"])
def test_cli_virtual_camera_settings_without_virtual_cam_are_refused_before_the_camera_opens(monkeypatch, tmp_path,
                                                                                            capsys, option):
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    value = "obs" if option == "--virtual-cam-backend" else "/dev/video2"
    code = main(["webcam", "--record", str(tmp_path / "out.mp4"), "--no-preview", option, value])
    assert code == 2
    assert capsys.readouterr().err == f"bgmatte webcam: error: {option} goes with --virtual-cam, which was not given\n"


@pytest.mark.parametrize("which", ["camera", "target"])
def test_run_webcam_never_records_over_its_camera_file_or_target_video_even_with_overwrite(monkeypatch, tmp_path,
                                                                                         which):
    clip = make_clip(tmp_path / "clip.mp4", 4)
    kept = clip.read_bytes()
    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: TinyModel())
    camera = make_clip(tmp_path / "camera.mp4", 4) if which == "target" else clip
    with pytest.raises(BgmatteError, match=r"clip\.mp4: this output would overwrite the "):
        run_webcam(camera=camera, target_bgr=[str(clip)] if which == "target" else ["green"], record=clip,
                   overwrite=True, preview=False, max_frames=2)
    assert clip.read_bytes() == kept


def test_run_webcam_refuses_a_recording_it_cannot_write_before_opening_the_camera(monkeypatch, tmp_path):
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    with pytest.raises(BgmatteError, match=r"out\.png: cannot write video with extension \.png"):
        run_webcam(camera="0", record=tmp_path / "out.png", preview=False)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BgmatteError, match=r"out\.mp4: cannot create the folder"):
        run_webcam(camera="0", record=tmp_path / "file" / "out.mp4", preview=False)


def test_a_failure_after_the_camera_thread_starts_stops_it_before_the_camera_is_released(monkeypatch, tmp_path):
    camera = WatchedCamera()
    monkeypatch.setattr(webcam, "open_camera", lambda *args, **kwargs: camera)
    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: TinyModel())

    def failing_session(*args, **kwargs):
        while camera.reads < 3:  # the camera thread is well under way
            time.sleep(0.005)
        raise BgmatteError("the session could not start")

    monkeypatch.setattr(webcam, "WebcamSession", failing_session)
    with pytest.raises(BgmatteError, match="could not start"):
        run_webcam(camera="0", record=tmp_path / "out.mp4", preview=False)
    assert camera.closed and not camera.released_while_reading
    assert camera.thread is not None and not camera.thread.is_alive()


class SlowCapture:
    """A cv2.VideoCapture double whose reads are slow, counting reads and releases and recording whether a
    release overlapped a read."""

    def __init__(self):
        self.reads = 0
        self.releases = 0
        self.reading = False
        self.overlapped = False

    @property
    def released(self):
        return self.releases > 0

    def isOpened(self):
        return True

    def set(self, *args):
        return True

    def get(self, prop):
        return 30.0

    def read(self):
        self.reads += 1
        self.reading = True
        time.sleep(0.05)
        self.reading = False
        return True, np.zeros((HEIGHT, WIDTH, 3), np.uint8)

    def release(self):
        self.overlapped = self.overlapped or self.reading
        self.releases += 1


class ResizingCapture(SlowCapture):
    """A camera whose frames change size after `after` reads."""

    def __init__(self, after: int, size: tuple[int, int]):
        super().__init__()
        self.after, self.later = after, size

    def read(self):
        self.reads += 1
        width, height = (WIDTH, HEIGHT) if self.reads <= self.after else self.later
        return (True, np.zeros((height, width, 3), np.uint8)) if self.reads <= 8 else (False, None)


def test_a_camera_changing_its_frame_size_is_warned_of_once(monkeypatch, caplog):
    """Frames of another size, mid-stream, were stretched to the first ones' size without a word."""
    monkeypatch.setattr(webcam, "_open_capture", lambda camera: ResizingCapture(3, (2 * WIDTH, HEIGHT)))
    source = CameraSource(0)
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.webcam"):
        frames = list(source)
    source.close()
    assert len(frames) == 8 and all(frame.shape == (HEIGHT, WIDTH, 3) for frame in frames)
    changes = [record.getMessage() for record in caplog.records if "changed its frames" in record.getMessage()]
    assert changes == [f"camera 0 changed its frames from {WIDTH}x{HEIGHT} to {2 * WIDTH}x{HEIGHT} after 3 frames; "
                       f"resizing them to {WIDTH}x{HEIGHT}, stretched: their aspect ratio differs"]


@pytest.mark.parametrize("asked, expected, warned", [(60.0, 30.0, True), (30.0, 30.0, False), (None, 30.0, False)])
def test_a_frame_rate_the_camera_does_not_give_is_warned_of_and_not_announced(monkeypatch, caplog, asked, expected,
                                                                               warned):
    """--fps 60 on a camera that settled on 30 was announced to the virtual camera and the recording as 60."""
    monkeypatch.setattr(webcam, "_open_capture", lambda camera: SlowCapture())  # it says 30 fps, whatever is asked
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.webcam"):
        source = CameraSource(0, fps=asked)
    source.close()
    assert source.fps == expected
    messages = [record.getMessage() for record in caplog.records]
    assert messages == (["camera 0 gives 30 fps, not the 60 asked for (--fps); using 30"] if warned else [])


def test_camera_source_waits_for_a_read_in_progress_before_releasing(monkeypatch):
    capture = SlowCapture()
    monkeypatch.setattr(webcam, "_open_capture", lambda camera: capture)
    source = CameraSource(0)
    next(source)  # the frame read when opening
    reader = threading.Thread(target=lambda: [None for _ in zip(range(20), source)])
    reader.start()
    while not capture.reading:
        time.sleep(0.001)
    source.close()
    reader.join(5)
    assert capture.released and not capture.overlapped and not reader.is_alive()


class StallingCapture(SlowCapture):
    """A camera that gave a frame and then stalled: every later read blocks for `stall` seconds and fails, as a
    V4L2 read whose select() times out does."""

    def __init__(self, stall: float):
        super().__init__()
        self.stall = stall

    def read(self):
        self.reads += 1
        if self.reads == 1:
            return True, np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        self.reading = True
        time.sleep(self.stall)
        self.reading = False
        return False, None


def reader_in_a_stalled_read(monkeypatch, stall: float) -> tuple[StallingCapture, CameraSource, LatestFrameReader]:
    capture = StallingCapture(stall)
    monkeypatch.setattr(webcam, "_open_capture", lambda camera: capture)
    source = CameraSource(0)
    reader = LatestFrameReader(source)
    next(reader)  # the frame read when opening
    while not capture.reading:  # the thread is now inside a read that stalls
        time.sleep(0.001)
    return capture, source, reader


def test_closing_a_stalled_camera_keeps_to_the_timeout_and_the_read_releases_it(monkeypatch, caplog):
    capture, source, reader = reader_in_a_stalled_read(monkeypatch, stall=1.0)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.webcam"):
        reader.close(timeout=0.3)
        reader.close(timeout=0.3)  # the session and the command both close the reader: the second returns at once
        source.close()  # run_webcam closes the camera again afterwards: that does not wait either
    assert time.perf_counter() - start < 0.8  # neither the read under way nor the four tries after it
    assert "camera 0: a read is still under way; the capture is released when it returns" in caplog.text
    reader._thread.join(5)
    assert not reader._thread.is_alive()
    assert capture.reads == 2 and capture.releases == 1 and not capture.overlapped


def test_closing_waits_for_the_read_under_way_but_not_for_the_tries_after_it(monkeypatch, caplog):
    capture, source, reader = reader_in_a_stalled_read(monkeypatch, stall=0.3)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="bgmatte.io.webcam"):
        reader.close(timeout=3.0)
    assert time.perf_counter() - start < 1.0  # five tries would take 1.5 s
    assert caplog.text == ""  # a camera that stops when asked is no news
    assert not reader._thread.is_alive()
    assert capture.reads == 2 and capture.releases == 1 and not capture.overlapped


class PoliteSource:
    """A source with `stop` and a `close` that takes a time limit, as `CameraSource` has: the reader uses them."""

    def __init__(self):
        self.calls: list[tuple[str, float | None]] = []
        self.stopped = threading.Event()

    def __iter__(self):
        while not self.stopped.is_set():
            time.sleep(0.005)
            yield scene(0)

    def stop(self):
        self.calls.append(("stop", None))
        self.stopped.set()

    def close(self, timeout=None):
        self.calls.append(("close", timeout))


def test_latest_frame_reader_stops_and_closes_any_source_that_can_be_stopped_within_its_timeout():
    source = PoliteSource()
    reader = LatestFrameReader(source)
    next(reader)
    reader.close(timeout=2.0)
    reader.close(timeout=2.0)  # the second returns at once, closing nothing again
    assert not reader._thread.is_alive()
    assert [name for name, _ in source.calls] == ["stop", "close"]
    assert 0 < source.calls[1][1] <= 2.0  # what is left of the reader's time limit


def test_cli_shows_each_warning_once_and_the_progress_lines(tmp_path, capsys, monkeypatch):
    # Without handlers on the root logger, as outside pytest: a second handler there would repeat every warning.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: TinyModel())
    plate = tmp_path / "plate.png"
    cv2.imwrite(str(plate), np.full((40, 50, 3), 77, np.uint8))  # another size: a warning
    code = main(["webcam", "--camera", str(make_clip(tmp_path / "camera.mp4", 30)), "--bgr", str(plate),
                 "--record", str(tmp_path / "out.mp4"), "--no-preview", "--max-frames", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == len(set(lines)), err
    assert sum("resizing the plate" in line for line in lines) == 1
    assert any(line.startswith("bgmatte webcam: matting ") for line in lines)  # INFO progress
    assert any(line.startswith("bgmatte webcam: 2 frames in") for line in lines)
    assert logging.getLogger().handlers == []


def test_cli_progress_goes_through_the_one_cli_handler_and_every_line_shows(capsys, monkeypatch):
    package = logging.getLogger("bgmatte")
    handlers_during_the_run = []

    def progress_only(*args, **kwargs):
        handlers_during_the_run.extend(package.handlers)
        for _ in range(5):  # as key t pressed five times: progress is not a per-frame warning, so none is hidden
            logging.getLogger("bgmatte.io.webcam").info("target background: %s (%d of %d)", "green", 1, 1)
        logging.getLogger("bgmatte.io.webcam").warning("a warning")

    monkeypatch.setattr(webcam, "run_webcam", progress_only)
    assert main(["webcam", "--no-preview", "--record", "unused.mp4"]) == 0
    assert len(handlers_during_the_run) == len(package.handlers) + 1  # the CLI's, and no other
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["bgmatte webcam: target background: green (1 of 1)"] * 5 + ["bgmatte webcam: warning: a warning"]


def forbid_camera_and_model(monkeypatch) -> None:
    """Fail the test if the camera is opened or the model loaded: what is refused must be refused before both."""
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    monkeypatch.setattr("bgmatte.model.build.load_model", no_model)


def truncated_png() -> bytes:
    """A PNG whose header is whole and whose pixels are cut off."""
    ok, data = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8))
    return data.tobytes()[: len(data) // 2]


@pytest.mark.parametrize("name,content,message", [
    ("garbage.png", b"not an image", r"garbage\.png: "),
    ("cut.png", None, r"cut\.png: damaged or truncated PNG"),
    ("garbage.mp4", b"not a video", r"garbage\.mp4: "),
], ids=["image", "truncated image", "video"])
def test_cli_unreadable_target_background_is_refused_before_the_camera_opens_and_the_model_loads(
        monkeypatch, tmp_path, capsys, name, content, message):
    forbid_camera_and_model(monkeypatch)
    target = tmp_path / name
    if content is None:  # a PNG whose header is whole and whose pixels are cut off
        content = truncated_png()
    target.write_bytes(content)
    code = main(["webcam", "--record", str(tmp_path / "out.mp4"), "--no-preview", "--target-bgr", "green",
                 str(target)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(r"^bgmatte webcam: error: .*" + message, err), err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("name,content,message", [
    ("missing.png", None, r"missing\.png: "),
    ("garbage.png", b"not an image", r"garbage\.png: "),
    ("cut.png", "cut", r"cut\.png: damaged or truncated PNG"),
], ids=["missing", "not an image", "truncated"])
def test_cli_a_missing_or_damaged_plate_is_refused_before_the_camera_opens_and_the_model_loads(
        monkeypatch, tmp_path, capsys, name, content, message):
    forbid_camera_and_model(monkeypatch)
    plate = tmp_path / name
    if content == "cut":  # a PNG whose header is whole and whose pixels are cut off
        content = truncated_png()
    if content is not None:
        plate.write_bytes(content)
    code = main(["webcam", "--record", str(tmp_path / "out.mp4"), "--no-preview", "--bgr", str(plate)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"^bgmatte webcam: error: .*" + message + r".*\(for the plate, --bgr\)$", err), err
    assert not (tmp_path / "out.mp4").exists()


def test_cli_a_virtual_camera_that_cannot_start_is_refused_before_the_model_loads(monkeypatch, capsys):
    """Its size is the camera's, so it starts once the camera is open, but before the weights are read and the
    warm-up inference is run: those took seconds, then "cannot start" came."""
    fake_pyvirtualcam(monkeypatch, error=RuntimeError("no v4l2 loopback device found"))
    camera = WatchedCamera()
    monkeypatch.setattr(webcam, "open_camera", lambda *args, **kwargs: camera)
    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    code = main(["webcam", "--virtual-cam", "--no-preview"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bgmatte webcam: error: virtual camera: cannot start (no v4l2 loopback device found)")
    assert camera.closed


def test_cli_frames_too_small_for_the_backbone_scale_are_refused_before_the_model_loads(monkeypatch, capsys):
    calls = fake_pyvirtualcam(monkeypatch)
    camera = WatchedCamera()  # 96x64
    monkeypatch.setattr(webcam, "open_camera", lambda *args, **kwargs: camera)
    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    code = main(["webcam", "--virtual-cam", "--no-preview", "--backbone-scale", "0.01"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"bgmatte webcam: error: frames of {WIDTH}x{HEIGHT} are too small for backbone scale 0.01")
    assert camera.closed and calls.args is None  # nor was the virtual camera started


def test_session_composites_an_image_target_from_the_pixels_read_before_the_camera_opened(tmp_path, camera_frames):
    """run_webcam reads an image target once, to check it; the session uses those pixels, not a second read."""
    path = tmp_path / "target.png"
    path.write_bytes(b"")  # a second read would fail
    picture = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    picture[:] = BLUE
    sink = Collect()
    WebcamSession(iter(camera_frames[:1]), ConstantMatte(alpha=0.0), [webcam.TargetBackground("image", path=path)],
                  sinks=[sink], plate=camera_frames[0], keys=scripted(), pictures={path: picture}).run()
    assert np.abs(sink.frames[0].astype(int) - BLUE).max() <= 1


@pytest.mark.parametrize("option,value", [("--fps", "nan"), ("--fps", "inf"), ("--auto-plate-delay", "nan"),
                                          ("--auto-plate-delay", "inf")])
def test_cli_a_frame_rate_or_plate_delay_that_is_not_a_finite_number_is_refused_before_the_camera_opens(
        monkeypatch, tmp_path, capsys, option, value):
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    code = main(["webcam", "--record", str(tmp_path / "out.mp4"), "--no-preview", option, value])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"bgmatte webcam: error: {option} ")
    assert value in err


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), -1.0])
def test_an_automatic_plate_delay_that_would_never_pass_is_refused(delay):
    with pytest.raises(BgmatteError, match="automatic plate delay must be 0 s or more"):
        AutoPlate(delay=delay)


def test_cli_frames_too_small_for_the_backbone_scale_are_one_line_naming_the_size_and_scale(tmp_path, checkpoint,
                                                                                            capsys):
    clip = make_clip(tmp_path / "camera.mp4", 4)
    code = main(["webcam", "--camera", str(clip), "--checkpoint", str(checkpoint), "--record",
                 str(tmp_path / "out.mp4"), "--no-preview", "--backbone-scale", "0.01", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("bgmatte webcam: error: ") and f"{WIDTH}x{HEIGHT}" in err and "0.01" in err
    assert not (tmp_path / "out.mp4").exists()


def test_run_webcam_refuses_a_capture_size_above_the_pixel_limit_before_opening_the_camera(monkeypatch, tmp_path):
    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    monkeypatch.setattr(webcam, "open_camera", no_camera)
    with pytest.raises(BgmatteError, match=r"--width 100000 --height 100000: 100000x100000 is 10000 megapixels, above "
                                           r"the limit of 100"):
        run_webcam(camera="0", record=tmp_path / "out.mp4", width=100_000, height=100_000, preview=False)
    with pytest.raises(BgmatteError, match=r"above the limit"):  # the other side follows the camera: not known yet
        run_webcam(camera="0", record=tmp_path / "out.mp4", width=100_001 * 1000, preview=False)


def test_camera_source_refuses_a_file_whose_frames_are_above_the_pixel_limit_before_reading_one(tmp_path,
                                                                                               monkeypatch):
    clip = make_clip(tmp_path / "camera.mp4", 3)
    read = []
    real_open = webcam._open_capture

    def watched(camera):
        capture = real_open(camera)
        original = capture.read
        capture = types.SimpleNamespace(isOpened=capture.isOpened, get=capture.get, set=capture.set,
                                        release=capture.release, read=lambda: read.append(1) or original())
        return capture

    monkeypatch.setattr(webcam, "_open_capture", watched)
    with pytest.raises(BgmatteError, match=rf"camera\.mp4: {WIDTH}x{HEIGHT} is 0\.006144 megapixels, above the "
                                           r"limit of 0\.005"):
        CameraSource(clip, max_pixels=5000)
    assert not read
    with pytest.raises(BgmatteError, match=r"camera\.mp4: .*asked for 200x200: 0\.04 megapixels, above the limit"):
        CameraSource(clip, width=200, height=200, max_pixels=20000)


def test_run_webcam_refuses_a_still_image_as_the_camera_before_opening_it(monkeypatch, tmp_path):
    """OpenCV plays a photo as a one-frame video: the recording got that one frame, passed through, exit 0."""
    from bgmatte.io.images import write_png

    def no_camera(*args, **kwargs):
        raise AssertionError("the camera was opened")

    photo = tmp_path / "photo.png"
    write_png(photo, scene(0))
    monkeypatch.setattr(webcam, "open_camera", no_camera)
    with pytest.raises(BgmatteError, match=r"photo\.png: a still image, not a video to play as the camera"):
        run_webcam(camera=photo, record=tmp_path / "out.mp4", preview=False)
    assert not (tmp_path / "out.mp4").exists()


# ------------------------------------------------------------------------------------------ exposure matching


def brightening_camera(count: int, gain: float = 1.3) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """A plate and `count` frames of it `gain` times brighter with a subject in each (a webcam that auto-exposed
    once the subject stepped in), and each frame's background mask. The plate's levels (107-179) keep clear of
    clipping at 1.3 and differ from the brightened ones by more than `DifferenceModel`'s threshold everywhere."""
    from media import plate_image, subject_box, subject_frame

    plate = (plate_image() * 0.45 + 80).astype(np.uint8)
    frames, backgrounds = [], []
    for index in range(count):
        frames.append(subject_frame(plate, index, gain))
        background = np.ones((HEIGHT, WIDTH), bool)
        background[subject_box(index)] = False
        backgrounds.append(background)
    return plate, frames, backgrounds


class DifferenceMatte(ConstantMatte):
    """A stand-in predictor whose matte is known: alpha 1 where frame and plate differ by more than 0.1 in some
    channel, else 0; remembers each plate and each matte."""

    def __init__(self):
        super().__init__()
        self.mattes: list[np.ndarray] = []

    def __call__(self, src, bgr) -> Matte:
        src_t = frames_to_tensor(src, CPU, torch.float32)
        bgr_t = frames_to_tensor(bgr, CPU, torch.float32)
        self.plates.append((bgr_t[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        pha = ((src_t - bgr_t).abs().amax(dim=1, keepdim=True) > 0.1).float()
        self.mattes.append(pha[0, 0].numpy())
        return Matte(pha, src_t, torch.zeros_like(pha), torch.zeros_like(pha))


def test_match_exposure_brings_the_plate_to_a_camera_that_brightened_and_off_leaves_it_as_it_is():
    """The webcam had no exposure matching: a background 30% brighter than the plate (auto-exposure) matted as
    foreground over all of it. With it, each plate handed to the model is the frame's background within a level or
    two and only the subject mattes as foreground; without it, the plate is the one given, untouched."""
    from bgmatte.pipeline import ExposureFeedback

    plate, frames, backgrounds = brightening_camera(6)
    runs = {}
    for match in (False, True):
        predictor = DifferenceMatte()
        WebcamSession(iter(frames), predictor, targets("green"), sinks=[Collect()], plate=plate, keys=scripted(),
                      exposure=ExposureFeedback("camera 0") if match else None).run()
        runs[match] = predictor
    off, on = runs[False], runs[True]
    assert len(off.plates) == len(on.plates) == len(frames)
    assert all(np.array_equal(handed, plate) for handed in off.plates)
    assert all(matte[background].mean() == 1.0 for matte, background in zip(off.mattes, backgrounds, strict=True))
    for index, (handed, frame, matte, background) in enumerate(zip(on.plates, frames, on.mattes, backgrounds,
                                                                   strict=True)):
        assert np.abs(handed.astype(int) - frame)[background].mean() < 1.5, index
        assert matte[background].mean() < 0.01 and matte[~background].mean() == 1.0, index


def test_exposure_matching_that_cannot_fit_the_camera_is_told_once_naming_it_and_counted_at_the_end(caplog):
    white = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    from bgmatte.pipeline import ExposureFeedback

    predictor = DifferenceMatte()
    with caplog.at_level(logging.WARNING, logger="bgmatte"):
        WebcamSession(iter([white] * 4), predictor, targets("green"), plate=white, keys=scripted(),
                      exposure=ExposureFeedback("camera 0")).run()
    warnings = [record.getMessage() for record in caplog.records if "exposure" in record.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("camera 0: exposure matching skipped on frame 1 (only 0 background pixels")
    assert warnings[1] == "camera 0: exposure matching was skipped on 4 of 4 frames"
    assert all(np.array_equal(handed, white) for handed in predictor.plates)


class InterruptedCamera:
    """A camera that gives `frames` 0.2 s apart, then Ctrl-C (as the camera thread hands it on)."""

    size, fps, name = (WIDTH, HEIGHT), 30.0, "fake camera"

    def __init__(self, frames: list[np.ndarray]):
        self.frames = frames

    def __iter__(self):
        for frame in self.frames:
            yield frame
            time.sleep(0.2)
        raise KeyboardInterrupt

    def close(self):
        pass


def test_exposure_matching_that_cannot_fit_is_counted_when_ctrl_c_stops_the_session(caplog):
    """Ctrl-C, the usual way to stop the webcam, went straight past the count at the end: only the first frame's
    warning was ever seen."""
    white = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    from bgmatte.pipeline import ExposureFeedback

    def camera():
        yield from [white] * 4
        raise KeyboardInterrupt

    with caplog.at_level(logging.WARNING, logger="bgmatte"), pytest.raises(KeyboardInterrupt):
        WebcamSession(camera(), DifferenceMatte(), targets("green"), plate=white, keys=scripted(),
                      exposure=ExposureFeedback("camera 0")).run()
    warnings = [record.getMessage() for record in caplog.records if "exposure" in record.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[1] == "camera 0: exposure matching was skipped on 4 of 4 frames"


def test_cli_ctrl_c_with_match_exposure_reports_the_unfitted_frames_and_exits_130(tmp_path, monkeypatch, capsys):
    """`bgmatte webcam --match-exposure` stopped by Ctrl-C: the count of frames it could not fit comes before the
    exit, as at a normal end, and the exit is still 130 with the recording kept."""
    from media import DifferenceModel

    white = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)

    monkeypatch.setattr(webcam, "open_camera", lambda *args, **kwargs: InterruptedCamera([white] * 4))
    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: DifferenceModel())
    plate_file = tmp_path / "plate.png"
    cv2.imwrite(str(plate_file), white)
    out = tmp_path / "out.mp4"
    code = main(["webcam", "--bgr", str(plate_file), "--match-exposure", "--record", str(out), "--no-preview"])
    err = capsys.readouterr().err
    assert code == 130, err
    counted = re.search(r"fake camera: exposure matching was skipped on (\d+) of (\d+) frames", err)
    assert counted is not None and counted[1] == counted[2] and int(counted[1]) >= 2, err
    assert err.index(counted[0]) < err.index("bgmatte webcam: interrupted"), err
    assert len(clip_frames(out)) == int(counted[1])


def test_cli_match_exposure_mattes_a_camera_that_brightened_against_its_plate(tmp_path, monkeypatch, capsys):
    """`bgmatte webcam --match-exposure`, the flag of `bgmatte video`: the brightened background composites onto the
    target; without the flag it stays, matted as foreground."""
    from media import DifferenceModel

    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: DifferenceModel())
    plate, frames, backgrounds = brightening_camera(8)
    camera = make_clip(tmp_path / "camera.mp4", len(frames), frame=lambda index: frames[index])
    plate_file = tmp_path / "plate.png"
    cv2.imwrite(str(plate_file), cv2.cvtColor(plate, cv2.COLOR_RGB2BGR))
    distance = {}
    for flags in ([], ["--match-exposure"]):
        out = tmp_path / f"out{len(flags)}.mp4"
        code = main(["webcam", "--camera", str(camera), "--bgr", str(plate_file), "--target-bgr", "blue",
                     "--record", str(out), "--no-preview", "--max-frames", "4", *flags])
        assert code == 0, capsys.readouterr().err
        recorded = clip_frames(out)
        assert len(recorded) == 4
        # The last frame: its background against the blue target (lossy twice over: camera file and recording).
        distance[bool(flags)] = np.abs(recorded[-1].astype(int) - BLUE)[backgrounds[3]].mean()
    assert distance[False] > 80 and distance[True] < 25, distance


def test_cli_ctrl_c_still_tells_how_many_frames_went_out_and_at_what_rate(tmp_path, monkeypatch, capsys):
    """Ctrl-C is how a headless session ends, and it lost the closing "N frames in S s: F fps" line, the one figure
    a user has of how fast the session ran. It comes before the exit, 130 as ever, and counts the frames recorded."""
    from media import DifferenceModel

    frames = [scene(index) for index in range(4)]
    monkeypatch.setattr(webcam, "open_camera", lambda *args, **kwargs: InterruptedCamera(frames))
    monkeypatch.setattr("bgmatte.model.build.load_model", lambda *args, **kwargs: DifferenceModel())
    plate_file = tmp_path / "plate.png"
    cv2.imwrite(str(plate_file), cv2.cvtColor(scene(0), cv2.COLOR_RGB2BGR))
    out = tmp_path / "out.mp4"
    code = main(["webcam", "--bgr", str(plate_file), "--record", str(out), "--no-preview"])
    err = capsys.readouterr().err
    assert code == 130, err
    summary = re.search(r"(\d+) frames in ([\d.]+) s: ([\d.]+) fps", err)
    assert summary is not None, err
    assert int(summary[1]) == len(clip_frames(out)) >= 2 and float(summary[3]) > 0, err
    assert err.index(summary[0]) < err.index("bgmatte webcam: interrupted"), err
