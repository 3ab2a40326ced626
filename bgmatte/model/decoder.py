"""The base network's decoder: upsample, join the skip features, convolve; four times."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DECODER_CHANNELS = (256, 128, 64, 48, 37)


class Decoder(nn.Module):
    """Turns ASPP features at stride 16 into 37 channels at full resolution.

    The output holds alpha (1), the foreground residual (3), the error map (1) and 32 hidden
    channels for the refiner. ``skip_channels`` are the encoder's features at strides 8, 4, 2, 1.
    """

    def __init__(self, skip_channels: tuple[int, int, int, int], channels: tuple[int, ...] = DECODER_CHANNELS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels[0] + skip_channels[0], channels[1], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[1])
        self.conv2 = nn.Conv2d(channels[1] + skip_channels[1], channels[2], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[2])
        self.conv3 = nn.Conv2d(channels[2] + skip_channels[2], channels[3], 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels[3])
        self.conv4 = nn.Conv2d(channels[3] + skip_channels[3], channels[4], 3, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _up_and_join(x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([x, skip], dim=1)

    def forward(self, x4: Tensor, x3: Tensor, x2: Tensor, x1: Tensor, x0: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self._up_and_join(x4, x3))))
        x = self.relu(self.bn2(self.conv2(self._up_and_join(x, x2))))
        x = self.relu(self.bn3(self.conv3(self._up_and_join(x, x1))))
        return self.conv4(self._up_and_join(x, x0))
