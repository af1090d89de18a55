"""MobileNetV2 backbone as MMDetection 3.x's `MobileNetV2` (inverted residual blocks, mmcv
ConvModules), with its state-dict names so its checkpoints load with `strict=True`.

A backbone only: which stages feed a neck, and the activation, are the family's choice
(YOLOv3-MobileNetV2 takes stages 2, 4, 6 with LeakyReLU 0.1).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .conv_modules import ConvModuleWithActivation

# MMDetection's arch_settings: (expand_ratio, channels, num_blocks, stride) per layer1..layer7
MOBILENET_V2_ARCH = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int, min_ratio: float = 0.9) -> int:
    """mmdet's `make_divisible`: the nearest multiple of `divisor`, at least `divisor`, and not
    below `min_ratio` of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < min_ratio * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expansion (left out at ratio 1), 3x3 depthwise, 1x1 linear projection; the input is
    added back when the stride is 1 and the widths match."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, stride: int,
                 activation: Callable[[], nn.Module]):
        super().__init__()
        self.with_res_shortcut = stride == 1 and in_channels == out_channels
        self.with_expand_conv = mid_channels != in_channels
        if self.with_expand_conv:
            self.expand_conv = ConvModuleWithActivation(in_channels, mid_channels, 1,
                                                        activation=activation())
        self.depthwise_conv = ConvModuleWithActivation(mid_channels, mid_channels, 3, stride, 1,
                                                       groups=mid_channels,
                                                       activation=activation())
        self.linear_conv = ConvModuleWithActivation(mid_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand_conv(x) if self.with_expand_conv else x
        out = self.linear_conv(self.depthwise_conv(out))
        return x + out if self.with_res_shortcut else out


class MobileNetV2(nn.Module):
    """`conv1`, `layer1`..`layer7`, `conv2` (the 1x1 to 1280 channels); returns the outputs of
    the layers in `out_indices` (0 = layer1, ..., 7 = conv2).

    The forward pass stops after the last layer it returns: MMDetection's runs `conv2` even when
    nothing uses it (YOLOv3's out_indices (2, 4, 6)), which changes no output.
    """

    def __init__(self, widen_factor: float = 1.0, out_indices: tuple[int, ...] = (1, 2, 4, 7),
                 activation: Callable[[], nn.Module] = nn.ReLU6):
        super().__init__()
        if not set(out_indices) <= set(range(8)):
            raise ValueError(f'out_indices must be within 0..7, got {out_indices}')
        self.out_indices = tuple(out_indices)
        in_channels = make_divisible(32 * widen_factor, 8)
        self.conv1 = ConvModuleWithActivation(3, in_channels, 3, 2, 1, activation=activation())
        self.layers = []
        for index, (expand_ratio, channels, num_blocks, stride) in enumerate(MOBILENET_V2_ARCH):
            out_channels = make_divisible(channels * widen_factor, 8)
            blocks = []
            for block in range(num_blocks):
                blocks.append(InvertedResidual(
                    in_channels, out_channels, int(round(in_channels * expand_ratio)),
                    stride if block == 0 else 1, activation))
                in_channels = out_channels
            self.add_module(f'layer{index + 1}', nn.Sequential(*blocks))
            self.layers.append(f'layer{index + 1}')
        last_channels = int(1280 * widen_factor) if widen_factor > 1.0 else 1280
        self.conv2 = ConvModuleWithActivation(in_channels, last_channels, 1,
                                              activation=activation())
        self.layers.append('conv2')

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.conv1(x)
        outs = []
        for index, name in enumerate(self.layers[:max(self.out_indices) + 1]):
            x = getattr(self, name)(x)
            if index in self.out_indices:
                outs.append(x)
        return tuple(outs)
