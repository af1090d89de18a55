"""The module that gets exported: an RTMDet plus its post-processing, per NMS mode.

`onnx` and `trt` end in one of the NMS custom ops (translated in `onnx_nms.py`); `none` ends
with per-anchor decoded boxes and class scores. All modes run the same PyTorch code as
`RTMDet.predict_outputs`, so the eager module is the reference for the exported graph.
"""
from __future__ import annotations

import torch
from torch import nn

from detdeploy.models import NMSConfig, RTMDet
from detdeploy.models.postprocess import (decode_outputs, dense_candidate_scores,
                                          efficient_nms_op, postprocess, select_candidates)

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
