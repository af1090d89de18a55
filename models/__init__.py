"""PyTorch detectors with MMDetection 3.x state-dict names, their registry and loading.

Families live in their own folders (`rtmdet/`) over shared blocks (`conv_modules`, `csp_layers`,
`priors`, `box_coders`, `nms`, `losses`); `base.Detector` is what each family provides.
Imports `detdeploy.core` and torch, never `runtimes`, `export` or the CLI.
"""
from .base import Detector, ModelSpec
from .checkpoint import LoadedDetector, load_detector, read_checkpoint, save_checkpoint
from .nms import DetectionOutputs, Detections, split_detections
from .registry import MODEL_SPECS, build_model, get_spec, model_names

__all__ = ['DetectionOutputs', 'Detections', 'Detector', 'LoadedDetector', 'MODEL_SPECS',
           'ModelSpec', 'build_model', 'get_spec', 'load_detector', 'model_names',
           'read_checkpoint', 'save_checkpoint', 'split_detections']
