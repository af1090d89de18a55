"""Box coders: turn a head's regression outputs at anchor points into boxes.

`distance2bbox` is MMDetection's `DistancePointBBoxCoder.decode` (RTMDet, and the distance part
of rotated RTMDet's coder); `delta2bbox` its `DeltaXYWHBBoxCoder.decode` (RetinaNet, Faster
R-CNN). Encoding (training targets) is not here.
"""
from __future__ import annotations

import numpy as np
import torch


def distance2bbox(points: torch.Tensor, distances: torch.Tensor,
                  max_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode (left, top, right, bottom) distances from points to xyxy boxes.

    With `max_shape` (height, width), x is clamped to [0, width] and y to [0, height]. A NaN
    distance gives a NaN coordinate (clamping keeps NaN, in PyTorch and in ONNX `Clip`); +-inf
    ones are clamped to the edges.
    """
    x1 = points[..., 0] - distances[..., 0]
    y1 = points[..., 1] - distances[..., 1]
    x2 = points[..., 0] + distances[..., 2]
    y2 = points[..., 1] + distances[..., 3]
    if max_shape is not None:
        height, width = max_shape
        x1, x2 = x1.clamp(0, width), x2.clamp(0, width)
        y1, y2 = y1.clamp(0, height), y2.clamp(0, height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def delta2bbox(rois: torch.Tensor, deltas: torch.Tensor,
               means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
               stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
               max_shape: tuple[int, int] | None = None, wh_ratio_clip: float = 16 / 1000,
               clip_border: bool = True) -> torch.Tensor:
    """MMDetection's `DeltaXYWHBBoxCoder.decode`: (dx, dy, dw, dh) deltas [..., 4] applied to
    xyxy `rois` [..., 4] (broadcast: per-class deltas [N, C, 4] take rois [N, 1, 4]).

    Deltas are de-normalised (`* stds + means`), dw and dh clamped to |log(wh_ratio_clip)|;
    with `clip_border` and `max_shape` (height, width), x is clamped to [0, width] and y to
    [0, height]. Same operation order as mmdet, so float32 results agree bit for bit.
    """
    means_t = deltas.new_tensor(means)
    stds_t = deltas.new_tensor(stds)
    denorm_deltas = deltas * stds_t + means_t
    dxy, dwh = denorm_deltas[..., :2], denorm_deltas[..., 2:]
    pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
    pwh = rois[..., 2:] - rois[..., :2]
    dxy_wh = pwh * dxy
    max_ratio = float(np.abs(np.log(wh_ratio_clip)))
    dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    x1y1 = gxy - gwh * 0.5
    x2y2 = gxy + gwh * 0.5
    if clip_border and max_shape is not None:
        height, width = max_shape
        x1y1 = torch.stack([x1y1[..., 0].clamp(0, width), x1y1[..., 1].clamp(0, height)], -1)
        x2y2 = torch.stack([x2y2[..., 0].clamp(0, width), x2y2[..., 1].clamp(0, height)], -1)
    return torch.cat([x1y1, x2y2], dim=-1)
