"""The module that gets exported: an RTMDet plus its post-processing, per NMS mode.

`onnx` and `trt` end in one of the NMS custom ops (translated in `onnx_nms.py`); `none` ends
with per-anchor decoded boxes and class scores. All modes run the same PyTorch code as
`RTMDet.predict_outputs`, so the eager module is the reference for the exported graph.
`PostprocessGraph` is the `onnx` mode's post-processing alone, for feeding it any values.
"""
from __future__ import annotations

import torch
from torch import nn

from detdeploy.models import NMSConfig, RTMDet
from detdeploy.models.postprocess import (DecodedOutputs, decode_boxes, decode_outputs,
                                          dense_candidate_scores, efficient_nms_op, nms_outputs,
                                          postprocess, select_candidates)

NMS_MODES = ('onnx', 'trt', 'none')
OUTPUT_NAMES = {
    'onnx': ('num_dets', 'boxes', 'scores', 'labels'),
    'trt': ('num_dets', 'boxes', 'scores', 'labels'),
    'none': ('boxes', 'scores'),
}


class DetectorGraph(nn.Module):
    """images [B, 3, H, W] (preprocessed) -> the outputs of `OUTPUT_NAMES[nms_mode]`.

    Boxes are xyxy in network-input pixels, clamped to the input's extent.
    """

    def __init__(self, model: RTMDet, nms_mode: str, nms: NMSConfig):
        super().__init__()
        if nms_mode not in NMS_MODES:
            raise ValueError(f'nms_mode must be one of {NMS_MODES}')
        self.model = model.eval()
        self.nms_mode = nms_mode
        self.nms = nms

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model(images)
        clamp_hw = (images.shape[2], images.shape[3])
        if self.nms_mode == 'onnx':
            return tuple(postprocess(raw, self.model.strides, clamp_hw, self.nms))
        decoded = decode_outputs(raw, self.model.strides, clamp_hw)
        if self.nms_mode == 'none':
            return decoded.boxes, decoded.scores
        candidates = select_candidates(decoded, self.nms.score_thr, self.nms.pre_top_k)
        dense_scores = dense_candidate_scores(candidates, decoded.boxes.shape[1],
                                              decoded.scores.shape[2])
        return efficient_nms_op(decoded.boxes, dense_scores, self.nms.score_thr,
                                self.nms.iou_thr, self.nms.max_det)


class PostprocessGraph(nn.Module):
    """(scores [B, N, C] after sigmoid, box distances [B, N, 4] px) -> the `onnx` mode's four
    outputs, by the same code as `DetectorGraph` after the network.

    N anchors are the levels' `feature_sizes` concatenated row-major, as `decode_outputs` lays
    them out. The network is left out so that tests can feed the post-processing any values
    (NaN, inf, degenerate boxes) in PyTorch and ONNX Runtime alike.
    """

    def __init__(self, feature_sizes: list[tuple[int, int]], strides: tuple[int, ...],
                 clamp_hw: tuple[int, int], nms: NMSConfig):
        super().__init__()
        self.feature_sizes = [tuple(size) for size in feature_sizes]
        self.strides = tuple(strides)
        self.clamp_hw = tuple(clamp_hw)
        self.nms = nms

    @property
    def num_anchors(self) -> int:
        return sum(height * width for height, width in self.feature_sizes)

    def forward(self, scores: torch.Tensor, distances: torch.Tensor) -> tuple[torch.Tensor, ...]:
        boxes = decode_boxes(distances, self.feature_sizes, self.strides, self.clamp_hw)
        decoded = DecodedOutputs(boxes, scores, [h * w for h, w in self.feature_sizes])
        return tuple(nms_outputs(decoded, self.nms))
