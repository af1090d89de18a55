"""YOLOv3's anchors and box coding: MMDetection's `YOLOAnchorGenerator` and `YOLOBBoxCoder.decode`.

Anchors are boxes of fixed sizes per level centred on each cell's centre; a prediction moves the
centre within its cell and scales the anchor's size. Encoding (for training) is not here.
"""
from __future__ import annotations

import torch


def yolo_level_anchors(feature_size: tuple[int, int], stride: int,
                       base_sizes: tuple[tuple[int, int], ...], device: torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One level's anchors [H * W * A, 4] xyxy px: row-major cells, the A sizes (w, h) of each
    cell together, centred at (x + stride / 2, y + stride / 2) as `YOLOAnchorGenerator`."""
    height, width = feature_size
    centre = stride / 2.0
    base = torch.tensor([[centre - 0.5 * w, centre - 0.5 * h, centre + 0.5 * w, centre + 0.5 * h]
                         for w, h in base_sizes], device=device, dtype=dtype)
    shift_x = torch.arange(width, device=device).to(dtype) * stride
    shift_y = torch.arange(height, device=device).to(dtype) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1)
    return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def yolo_decode(anchors: torch.Tensor, centre_offsets: torch.Tensor, log_scales: torch.Tensor,
                stride: int) -> torch.Tensor:
    """`YOLOBBoxCoder.decode`: anchors [..., 4] xyxy, centre offsets in the cell after sigmoid
    [..., 2] (0.5 = the anchor's centre), log size ratios [..., 2] -> boxes [..., 4] xyxy px.
    Not clamped to the image, as MMDetection's YOLOv3 does not clamp them."""
    centres = (anchors[..., :2] + anchors[..., 2:]) * 0.5 + (centre_offsets - 0.5) * stride
    half_sizes = (anchors[..., 2:] - anchors[..., :2]) * 0.5 * log_scales.exp()
    return torch.cat([centres - half_sizes, centres + half_sizes], dim=-1)
