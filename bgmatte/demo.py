"""The demo job: a generated shot and plate, matted by the default model, written where a person can open it."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from bgmatte.errors import BgmatteError
from bgmatte.model.build import load_model
from bgmatte.sample import sample_frame, sample_plate


def run_demo(out_dir: str | Path, *, checkpoint: str | None = None, overwrite: bool = False) -> list[Path]:
    """Matte one generated 640x360 frame; writes src, bgr, pha and a composite over green; returns the paths."""
    out_dir = Path(out_dir)
    names = ["src.png", "bgr.png", "pha.png", "com.png"]
    targets = [out_dir / n for n in names]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise BgmatteError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    model = load_model(checkpoint, device="auto")
    plate = sample_plate()
    frame, _ = sample_frame(plate, t=0.5)
    device = next(model.parameters()).device
    to_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255).to(device)  # noqa: E731
    with torch.inference_mode():
        pha, fgr, *_ = model(to_tensor(frame), to_tensor(plate))
    pha_np = pha[0, 0].cpu().numpy()
    fgr_np = fgr[0].permute(1, 2, 0).cpu().numpy()
    green = np.array([0.0, 1.0, 0.0], np.float32)
    com = pha_np[..., None] * fgr_np + (1 - pha_np[..., None]) * green
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [frame, plate, (pha_np * 255).round().astype(np.uint8), (com * 255).round().astype(np.uint8)]
    for path, image in zip(targets, images):
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(path), image)
    return targets
