"""Mask R-CNN R50-FPN: Faster R-CNN with MMDetection's FCN mask head on the final detections."""
from .mask_head import MASK_SIZE, FCNMaskHead, MaskRoIHead
from .model import MaskRawOutputs, MaskRCNN
from .sizes import SPECS

__all__ = ['FCNMaskHead', 'MASK_SIZE', 'MaskRCNN', 'MaskRawOutputs', 'MaskRoIHead', 'SPECS']
