"""A small generated shot and its clean plate, so the demo and the docs need no downloaded media."""
from __future__ import annotations

import math

import cv2
import numpy as np


def sample_plate(width: int = 640, height: int = 360, seed: int = 0) -> np.ndarray:
    """A textured room-like background: a gradient wall, a floor, shelves and noise (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    wall = np.array([0.78, 0.72, 0.62], np.float32) * (0.85 + 0.15 * x) * (0.9 + 0.1 * y)
    plate = np.broadcast_to(wall, (height, width, 3)).copy()
    floor = int(height * 0.78)
    plate[floor:] = np.array([0.45, 0.33, 0.24], np.float32) * (0.8 + 0.2 * x[0])
    for i in range(3):
        top = int(height * (0.2 + 0.18 * i))
        cv2.rectangle(plate, (int(width * 0.62), top), (int(width * 0.95), top + 6), (0.35, 0.25, 0.18), -1)
        for j in range(7):
            left = int(width * 0.63) + j * int(width * 0.045)
            color = tuple(float(c) for c in rng.uniform(0.2, 0.9, 3))
            cv2.rectangle(plate, (left, top - int(height * 0.09)), (left + int(width * 0.03), top), color, -1)
    plate += rng.normal(0, 0.01, plate.shape).astype(np.float32)
    return (np.clip(plate, 0, 1) * 255).round().astype(np.uint8)


def sample_subject(width: int, height: int, t: float) -> tuple[np.ndarray, np.ndarray]:
    """A person-like figure at time ``t`` (seconds): RGB foreground and a soft alpha, both float32 in [0, 1]."""
    scale = 4  # draw supersampled so that edges carry fractional alpha
    big = np.zeros((height * scale, width * scale), np.float32)
    cx = width * scale * (0.38 + 0.12 * math.sin(t * 1.3))
    head_y = height * scale * 0.3
    r = height * scale * 0.1
    cv2.ellipse(big, (int(cx), int(head_y)), (int(r * 0.85), int(r)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    cv2.ellipse(big, (int(cx), int(height * scale * 0.85)), (int(r * 2.2), int(height * scale * 0.45)),
                0, 180, 360, 1.0, -1, cv2.LINE_AA)
    cv2.rectangle(big, (int(cx - r * 0.35), int(head_y)), (int(cx + r * 0.35), int(head_y + r * 1.6)), 1.0, -1)
    arm = (int(cx + r * 2.0), int(height * scale * 0.62))
    hand = (int(cx + r * (3.0 + math.sin(t * 2.1))), int(height * scale * (0.45 + 0.05 * math.cos(t * 2.1))))
    cv2.line(big, arm, hand, 1.0, int(r * 0.45), cv2.LINE_AA)
    rng = np.random.default_rng(1)
    for _ in range(40):  # hair strands, a pixel wide or less at the output resolution
        a = rng.uniform(math.pi * 0.9, math.pi * 2.1)
        p0 = (int(cx + math.cos(a) * r * 0.8), int(head_y + math.sin(a) * r * 0.9))
        p1 = (int(cx + math.cos(a) * r * 1.35), int(head_y + math.sin(a) * r * 1.3 + 0.1 * r * math.sin(t)))
        cv2.line(big, p0, p1, 1.0, 2, cv2.LINE_AA)
    pha = cv2.resize(big, (width, height), interpolation=cv2.INTER_AREA)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    fgr = np.stack([0.15 + 0.5 * yy, 0.25 + 0.2 * yy, 0.55 - 0.3 * yy], -1) * np.ones((1, width, 1), np.float32)
    skin = np.zeros_like(pha)
    cv2.circle(skin, (int(cx / scale), int(head_y / scale)), int(r / scale), 1.0, -1)
    fgr = fgr * (1 - skin[..., None]) + np.array([0.85, 0.65, 0.5], np.float32) * skin[..., None]
    return np.clip(fgr, 0, 1), np.clip(pha, 0, 1)


def sample_frame(plate: np.ndarray, t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The shot at time ``t``: (uint8 RGB frame, float32 true alpha), with mild sensor noise."""
    height, width = plate.shape[:2]
    fgr, pha = sample_subject(width, height, t)
    frame = pha[..., None] * fgr + (1 - pha[..., None]) * (plate.astype(np.float32) / 255)
    frame += np.random.default_rng(seed).normal(0, 0.008, frame.shape).astype(np.float32)
    return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8), pha
