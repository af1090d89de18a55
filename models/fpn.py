"""MMDetection's FPN (no norm, no activation): lateral 1x1 convs, top-down nearest upsampling to
each lateral's size, 3x3 output convs, then extra levels (max-pool or strided convs).

Attribute names follow mmcv's ConvModule (`lateral_convs.i.conv`, `fpn_convs.i.conv`) so
checkpoints load with `strict=True`. `end_level` and `relu_before_extra_convs` are left out: the
zoo's configs use neither.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXTRA_CONV_SOURCES = ('on_input', 'on_lateral', 'on_output')


class ConvNoNorm(nn.Module):
    """mmcv's ConvModule without norm and activation: a biased conv under the name `conv`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Feature pyramid over backbone levels `start_level..` giving `num_outs` maps of
    `out_channels`. Extra levels past the backbone's: with `add_extra_convs` False, stride-2
    max-pooling of the last output (Faster R-CNN); otherwise stride-2 3x3 convs, the first one on
    the backbone's last map (`'on_input'`, RetinaNet; True means that too), its lateral or its
    output."""

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int,
                 start_level: int = 0, add_extra_convs: bool | str = False):
        super().__init__()
        if add_extra_convs is True:
            add_extra_convs = 'on_input'
        if add_extra_convs and add_extra_convs not in EXTRA_CONV_SOURCES:
            raise ValueError(f'add_extra_convs must be a bool or one of {EXTRA_CONV_SOURCES}')
        if num_outs < len(in_channels) - start_level:
            raise ValueError('num_outs must cover the backbone levels from start_level on')
        self.in_channels = list(in_channels)
        self.num_outs = num_outs
        self.start_level = start_level
        self.add_extra_convs = add_extra_convs
        self.lateral_convs = nn.ModuleList(
            ConvNoNorm(channels, out_channels, 1) for channels in in_channels[start_level:])
        self.fpn_convs = nn.ModuleList(
            ConvNoNorm(out_channels, out_channels, 3, padding=1)
            for _ in in_channels[start_level:])
        extra_levels = num_outs - (len(in_channels) - start_level)
        if add_extra_convs:
            for i in range(extra_levels):
                source_channels = (in_channels[-1] if i == 0 and add_extra_convs == 'on_input'
                                   else out_channels)
                self.fpn_convs.append(ConvNoNorm(source_channels, out_channels, 3, 2, 1))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'FPN expects {len(self.in_channels)} inputs, got {len(inputs)}')
        laterals = [conv(inputs[i + self.start_level])
                    for i, conv in enumerate(self.lateral_convs)]
        used_levels = len(laterals)
        for i in range(used_levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode='nearest')
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used_levels)]
        if not self.add_extra_convs:
            for _ in range(self.num_outs - used_levels):
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        elif self.num_outs > used_levels:
            source = {'on_input': inputs[-1], 'on_lateral': laterals[-1],
                      'on_output': outs[-1]}[self.add_extra_convs]
            outs.append(self.fpn_convs[used_levels](source))
            for i in range(used_levels + 1, self.num_outs):
                outs.append(self.fpn_convs[i](outs[-1]))
        return tuple(outs)
