"""Synthetic training composites: procedural people-like mattes over photographic or procedural textures.

Everything is batched torch code, so that it runs where the model trains (CPU or GPU) and no training
step waits on data. A person is built from signed distance fields in a body frame whose unit is the
head's radius (head, neck, shoulders, tapered torso, legs, two-segment arms with hands, a hair cap
and long hair), anti-aliased from the distance and rendered on a supersampled grid that is then
area-downsampled. Hair strands are sub-pixel curves splatted as dense points on the same grid, so
their alpha is fractional. Holes, translucent regions, props, defocus and motion blur vary the
matte; a share of samples have a foreground coloured like the background behind it ("hard" cases).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from bgmatte.train.augment import (
    gaussian_blur,
    rand_index,
    rand_mask,
    rand_normal,
    rand_uniform,
    random_affine,
    random_flip,
)


@dataclass(frozen=True)
class SyntheticOptions:
    """Settings of the generator; the fractions are shares of samples in a batch."""

    supersample: int = 2  # the matte is rendered at this many times the output size, then area-downsampled
    strands: int = 400  # most hair strands per person
    hard_fraction: float = 0.15  # foreground coloured like the background behind it
    photo_fraction: float = 0.6  # textures taken from photographs, when photographs are given
    texture_fraction: float = 0.2  # foregrounds that are one texture (no skin or hair colours)
    long_hair_fraction: float = 0.45
    sleeveless_fraction: float = 0.3
    hole_fraction: float = 0.25
    translucent_fraction: float = 0.25
    prop_fraction: float = 0.25
    defocus_fraction: float = 0.3
    motion_blur_fraction: float = 0.15
    background_blur_fraction: float = 0.3
    empty_fraction: float = 0.0  # frames with nobody in them: alpha 0 everywhere
    hard_mix: tuple[float, float] = (0.8, 1.0)  # how far a hard foreground moves towards the background
    hard_min_offset: float = 0.0  # least colour difference (RGB norm) a hard foreground keeps


DEFAULT = SyntheticOptions()
"""The distribution of the validation sets (``bgmatte.train.validation``): kept fixed so scores stay comparable."""

TRAINING = SyntheticOptions(empty_fraction=0.05, hard_mix=(0.6, 0.95), hard_min_offset=0.04, translucent_fraction=0.5)
"""What training draws from: some empty frames, hard foregrounds that stay faintly visible, and twice as many
translucent veils. A foreground exactly the colour of what is behind it can only be guessed, and learning to
guess paints people into empty background (seen in the first default models); veils at the validation
distribution's rate were still read as background, and were the largest error left."""


def generate_batch(
    batch_size: int,
    height: int,
    width: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    photos: Sequence[Tensor] | None = None,
    options: SyntheticOptions = DEFAULT,
) -> dict[str, Tensor]:
    """Generate `batch_size` composites at (height, width) on `device`.

    Returns float tensors in [0, 1]: `fgr` (B,3,H,W), `pha` (B,1,H,W), `bgr` (B,3,H,W) and
    `src = pha * fgr + (1 - pha) * bgr`, plus `hard` (B,) bool marking foregrounds coloured like their
    background. `photos` are (3,h,w) uint8 or float images to crop textures from (optional). The
    same generator state gives the same batch (bit for bit on the CPU).
    """
    device = torch.device(device)
    n = batch_size
    people = _sample_people(n, height, width, options, generator, device)
    layers = _render_person(people, height, width, options, generator, device)
    pha = layers["pha"]

    cloth = _textures(n, height, width, photos, options.photo_fraction, generator, device)
    fgr = _paint_person(cloth, layers, options, generator, device)
    bgr = _textures(n, height, width, photos, options.photo_fraction, generator, device)
    blur_bgr = rand_mask(generator, n, options.background_blur_fraction, device)
    bgr_sigma = rand_uniform(generator, n, 0.5, 4.0, device)
    if bool(blur_bgr.any()):
        index = blur_bgr.nonzero().flatten()
        bgr[index] = gaussian_blur(bgr[index], bgr_sigma[index])

    hard = rand_mask(generator, n, options.hard_fraction, device)
    fgr = _make_hard(fgr, bgr, hard, options, generator, device)

    # Defocus and motion blur act on the whole foreground layer: matte and colour alike.
    defocus = rand_mask(generator, n, options.defocus_fraction, device)
    sigma = rand_uniform(generator, n, 0.3, 1.6, device) * defocus
    if bool(defocus.any()):
        index = defocus.nonzero().flatten()
        pha[index] = gaussian_blur(pha[index], sigma[index])
        fgr[index] = gaussian_blur(fgr[index], sigma[index])
    moving = rand_mask(generator, n, options.motion_blur_fraction, device)
    streak = rand_uniform(generator, n, 3.0, 0.04 * max(height, width) + 4.0, device)
    direction = rand_uniform(generator, n, 0.0, math.pi, device)
    if bool(moving.any()):
        index = moving.nonzero().flatten()
        pha[index], fgr[index] = _motion_blur([pha[index], fgr[index]], streak[index], direction[index])

    pha = pha.clamp(0, 1)
    if options.empty_fraction > 0:  # drawn only when asked, so the other streams stay as they were
        empty = rand_mask(generator, n, options.empty_fraction, device)
        pha = torch.where(empty[:, None, None, None], 0.0, pha)
    fgr = fgr.clamp(0, 1)
    bgr = bgr.clamp(0, 1)
    src = pha * fgr + (1 - pha) * bgr
    return {"fgr": fgr, "pha": pha, "bgr": bgr, "src": src, "hard": hard}


