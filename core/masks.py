"""How an instance model's `masks` output is framed, as data: the contract between the model
families (which fill it in), the exporter (which stores it in the metadata) and the host code
that turns mask probabilities into per-detection masks at the original image size.

Two frames:
- `input`: each detection's mask covers the whole padded network input at `stride` input
  pixels per mask pixel (RTMDet-Ins: its prototype's stride, 8); masks are [B, K, H/stride,
  W/stride] probabilities.
- `box`: each detection's mask covers its own box, `size` x `size` probabilities (Mask R-CNN:
  28 x 28 of the detection's class), pasted into the image on the host.
A pixel belongs to a detection when its probability, resampled to the original image, is
strictly above `threshold` (MMDetection's `mask_thr_binary`, 0.5: `sigmoid > 0.5`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MASK_FRAMES = ('input', 'box')


@dataclass(frozen=True)
class MaskConfig:
    frame: str                  # 'input' or 'box'
    stride: int | None = None   # frame 'input': input pixels per mask pixel
    size: int | None = None     # frame 'box': mask side (28)
    threshold: float = 0.5      # binary threshold on the resampled probability

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, values: dict) -> 'MaskConfig':
        if not isinstance(values, dict):
            raise TypeError(f'must be a JSON object, got {type(values).__name__}')
        stride, size = values.get('stride'), values.get('size')
        return cls(frame=str(values['frame']), stride=None if stride is None else int(stride),
                   size=None if size is None else int(size),
                   threshold=float(values.get('threshold', 0.5)))

    def problem(self) -> str | None:
        """What makes these values unusable, or None."""
        if self.frame not in MASK_FRAMES:
            return f"frame '{self.frame}' is not one of {', '.join(MASK_FRAMES)}"
        if self.frame == 'input' and not (self.stride and self.stride >= 1):
            return 'frame input needs a stride of at least 1'
        if self.frame == 'box' and not (self.size and self.size >= 1):
            return 'frame box needs a size of at least 1'
        if not (math.isfinite(self.threshold) and 0 <= self.threshold < 1):
            return f'threshold must be a number in [0, 1), got {self.threshold}'
        return None

    def describe(self) -> str:
        if self.frame == 'input':
            return (f'masks cover the padded input at stride {self.stride}; foreground: '
                    f'probability > {self.threshold:g} after resampling to the image')
        return (f'{self.size}x{self.size} masks cover each detection box; foreground: '
                f'probability > {self.threshold:g} after pasting into the image')
