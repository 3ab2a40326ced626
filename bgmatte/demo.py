"""The demo job: a generated shot and its plate, matted by the default model into videos a person can open."""
from __future__ import annotations

import os
from pathlib import Path

from bgmatte.errors import BgmatteError
from bgmatte.io.files import check_destination, refuse_existing
from bgmatte.io.images import write_png
from bgmatte.io.video import VideoWriter
from bgmatte.sample import sample_frame, sample_plate


def write_sample(out_dir: Path, *, seconds: float = 2.0, fps: int = 24, width: int = 640,
                 height: int = 360) -> tuple[Path, Path]:
    """Write the generated shot (``sample.mp4``) and its clean plate (``plate.png``); returns both paths."""
    plate = sample_plate(width, height)
    plate_path = write_png(out_dir / "plate.png", plate, overwrite=True)
    video_path = out_dir / "sample.mp4"
    with VideoWriter(video_path, fps=fps, overwrite=True) as writer:
        for index in range(round(seconds * fps)):
            frame, _ = sample_frame(plate, t=index / fps, seed=index)
            writer.write(frame)
    return video_path, plate_path


def run_demo(out_dir: str | Path, *, checkpoint: str | None = None, overwrite: bool = False,
             progress: bool = True) -> list[Path]:
    """Generate a 2-second 640x360 shot and its plate, then write its composite over a colour and its alpha."""
    from bgmatte.model.build import load_model
    from bgmatte.pipeline import convert_video

    out_dir = Path(out_dir)
    composite, alpha = out_dir / "com.mp4", out_dir / "com_pha.mp4"
    outputs = (out_dir / "sample.mp4", out_dir / "plate.png", composite, alpha)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise BgmatteError(f"{out_dir}: is a file, not a folder (for the demo's outputs)")
    for path in outputs:
        refuse_existing(path, overwrite)  # all four, before anything slow
    model = load_model(checkpoint)  # fails early, with a clear message, when there are no weights
    for path in outputs:
        check_destination(path, overwrite)  # makes the folder, now that there is something to write
    video, plate = write_sample(out_dir)
    convert_video(video, plate, output=composite, outputs=("com", "pha"), target_bgr="#3a7bd5", model=model,
                  overwrite=True, progress=progress)
    return [video, plate, composite, alpha]
