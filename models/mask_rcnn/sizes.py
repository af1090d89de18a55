"""Mask R-CNN's named size (ResNet-50 FPN) with MMDetection 3.3.0's hyper-parameters
(config `mask_rcnn/mask-rcnn_r50_fpn_1x_coco`): Faster R-CNN's preprocessing and NMS presets
(the same RPN and R-CNN test settings), plus the mask threshold 0.5 of the model's
`mask_config`.
"""
from __future__ import annotations

from ..base import ModelSpec
from ..coco_classes import COCO_CLASSES
from ..faster_rcnn.sizes import DEPLOY_NMS, EVAL_NMS, PREPROCESSING
from .model import MaskRCNN

SPECS = (ModelSpec('mask-rcnn-r50', MaskRCNN, dict(depth=50), PREPROCESSING,
                   {'eval': EVAL_NMS, 'deploy': DEPLOY_NMS}, COCO_CLASSES),)
