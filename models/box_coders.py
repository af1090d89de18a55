"""Box coders: turn a head's regression outputs at anchor points into boxes.

`distance2bbox` is MMDetection's `DistancePointBBoxCoder.decode` (RTMDet, and the distance part
of rotated RTMDet's coder); other coders (delta-xywh for RetinaNet and Faster R-CNN, YOLO's)
belong beside it.
"""
from __future__ import annotations

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
