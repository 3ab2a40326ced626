"""The fast inference path: the plain ``MattingRefine`` computation, rearranged so that less work is done.

The network, its weights and its settings are the same; what changes is how it is computed:

- batch norm is folded into the convolutions, and activations and residual sums are fused into
  them; on the CPU the weights are prepacked for oneDNN, per input size;
- activations stay channels_last, which oneDNN and cuDNN prefer;
- the refiner works at the selected patches only. The plain module upsamples the whole 42-channel
  coarse result to half resolution to cut a few thousand 8x8 patches from it; here the 3x3
  convolution over the bilinear 2x upsampling is rewritten as four "phase" convolutions over the
  coarse result itself (exact, since both are linear), run on 5x5 windows gathered per patch, and
  the nearest 2x upsampling before the full-resolution stage likewise becomes 2x2 phase
  convolutions. Patches at the frame's edge, and scales other than 2x, take a per-patch bilinear
  interpolation instead;
- convolutions over concatenations are split into sums (no concatenated copies), and the
  full-resolution outputs are written once, with no full-size intermediate thrown away.

None of this changes the outputs beyond float rounding: the refined patches are the same ones, and
alpha agrees to about 1e-6 (see tests/test_fast.py).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgmatte.model.aspp import ASPP
from bgmatte.model.decoder import Decoder
from bgmatte.model.matting import MattingRefine, prepare_inputs
from bgmatte.model.mobilenetv2 import MobileNetV2Encoder
from bgmatte.model.plate_solve import solve_alpha
from bgmatte.model.refiner import Refiner
from bgmatte.model.resnet import ResNetEncoder

# The decoder's 37 output channels are reordered so that the refiner's inputs come first, in the
# order its first convolution expects them: hidden (32), alpha (1), foreground residual (3); then
# the error (1), which the refiner does not read (its weights for it are zero).
_DECODER_ORDER = (*range(5, 37), 0, 1, 2, 3, 4)
_HID, _PHA, _FGR, _ERR = slice(0, 32), slice(32, 33), slice(33, 36), slice(36, 37)
_COARSE = 37

_ACTIVATIONS = {"relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]), None: ("none", [])}


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None]:
    """The weight and bias of one convolution equal to ``bn(conv(x))`` in eval mode (folded in float64)."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    if bn is None:
        return weight.clone(), None if bias is None else bias.clone()
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    folded_bias = bn.bias.double() - bn.running_mean.double() * scale
    if bias is not None:
        folded_bias = folded_bias + bias.double() * scale
    folded = weight.double() * scale.reshape(-1, 1, 1, 1)
    return folded.to(weight.dtype), folded_bias.to(weight.dtype)


def _onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepacked oneDNN convolutions with fused activations can run here (CPU, fp32)."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


class FoldedConv:
    """A convolution with batch norm folded in and its activation (and a sum with another tensor) fused.

    On the CPU in fp32 the weights are prepacked for oneDNN, which applies the sum and the
    activation in the same pass; elsewhere ``F.conv2d`` runs and the rest follows in place.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, activation: str | None = None, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, onednn: bool = False) -> None:
        self.weight, self.bias = weight.contiguous(), None if bias is None else bias.contiguous()
        self.stride, self.padding, self.dilation, self.groups = [stride] * 2, [padding] * 2, [dilation] * 2, groups
        self.activation = activation
        self.onednn = onednn
        self._packed: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def of(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: str | None, onednn: bool,
           **geometry: int) -> "FoldedConv":
        """``conv`` followed by ``bn`` and ``activation``, with the convolution's own geometry unless given."""
        weight, bias = fold_batch_norm(conv, bn)
        settings = {"stride": conv.stride[0], "padding": conv.padding[0], "dilation": conv.dilation[0],
                    "groups": conv.groups, **geometry}
        return cls(weight, bias, activation, onednn=onednn, **settings)

    def _packed_for(self, x: Tensor) -> Tensor | None:
        """The weights reordered for oneDNN for this input's height and width (oneDNN picks its algorithm
        and the weights' layout by input size; a mismatch measured up to 10x slower); None where this
        build of oneDNN cannot pack them."""
        key = (x.shape[2], x.shape[3])
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= 8:
                self._packed.clear()
            shape = [1, self.weight.shape[1] * self.groups, key[0], key[1]]
            try:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, shape)
            except RuntimeError:
                self.onednn = False
                return None
            self._packed[key] = packed
        return packed

    def __call__(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        packed = self._packed_for(x) if self.onednn and x.numel() else None
        if packed is not None:
            attr, scalars = _ACTIVATIONS[self.activation]
            if add is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
                    attr, scalars, None)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, add, packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "add", None, None if self.activation is None else attr, scalars, None)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if add is not None:
            y = y.add_(add)
        if self.activation == "relu":
            y = y.relu_()
        elif self.activation == "relu6":
            y = F.hardtanh_(y, 0.0, 6.0)
        return y


