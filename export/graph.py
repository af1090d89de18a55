"""The module that gets exported: a family's detector plus its post-processing, per NMS mode.

Any `models.Detector` works the same way: the network, then the family's `postprocess` to the
task's outputs (`core.tasks`). All modes run the same PyTorch code as `Detector.predict_outputs`,
so the eager module is the reference for the exported graph. `PostprocessGraph` is RTMDet's
decoding and the `onnx` mode's NMS alone, for feeding it any values.
"""
from __future__ import annotations

import torch
from torch import nn

from detdeploy.core.nms import NMSConfig
from detdeploy.core.tasks import NMS_MODES, output_names
from detdeploy.models import Detector
from detdeploy.models.nms import DecodedOutputs, nms_outputs
from detdeploy.models.rtmdet.model import decode_boxes


class DetectorGraph(nn.Module):
    """images [B, 3, H, W] (preprocessed) -> the task's outputs for `nms_mode`, then, with
    `expose_raw`, the network's raw outputs (named by `Detector.raw_output_names`), which the
    exporter uses to name those tensors in the graph.

    Boxes are in network-input pixels, clamped to the input's extent.
    """

    def __init__(self, model: Detector, nms_mode: str, nms: NMSConfig, expose_raw: bool = False):
        super().__init__()
        if nms_mode not in NMS_MODES:
            raise ValueError(f'nms_mode must be one of {NMS_MODES}')
        self.model = model.eval()
        self.nms_mode = nms_mode
        self.nms = nms
        self.expose_raw = expose_raw

    def output_names(self, raw_names: tuple[str, ...] = ()) -> list[str]:
        return [*output_names(self.model.task, self.nms_mode), *raw_names]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model.forward_for(images, self.nms, self.nms_mode)
        outputs = self.model.postprocess(raw, (images.shape[2], images.shape[3]), self.nms,
                                         self.nms_mode)
        if self.expose_raw:
            return (*outputs, *self.model.raw_tensors(raw))
        return outputs


class PostprocessGraph(nn.Module):
    """(scores [B, N, C] after sigmoid, box distances [B, N, 4] px) -> the `onnx` mode's four
    outputs, by the same code as RTMDet's `DetectorGraph` after the network.

    N anchors are the levels' `feature_sizes` concatenated row-major, as RTMDet's
    `decode_outputs` lays them out. The network is left out so that tests can feed the
    post-processing any values (NaN, inf, degenerate boxes) in PyTorch and ONNX Runtime alike.
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
