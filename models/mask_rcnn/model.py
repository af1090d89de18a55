"""Mask R-CNN (ResNet-FPN) in plain PyTorch: Faster R-CNN plus MMDetection's mask branch, run as
its `StandardRoIHead.predict` does, on the final detections.

The box part is `FasterRCNN` unchanged; the final per-class NMS (either NMS mode) gives boxes
and labels, the mask head pools those boxes (14 x 14, the box branch's level mapping) and keeps
each detection's class channel: 28 x 28 mask logits per detection. Because the mask head
follows the final NMS, `forward_for` runs the NMS (and `forward` with the deploy preset, so
that parity sees the mask logits as raw outputs). Pasting into the image is the host's job;
training is not here.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from detdeploy.core.masks import MaskConfig
from detdeploy.core.nms import NMSConfig
from detdeploy.core.tasks import INSTANCE

from ..faster_rcnn import DEPLOY_NMS, FasterRCNN, RawOutputs
from ..faster_rcnn.model import PROPOSAL_PAIRING_PX, MIN_PAIRED_PROPOSALS
from .mask_head import MASK_SIZE, MaskRoIHead

MASK_THRESHOLD = 0.5
"""MMDetection's `mask_thr_binary`."""
MASK_NMS_MODES = ('onnx', 'trt')


class MaskRawOutputs(NamedTuple):
    """Faster R-CNN's raw outputs (`box`), the final detections of the NMS settings the mask
    head ran after (`nms`, `nms_mode`: num_dets, boxes, scores, labels) and the mask logits of
    each detection's class [B, K, 28, 28]. `feats` (the FPN levels) let `postprocess` rerun
    the mask head after other NMS settings."""
    box: RawOutputs
    feats: tuple[torch.Tensor, ...]
    nms: NMSConfig
    nms_mode: str
    detections: tuple[torch.Tensor, ...]
    mask_logits: torch.Tensor


