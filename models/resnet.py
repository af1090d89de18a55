"""ResNet-50/101 backbones (torchvision/MMDetection 'pytorch' style: the stride sits on the 3x3
conv), with MMDetection's attribute names so its checkpoints load with `strict=True`.

Inference only: no frozen stages, no norm_eval switch, no DCN/plugins; BN eps 1e-5.
"""
from __future__ import annotations

import torch
from torch import nn

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs with BN, ReLU after the residual sum."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of `depth` 50 or 101: returns the outputs of the stages in `out_indices`
    (0..3 -> strides 4, 8, 16, 32; channels 256, 512, 1024, 2048)."""

    def __init__(self, depth: int, out_indices: tuple[int, ...] = (0, 1, 2, 3)):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f'ResNet depth must be one of {tuple(STAGE_BLOCKS)}, got {depth}')
        self.depth = depth
        self.out_indices = tuple(out_indices)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        self.res_layers = []
        for i, num_blocks in enumerate(STAGE_BLOCKS[depth]):
            planes, stride = 64 * 2 ** i, 1 if i == 0 else 2
            out_channels = planes * Bottleneck.expansion
            downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_channels))
            blocks = [Bottleneck(in_channels, planes, stride, downsample)]
            blocks += [Bottleneck(out_channels, planes) for _ in range(num_blocks - 1)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.res_layers.append(f'layer{i + 1}')
            in_channels = out_channels

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(256 * 2 ** i for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
