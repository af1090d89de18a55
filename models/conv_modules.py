"""mmcv's ConvModule (conv, BatchNorm, SiLU) and its depthwise-separable form, with mmcv's
attribute names (`conv`, `bn`, `depthwise_conv`, ...) so checkpoints load with `strict=True`.

Layers only, no model assembly; shared by every family that uses them.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvModule(nn.Module):
    """Conv2d -> BatchNorm2d -> SiLU, as mmcv's ConvModule with norm and act (conv has no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.activate = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise ConvModule followed by a pointwise (1x1) ConvModule, both with BN and SiLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, **bn_kwargs):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride, padding,
                                         groups=in_channels, **bn_kwargs)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, **bn_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class ConvModuleWithActivation(ConvModule):
    """mmcv's ConvModule (conv without bias, BatchNorm) with another activation than SiLU, or
    none (`activation=None`, mmcv's `act_cfg=None`); the same state-dict names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, activation: nn.Module | None = None,
                 **bn_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups,
                         **bn_kwargs)
        self.activate = activation if activation is not None else nn.Identity()
