"""Anchor points of dense heads: the (x, y) of every feature-map cell, level by level.

Offset 0 (MMDetection's `MlvlPointGenerator(offset=0)`, used by RTMDet); anchors with sizes
belong to the families that use them.
"""
from __future__ import annotations

import torch


def grid_priors(feature_sizes: list[tuple[int, int]], strides: tuple[int, ...],
                device: torch.device | None = None, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """Anchor points (x, y) of every level, row-major within a level, offset 0: [sum(H*W), 2]."""
    points = []
    for (height, width), stride in zip(feature_sizes, strides):
        shift_x = torch.arange(width, device=device, dtype=dtype) * stride
        shift_y = torch.arange(height, device=device, dtype=dtype) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
    return torch.cat(points)


def grid_priors_with_strides(feature_sizes: list[tuple[int, int]], strides: tuple[int, ...],
                             device: torch.device | None = None) -> torch.Tensor:
    """[A, 4]: x, y, stride, stride of every anchor point, levels concatenated (the form
    MMDetection's assigners take)."""
    points = grid_priors(feature_sizes, strides, device)
    level_strides = torch.cat([points.new_full((h * w,), float(stride))
                               for (h, w), stride in zip(feature_sizes, strides)])
    return torch.cat([points, level_strides[:, None], level_strides[:, None]], dim=1)
