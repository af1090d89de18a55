"""Per-image detection results in original-image pixels, as numpy arrays, and their JSON form."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageDetections:
    """Detections of one image, best first; boxes are xyxy in original-image pixels."""
    source: str
    image_hw: tuple[int, int]
    boxes_xyxy_px: np.ndarray           # [K, 4] float32
    scores: np.ndarray                  # [K] float32
    labels: np.ndarray                  # [K] int64
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, score_thr: float) -> 'ImageDetections':
        """The detections scoring at least `score_thr`."""
        keep = self.scores >= score_thr
        return ImageDetections(self.source, self.image_hw, self.boxes_xyxy_px[keep],
                               self.scores[keep], self.labels[keep], self.class_names)

    def label_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def to_dict(self) -> dict:
        return {
            'image': self.source,
            'height': int(self.image_hw[0]),
            'width': int(self.image_hw[1]),
            'detections': [
                {'bbox_xyxy': [round(float(v), 3) for v in box], 'score': round(float(score), 6),
                 'label': int(label), 'label_name': self.label_name(int(label))}
                for box, score, label in zip(self.boxes_xyxy_px, self.scores, self.labels)],
        }