class MaskRCNN(FasterRCNN):
    """Mask R-CNN with a ResNet-FPN backbone: `forward_for` gives both stages' raw outputs and
    the mask logits of the final detections, `postprocess` the `instance` task's outputs."""

    family = 'mask_rcnn'
    task = INSTANCE
    roi_head_class = MaskRoIHead

    @property
    def mask_config(self) -> MaskConfig:
        return MaskConfig('box', size=MASK_SIZE, threshold=MASK_THRESHOLD)

    forward_nms: NMSConfig = DEPLOY_NMS
    """The final NMS `forward` runs before the mask head (the `onnx` mode): the deploy preset,
    which `parity` compares raw outputs after; lower `max_det` to make `forward` cheaper (the
    mask head costs about 1 GFLOP per detection)."""

    def forward(self, images: torch.Tensor) -> MaskRawOutputs:
        """Both stages with the `forward_nms` final NMS, then the mask head."""
        return self.forward_for(images, self.forward_nms, 'onnx')

    def forward_for(self, images: torch.Tensor, nms: NMSConfig, nms_mode: str
                    ) -> MaskRawOutputs:
        input_hw = (images.shape[2], images.shape[3])
        feats = self.neck(self.backbone(images))
        box = self.box_stages(feats, input_hw)
        detections, mask_logits = self._detect_and_segment(box, feats, input_hw, nms, nms_mode)
        return MaskRawOutputs(box, feats, nms, nms_mode, detections, mask_logits)

    def _detect_and_segment(self, box: RawOutputs, feats: tuple[torch.Tensor, ...],
                            input_hw: tuple[int, int], nms: NMSConfig, nms_mode: str
                            ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if nms_mode not in MASK_NMS_MODES:
            raise ValueError(f'Mask R-CNN runs its mask head after NMS: nms_mode must be one '
                             f'of {MASK_NMS_MODES}')
        detections = tuple(FasterRCNN.postprocess(self, box, input_hw, nms, nms_mode))
        _, boxes, _, labels = detections
        return detections, self.roi_head.mask_logits(feats, boxes, labels)

    @property
    def raw_output_names(self) -> tuple[str, ...]:
        return (*super().raw_output_names, 'mask_rois', 'mask_logits')

    def raw_tensors(self, raw: MaskRawOutputs) -> tuple[torch.Tensor, ...]:
        return (*super().raw_tensors(raw.box), raw.detections[1], raw.mask_logits)

    def postprocess(self, raw: MaskRawOutputs, input_hw: tuple[int, int], nms: NMSConfig,
                    nms_mode: str) -> tuple[torch.Tensor, ...]:
        """num_dets, boxes, scores, labels as Faster R-CNN's, and masks [B, K, 28, 28]: the
        sigmoid of each detection's class logits, 0 on padding rows. The mask head reruns if
        `raw` followed other NMS settings."""
        detections, mask_logits = raw.detections, raw.mask_logits
        if (raw.nms, raw.nms_mode) != (nms, nms_mode):
            detections, mask_logits = self._detect_and_segment(raw.box, raw.feats, input_hw,
                                                               nms, nms_mode)
        num_dets = detections[0]
        row = torch.arange(mask_logits.shape[1], device=mask_logits.device)
        is_detection = (row[None, :] < num_dets)[..., None, None]
        masks = torch.where(is_detection, mask_logits.sigmoid(), torch.zeros_like(mask_logits))
        return (*detections, masks)

    def paired_raw_outputs(self, got: dict, want: dict) -> tuple[dict, dict, str | None]:
        """Faster R-CNN's proposal pairing, then the mask rows paired by their box
        (`mask_rois` within `PROPOSAL_PAIRING_PX`): the two sides' final NMS may keep
        near-tied detections in another order, or (other NMS settings in the file than
        PyTorch's deploy preset) other detections; rows are compared for the detections both
        kept, unless fewer than `MIN_PAIRED_PROPOSALS` of the smaller side's pair."""
        got, want, note = super().paired_raw_outputs(got, want)
        if 'mask_rois' not in want or 'mask_rois' not in got:
            return got, want, note
        want_boxes, got_boxes = want['mask_rois'], got['mask_rois']
        want_valid = np.nonzero((want_boxes[:, 2:] > want_boxes[:, :2]).all(1))[0]
        got_valid = np.nonzero((got_boxes[:, 2:] > got_boxes[:, :2]).all(1))[0]
        if len(want_valid) == 0 or len(got_valid) == 0:
            return got, want, note
        distance = np.abs(want_boxes[want_valid, None, :] - got_boxes[None, got_valid, :]).max(-1)
        nearest = distance.argmin(1)
        is_paired = distance[np.arange(len(want_valid)), nearest] <= PROPOSAL_PAIRING_PX
        want_rows = np.nonzero(is_paired)[0]
        got_rows, first = np.unique(nearest[want_rows], return_index=True)
        want_rows, got_rows = want_valid[want_rows[first]], got_valid[got_rows]
        if len(want_rows) < MIN_PAIRED_PROPOSALS * min(len(want_valid), len(got_valid)):
            return got, want, note
        rows = {'mask_rois', 'mask_logits'}
        got = {name: value[got_rows] if name in rows else value for name, value in got.items()}
        want = {name: value[want_rows] if name in rows else value
                for name, value in want.items()}
        mask_note = (f'mask rows compared for the {len(want_rows)} detections both sides kept '
                     f'(of {len(want_valid)})')
        return got, want, f'{note}; {mask_note}' if note else mask_note

    def synthetic_head(self) -> tuple[list[nn.Module], list[tuple[nn.Module, str]], float]:
        towers, predictors, box_bias = super().synthetic_head()
        mask_head = self.roi_head.mask_head
        towers = [*towers, *(conv.conv for conv in mask_head.convs), mask_head.upsample]
        return towers, [*predictors, (mask_head.conv_logits, 'logits')], box_bias

    def adjust_synthetic_weights(self, generator: torch.Generator) -> None:
        """Mask logits of spread 3 around 0 (not the classifiers' -3 prior), so that masks
        cover part of each box with a clear edge rather than nothing."""
        conv_logits = self.roi_head.mask_head.conv_logits
        conv_logits.weight.mul_(3.0)
        conv_logits.bias.copy_(0.5 * torch.randn(conv_logits.bias.shape[0], generator=generator))
