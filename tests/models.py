"""Small models and inputs shared by the model tests."""
from __future__ import annotations

import torch

from bgmatte.model.matting import MattingRefine


def reference_style_model(reference, backbone: str = "mobilenetv2", seed: int = 7, **settings) -> MattingRefine:
    """A model with the reference vectors' weight recipe: outputs inside (0, 1), an error map without ties."""
    model = MattingRefine(backbone, **settings)
    layout = [{"key": k, "shape": list(v.shape)} for k, v in model.state_dict().items()]
    weights = reference.make_state_dict(layout, seed, 0.05)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.eval()


def subject_frames(batch: int = 1, height: int = 128, width: int = 160, seed: int = 0):
    """A random plate, and the same plate with a random block pasted in as the subject."""
    g = torch.Generator().manual_seed(seed)
    bgr = torch.rand(batch, 3, height, width, generator=g)
    src = bgr.clone()
    rows, cols = slice(height // 4, 3 * height // 4), slice(width // 3, 2 * width // 3)
    src[:, :, rows, cols] = torch.rand(batch, 3, height, width, generator=g)[:, :, rows, cols]
    return src, bgr
