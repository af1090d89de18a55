"""YOLOv3-MobileNetV2 (320, 416): the model, its anchors and box coding, named sizes, presets."""
from .model import YOLOV3, RawOutputs, YOLODecoded, decode_outputs, yolo_outputs
from .sizes import DEPLOY_NMS, EVAL_NMS, SPECS

__all__ = ['DEPLOY_NMS', 'EVAL_NMS', 'RawOutputs', 'SPECS', 'YOLODecoded', 'YOLOV3',
           'decode_outputs', 'yolo_outputs']
