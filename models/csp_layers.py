"""Cross-stage-partial layers of CSPNeXt (RTMDet's backbone and neck, also used by RTMDet-Ins
and rotated RTMDet), with MMDetection's attribute names (`main_conv`, `blocks`, ...).

Layers only, no model assembly.
"""
from __future__ import annotations

import torch
from torch import nn

from .conv_modules import ConvModule, DepthwiseSeparableConvModule


class ChannelAttention(nn.Module):
    """Squeeze-style channel gate: global average pool, 1x1 conv with bias, hard sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.fc(self.global_avgpool(x)))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: 1x1 reduce, concat with max-pools of several sizes, 1x1 fuse."""

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_sizes: tuple[int, ...] = (5, 9, 13), **bn_kwargs):
        super().__init__()
        mid_channels = in_channels // 2
        self.conv1 = ConvModule(in_channels, mid_channels, 1, **bn_kwargs)
        self.poolings = nn.ModuleList(
            nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvModule(mid_channels * (len(kernel_sizes) + 1), out_channels, 1, **bn_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = torch.cat([x] + [pool(x) for pool in self.poolings], dim=1)
        return self.conv2(x)


class CSPNeXtBlock(nn.Module):
    """3x3 conv then a 5x5 depthwise-separable conv, with an optional residual connection."""

    def __init__(self, in_channels: int, out_channels: int, expansion: float = 0.5,
                 add_identity: bool = True, kernel_size: int = 5, **bn_kwargs):
        super().__init__()
        hidden_channels = int(out_channels * expansion)
        self.conv1 = ConvModule(in_channels, hidden_channels, 3, 1, 1, **bn_kwargs)
        self.conv2 = DepthwiseSeparableConvModule(hidden_channels, out_channels, kernel_size, 1,
                                                  kernel_size // 2, **bn_kwargs)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross-stage partial layer: a main branch of CSPNeXt blocks beside a 1x1 shortcut branch."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 0.5,
                 num_blocks: int = 1, add_identity: bool = True, channel_attention: bool = False,
                 **bn_kwargs):
        super().__init__()
        mid_channels = int(out_channels * expand_ratio)
        self.main_conv = ConvModule(in_channels, mid_channels, 1, **bn_kwargs)
        self.short_conv = ConvModule(in_channels, mid_channels, 1, **bn_kwargs)
        self.final_conv = ConvModule(2 * mid_channels, out_channels, 1, **bn_kwargs)
        self.blocks = nn.Sequential(*[
            CSPNeXtBlock(mid_channels, mid_channels, 1.0, add_identity, **bn_kwargs)
            for _ in range(num_blocks)])
        self.channel_attention = channel_attention
        if channel_attention:
            self.attention = ChannelAttention(2 * mid_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_short = self.short_conv(x)
        x_main = self.blocks(self.main_conv(x))
        x_final = torch.cat((x_main, x_short), dim=1)
        if self.channel_attention:
            x_final = self.attention(x_final)
        return self.final_conv(x_final)