# -- the base network ----------------------------------------------------------------------------------

class _FastMobileNetV2:
    """The MobileNetV2 encoder as a list of folded blocks; the residual sums are fused into the last conv."""

    def __init__(self, encoder: MobileNetV2Encoder, onednn: bool) -> None:
        self.blocks: list[tuple[list[FoldedConv], bool]] = []
        for block in encoder.features:
            if isinstance(block, nn.Sequential):  # the first ConvBNReLU6
                self.blocks.append(([FoldedConv.of(block[0], block[1], "relu6", onednn)], False))
                continue
            layers = list(block.conv)
            convs = [FoldedConv.of(unit[0], unit[1], "relu6", onednn) for unit in layers[:-2]]
            convs.append(FoldedConv.of(layers[-2], layers[-1], None, onednn))
            self.blocks.append((convs, block.use_residual))

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        features = []
        y = x
        for i, (convs, residual) in enumerate(self.blocks):
            z = y
            for conv in convs[:-1]:
                z = conv(z)
            y = convs[-1](z, add=y if residual else None)
            if i in (1, 3, 6):
                features.append(y)
        x1, x2, x3 = features
        return y, x3, x2, x1, x


class _FastResNet:
    """The ResNet encoder with folded bottlenecks; the residual sum and ReLU are fused into conv3."""

    def __init__(self, encoder: ResNetEncoder, onednn: bool) -> None:
        self.stem = FoldedConv.of(encoder.conv1, encoder.bn1, "relu", onednn)
        self.stages = []
        for stage in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
            blocks = []
            for b in stage:
                down = None if b.downsample is None else FoldedConv.of(b.downsample[0], b.downsample[1], None,
                                                                         onednn)
                blocks.append((FoldedConv.of(b.conv1, b.bn1, "relu", onednn),
                               FoldedConv.of(b.conv2, b.bn2, "relu", onednn),
                               FoldedConv.of(b.conv3, b.bn3, "relu", onednn), down))
            self.stages.append(blocks)

    def _stage(self, i: int, x: Tensor) -> Tensor:
        for conv1, conv2, conv3, down in self.stages[i]:
            identity = x if down is None else down(x)
            x = conv3(conv2(conv1(x)), add=identity)
        return x

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x1 = self.stem(x)
        x2 = self._stage(0, F.max_pool2d(x1, 3, 2, 1))
        x3 = self._stage(1, x2)
        x4 = self._stage(3, self._stage(2, x3))
        return x4, x3, x2, x1, x


class _FastASPP:
    """ASPP with folded branches; the pooling branch's constant map enters the projection as a sum."""

    def __init__(self, aspp: ASPP, onednn: bool) -> None:
        self.branches = [FoldedConv.of(branch[0], branch[1], "relu", onednn) for branch in aspp.convs[:-1]]
        pooling = aspp.convs[-1]
        pool_weight, self.pool_bias = fold_batch_norm(pooling[1], pooling[2])
        self.pool_weight = pool_weight[:, :, 0, 0]
        weight, self.project_bias = fold_batch_norm(aspp.project[0], aspp.project[1])
        spatial = len(self.branches) * pooling[1].out_channels
        self.project_pooled = weight[:, spatial:, 0, 0]
        self.project = FoldedConv(weight[:, :spatial], None, "relu", onednn=onednn)

    def __call__(self, x: Tensor) -> Tensor:
        pooled = F.linear(x.mean((2, 3)), self.pool_weight, self.pool_bias).relu_()
        per_image = F.linear(pooled, self.project_pooled, self.project_bias)  # (B, 256), constant over the map
        joined = torch.cat([branch(x) for branch in self.branches], dim=1)
        shape = (x.shape[0], per_image.shape[1], x.shape[2], x.shape[3])
        constant = per_image[:, :, None, None].expand(shape).contiguous(memory_format=torch.channels_last)
        return self.project(joined, add=constant)


