"""MMDetection's `AnchorGenerator`: base anchors of every scale and ratio per level, shifted to
every feature-map cell.

Same base-anchor arithmetic (float32, ratio-major order with `scale_major`) and the same layout
(row-major cells, the base anchors of a cell together), so anchor i here is mmdet's anchor i.
`grid_anchors` is traceable with symbolic feature sizes. YOLO's and SSD's generators differ and
are not here.
"""
from __future__ import annotations

import numpy as np
import torch


class AnchorGenerator:
    """Anchors per level for `strides` (int or (w, h)), `ratios` (h/w) and either `scales` or
    `octave_base_scale` * 2**(i / `scales_per_octave`); `base_sizes` default to the strides'
    smaller side; `center_offset` in units of the base size."""

    def __init__(self, strides: list[int] | list[tuple[int, int]], ratios: list[float],
                 scales: list[float] | None = None, base_sizes: list[int] | None = None,
                 scale_major: bool = True, octave_base_scale: float | None = None,
                 scales_per_octave: int | None = None, center_offset: float = 0.0):
        if (scales is None) == (octave_base_scale is None or scales_per_octave is None):
            raise ValueError('give either scales or octave_base_scale with scales_per_octave')
        if not 0 <= center_offset <= 1:
            raise ValueError(f'center_offset must be in [0, 1], got {center_offset}')
        self.strides = [(s, s) if isinstance(s, (int, float)) else tuple(s) for s in strides]
        self.base_sizes = (list(base_sizes) if base_sizes is not None
                           else [min(stride) for stride in self.strides])
        if len(self.base_sizes) != len(self.strides):
            raise ValueError('base_sizes and strides must have the same length')
        if scales is None:
            # mmdet computes the octave scales in float64, then stores them as float32
            scales = np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
                              ) * octave_base_scale
        self.scales = torch.tensor(np.asarray(scales, dtype=np.float64), dtype=torch.float32)
        self.ratios = torch.tensor(ratios, dtype=torch.float32)
        self.scale_major = scale_major
        self.center_offset = center_offset
        self.base_anchors = [self._base_anchors(size) for size in self.base_sizes]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> list[int]:
        """Anchors per feature-map cell, per level."""
        return [len(anchors) for anchors in self.base_anchors]

    def _base_anchors(self, base_size: float) -> torch.Tensor:
        """[A, 4] xyxy anchors around the cell's origin (plus `center_offset`), in mmdet's
        arithmetic and order."""
        center = self.center_offset * base_size
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        if self.scale_major:
            widths = (base_size * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
            heights = (base_size * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        else:
            widths = (base_size * self.scales[:, None] * w_ratios[None, :]).reshape(-1)
            heights = (base_size * self.scales[:, None] * h_ratios[None, :]).reshape(-1)
        return torch.stack([center - 0.5 * widths, center - 0.5 * heights,
                            center + 0.5 * widths, center + 0.5 * heights], dim=-1)

    def single_level_grid_anchors(self, featmap_size: tuple[int, int], level: int,
                                  device: torch.device | str | None = None,
                                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[H * W * A, 4]: cell (y, x) row-major, then the level's A base anchors."""
        height, width = featmap_size
        stride_w, stride_h = self.strides[level]
        base_anchors = self.base_anchors[level].to(device=device, dtype=dtype)
        shift_x = torch.arange(width, device=device).to(dtype) * stride_w
        shift_y = torch.arange(height, device=device).to(dtype) * stride_h
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base_anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4)

    def grid_anchors(self, featmap_sizes: list[tuple[int, int]],
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Anchors of every level, [H_l * W_l * A_l, 4] each."""
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f'expected {self.num_levels} feature sizes, got {len(featmap_sizes)}')
        return [self.single_level_grid_anchors(size, level, device, dtype)
                for level, size in enumerate(featmap_sizes)]
