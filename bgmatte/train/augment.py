"""The paper's training augmentations, as pure functions on batched (B,C,H,W) float tensors.

Every random function takes a `torch.Generator` (or None for torch's global one). Random numbers are
drawn on the generator's device and then moved to the data's device, so a CUDA generator keeps all
the work on the GPU, and the same generator state always gives the same result. Paired functions
take a sequence of tensors (for example `[fgr, pha]`) and apply one transform per sample to all of
them, so that the foreground and its matte stay aligned.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R BT.601 luma weights, used for greyscale in saturation and contrast jitter.
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------
# Random numbers
# --------------------------------------------------------------------------------------------


def rand_uniform(
    generator: torch.Generator | None,
    shape: Sequence[int] | int,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform numbers in [low, high) drawn on the generator's device, returned on `device`."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    source = generator.device if generator is not None else torch.device(device or "cpu")
    values = torch.rand(shape, generator=generator, device=source)
    values = low + (high - low) * values
    return values if device is None else values.to(device)


def rand_normal(
    generator: torch.Generator | None,
    shape: Sequence[int] | int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal numbers drawn on the generator's device, returned on `device`."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    source = generator.device if generator is not None else torch.device(device or "cpu")
    values = torch.randn(shape, generator=generator, device=source)
    return values if device is None else values.to(device)


def rand_mask(
    generator: torch.Generator | None, count: int, probability: float, device: torch.device | str | None = None
) -> Tensor:
    """A bool tensor of `count` draws that are True with the given probability (one per sample)."""
    return rand_uniform(generator, count, device=device) < probability


def rand_index(
    generator: torch.Generator | None, count: int, high: int, device: torch.device | str | None = None
) -> Tensor:
    """`count` integers drawn uniformly from [0, high)."""
    return (rand_uniform(generator, count, device=device) * high).long().clamp_(0, max(high - 1, 0))


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def affine_matrices(
    generator: torch.Generator | None,
    batch: int,
    *,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    shear: float = 0.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random forward affine maps (B,2,3) in centred pixel units: rotation, shear and scale about the
    centre, then a translation given as a fraction of the output size (x, y)."""
    angle = torch.deg2rad(rand_uniform(generator, batch, -degrees, degrees, device))
    shear_x = torch.deg2rad(rand_uniform(generator, batch, -shear, shear, device))
    shear_y = torch.deg2rad(rand_uniform(generator, batch, -shear, shear, device))
    zoom = rand_uniform(generator, batch, scale[0], scale[1], device)
    shift = rand_uniform(generator, (batch, 2), -translate, translate, device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.stack(
        [
            torch.stack([torch.ones_like(shear_x), torch.tan(shear_x)], -1),
            torch.stack([torch.tan(shear_y), torch.ones_like(shear_y)], -1),
        ],
        -2,
    )
    linear = zoom[:, None, None] * rotation @ shearing
    # The translation column holds fractions of the output size; `warp_affine` scales it.
    return torch.cat([linear, shift[:, :, None]], dim=2)


def warp_affine(
    tensors: Sequence[Tensor],
    matrices: Tensor,
    size: tuple[int, int] | None = None,
    padding_mode: str = "zeros",
) -> list[Tensor]:
    """Warp each (B,C,H,W) tensor by the forward maps of `affine_matrices`, into `size` (H,W).

    The input is first fitted to cover the output (as a resize that keeps the aspect ratio), then the
    map is applied about the centre; strong downscales are prefiltered so that thin edges do not alias.
    """
    first = tensors[0]
    height, width = first.shape[-2:]
    out_h, out_w = size if size is not None else (height, width)
    cover = max(out_w / width, out_h / height)
    batch = first.shape[0]
    matrices = matrices.to(device=first.device, dtype=torch.float32)
    linear = matrices[:, :, :2]
    shift = matrices[:, :, 2] * torch.tensor([out_w, out_h], device=first.device, dtype=torch.float32)
    inverse = torch.linalg.inv(linear)
    # theta maps output normalised coordinates to input normalised ones:
    # input = D_in^-1 / cover * A^-1 (D_out * q - t).
    to_output = torch.tensor([out_w / 2.0, out_h / 2.0], device=first.device)
    results = []
    for tensor in tensors:
        in_h, in_w = tensor.shape[-2:]
        if (in_h, in_w) != (height, width):
            raise ValueError("paired tensors must share their height and width")
        source, source_cover = tensor, cover
        if cover < 0.5:
            # Resize with antialiasing to the covering size first; bilinear sampling alone would alias.
            target = (max(1, round(in_h * cover)), max(1, round(in_w * cover)))
            source = F.interpolate(tensor.float(), size=target, mode="bilinear", antialias=True, align_corners=False)
            source_cover = max(out_w / target[1], out_h / target[0])
        src_h, src_w = source.shape[-2:]
        to_input = torch.tensor([2.0 / (src_w * source_cover), 2.0 / (src_h * source_cover)], device=first.device)
        theta_linear = to_input[None, :, None] * inverse * to_output[None, None, :]
        theta_shift = -(to_input[None, :] * (inverse @ shift[:, :, None])[:, :, 0])
        theta = torch.cat([theta_linear, theta_shift[:, :, None]], dim=2)
        grid = F.affine_grid(theta, [batch, 1, out_h, out_w], align_corners=False)
        warped = F.grid_sample(source.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
        results.append(warped)
    return results


def random_affine(
    tensors: Sequence[Tensor],
    generator: torch.Generator | None,
    *,
    size: tuple[int, int] | None = None,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    shear: float = 0.0,
    padding_mode: str = "zeros",
) -> list[Tensor]:
    """One random affine transform per sample, shared by all `tensors`, resizing to `size` (H,W)."""
    first = tensors[0]
    identity = degrees == 0 and translate == 0 and shear == 0 and scale == (1.0, 1.0)
    if identity and (size is None or tuple(size) == tuple(first.shape[-2:])):
        return [t.float() for t in tensors]
    matrices = affine_matrices(
        generator, first.shape[0], degrees=degrees, translate=translate, scale=scale, shear=shear, device=first.device
    )
    return warp_affine(tensors, matrices, size, padding_mode)


def random_flip(tensors: Sequence[Tensor], generator: torch.Generator | None, probability: float = 0.5) -> list[Tensor]:
    """Mirror each sample left to right with the given probability, the same way in all `tensors`."""
    first = tensors[0]
    mask = rand_mask(generator, first.shape[0], probability, first.device)[:, None, None, None]
    return [torch.where(mask, t.flip(-1), t) for t in tensors]


def random_crop(tensors: Sequence[Tensor], generator: torch.Generator | None, size: tuple[int, int]) -> list[Tensor]:
    """Crop a random (H,W) window per sample, the same window in all `tensors`; inputs smaller than
    the window are first scaled up to cover it."""
    first = tensors[0]
    out_h, out_w = size
    height, width = first.shape[-2:]
    if height < out_h or width < out_w:
        cover = max(out_h / height, out_w / width)
        target = (max(out_h, math.ceil(height * cover)), max(out_w, math.ceil(width * cover)))
        tensors = [F.interpolate(t.float(), size=target, mode="bilinear", align_corners=False) for t in tensors]
        height, width = target
    batch = first.shape[0]
    top = rand_index(generator, batch, height - out_h + 1)
    left = rand_index(generator, batch, width - out_w + 1)
    results = []
    for tensor in tensors:
        crops = [tensor[i, :, top[i] : top[i] + out_h, left[i] : left[i] + out_w] for i in range(batch)]
        results.append(torch.stack(crops))
    return results


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def separable_filter(images: Tensor, kernels: Tensor) -> Tensor:
    """Filter each sample with its own 1-D kernel (B,K), K odd, along x then y, reflecting at borders."""
    batch, channels, height, width = images.shape
    size = kernels.shape[1]
    pad = size // 2
    weight = kernels.to(images).repeat_interleave(channels, dim=0)  # (B*C, K)
    flat = images.reshape(1, batch * channels, height, width)
    mode = "reflect" if pad < min(height, width) else "replicate"
    flat = F.pad(flat, (pad, pad, 0, 0), mode=mode)
    flat = F.conv2d(flat, weight[:, None, None, :], groups=batch * channels)
    flat = F.pad(flat, (0, 0, pad, pad), mode=mode)
    flat = F.conv2d(flat, weight[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def box_kernels(sizes: Tensor, max_size: int) -> Tensor:
    """Normalised box kernels (B, max_size) of the given odd widths, centred and zero-padded."""
    max_size = max_size | 1
    offsets = torch.arange(max_size, device=sizes.device) - max_size // 2
    kernels = (offsets.abs()[None, :] <= (sizes[:, None] // 2)).float()
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_kernels(sigmas: Tensor, max_sigma: float | None = None) -> Tensor:
    """Normalised Gaussian kernels (B,K) for per-sample standard deviations in pixels (0 means identity)."""
    top = float(sigmas.max()) if max_sigma is None else max_sigma
    radius = max(1, math.ceil(3.0 * top))
    offsets = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)
    safe = sigmas.float().clamp_min(1e-3)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(images: Tensor, sigma: Tensor | float) -> Tensor:
    """Gaussian blur with one standard deviation per sample (a tensor (B,)) or for all (a float)."""
    if not torch.is_tensor(sigma):
        sigma = torch.full((images.shape[0],), float(sigma), device=images.device)
    return separable_filter(images, gaussian_kernels(sigma.to(images.device)))


def _apply_to(mask: Tensor, tensors: Sequence[Tensor], function) -> list[Tensor]:
    """Apply `function(list_of_subsets, index)` to the samples where `mask` is set, leaving the rest."""
    index = mask.nonzero().flatten()
    if index.numel() == 0:
        return list(tensors)
    changed = function([t[index] for t in tensors], index)
    results = []
    for tensor, part in zip(tensors, changed):
        tensor = tensor.clone()
        tensor[index] = part.to(tensor.dtype)
        results.append(tensor)
    return results


def random_blur(
    tensors: Sequence[Tensor], generator: torch.Generator | None, probability: float = 0.1, max_kernel: int = 5
) -> list[Tensor]:
    """Box-blur a random subset of samples with an odd kernel of width 3..max_kernel, the same in all tensors."""
    first = tensors[0]
    mask = rand_mask(generator, first.shape[0], probability, first.device)
    choices = max(1, (max_kernel - 1) // 2)
    sizes = 3 + 2 * rand_index(generator, first.shape[0], choices, first.device)

    def blur(parts, index):
        kernels = box_kernels(sizes[index], max_kernel)
        return [separable_filter(p.float(), kernels) for p in parts]

    return _apply_to(mask, tensors, blur)


def random_sharpen(
    tensors: Sequence[Tensor],
    generator: torch.Generator | None,
    probability: float = 0.1,
    amount: tuple[float, float] = (0.3, 1.0),
) -> list[Tensor]:
    """Unsharp-mask a random subset of samples (x + a * (x - blur(x))), the same in all tensors."""
    first = tensors[0]
    mask = rand_mask(generator, first.shape[0], probability, first.device)
    strength = rand_uniform(generator, first.shape[0], amount[0], amount[1], first.device)

    def sharpen(parts, index):
        a = strength[index][:, None, None, None]
        return [(p + a * (p - gaussian_blur(p.float(), 1.0))).clamp(0, 1) for p in parts]

    return _apply_to(mask, tensors, sharpen)


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


def grey(images: Tensor) -> Tensor:
    """Luma (B,1,H,W) of RGB images."""
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype)
    return (images * weights[None, :, None, None]).sum(dim=1, keepdim=True)


def rotate_hue(images: Tensor, turns: Tensor) -> Tensor:
    """Rotate the hue of each sample by `turns` (B,) of a full circle, in YIQ space (a linear map)."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=images.device,
        dtype=images.dtype,
    )
    to_rgb = torch.linalg.inv(to_yiq)
    angle = 2 * math.pi * turns.to(images)
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack(
        [torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1), torch.stack([zero, sin, cos], -1)], -2
    )
    matrix = to_rgb[None] @ rotation @ to_yiq[None]  # (B,3,3)
    return torch.einsum("bij,bjhw->bihw", matrix, images)


def color_jitter(
    images: Tensor,
    generator: torch.Generator | None,
    brightness: float = 0.15,
    contrast: float = 0.15,
    saturation: float = 0.15,
    hue: float = 0.05,
) -> Tensor:
    """Random brightness, contrast, saturation (factors in [1-x, 1+x]) and hue (shift in [-x, x] turns)
    per sample, like torchvision's ColorJitter, in that order."""
    batch, device = images.shape[0], images.device
    b = rand_uniform(generator, batch, 1 - brightness, 1 + brightness, device)[:, None, None, None]
    c = rand_uniform(generator, batch, 1 - contrast, 1 + contrast, device)[:, None, None, None]
    s = rand_uniform(generator, batch, 1 - saturation, 1 + saturation, device)[:, None, None, None]
    h = rand_uniform(generator, batch, -hue, hue, device)
    out = (images.float() * b).clamp(0, 1)
    mean = grey(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (mean + c * (out - mean)).clamp(0, 1)
    luma = grey(out)
    out = (luma + s * (out - luma)).clamp(0, 1)
    if hue > 0:
        out = rotate_hue(out, h).clamp(0, 1)
    return out


# --------------------------------------------------------------------------------------------
# Capture effects
# --------------------------------------------------------------------------------------------


def cast_shadow(
    bgr: Tensor,
    pha: Tensor,
    generator: torch.Generator | None,
    probability: float = 0.3,
    strength: float = 0.3,
    blur: tuple[float, float] = (0.04, 0.08),
) -> Tensor:
    """Darken the background of a random subset of samples by a shadow: the matte moved by a random
    affine map (rotation 5 degrees, shift 20%, scale 0.5-1.5), box-blurred by a kernel of `blur` times
    the image size, times a darkness in [0, strength]."""
    batch, device = bgr.shape[0], bgr.device
    mask = rand_mask(generator, batch, probability, device)
    darkness = rand_uniform(generator, batch, 0.0, strength, device)
    matrices = affine_matrices(generator, batch, degrees=5, translate=0.2, scale=(0.5, 1.5), shear=5, device=device)
    side = min(bgr.shape[-2:])
    widths = rand_uniform(generator, batch, blur[0] * side, blur[1] * side, device)
    sizes = (widths.long() // 2) * 2 + 1
    index = mask.nonzero().flatten()
    if index.numel() == 0:
        return bgr.clone()
    (shadow,) = warp_affine([pha[index].float()], matrices[index], tuple(bgr.shape[-2:]))
    shadow = separable_filter(shadow, box_kernels(sizes[index], int(sizes[index].max())))
    out = bgr.clone()
    out[index] = (bgr[index] * (1 - darkness[index][:, None, None, None] * shadow)).clamp(0, 1).to(bgr.dtype)
    return out


def sensor_noise(
    images: Tensor, generator: torch.Generator | None, probability: float = 0.4, sigma: float = 0.03
) -> Tensor:
    """Add Gaussian noise with a standard deviation in [0, sigma] to a random subset of samples."""
    batch, device = images.shape[0], images.device
    mask = rand_mask(generator, batch, probability, device)
    level = rand_uniform(generator, batch, 0.0, sigma, device) * mask
    noise = rand_normal(generator, images.shape, device)
    return (images + level[:, None, None, None] * noise).clamp(0, 1)


def plate_jitter(
    bgr: Tensor,
    generator: torch.Generator | None,
    color_probability: float = 0.8,
    color: tuple[float, float, float, float] = (0.18, 0.18, 0.18, 0.1),
    affine_probability: float = 0.3,
    degrees: float = 1.0,
    translate: float = 0.01,
) -> Tensor:
    """The plate given to the model: the background with a small colour change and, for some samples, a
    small misalignment (rotation and shift), so the model tolerates imperfect plates."""
    batch, device = bgr.shape[0], bgr.device
    color_mask = rand_mask(generator, batch, color_probability, device)
    jittered = color_jitter(bgr, generator, *color)
    plate = torch.where(color_mask[:, None, None, None], jittered, bgr.float())
    affine_mask = rand_mask(generator, batch, affine_probability, device)
    (moved,) = random_affine([plate], generator, degrees=degrees, translate=translate, padding_mode="reflection")
    return torch.where(affine_mask[:, None, None, None], moved, plate)


# --------------------------------------------------------------------------------------------
# The whole recipe
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentOptions:
    """Settings of `make_training_batch`; the defaults are the paper's (BackgroundMattingV2 training)."""

    fgr_degrees: float = 5.0
    fgr_translate: float = 0.1
    fgr_scale: tuple[float, float] = (0.4, 1.0)
    fgr_shear: float = 5.0
    bgr_degrees: float = 5.0
    bgr_translate: float = 0.1
    bgr_scale: tuple[float, float] = (1.0, 2.0)
    bgr_shear: float = 5.0
    flip_probability: float = 0.5
    blur_probability: float = 0.1
    blur_max_kernel: int = 5
    sharpen_probability: float = 0.1
    jitter: tuple[float, float, float, float] = (0.15, 0.15, 0.15, 0.05)
    shadow_probability: float = 0.3
    shadow_strength: float = 0.3
    noise_probability: float = 0.4
    noise_sigma: float = 0.03
    plate_color_probability: float = 0.8
    plate_color: tuple[float, float, float, float] = (0.18, 0.18, 0.18, 0.1)
    plate_affine_probability: float = 0.3
    plate_degrees: float = 1.0
    plate_translate: float = 0.01


PAPER = AugmentOptions()

# For the synthetic generator, which already varies pose, size and position: no geometric warp of
# the matte (it would blur the rendered sub-pixel hair) and no zoom of the background.
SYNTHETIC = AugmentOptions(
    fgr_degrees=0.0,
    fgr_translate=0.0,
    fgr_scale=(1.0, 1.0),
    fgr_shear=0.0,
    bgr_degrees=0.0,
    bgr_translate=0.0,
    bgr_scale=(1.0, 1.0),
    bgr_shear=0.0,
)


def make_training_batch(
    fgr: Tensor,
    pha: Tensor,
    bgr: Tensor,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    options: AugmentOptions = PAPER,
) -> dict[str, Tensor]:
    """Augment foregrounds, mattes and backgrounds and composite them into a training batch.

    `fgr` (B,3,H,W) and `pha` (B,1,H,W) share a size, `bgr` (B,3,H2,W2) may have another; all come
    out at `size` (H,W). Returns `src` (the composite, with shadow and noise), `bgr` (the plate the
    model sees: jittered and sometimes misaligned), `pha` and `fgr`.
    """
    o = options
    fgr, pha = random_affine(
        [fgr, pha],
        generator,
        size=size,
        degrees=o.fgr_degrees,
        translate=o.fgr_translate,
        scale=o.fgr_scale,
        shear=o.fgr_shear,
    )
    fgr, pha = random_flip([fgr, pha], generator, o.flip_probability)
    fgr, pha = random_blur([fgr, pha], generator, o.blur_probability, o.blur_max_kernel)
    fgr, pha = random_sharpen([fgr, pha], generator, o.sharpen_probability)
    fgr = color_jitter(fgr, generator, *o.jitter)
    pha = pha.clamp(0, 1)

    (bgr,) = random_affine(
        [bgr],
        generator,
        size=size,
        degrees=o.bgr_degrees,
        translate=o.bgr_translate,
        scale=o.bgr_scale,
        shear=o.bgr_shear,
        padding_mode="reflection",
    )
    (bgr,) = random_flip([bgr], generator, o.flip_probability)
    (bgr,) = random_blur([bgr], generator, o.blur_probability, o.blur_max_kernel)
    (bgr,) = random_sharpen([bgr], generator, o.sharpen_probability)
    bgr = color_jitter(bgr, generator, *o.jitter)

    behind = cast_shadow(bgr, pha, generator, o.shadow_probability, o.shadow_strength)
    src = pha * fgr + (1 - pha) * behind
    src = sensor_noise(src, generator, o.noise_probability, o.noise_sigma)
    plate = plate_jitter(
        bgr,
        generator,
        o.plate_color_probability,
        o.plate_color,
        o.plate_affine_probability,
        o.plate_degrees,
        o.plate_translate,
    )
    plate = sensor_noise(plate, generator, o.noise_probability, o.noise_sigma)
    return {"src": src, "bgr": plate, "pha": pha, "fgr": fgr}
