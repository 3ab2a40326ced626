"""ResNet-50/101 encoder with torchvision's module names, 6 input channels and a dilated last stage.

The layout (``conv1``, ``bn1``, ``layer1``..``layer4``, each block with ``conv1..3``, ``bn1..3`` and
``downsample``) must match torchvision's so that the released checkpoints load key for key.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Blocks per stage for each variant, as in torchvision.
RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    """The ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (carrying stride and dilation), 1x1 expand, residual."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNetEncoder(nn.Module):
    """Returns features at strides 16, 8, 4, 2 and 1: (layer4, layer2, layer1, conv1, input).

    layer4 trades its stride for dilation 2 (output stride 16), as torchvision's
    ``replace_stride_with_dilation=[False, False, True]`` does: its first block keeps dilation 1.
    """

    def __init__(self, variant: str = "resnet50", in_channels: int = 6) -> None:
        super().__init__()
        blocks = RESNET_LAYERS[variant]
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in_channels = 64
        self.layer1 = self._make_stage(64, blocks[0], stride=1, dilation=1, first_dilation=1)
        self.layer2 = self._make_stage(128, blocks[1], stride=2, dilation=1, first_dilation=1)
        self.layer3 = self._make_stage(256, blocks[2], stride=2, dilation=1, first_dilation=1)
        self.layer4 = self._make_stage(512, blocks[3], stride=1, dilation=2, first_dilation=1)
        self.out_channels = (2048, 512, 256, 64, in_channels)

    def _make_stage(self, width: int, count: int, stride: int, dilation: int, first_dilation: int) -> nn.Sequential:
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [Bottleneck(self._in_channels, width, stride, first_dilation, downsample)]
        self._in_channels = out_channels
        layers += [Bottleneck(out_channels, width, 1, dilation) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x0 = x
        x1 = self.relu(self.bn1(self.conv1(x)))
        x2 = self.layer1(self.maxpool(x1))
        x3 = self.layer2(x2)
        x4 = self.layer4(self.layer3(x3))
        return x4, x3, x2, x1, x0


if __name__ == "__main__":  # pragma: no cover
    print(ResNetEncoder()(torch.zeros(1, 6, 64, 64))[0].shape)
