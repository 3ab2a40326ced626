"""bgmatte: real-time, high-resolution background matting.

The model is the one of "Real-Time High-Resolution Background Matting" (Lin, Ryabtsev et al.,
CVPR 2021), and loads that work's released checkpoints. The vocabulary, used throughout:

- ``src``: the frame to matte; ``bgr``: a capture of the same background without the subject
  (the plate); both (B,3,H,W) float tensors in [0, 1].
- ``pha``: the alpha matte; ``fgr``: the foreground colour; ``err``: the predicted error of the
  coarse matte; ``ref``: where the refiner worked (1 on the 4x4 patches it refined);
  ``hid``: hidden features passed from the base network to the refiner.
- ``*_sm``: the same at the base network's reduced resolution (``backbone_scale``); ``ref_sm`` is the
  exception, always at quarter resolution.

The public API is small: the networks ``MattingBase`` and ``MattingRefine``; ``RefineOptions``, the
refiner's speed settings (``MattingRefine.configure`` takes them); ``load_model``; the one-call video
and image functions ``convert_video`` and ``matte_images``; ``ModelOptions``, their choice of model,
device and precision; and ``BgmatteError``, the one-line error for bad input. Everything else lives
in a module named for what it does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bgmatte.errors import BgmatteError

__version__ = "0.1.0"

# Heavy imports (torch, PyAV, OpenCV) wait until first use, so that `bgmatte --help` is quick.
_LAZY = {
    "MattingBase": "bgmatte.model.matting",
    "MattingRefine": "bgmatte.model.matting",
    "RefineOptions": "bgmatte.model.matting",
    "load_model": "bgmatte.model.build",
    "ModelOptions": "bgmatte.pipeline",
    "convert_video": "bgmatte.pipeline",
    "matte_images": "bgmatte.pipeline",
}

__all__ = ["BgmatteError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bgmatte' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from bgmatte.model.build import load_model
    from bgmatte.model.matting import MattingBase, MattingRefine, RefineOptions
    from bgmatte.pipeline import ModelOptions, convert_video, matte_images