class _FastDecoder:
    """The decoder with folded convolutions; its last layer's channels come out in ``_DECODER_ORDER``."""

    def __init__(self, decoder: Decoder, onednn: bool) -> None:
        self.conv1 = FoldedConv.of(decoder.conv1, decoder.bn1, "relu", onednn)
        self.conv2 = FoldedConv.of(decoder.conv2, decoder.bn2, "relu", onednn)
        self.conv3 = FoldedConv.of(decoder.conv3, decoder.bn3, "relu", onednn)
        order = list(_DECODER_ORDER)
        weight, bias = fold_batch_norm(decoder.conv4, None)
        self.conv4 = FoldedConv(weight[order], bias[order], None, padding=1, onednn=onednn)

    @staticmethod
    def _up_and_join(x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([x, skip], dim=1)

    def __call__(self, x4: Tensor, x3: Tensor, x2: Tensor, x1: Tensor, x0: Tensor) -> Tensor:
        x = self.conv1(self._up_and_join(x4, x3))
        x = self.conv2(self._up_and_join(x, x2))
        x = self.conv3(self._up_and_join(x, x1))
        return self.conv4(self._up_and_join(x, x0))


# -- the refiner ---------------------------------------------------------------------------------------

def _axis_windows(n_in: int, n_out: int, cells: int, context: int, span: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """For each quarter-grid cell along one axis: where its source window starts, and the weights.

    The patch of cell ``q`` covers ``span`` half-resolution positions from ``2q - context``; bilinear
    upsampling from ``n_in`` to ``n_out`` positions (align_corners=False, in float32 as PyTorch
    computes it) reads a window of K consecutive sources. Returns ``start`` (cells,) and ``weights``
    (cells, span, K), zero for positions outside the frame (the zero padding of the plain refiner).
    """
    q = torch.arange(cells, device=device)
    position = 2 * q[:, None] - context + torch.arange(span, device=device)
    inside = (position >= 0) & (position < n_out)
    scale = torch.tensor(n_in, dtype=torch.float32, device=device) / n_out
    source = (scale * (position.clamp(0, n_out - 1).float() + 0.5) - 0.5).clamp(min=0)
    first = source.long()
    upper = (source - first).clamp(0, 1)
    second = (first + 1).clamp(max=n_in - 1)
    start = first[:, 0]
    width = min(int((second[:, -1] - start).max()) + 1, n_in)
    start = start.clamp(max=n_in - width)
    weights = torch.zeros(cells, span, width, device=device)
    weights.scatter_add_(2, (first - start[:, None]).unsqueeze(2), ((1 - upper) * inside).unsqueeze(2))
    weights.scatter_add_(2, (second - start[:, None]).unsqueeze(2), (upper * inside).unsqueeze(2))
    return start, weights


def _upsampling_phases() -> Tensor:
    """How a 3-tap convolution over a bilinear 2x upsampling reads the source: (phase, source, tap).

    Output ``2m + phase`` of the convolution, whose taps read upsampled positions ``2m + phase - 1 + tap``,
    equals a 3-tap convolution over sources ``m - 1 .. m + 1`` with these coefficients. They are read
    off the per-patch path's own interpolation weights, at a cell far from the edges, for each of the
    patch's three output pairs (which must agree).
    """
    cells, q = 16, 8
    start, weights = _axis_windows(cells, 2 * cells, cells, 3, 8, torch.device("cpu"))
    first, width = int(start[q]), weights.shape[2]
    found = torch.zeros(3, 2, 3, 3)  # (output pair, phase, source, tap)
    for unit, phase, tap in itertools.product(range(3), range(2), range(3)):
        along = torch.zeros(cells)
        along[first:first + width] = weights[q, 2 * unit + phase + tap]
        found[unit, phase, :, tap] = along[q - 2 + unit:q + 1 + unit]
        if found[unit, phase, :, tap].sum() != along.sum():
            raise RuntimeError("bilinear 2x upsampling reads beyond three sources")
    if not (torch.equal(found[0], found[1]) and torch.equal(found[0], found[2])):
        raise RuntimeError("bilinear 2x upsampling is not periodic")
    return found[0]


def _nearest_phases() -> Tensor:
    """How a 3-tap convolution over a nearest 2x upsampling reads the source: (phase, source, tap)."""
    coefficients = torch.zeros(2, 2, 3)
    for phase in range(2):
        for tap in range(3):
            coefficients[phase, (phase + tap) // 2, tap] = 1.0
    return coefficients


def _phase_weight(weight: Tensor, phases: Tensor) -> Tensor:
    """The kernels of the four phase convolutions stacked as output channels ``(phase_y*2 + phase_x)*O + o``."""
    phases = phases.to(weight.device, torch.float64)
    w = torch.einsum("yat,xbs,oits->yxoiab", phases, phases, weight.double())
    return w.reshape(-1, weight.shape[1], phases.shape[1], phases.shape[1]).to(weight.dtype)


def _interleave(x: Tensor) -> Tensor:
    """(N, 4C, h, w) phase outputs, channels_last, to (N, C, 2h, 2w) channels_last (a pixel shuffle)."""
    n, channels, h, w = x.shape
    out = x.permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, channels // 4).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(n, 2 * h, 2 * w, channels // 4).permute(0, 3, 1, 2)


def _nearest2x(x: Tensor) -> Tensor:
    """Nearest 2x upsampling of a channels_last (N, C, h, w) tensor, channels_last."""
    n, channels, h, w = x.shape
    out = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, channels)
    return out.reshape(n, 2 * h, 2 * w, channels).permute(0, 3, 1, 2)


def _rows(x: Tensor, length: int, step: int) -> Tensor:
    """An overlapping (R, length) view of contiguous ``x`` whose row ``i`` starts at element ``i*step``:
    ``index_select`` on it cuts windows as whole rows."""
    flat = x.reshape(-1)
    return flat.as_strided(((flat.numel() - length) // step + 1, length), (step, 1))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resizing (align_corners=False) of a contiguous (B, C, H, W) tensor, one channel at a time:
    the same values as ``F.interpolate``, which on the CPU converts 3-channel images to channels_last
    and back (two full-size copies) instead."""
    batch, channels, height, width = x.shape
    if x.device.type != "cpu" or channels == 1 or not x.is_contiguous():
        return F.interpolate(x, size, mode="bilinear", align_corners=False)
    out = F.interpolate(x.reshape(batch * channels, 1, height, width), size, mode="bilinear", align_corners=False)
    return out.reshape(batch, channels, *size)


class _FastRefiner:
    """The refiner's layers, folded and split so that no concatenation is copied, plus its phase kernels."""

    def __init__(self, refiner: Refiner, onednn: bool) -> None:
        self.kernel_size = k = refiner.kernel_size
        w1, b1 = fold_batch_norm(refiner.conv1, refiner.bn1)
        w3, b3 = fold_batch_norm(refiner.conv3, refiner.bn3)
        # conv1 reads [hidden, alpha, foreground residual] (36) then [src, bgr] at half resolution (6);
        # the coarse tensor carries the error as a 37th channel, which gets zero weights.
        w1_coarse = torch.cat([w1[:, :36], torch.zeros_like(w1[:, :1])], dim=1)
        self.conv1_coarse = FoldedConv(w1_coarse, None, onednn=onednn)
        self.conv1_images = FoldedConv(w1[:, 36:], b1, "relu", onednn=onednn)
        self.conv2 = FoldedConv.of(refiner.conv2, refiner.bn2, "relu", onednn)
        self.conv3_images = FoldedConv(w3[:, 16:], b3, "relu", onednn=onednn)
        self.conv4 = FoldedConv.of(refiner.conv4, None, None, onednn)
        if k == 3:
            self.conv1_phases = FoldedConv(_phase_weight(w1_coarse, _upsampling_phases()), None, onednn=onednn)
            self.conv3_phases = FoldedConv(_phase_weight(w3[:, :16], _nearest_phases()), None, onednn=onednn)
            self.conv1_frame = FoldedConv(w1_coarse, None, padding=3, onednn=onednn)
            self.conv1_images_frame = FoldedConv(w1[:, 36:], b1, "relu", padding=3, onednn=onednn)
            self.conv3_images_frame = FoldedConv(w3[:, 16:], b3, "relu", padding=2, onednn=onednn)
        else:
            self.conv3_features = FoldedConv(w3[:, :16], None, onednn=onednn)

    # The two stages on a batch of patches, from their inputs.
    def patches(self, coarse_part: Tensor, images_half: Tensor, images_full: Tensor) -> Tensor:
        """``coarse_part``: conv1 applied to the coarse channels (N, 24, s, s); ``images_half``: src and bgr
        at half resolution (N, 6, s+2, s+2); ``images_full``: the full-resolution crop (N, 6, 8, 8) or
        (N, 6, 4, 4). Returns the refined (N, 4, 4, 4): alpha and foreground residual."""
        h = self.conv2(self.conv1_images(images_half, add=coarse_part))
        if self.kernel_size == 3:
            features = _interleave(self.conv3_phases(h))  # conv3 over the nearest 2x upsampling of h
        else:
            features = _nearest2x(self.conv3_features(h))
        return self.conv4(self.conv3_images(images_full, add=features.contiguous(memory_format=torch.channels_last)))

    def frame(self, coarse_half: Tensor, images_half: Tensor, images_full: Tensor) -> Tensor:
        """The ``full`` mode: both stages over the whole frame (zero-padded as the plain module does)."""
        if self.kernel_size == 3:
            h = self.conv2(self.conv1_images_frame(images_half, add=self.conv1_frame(coarse_half)))
            features = _interleave(self.conv3_phases(h)).contiguous(memory_format=torch.channels_last)
            return self.conv4(self.conv3_images_frame(images_full, add=features))
        h = self.conv2(self.conv1_images(images_half, add=self.conv1_coarse(coarse_half)))
        features = _nearest2x(self.conv3_features(h)).contiguous(memory_format=torch.channels_last)
        return self.conv4(self.conv3_images(images_full, add=features))


def _cells_inside(row: Tensor, col: Tensor, quarter: tuple[int, int], margin: int) -> Tensor:
    """Whether each cell is at least ``margin`` cells away from the grid's edges."""
    return (row >= margin) & (row < quarter[0] - margin) & (col >= margin) & (col < quarter[1] - margin)


def _crop_full(image: Tensor, b: Tensor, row: Tensor, col: Tensor, context: int, inside: bool) -> Tensor:
    """The (4 + 2*context)-pixel windows of ``image`` (B, 3, H, W) around the cells' 4x4 pixels, zero outside
    the frame: (N, 3, side, side). ``inside`` promises that no window crosses the frame's edge."""
    _, channels, height, width = image.shape
    side = 4 + 2 * context
    steps = torch.arange(side, device=b.device)
    ys, xs = 4 * row[:, None] - context + steps, 4 * col[:, None] - context + steps
    plane = torch.arange(channels, device=b.device) * (height * width)
    if inside:  # whole rows of ``side`` pixels, every one starting at an even offset
        start = (b * channels * height * width)[:, None, None] + plane[:, None] + ys[:, None, :] * width \
            + xs[:, None, :1]
        rows = _rows(image, side, 2).index_select(0, (start // 2).reshape(-1))
        return rows.reshape(-1, channels, side, side)
    inside_frame = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]
    pixel = (b * channels * height * width)[:, None, None] + ys.clamp(0, height - 1)[:, :, None] * width \
        + xs.clamp(0, width - 1)[:, None, :]
    index = pixel[:, None] + plane[:, None, None]
    return image.reshape(-1)[index] * inside_frame[:, None].to(image.dtype)


class FastMattingRefine(MattingRefine):
    """``MattingRefine`` computed faster for inference, with the same interface, settings and outputs.

    It takes over the layers of the plain model it is made from (no copy: ``state_dict`` and the
    settings, ``backbone_scale`` and ``refiner.mode`` and the like, are the plain model's, so keep
    using one of the two). The folded weights are rebuilt by themselves whenever the parameters
    change (``load_state_dict``, ``.to(...)``, in-place edits). In training mode it runs the plain
    computation; in eval mode it never records gradients.

    Inputs of another float dtype are cast to the model's dtype; outputs come in the model's dtype.
    """

    def __init__(self, model: MattingRefine) -> None:
        nn.Module.__init__(self)  # adopt the plain model's layers rather than building new ones
        self.backbone_name = model.backbone_name
        self.backbone = model.backbone
        self.aspp = model.aspp
        self.decoder = model.decoder
        self.refiner = model.refiner
        self.backbone_scale = model.backbone_scale
        self.plate_solve = model.plate_solve
        self.train(model.training)
        self._plan_key: tuple | None = None
        self._plan: dict = {}
        self._windows: dict = {}

    # -- the folded layers, rebuilt when the parameters change -------------------------------------------

    def _signature(self) -> tuple:
        tensors = [*self.parameters(), *self.buffers()]
        first = tensors[0]
        return (first.device, first.dtype, self.refiner.kernel_size,
                tuple((t.data_ptr(), t._version) for t in tensors))

    def _layers(self) -> dict:
        key = self._signature()
        if key != self._plan_key:
            with torch.no_grad():
                self._plan = self._fold()
            self._plan_key = key
            self._windows = {}
        return self._plan

    def _fold(self) -> dict:
        first = next(self.parameters())
        onednn = _onednn_usable(first.device, first.dtype)
        if isinstance(self.backbone, MobileNetV2Encoder):
            encoder = _FastMobileNetV2(self.backbone, onednn)
        else:
            encoder = _FastResNet(self.backbone, onednn)
        return {"encoder": encoder, "aspp": _FastASPP(self.aspp, onednn), "decoder": _FastDecoder(self.decoder, onednn),
                "refiner": _FastRefiner(self.refiner, onednn)}

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.update(_plan_key=None, _plan={}, _windows={})  # prepacked weights are rebuilt, never copied
        return state

    def refresh(self) -> "FastMattingRefine":
        """Rebuild the folded weights now (they are rebuilt by themselves when parameters change)."""
        self._plan_key = None
        self._layers()
        return self

    # -- forward -----------------------------------------------------------------------------------------

    def forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        if self.training:
            return super().forward(src, bgr)
        with torch.no_grad():
            return self._fast_forward(src, bgr)

    def _fast_forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        self.check_settings()
        src, bgr, small, (height, width) = prepare_inputs(src, bgr, self.backbone_scale,
                                                          next(self.parameters()).dtype, self)
        layers = self._layers()
        src_sm, bgr_sm = _resize(src, small), _resize(bgr, small)
        x = torch.cat([src_sm, bgr_sm], dim=1).contiguous(memory_format=torch.channels_last)
        features = layers["encoder"](x)
        coarse = layers["decoder"](layers["aspp"](features[0]), *features[1:])  # (B, 37, h, w), channels_last
        coarse[:, _HID].relu_()
        coarse[:, _PHA].clamp_(0.0, 1.0)
        pha_sm = coarse[:, _PHA].contiguous()
        fgr_sm = (coarse[:, _FGR] + src_sm).clamp_(0.0, 1.0).contiguous()
        err_sm = coarse[:, _ERR].clamp(0.0, 1.0).contiguous()

        if self.refiner.mode == "full":
            pha, fgr, ref_sm = self._refine_everywhere(layers["refiner"], src, bgr, coarse)
        else:
            pha, fgr, ref_sm = self._refine_patches(layers["refiner"], src, bgr, coarse, err_sm)
        if self.plate_solve:
            pha = solve_alpha(src, bgr, pha, fgr)
        return pha[:, :, :height, :width], fgr[:, :, :height, :width], pha_sm, fgr_sm, err_sm, ref_sm

    def _refine_patches(self, refiner: _FastRefiner, src: Tensor, bgr: Tensor, coarse: Tensor,
                        err_sm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The sampling and thresholding modes: the refiner's two stages on the selected patches only."""
        batch, _, full_h, full_w = src.shape
        quarter = (full_h // 4, full_w // 4)
        err = F.interpolate(err_sm, quarter, mode="bilinear", align_corners=False)
        ref_sm = self.refiner.select(err)

        # The unrefined output: the coarse result upsampled once, straight into the outputs.
        pha = _resize(coarse[:, _PHA].contiguous(), (full_h, full_w)).clamp_(0.0, 1.0)
        fgr = _resize(coarse[:, _FGR].contiguous(), (full_h, full_w)).add_(src).clamp_(0.0, 1.0)
        b, row, col = torch.nonzero(ref_sm.squeeze(1)).unbind(1)
        if b.numel() == 0:
            return pha, fgr, ref_sm

        k3 = refiner.kernel_size == 3
        context_half, context_full = (3, 2) if k3 else (0, 0)
        images_half = self._half_images(src, bgr, context_half)
        # Cells two or more from the edge have their windows inside the frame and, at a 2x coarse-to-
        # half scale, an interior interpolation pattern: they take the phase convolutions.
        margin = 2 if k3 else 0
        inside = _cells_inside(row, col, quarter, margin)
        phases = k3 and coarse.shape[2] == quarter[0] and coarse.shape[3] == quarter[1]
        for group, interior in ((inside, True), (~inside, False)):
            if not bool(group.any()):
                continue
            gb, grow, gcol = b[group], row[group], col[group]
            if interior and phases:
                coarse_part = refiner.conv1_phases(self._coarse_windows(coarse, gb, grow, gcol))
                coarse_part = _interleave(coarse_part).contiguous(memory_format=torch.channels_last)
            else:
                coarse_part = refiner.conv1_coarse(self._coarse_upsampled(coarse, gb, grow, gcol, context_half, quarter))
            half_windows = self._half_windows(images_half, gb, grow, gcol, context_half)
            src_crop = _crop_full(src, gb, grow, gcol, context_full, interior)
            full_windows = torch.cat([src_crop, _crop_full(bgr, gb, grow, gcol, context_full, interior)], dim=1)
            out = refiner.patches(coarse_part, half_windows, full_windows.contiguous(memory_format=torch.channels_last))
            core = src_crop[:, :, context_full:context_full + 4, context_full:context_full + 4]
            self._write(pha, fgr, out, core, gb, grow, gcol)
        return pha, fgr, ref_sm

    @staticmethod
    def _write(pha: Tensor, fgr: Tensor, out: Tensor, src_core: Tensor, b: Tensor, row: Tensor, col: Tensor) -> None:
        """Put the refined 4x4 patches into the full-resolution outputs, clamped as the plain module's, as
        whole rows of 4 pixels (every one starts at a multiple of 4, the width being one)."""
        _, _, height, width = pha.shape
        steps = torch.arange(4, device=b.device)
        line = ((b * height)[:, None] + 4 * row[:, None] + steps) * width + 4 * col[:, None]  # (N, 4)
        _rows(pha, 4, 4).index_copy_(0, (line // 4).reshape(-1), out[:, 0].clamp(0.0, 1.0).reshape(-1, 4))
        plane = height * width
        line = (line + (b * 2 * plane)[:, None])[:, None] + steps[:3, None] * plane  # (N, 3, 4)
        fgr_rows = (out[:, 1:4] + src_core).clamp(0.0, 1.0).reshape(-1, 4)
        _rows(fgr, 4, 4).index_copy_(0, (line // 4).reshape(-1), fgr_rows)

    @staticmethod
    def _half_images(src: Tensor, bgr: Tensor, context: int) -> Tensor:
        """src and bgr at half resolution (the plain module's bilinear halving), channels_last and zero-padded
        by ``context``: (B, H/2 + 2*context, W/2 + 2*context, 6)."""
        batch, _, height, width = src.shape
        half = (height // 2, width // 2)
        out = src.new_empty(batch, half[0] + 2 * context, half[1] + 2 * context, 6)
        if context:  # zero only the frame around the interior, which is written next
            out[:, :context].zero_()
            out[:, -context:].zero_()
            out[:, :, :context].zero_()
            out[:, :, -context:].zero_()
        interior = out[:, context:context + half[0], context:context + half[1]]
        interior[..., :3] = _resize(src, half).permute(0, 2, 3, 1)
        interior[..., 3:] = _resize(bgr, half).permute(0, 2, 3, 1)
        return out

    @staticmethod
    def _half_windows(images_half: Tensor, b: Tensor, row: Tensor, col: Tensor, context: int) -> Tensor:
        """Each patch's (2 + 2*context)-square window of the padded half-resolution images: (N, 6, s, s)."""
        batch, padded_h, padded_w, channels = images_half.shape
        side = 2 + 2 * context
        start = ((b * padded_h + 2 * row)[:, None] + torch.arange(side, device=b.device)) * padded_w \
            + 2 * col[:, None]
        windows = _rows(images_half, side * channels, channels).index_select(0, start.reshape(-1))
        return windows.reshape(-1, side, side, channels).permute(0, 3, 1, 2)

    @staticmethod
    def _coarse_windows(coarse: Tensor, b: Tensor, row: Tensor, col: Tensor) -> Tensor:
        """The 5x5 windows of the coarse tensor around each cell (cells at least two from the edge):
        (N, 37, 5, 5), channels_last."""
        batch, channels, small_h, small_w = coarse.shape
        start = ((b * small_h + row - 2)[:, None] + torch.arange(5, device=b.device)) * small_w + col[:, None] - 2
        table = coarse.permute(0, 2, 3, 1)  # a view: coarse is channels_last
        windows = _rows(table, 5 * channels, channels).index_select(0, start.reshape(-1))
        return windows.reshape(-1, 5, 5, channels).permute(0, 3, 1, 2)

    def _coarse_upsampled(self, coarse: Tensor, b: Tensor, row: Tensor, col: Tensor, context: int,
                          quarter: tuple[int, int]) -> Tensor:
        """The coarse channels upsampled bilinearly to half resolution at each patch's window only (zero
        outside the frame), for any scale: (N, 37, s, s), channels_last."""
        batch, channels, small_h, small_w = coarse.shape
        span = 2 + 2 * context
        key = (small_h, small_w, quarter, context, coarse.device)
        if key not in self._windows:
            rows = _axis_windows(small_h, 2 * quarter[0], quarter[0], context, span, coarse.device)
            cols = _axis_windows(small_w, 2 * quarter[1], quarter[1], context, span, coarse.device)
            self._windows[key] = rows, cols
        (row_start, row_weights), (col_start, col_weights) = self._windows[key]
        height, width = row_weights.shape[2], col_weights.shape[2]
        start = ((b * small_h + row_start[row])[:, None] + torch.arange(height, device=b.device)) * small_w \
            + col_start[col][:, None]
        table = coarse.permute(0, 2, 3, 1)
        sources = _rows(table, width * channels, channels).index_select(0, start.reshape(-1))
        sources = sources.reshape(-1, height, width * channels)
        rows_done = torch.matmul(row_weights[row].to(coarse.dtype), sources).reshape(-1, span, width, channels)
        out = torch.matmul(col_weights[col].to(coarse.dtype)[:, None], rows_done)  # (N, span, span, C)
        return out.permute(0, 3, 1, 2)

    def _refine_everywhere(self, refiner: _FastRefiner, src: Tensor, bgr: Tensor,
                           coarse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``full`` mode: the two stages as convolutions over the whole frame."""
        batch, _, full_h, full_w = src.shape
        half = (full_h // 2, full_w // 2)
        coarse_half = F.interpolate(coarse, half, mode="bilinear", align_corners=False)
        images_half = torch.cat([_resize(src, half), _resize(bgr, half)], dim=1)
        images_full = torch.cat([src, bgr], dim=1)
        out = refiner.frame(coarse_half.contiguous(memory_format=torch.channels_last),
                            images_half.contiguous(memory_format=torch.channels_last),
                            images_full.contiguous(memory_format=torch.channels_last))
        pha = out[:, 0:1].clamp(0.0, 1.0).contiguous()
        fgr = (out[:, 1:4] + src).clamp_(0.0, 1.0).contiguous()
        ref_sm = torch.ones(batch, 1, *(full_h // 4, full_w // 4), device=src.device, dtype=src.dtype)
        return pha, fgr, ref_sm


def optimize_model(model: MattingRefine) -> FastMattingRefine:
    """The fast inference path for a plain ``MattingRefine``: same interface, settings and outputs."""
    if isinstance(model, FastMattingRefine):
        return model
    if not isinstance(model, MattingRefine):
        raise TypeError(f"optimize_model takes a MattingRefine, not {type(model).__name__}")
    return FastMattingRefine(model)