# --------------------------------------------------------------------------------------------
# People: parameters
# --------------------------------------------------------------------------------------------


def _sample_people(
    n: int, height: int, width: int, options: SyntheticOptions, generator, device
) -> dict[str, Tensor]:
    """Random pose, proportions and placement per sample; lengths in head radii, angles in radians."""

    def u(low: float, high: float, shape=n) -> Tensor:
        return rand_uniform(generator, shape, low, high, device)

    p: dict[str, Tensor] = {}
    # Head radius in output pixels, log-uniform: from full figures to close-ups partly out of frame.
    p["radius"] = height * torch.exp(u(math.log(0.04), math.log(0.2)))
    p["x"] = width * u(-0.05, 1.05)
    p["y"] = height * u(0.06, 0.55)
    p["lean"] = u(-0.18, 0.18)
    p["tilt"] = u(-0.3, 0.3)
    p["head_w"] = u(0.74, 0.9)
    p["head_h"] = u(0.98, 1.12)
    p["egg"] = u(0.0, 0.22)
    p["neck_r"] = u(0.34, 0.48)
    p["shoulder_y"] = u(1.55, 1.95)
    p["shoulder_w"] = u(1.5, 2.3)
    p["shoulder_r"] = u(0.5, 0.72)
    p["torso_len"] = u(4.2, 5.4)
    p["waist"] = u(0.72, 0.95)
    p["leg_spread"] = u(0.0, 0.3, (n, 2))
    # Arms, one row per side: upper-arm angle from straight down (positive outwards), elbow bend.
    mode = u(0.0, 1.0, (n, 2))
    down, out, raised = u(0.05, 0.4, (n, 2)), u(0.4, 1.1, (n, 2)), u(1.1, 2.9, (n, 2))
    p["arm_angle"] = torch.where(mode < 0.55, down, torch.where(mode < 0.8, out, raised))
    p["arm_bend"] = u(-2.4, 0.5, (n, 2))
    p["arm_upper"] = u(2.5, 3.1, (n, 2))
    p["arm_lower"] = u(2.2, 2.7, (n, 2))
    p["sleeveless"] = rand_mask(generator, n, options.sleeveless_fraction, device)
    # Hair: a cap over the top of the head, long hair behind it, strands from their outline.
    p["bald"] = rand_mask(generator, n, 0.08, device)
    p["cap_w"] = u(1.04, 1.22)
    p["cap_h"] = u(1.0, 1.16)
    p["cap_shift"] = u(0.04, 0.2)
    p["hairline"] = u(-0.4, 0.35)
    p["long"] = rand_mask(generator, n, options.long_hair_fraction, device)
    p["long_len"] = u(-0.4, 3.5)
    p["long_w"] = u(0.95, 1.35)
    p["hair_frizz"] = u(0.15, 1.0)  # share of strands drawn
    p["hair_gravity"] = u(0.2, 1.2)
    p["hair_curl"] = u(0.0, 0.15)
    p["hair_width"] = u(0.25, 0.9)  # strand width in output pixels
    # Extras.
    p["holes"] = rand_mask(generator, n, options.hole_fraction, device)
    p["hole_pos"] = u(0.0, 1.0, (n, 2, 2))
    p["hole_size"] = u(0.12, 0.6, (n, 2, 2))
    p["translucent"] = rand_mask(generator, n, options.translucent_fraction, device)
    p["veil_pos"] = torch.stack([u(-3.0, 3.0), u(-1.5, 4.0)], -1)
    p["veil_size"] = torch.stack([u(0.4, 2.4), u(0.3, 1.6)], -1)
    p["veil_angle"] = u(-math.pi, math.pi)
    p["veil_opacity"] = u(0.12, 0.8)
    p["prop"] = rand_mask(generator, n, options.prop_fraction, device)
    p["prop_side"] = rand_index(generator, n, 2, device)
    p["prop_size"] = torch.stack([u(0.3, 1.6), u(0.3, 1.6)], -1)
    p["prop_angle"] = u(-math.pi, math.pi)
    return p


# --------------------------------------------------------------------------------------------
# People: signed distances (negative inside), all in head radii
# --------------------------------------------------------------------------------------------


def _ellipse(x: Tensor, y: Tensor, half_w, half_h) -> Tensor:
    """Approximate signed distance to an axis-aligned ellipse at the origin (first order in the
    implicit function, exact on the axes and accurate near the outline, where anti-aliasing needs it)."""
    sx, sy = x / half_w, y / half_h
    level = torch.sqrt(sx * sx + sy * sy)
    slope = torch.sqrt((sx / half_w) ** 2 + (sy / half_h) ** 2)
    near = (level - 1) * level / slope.clamp_min(1e-6)
    deep = (level - 1) * torch.minimum(torch.as_tensor(half_w), torch.as_tensor(half_h))
    return torch.where(level > 0.5, near, deep)


