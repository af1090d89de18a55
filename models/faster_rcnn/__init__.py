"""Faster R-CNN R50/R101-FPN: the model, its RPN and RoI head, named sizes and presets."""
from .model import FasterRCNN, RawOutputs, decode_rois
from .sizes import DEPLOY_NMS, EVAL_NMS, SPECS

__all__ = ['DEPLOY_NMS', 'EVAL_NMS', 'FasterRCNN', 'RawOutputs', 'SPECS', 'decode_rois']
