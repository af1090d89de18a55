"""Faster R-CNN's named sizes (ResNet-50/101 FPN) with MMDetection 3.3.0's hyper-parameters,
preprocessing and NMS presets (configs `faster_rcnn/faster-rcnn_r50/r101_fpn_1x_coco`).

The RPN's test settings (1000 anchors per level, NMS 0.7 per level, 1000 proposals per image)
are the model's constructor defaults and the same for both presets. The presets set the R-CNN
stage: `pre_top_k` caps the (proposal, class) pairs that enter the final per-class NMS.
"""
from __future__ import annotations

from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig

from ..base import ModelSpec
from ..coco_classes import COCO_CLASSES
from .model import FasterRCNN

ALL_PAIRS = 1000 * len(COCO_CLASSES)
EVAL_NMS = NMSConfig(score_thr=0.05, pre_top_k=ALL_PAIRS, iou_thr=0.5, max_det=100)
"""MMDetection's test config (rcnn: score 0.05, NMS 0.5, 100 per image): every (proposal, class)
pair of the 1000 proposals may enter NMS."""
DEPLOY_NMS = NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.5, max_det=100)
"""As the eval preset, but only the best 1000 (proposal, class) pairs above the threshold enter
NMS (a trained model rarely has more; it bounds the NMS's work)."""

PREPROCESSING = PreprocessConfig(input_size=(800, 1333), channel_order='rgb',
                                 mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                                 pad_value=0.0, pad_fill='mean', resize='scale',
                                 pad='divisor', size_divisor=32)
"""Keep-ratio Resize to scale (1333, 800), BGR->RGB, ImageNet mean/std, padding to a multiple
of 32 with 0 after normalising (MMDetection's DetDataPreprocessor)."""

SPECS = tuple(
    ModelSpec(name, FasterRCNN, dict(depth=depth), PREPROCESSING,
              {'eval': EVAL_NMS, 'deploy': DEPLOY_NMS}, COCO_CLASSES)
    for name, depth in (('faster-rcnn-r50', 50), ('faster-rcnn-r101', 101)))
