"""MobileNetV2 encoder with torchvision's module names, 6 input channels and output stride 16.

As in the released checkpoints: the final 1x1 block (``features[18]``) is dropped, block 14 keeps
stride 1, and the depthwise convolutions of blocks 15-17 use dilation 2.
"""
from __future__ import annotations

from torch import Tensor, nn

# (expansion, output channels, repeats, first stride) for each group, as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Conv, batch norm, ReLU6: torchvision's ``Conv2dNormActivation`` layout (keys ``0`` and ``1``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, dilation: int = 1) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1, linear); residual when shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, dilation: int = 1) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Encoder(nn.Module):
    """Returns features at strides 16, 8, 4, 2 and 1: (block 17, block 6, block 3, block 1, input)."""

    def __init__(self, in_channels: int = 6) -> None:
        super().__init__()
        blocks: list[nn.Module] = [ConvBNReLU6(in_channels, 32, stride=2)]
        channels = 32
        for expansion, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
            for i in range(repeats):
                index = len(blocks)
                stride = first_stride if i == 0 else 1
                if index == 14:
                    stride = 1  # keep output stride 16 ...
                dilation = 2 if index >= 15 else 1  # ... and widen the receptive field instead
                blocks.append(InvertedResidual(channels, out_channels, stride, expansion, dilation))
                channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.out_channels = (320, 32, 24, 16, in_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        f = self.features
        x0 = x
        x1 = f[1](f[0](x))
        x2 = f[3](f[2](x1))
        x3 = f[6](f[5](f[4](x2)))
        x4 = x3
        for i in range(7, 18):
            x4 = f[i](x4)
        return x4, x3, x2, x1, x0
