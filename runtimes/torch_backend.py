"""The PyTorch backend: runs a `detdeploy.models` detector on a preprocessed numpy batch.

It is the reference every exported model is compared with, and the only module of `runtimes`
that imports torch. Its metadata is what an export of the same model would carry, so host code
treats it like a file.
"""
from __future__ import annotations

import numpy as np
import torch

from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.models import LoadedDetector

from .backend import Backend


class TorchBackend(Backend):
    """Run a loaded PyTorch detector in eager mode; outputs as the `onnx` NMS mode's."""

    name = 'torch'

    def __init__(self, detector: LoadedDetector, nms: NMSConfig | None = None,
                 device: str = 'cpu', preprocess_config: PreprocessConfig | None = None):
        """`nms` defaults to the model's deploy preset, as `detdeploy export` does."""
        self.detector = detector
        self.nms = nms or detector.spec.nms('deploy')
        self.metadata = detector.metadata(self.nms, 'onnx', preprocess_config)
        self.device = torch.device(device)
        self.model = detector.model.to(self.device).eval()

    def describe(self) -> dict:
        return {'backend': self.name, 'device': str(self.device),
                'providers': [f'torch {self.device}'],
                'threads': {'torch_intra_op': torch.get_num_threads(),
                            'torch_inter_op': torch.get_num_interop_threads()},
                'weights': self.detector.source, 'nms_mode': 'torch (eager)',
                'arch': self.detector.spec.name}

    def synchronize(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The task's `onnx`-mode outputs (num_dets, boxes, scores, labels; instance models:
        and masks); boxes in network-input pixels, clamped to the input's extent."""
        images = torch.from_numpy(batch).to(self.device)
        outputs = self.model.predict_outputs(images, self.nms)
        return [tensor.cpu().numpy() for tensor in outputs]