def _capsule(x: Tensor, y: Tensor, ax, ay, bx, by, radius_a, radius_b) -> Tensor:
    """Signed distance to a segment from a to b thickened by a radius that varies from a to b."""
    dx, dy = bx - ax, by - ay
    t = (((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-9)).clamp(0, 1)
    return torch.hypot(x - ax - t * dx, y - ay - t * dy) - (radius_a + t * (radius_b - radius_a))


def _tapered_box(x: Tensor, y: Tensor, top, bottom, half_top, half_bottom, corner) -> Tensor:
    """Signed distance (close to exact) to a box centred on x = 0 whose half-width changes linearly
    from `top` to `bottom`, with rounded corners."""
    span = bottom - top
    t = ((y - top) / span).clamp(0, 1)
    slope = (half_bottom - half_top) / span
    half = half_top + t * (half_bottom - half_top) - corner
    across = (x.abs() - half) / torch.sqrt(1 + slope * slope)
    along = torch.maximum(top + corner - y, y - bottom + corner)
    outside = torch.hypot(across.clamp_min(0), along.clamp_min(0))
    inside = torch.maximum(across, along).clamp_max(0)
    return outside + inside - corner


def _rounded_rect(x: Tensor, y: Tensor, half_w, half_h, corner) -> Tensor:
    """Signed distance to a rectangle centred at the origin with rounded corners."""
    qx = x.abs() - half_w + corner
    qy = y.abs() - half_h + corner
    return torch.hypot(qx.clamp_min(0), qy.clamp_min(0)) + torch.maximum(qx, qy).clamp_max(0) - corner


def _smooth_union(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Union of two distance fields that blends them within `k`, like flesh at a joint."""
    h = (k - (a - b).abs()).clamp_min(0) / k
    return torch.minimum(a, b) - h * h * (k * 0.25)


def _rotate(x: Tensor, y: Tensor, angle) -> tuple[Tensor, Tensor]:
    """Coordinates in a frame rotated by `angle` (the inverse rotation of the points)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return cos * x + sin * y, -sin * x + cos * y


_PIVOT = 0.9  # the head turns about this point of the neck (body frame, head radii below the head's centre)
_CELL = 4  # output pixels on a side of the cells of the coarse pass
_FAR = 1e4  # the distance of a part that a sample does not have


def _columns(p: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample parameters as named (B,) columns, with the arm joints worked out."""
    columns = {name: t for name, t in p.items() if t.dim() == 1}
    sides = torch.tensor([-1.0, 1.0], device=p["radius"].device)
    shoulder_x = sides * p["shoulder_w"][:, None]
    shoulder_y = (p["shoulder_y"] + 0.35)[:, None].expand(-1, 2)
    upper, lower = p["arm_angle"], p["arm_angle"] + p["arm_bend"]
    elbow_x = shoulder_x + sides * torch.sin(upper) * p["arm_upper"]
    elbow_y = shoulder_y + torch.cos(upper) * p["arm_upper"]
    wrist_x = elbow_x + sides * torch.sin(lower) * p["arm_lower"]
    wrist_y = elbow_y + torch.cos(lower) * p["arm_lower"]
    hand_x = wrist_x + sides * torch.sin(lower) * 0.75
    hand_y = wrist_y + torch.cos(lower) * 0.75
    joints = {"elbow_x": elbow_x, "elbow_y": elbow_y, "wrist_x": wrist_x, "wrist_y": wrist_y,
              "hand_x": hand_x, "hand_y": hand_y, "shoulder_x": shoulder_x}
    for i in range(2):
        for name, value in joints.items():
            columns[f"{name}{i}"] = value[:, i]
        columns[f"leg_spread{i}"] = p["leg_spread"][:, i]
        columns[f"hole_x{i}"] = p["hole_pos"][:, i, 0]
        columns[f"hole_y{i}"] = p["hole_pos"][:, i, 1]
        columns[f"hole_w{i}"] = p["hole_size"][:, i, 0]
        columns[f"hole_h{i}"] = p["hole_size"][:, i, 1]
    rows = torch.arange(len(p["radius"]), device=p["radius"].device)
    columns["prop_x"] = hand_x[rows, p["prop_side"]]
    columns["prop_y"] = hand_y[rows, p["prop_side"]]
    columns["prop_w"], columns["prop_h"] = p["prop_size"][:, 0], p["prop_size"][:, 1]
    columns["veil_x"], columns["veil_y"] = p["veil_pos"][:, 0], p["veil_pos"][:, 1]
    columns["veil_w"], columns["veil_h"] = p["veil_size"][:, 0], p["veil_size"][:, 1]
    return columns


def _person_fields(q: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Signed distances (head radii) of the person's parts at output-pixel positions `x`, `y`; the
    parameters in `q` are shaped to broadcast against the positions (one per sample or per cell)."""
    radius, cos, sin = q["radius"], torch.cos(q["lean"]), torch.sin(q["lean"])
    dx, dy = x - q["x"], y - q["y"]
    u = (cos * dx + sin * dy) / radius
    v = (-sin * dx + cos * dy) / radius
    far = torch.full_like(u, _FAR)

    a, b = _rotate(u, v - _PIVOT, q["tilt"])
    b = b + _PIVOT
    narrowing = 1 - q["egg"] * (b / q["head_h"]).clamp(0, 1)
    head = _ellipse(a, b, q["head_w"] * narrowing, q["head_h"])

    sy, sw, sr = q["shoulder_y"], q["shoulder_w"], q["shoulder_r"]
    neck = _capsule(u, v, 0.0, 0.4, 0.0, sy + 0.3, q["neck_r"], q["neck_r"] * 1.15)
    shoulders = _capsule(u, v, -sw, sy + 0.35, sw, sy + 0.35, sr, sr)
    bottom = sy + q["torso_len"]
    half_top = sw + 0.1
    torso = _tapered_box(u, v, sy + 0.1, bottom, half_top, half_top * q["waist"], 0.5)
    body = _smooth_union(_smooth_union(neck, shoulders, 0.7), torso, 0.5)
    hip = half_top * q["waist"] * 0.5
    for i, side in enumerate((-1.0, 1.0)):
        foot = side * (hip + 7 * q[f"leg_spread{i}"])
        leg = _capsule(u, v, side * hip, bottom - 0.6, foot, bottom + 7.5, hip * 0.95, 0.45)
        body = _smooth_union(body, leg, 0.3)

    hands, forearms = [], []
    for i in range(2):
        shoulder = (q[f"shoulder_x{i}"], sy + 0.35)
        elbow, wrist = (q[f"elbow_x{i}"], q[f"elbow_y{i}"]), (q[f"wrist_x{i}"], q[f"wrist_y{i}"])
        upper = _capsule(u, v, *shoulder, *elbow, sr * 0.85, sr * 0.7)
        lower = _capsule(u, v, *elbow, *wrist, sr * 0.68, sr * 0.5)
        hands.append(_capsule(u, v, *wrist, q[f"hand_x{i}"], q[f"hand_y{i}"], 0.3, 0.34))
        forearms.append(lower)
        body = _smooth_union(body, _smooth_union(upper, lower, 0.2), 0.15)
    hand = torch.minimum(hands[0], hands[1])
    body = torch.minimum(body, hand)

    px, py = _rotate(u - q["prop_x"], v - q["prop_y"], q["prop_angle"])
    prop = torch.where(q["prop"], _rounded_rect(px, py, q["prop_w"], q["prop_h"], 0.12), far)

    cap = _ellipse(a, b + q["cap_shift"], q["head_w"] * q["cap_w"], q["head_h"] * q["cap_h"])
    # The hairline curves down towards the temples.
    cap = torch.maximum(cap, b - q["hairline"] - 0.35 * a * a)
    long_bottom = (sy + q["long_len"]).clamp_min(0.2)
    long_half = q["head_w"] * q["long_w"]
    long_hair = _tapered_box(a, b, -0.4, long_bottom, long_half, long_half * 1.15, 0.45)
    cap = torch.where(q["bald"], far, cap)
    # Long hair hangs behind the head: it shows around it, never over the face.
    long_hair = torch.where(q["long"] & ~q["bald"], long_hair, far)
    hair = torch.minimum(cap, torch.maximum(long_hair, -head))
    face = torch.maximum(head, -cap)

    skin = torch.minimum(torch.minimum(head, neck), hand)
    skin = torch.where(q["sleeveless"], torch.minimum(skin, torch.minimum(*forearms)), skin)

    # The silhouette takes the long hair whole: its union with a shape cut from it would leave a seam.
    silhouette = torch.minimum(torch.minimum(body, prop), torch.minimum(head, torch.minimum(cap, long_hair)))
    fields = {"body": silhouette, "hair": hair,
              "skin": skin, "prop": prop, "face": face}
    for i in range(2):
        cx = (q[f"hole_x{i}"] * 2 - 1) * sw * 0.8
        cy = sy + 0.6 + q[f"hole_y{i}"] * (q["torso_len"] - 1.2)
        hole = _ellipse(u - cx, v - cy, q[f"hole_w{i}"], q[f"hole_h{i}"])
        fields[f"hole{i}"] = torch.where(q["holes"], hole, far)
    vx, vy = _rotate(u - q["veil_x"], v - q["veil_y"], q["veil_angle"])
    veil = _ellipse(vx, vy, q["veil_w"], q["veil_h"])
    fields["veil"] = torch.where(q["translucent"], veil, far)
    return fields


_LAYERS = ("body", "hair", "skin", "prop", "face", "veil")


def _layers(fields: dict[str, Tensor], pixels_per_unit) -> Tensor:
    """Coverage of each of `_LAYERS`, stacked on a new dimension 1; holes are cut from the body."""

    def cover(distance: Tensor) -> Tensor:
        # Area of a pixel inside the shape, from its signed distance (a box filter on a straight edge).
        return (0.5 - distance * pixels_per_unit).clamp(0, 1)

    body = cover(fields["body"]) * (1 - cover(fields["hole0"])) * (1 - cover(fields["hole1"]))
    others = [cover(fields[name]) for name in _LAYERS[1:]]
    return torch.stack([body, *others], dim=1)


def _render_person(
    p: dict[str, Tensor], height: int, width: int, options: SyntheticOptions, generator, device
) -> dict[str, Tensor]:
    """Matte and part masks (B,1,H,W) at output size, with hair strands added.

    A coarse pass evaluates the distance fields at the centres of cells of `_CELL` pixels; cells that
    no outline comes near take its inside or outside value, and only the others are rendered on the
    supersampled grid and area-downsampled, so the cost follows the outlines' length, not the area.
    """
    n = p["radius"].shape[0]
    s = max(1, int(options.supersample))
    c = _CELL
    rows, cols = -(-height // c), -(-width // c)
    columns = _columns(p)

    centre_x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) * c
    centre_y = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) * c
    per_sample = {name: t[:, None, None] for name, t in columns.items()}
    coarse = _person_fields(per_sample, centre_x[None, None, :], centre_y[None, :, None])
    # A generous margin: the fields are close to, but not exactly, Euclidean distances.
    reach = 3.0 * c * math.sqrt(0.5) + 1.0
    near = torch.zeros(n, rows, cols, dtype=torch.bool, device=device)
    for distance in coarse.values():
        near |= distance.abs() * per_sample["radius"] <= reach
    cells = _layers(coarse, 1e6)  # (B,L,rows,cols) of 0 and 1
    cells = cells.permute(0, 2, 3, 1)[..., None, None].expand(-1, -1, -1, -1, c, c).contiguous()

    sample, cell_y, cell_x = near.nonzero(as_tuple=True)
    offsets = (torch.arange(c * s, device=device, dtype=torch.float32) + 0.5) / s
    for start in range(0, int(sample.numel()), 4096):
        part = slice(start, start + 4096)
        b, iy, ix = sample[part], cell_y[part], cell_x[part]
        q = {name: t[b][:, None, None] for name, t in columns.items()}
        xs = ix[:, None, None].float() * c + offsets[None, None, :]
        ys = iy[:, None, None].float() * c + offsets[None, :, None]
        fine = _layers(_person_fields(q, xs, ys), q["radius"] * s)
        if s > 1:
            fine = F.avg_pool2d(fine, s)
        cells[b, iy, ix] = fine
    layers = cells.permute(0, 3, 1, 4, 2, 5).reshape(n, len(_LAYERS), rows * c, cols * c)[:, :, :height, :width]
    out = {name: layers[:, i : i + 1].contiguous() for i, name in enumerate(_LAYERS)}

    density = _strand_density(p, n, height * s, width * s, s, options.strands, generator, device)
    strands = 1 - torch.exp(-density[:, None])
    strands = F.avg_pool2d(strands, s) if s > 1 else strands
    pha = 1 - (1 - out["body"]) * (1 - strands)
    # A translucent veil: inside it the matte takes the veil's opacity, over the body or the background.
    out["pha"] = pha + out["veil"] * (p["veil_opacity"][:, None, None, None] - pha)
    out["hair"] = out["hair"] + strands * (1 - out["hair"])
    return out


def _strand_density(
    p: dict[str, Tensor], n: int, grid_h: int, grid_w: int, s: int, count: int, generator, device
) -> Tensor:
    """Hair strands as optical density (B,H,W) on the supersampled grid.

    Each strand is a curved, tapering line of sub-pixel width from the hair outline outwards, drawn
    as points under half a grid pixel apart, each carrying its share of the strand's area and
    spread bilinearly over its four neighbours; `1 - exp(-density)` turns overlaps into coverage.
    """
    shape = (n, max(1, count))

    def u(low: float, high: float) -> Tensor:
        return rand_uniform(generator, shape, low, high, device)

    col = {k: t[:, None] for k, t in p.items() if t.dim() == 1}
    # Roots on the cap's outline (upper half and a bit below), or on the sides of long hair.
    angle = u(-math.pi - 0.4, 0.4)
    half_w = col["head_w"] * col["cap_w"]
    half_h = col["head_h"] * col["cap_h"]
    root_a = torch.cos(angle) * half_w * 0.97
    root_b = torch.sin(angle) * half_h * 0.97 - col["cap_shift"]
    normal = torch.atan2(torch.sin(angle) / half_h, torch.cos(angle) / half_w)
    side_root = (u(0.0, 1.0) < 0.5) & col["long"]
    side = torch.where(u(0.0, 1.0) < 0.5, -1.0, 1.0)
    long_bottom = (col["shoulder_y"] + col["long_len"]).clamp_min(0.2)
    along = u(0.0, 1.0)
    side_b = -0.2 + along * (long_bottom + 0.2)
    side_a = side * col["head_w"] * col["long_w"] * (1 + 0.15 * along) * 0.97
    root_a = torch.where(side_root, side_a, root_a)
    root_b = torch.where(side_root, side_b, root_b)
    normal = torch.where(side_root, torch.where(side > 0, 0.3, math.pi - 0.3), normal)
    # Most strands follow the hair's flow around the outline; the rest fly away from it.
    flow = u(0.0, 1.0) < 0.7
    sweep = torch.where(u(0.0, 1.0) < 0.5, -1.0, 1.0) * u(0.9, 1.45)
    heading = torch.where(flow, normal + sweep, normal) + 0.3 * rand_normal(generator, shape, device)

    length = 0.05 + 0.85 * u(0.0, 1.0) ** 2.5
    gravity = col["hair_gravity"] * u(0.5, 1.5)
    curl = col["hair_curl"] * u(0.0, 2.0)
    bend = u(-0.6, 0.6)  # a constant curvature, so that no strand is straight
    waves = u(0.5, 3.0)
    phase = u(0.0, 2 * math.pi)
    widths = col["hair_width"] * u(0.5, 1.5) * s  # grid pixels
    opacity = u(0.5, 1.0)
    active = (u(0.0, 1.0) < torch.where(col["bald"], 0.05, col["hair_frizz"])).float()

    radius = col["radius"]
    bound = (length * (1.2 + 0.6 * gravity + 6 * curl + bend.abs()) * radius * s).max().item()
    steps = int(min(4096, max(4, math.ceil(bound / 0.45) + 2)))
    t = torch.linspace(0.0, 1.0, steps, device=device)[None, None, :]

    def e(x: Tensor) -> Tensor:
        return x[:, :, None]

    dir_a, dir_b = torch.cos(e(heading)), torch.sin(e(heading))
    wobble = e(curl) * torch.sin(2 * math.pi * e(waves) * t + e(phase)) * t + e(bend) * t * t
    reach = e(length) * t
    a = e(root_a) + dir_a * reach - dir_b * wobble * e(length)
    b = e(root_b) + dir_b * reach + dir_a * wobble * e(length) + 0.5 * e(gravity) * e(length) * t * t
    # Head frame -> body frame -> output pixels -> grid pixels.
    tilt = e(col["tilt"])
    bu = torch.cos(tilt) * a - torch.sin(tilt) * (b - _PIVOT)
    bv = torch.sin(tilt) * a + torch.cos(tilt) * (b - _PIVOT) + _PIVOT
    lean = e(col["lean"])
    r = e(radius)
    x = e(col["x"]) + r * (torch.cos(lean) * bu - torch.sin(lean) * bv)
    y = e(col["y"]) + r * (torch.sin(lean) * bu + torch.cos(lean) * bv)
    gx, gy = x * s - 0.5, y * s - 0.5

    # Each point carries the strand's area over half the polyline on either side of it.
    step = torch.hypot(gx.diff(dim=2), gy.diff(dim=2))
    share = torch.zeros_like(gx)
    share[:, :, 1:] += 0.5 * step
    share[:, :, :-1] += 0.5 * step
    taper = 1 - 0.6 * t
    mass = share * e(widths) * taper * e(opacity * active)
    return _splat(gx, gy, mass, n, grid_h, grid_w)


def _splat(x: Tensor, y: Tensor, mass: Tensor, n: int, height: int, width: int) -> Tensor:
    """Accumulate point masses (B,...) at continuous pixel positions into (B,H,W) bilinearly."""
    x, y, mass = x.reshape(n, -1), y.reshape(n, -1), mass.reshape(n, -1)
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    offsets = torch.arange(n, device=x.device)[:, None] * (height * width)
    density = torch.zeros(n * height * width, device=x.device, dtype=mass.dtype)
    for ox, oy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + ox, y0 + oy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        index = offsets + yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
        density.index_add_(0, index.flatten(), (weight * mass * inside).flatten())
    return density.reshape(n, height, width)


def _motion_blur(tensors: list[Tensor], lengths: Tensor, angles: Tensor) -> list[Tensor]:
    """Average each sample over copies shifted along a line of `lengths` pixels at `angles`, under a
    pixel apart so that the streak is smooth."""
    first = tensors[0]
    taps = max(2, math.ceil(float(lengths.max())) + 1)
    n, _, height, width = first.shape
    device = first.device
    ys = (torch.arange(height, device=device) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device) + 0.5) / width * 2 - 1
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1,H,W,2)
    outputs = [torch.zeros_like(t) for t in tensors]
    for k in range(taps):
        fraction = k / (taps - 1) - 0.5
        shift_x = (fraction * lengths * torch.cos(angles)) * 2 / width
        shift_y = (fraction * lengths * torch.sin(angles)) * 2 / height
        grid = base + torch.stack([shift_x, shift_y], -1)[:, None, None, :]
        for out, tensor in zip(outputs, tensors):
            out += F.grid_sample(tensor, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return [out / taps for out in outputs]


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------

_SKIN_DARK = (0.24, 0.14, 0.09)
_SKIN_LIGHT = (0.96, 0.80, 0.70)
_HAIR = (
    (0.05, 0.04, 0.035),  # black
    (0.18, 0.11, 0.06),  # dark brown
    (0.38, 0.24, 0.12),  # brown
    (0.82, 0.67, 0.42),  # blonde
    (0.55, 0.22, 0.09),  # red
    (0.68, 0.67, 0.66),  # grey
)


def _paint_person(
    cloth: Tensor, layers: dict[str, Tensor], options: SyntheticOptions, generator, device
) -> Tensor:
    """Foreground colour: clothing texture, skin where skin shows, hair colour on the hair, under soft
    lighting; some samples keep a single texture for the whole foreground."""
    n, _, height, width = cloth.shape
    tone = rand_uniform(generator, (n, 1), 0.0, 1.0, device)
    dark = torch.tensor(_SKIN_DARK, device=device)
    light = torch.tensor(_SKIN_LIGHT, device=device)
    skin = dark + tone * (light - dark) + 0.04 * rand_normal(generator, (n, 3), device)
    skin = skin[:, :, None, None] * (0.85 + 0.3 * value_noise(n, height, width, 4, 1, generator, device))

    palette = torch.tensor(_HAIR, device=device)
    hair = palette[rand_index(generator, n, len(_HAIR), device)]
    dyed = rand_mask(generator, n, 0.08, device)[:, None]
    hair = torch.where(dyed, rand_uniform(generator, (n, 3), 0.0, 1.0, device), hair)
    hair = hair * rand_uniform(generator, (n, 1), 0.75, 1.25, device)
    # Streaks along the hair: noise fine across and coarse along (hair mostly falls downwards).
    streaks = rand_uniform(generator, (n, 1, max(2, height // 32), max(2, width // 2)), 0.0, 1.0, device)
    grain = F.interpolate(streaks, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    hair = hair[:, :, None, None] * (0.7 + 0.6 * grain)

    hair_weight = F.max_pool2d(layers["hair"], 3, stride=1, padding=1).clamp(0, 1) ** 0.5 * (1 - layers["face"])
    skin_weight = F.max_pool2d(layers["skin"], 3, stride=1, padding=1).clamp(0, 1)
    fgr = cloth + skin_weight * (skin - cloth)
    fgr = fgr + hair_weight * (hair - fgr)
    single = rand_mask(generator, n, options.texture_fraction, device)[:, None, None, None]
    fgr = torch.where(single, cloth, fgr)
    light_field = 0.75 + 0.45 * value_noise(n, height, width, 3, 1, generator, device)
    return (fgr * light_field).clamp(0, 1)


def _make_hard(fgr: Tensor, bgr: Tensor, hard: Tensor, options: SyntheticOptions, generator, device) -> Tensor:
    """For `hard` samples, recolour the foreground to look like the background behind it: either the
    background itself or its local mean colour, plus a small colour offset (at least
    ``options.hard_min_offset`` long) and faint texture."""
    index = hard.nonzero().flatten()
    m = int(index.numel())
    if m == 0:
        return fgr
    _, _, height, width = fgr.shape
    offset = 0.05 * rand_normal(generator, (m, 3, 1, 1), device)
    if options.hard_min_offset > 0:
        length = offset.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None, None]
        offset = offset * (options.hard_min_offset / length).clamp_min(1.0)
    texture = 0.04 * (value_noise(m, height, width, 16, 3, generator, device) - 0.5)
    behind = bgr[index]
    local = gaussian_blur(behind, max(2.0, min(height, width) / 40))
    same = rand_mask(generator, m, 0.5, device)[:, None, None, None]
    target = torch.where(same, behind, local) + offset + texture
    mix = rand_uniform(generator, m, *options.hard_mix, device)[:, None, None, None]
    fgr = fgr.clone()
    fgr[index] = (fgr[index] + mix * (target - fgr[index])).clamp(0, 1)
    return fgr


# --------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------


def value_noise(
    n: int, height: int, width: int, cells: int, channels: int, generator, device, octaves: int = 1
) -> Tensor:
    """Smooth random fields (B,C,H,W) in [0,1]: bicubic interpolation of random values on a grid of
    `cells` across the width, summed over `octaves` (each twice finer and half as strong)."""
    total = None
    amplitude, weight = 1.0, 0.0
    for octave in range(octaves):
        across = max(1, cells * 2**octave)
        down = max(1, round(across * height / width))
        values = rand_uniform(generator, (n, channels, down + 3, across + 3), 0.0, 1.0, device)
        field = F.interpolate(values, size=(height, width), mode="bicubic", align_corners=False)
        total = field * amplitude if total is None else total + field * amplitude
        weight += amplitude
        amplitude *= 0.5
    return (total / weight).clamp(0, 1)


def _colors(n: int, k: int, generator, device) -> Tensor:
    """k random colours per sample (B,k,3), some of them desaturated towards grey."""
    colors = rand_uniform(generator, (n, k, 3), 0.0, 1.0, device)
    grey = colors.mean(dim=2, keepdim=True)
    fade = rand_uniform(generator, (n, k, 1), 0.0, 0.8, device)
    return colors + fade * (grey - colors)


def _ramp(field: Tensor, colors: Tensor) -> Tensor:
    """Map a scalar field (B,1,H,W) in [0,1] through a piecewise-linear ramp of k colours (B,k,3)."""
    k = colors.shape[1]
    position = field.clamp(0, 1) * (k - 1)
    low = position.floor().clamp(max=k - 2).long()
    frac = position - low
    index = low.expand(-1, 3, -1, -1)
    table = colors.transpose(1, 2)[:, :, :, None]  # (B,3,k,1)
    start = torch.gather(table.expand(-1, -1, -1, field.shape[-1]), 2, index)
    end = torch.gather(table.expand(-1, -1, -1, field.shape[-1]), 2, index + 1)
    return start + frac * (end - start)


def procedural_textures(
    n: int, height: int, width: int, *, generator: torch.Generator | None = None, device="cpu"
) -> Tensor:
    """Random textures (B,3,H,W) in [0,1]: gradients, fractal noise, stripes and plaids, soft blobs."""
    device = torch.device(device)
    kinds = rand_index(generator, n, 4, device)
    out = torch.zeros(n, 3, height, width, device=device)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / max(height, width)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / max(height, width)
    gy, gx = ys[None, None, :, None], xs[None, None, None, :]
    for kind in range(4):
        index = (kinds == kind).nonzero().flatten()
        m = int(index.numel())
        if m == 0:
            continue

        def u(low: float, high: float, shape=(m, 1, 1, 1)) -> Tensor:
            return rand_uniform(generator, shape, low, high, device)

        if kind == 0:  # linear or radial gradient through 2-3 colours
            angle = u(0, 2 * math.pi)
            linear = (gx - 0.5) * torch.cos(angle) + (gy - 0.5) * torch.sin(angle)
            radial = torch.hypot(gx - u(0, 1), gy - u(0, 1))
            field = torch.where(u(0, 1) < 0.7, linear * u(0.8, 2.0) + 0.5, radial * u(0.8, 2.0))
            texture = _ramp(field.clamp(0, 1), _colors(m, 3, generator, device))
        elif kind == 1:  # fractal noise, colour-mapped or per channel
            cells = int(rand_index(generator, 1, 12, device).item()) + 2
            noise = value_noise(m, height, width, cells, 3, generator, device, octaves=4)
            low, high = noise.amin(dim=(2, 3), keepdim=True), noise.amax(dim=(2, 3), keepdim=True)
            noise = (noise - low) / (high - low).clamp_min(1e-6)
            mapped = _ramp(noise[:, :1], _colors(m, 3, generator, device))
            texture = torch.where(u(0, 1) < 0.7, mapped, noise)
        elif kind == 2:  # stripes, soft or hard, sometimes wavy or crossed into a plaid
            def stripes() -> Tensor:
                angle = u(0, math.pi)
                frequency = torch.exp(u(math.log(3.0), math.log(60.0)))
                warp = u(0, 1) * value_noise(m, height, width, 3, 1, generator, device)
                phase = 2 * math.pi * frequency * ((gx * torch.cos(angle) + gy * torch.sin(angle)) + 0.3 * warp)
                return torch.sigmoid(torch.sin(phase + u(0, 2 * math.pi)) * torch.exp(u(0.0, 3.0)))

            first = stripes()
            field = torch.where(u(0, 1) < 0.35, 0.5 * (first + stripes()), first)
            texture = _ramp(field, _colors(m, 2, generator, device))
        else:  # soft blobs over a base colour
            colors = _colors(m, 13, generator, device)
            texture = colors[:, 0, :, None, None].expand(-1, -1, height, width).clone()
            for k in range(1, 13):
                cx, cy = u(-0.1, 1.1), u(-0.1, 1.1) * height / max(height, width)
                sigma = u(0.02, 0.25)
                weight = torch.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * sigma * sigma)) * u(0.3, 1.0)
                texture = texture + weight * (colors[:, k, :, None, None] - texture)
        out[index] = texture
    grain = rand_mask(generator, n, 0.5, device)[:, None, None, None]
    amount = rand_uniform(generator, (n, 1, 1, 1), 0.01, 0.05, device)
    noise = rand_normal(generator, (n, 1, height, width), device)
    out = torch.where(grain, out + amount * noise, out)
    return out.clamp(0, 1)


def photo_textures(
    photos: Sequence[Tensor], n: int, height: int, width: int, *, generator=None, device="cpu"
) -> Tensor:
    """Random crops (B,3,H,W) of random photographs, zoomed 1-2.5x, slightly rotated, sometimes flipped."""
    device = torch.device(device)
    choice = rand_index(generator, n, len(photos), device)
    crops = []
    for i in choice.tolist():
        photo = photos[i].to(device)
        photo = photo.float() / 255.0 if photo.dtype == torch.uint8 else photo.float()
        (crop,) = random_affine(
            [photo[None]], generator, size=(height, width), degrees=8.0, translate=0.15, scale=(1.0, 2.5),
            padding_mode="reflection",
        )
        crops.append(crop)
    (out,) = random_flip([torch.cat(crops)], generator)
    return out.clamp(0, 1)


def _textures(n: int, height: int, width: int, photos, photo_fraction: float, generator, device) -> Tensor:
    """Textures for a batch: photographs for about `photo_fraction` of samples (if any), else procedural."""
    if not photos:
        return procedural_textures(n, height, width, generator=generator, device=device)
    use_photo = rand_mask(generator, n, photo_fraction, device)
    out = torch.empty(n, 3, height, width, device=device)
    for mask, make in ((~use_photo, procedural_textures), (use_photo, partial(photo_textures, photos))):
        index = mask.nonzero().flatten()
        if index.numel():
            out[index] = make(int(index.numel()), height, width, generator=generator, device=device)
    return out
