"""YOLOv3-MobileNetV2's named sizes (320 and 416 input) with MMDetection 3.3.0's anchors,
preprocessing and NMS presets (configs `yolov3_mobilenetv2_8xb24-320-300e_coco` and
`yolov3_mobilenetv2_8xb24-ms-416-300e_coco`)."""
from __future__ import annotations

from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig

from ..base import ModelSpec
from ..coco_classes import COCO_CLASSES
from .model import YOLOV3

EVAL_NMS = NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.45, max_det=100,
                     objectness_thr=0.005)
"""The configs' test_cfg (conf_thr 0.005, nms_pre 1000 over all levels, score_thr 0.05 on the
class score, NMS 0.45, max_per_img 100): what the published mAP is measured with. It is already
lean (at most 1000 candidates), so it is the deploy preset too."""
DEPLOY_NMS = EVAL_NMS


def preprocessing(side: int) -> PreprocessConfig:
    """Keep-ratio resize into side x side, pad bottom/right to a multiple of 32 with zeros after
    normalisation (`DetDataPreprocessor`), RGB, ImageNet mean and std (not /255)."""
    return PreprocessConfig(input_size=(side, side), channel_order='rgb',
                            mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                            pad_value=0.0, resize='fit', pad='divisor', size_divisor=32,
                            pad_fill='mean')


# name: input side, anchor sizes (w, h) per level, coarsest (stride 32) first
SIZES = {
    'yolov3-mobilenetv2-320': (320, (((220, 125), (128, 222), (264, 266)),
                                     ((35, 87), (102, 96), (60, 170)),
                                     ((10, 15), (24, 36), (72, 42)))),
    'yolov3-mobilenetv2-416': (416, (((116, 90), (156, 198), (373, 326)),
                                     ((30, 61), (62, 45), (59, 119)),
                                     ((10, 13), (16, 30), (33, 23)))),
}

SPECS = tuple(
    ModelSpec(name, YOLOV3, dict(base_sizes=base_sizes), preprocessing(side),
              {'eval': EVAL_NMS, 'deploy': DEPLOY_NMS}, COCO_CLASSES)
    for name, (side, base_sizes) in SIZES.items())
