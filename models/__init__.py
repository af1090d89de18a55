"""PyTorch detectors (RTMDet tiny..x) with MMDetection 3.x state-dict names, and their loading."""
from .checkpoint import LoadedDetector, load_detector, read_checkpoint, save_checkpoint
from .postprocess import (DEPLOY_NMS, EVAL_NMS, DetectionOutputs, Detections, NMSConfig,
                          RawOutputs)
from .registry import MODEL_SPECS, ModelSpec, build_model, get_spec, model_names
from .rtmdet import RTMDet

__all__ = ['DEPLOY_NMS', 'EVAL_NMS', 'DetectionOutputs', 'Detections', 'LoadedDetector',
           'MODEL_SPECS', 'ModelSpec', 'NMSConfig', 'RTMDet', 'RawOutputs', 'build_model',
           'get_spec', 'load_detector', 'model_names', 'read_checkpoint', 'save_checkpoint']
