"""The PyTorch backend: runs a `detdeploy.models` detector on a preprocessed numpy batch.

It is the reference every exported model is compared with; the only module of `runtimes`
that imports torch.
"""
from __future__ import annotations

import numpy as np
import torch

from detdeploy.models import LoadedDetector, NMSConfig

from .preprocess import PreprocessConfig


class TorchBackend:
    """Run a loaded PyTorch detector; boxes come back in network-input pixels."""

    name = 'torch'

    def __init__(self, detector: LoadedDetector, nms: NMSConfig | None = None,
                 device: str = 'cpu', preprocess_config: PreprocessConfig | None = None):
        self.detector = detector
        self.nms = nms or detector.spec.test_nms
        self._preprocess_config = preprocess_config or detector.spec.preprocessing
        self.device = torch.device(device)
        self.model = detector.model.to(self.device).eval()

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self._preprocess_config

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.detector.class_names

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The four NMS outputs (num_dets, boxes, scores, labels) for a [B, 3, H, W] float32
        batch; boxes in network-input pixels, clamped to the input's extent."""
        images = torch.from_numpy(batch).to(self.device)
        outputs = self.model.predict_outputs(images, self.nms)
        return tuple(tensor.cpu().numpy() for tensor in outputs)
