"""How an image becomes a network input, as data: resize policy, padding, pad value, channel
order, pixel scaling and mean/std, and the size divisor the network needs.

Stored in every exported file's metadata and in every registry model's spec. The geometry
(what size an image is resized and padded to) is computed here; the pixel work is numpy code in
`detdeploy.runtimes.preprocess`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import DetdeployError
from .memory import format_bytes, image_batch_bytes, memory_limit_bytes

RESIZE_MODES = ('fit', 'scale', 'stretch')
"""fit: keep the ratio, fit inside input_size (RTMDet, YOLO); scale: keep the ratio, MMDetection's
`scale=(long, short)` rule (long side at most the larger, short side at most the smaller value of
input_size); stretch: resize to input_size exactly."""
PAD_MODES = ('fixed', 'divisor')
"""fixed: pad bottom/right to input_size; divisor: pad bottom/right to the next multiple of
size_divisor (a batch is padded to its largest image)."""
CHANNEL_ORDERS = ('rgb', 'bgr')
PAD_FILLS = ('value', 'mean')
"""value: padding holds the raw pixel value pad_value (MMDetection's `Pad` transform, RTMDet);
mean: padding is 0 after normalisation, i.e. the channel means (MMDetection's
`DetDataPreprocessor` padding to pad_size_divisor, which pads the normalised batch with 0)."""


def check_input_size(input_hw: tuple[int, int], size_divisor: int,
                     flag: str = '--input-size') -> None:
    """The one rule for a network input size, wherever it comes from (a flag of infer, export
    or bench, a file's metadata or graph, a checkpoint): both sides positive multiples of the
    network's size divisor, and one image's input fitting in memory; or a one-line error."""
    problem = input_size_problem(input_hw, size_divisor)
    if problem:
        shown = 'x'.join(str(side) for side in input_hw)
        raise DetdeployError(f'{flag} {shown}: {problem}')


def input_size_problem(input_hw, size_divisor: int) -> str | None:
    if len(input_hw) != 2 or any(not isinstance(side, int) or isinstance(side, bool)
                                 or side <= 0 or side % size_divisor for side in input_hw):
        return f'both sides must be positive multiples of {size_divisor}'
    needed = image_batch_bytes(1, *input_hw)
    limit = memory_limit_bytes()
    if limit is not None and needed > limit:
        return (f'one image\'s network input alone needs {format_bytes(needed)} of memory, '
                f'more than this machine has ({format_bytes(limit)})')
    return None


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing of one model; defaults are RTMDet's (MMDetection 3.3.0 configs)."""
    input_size: tuple[int, int] = (640, 640)        # network input (height, width); see resize
    channel_order: str = 'bgr'                       # channel order the network expects
    mean: tuple[float, float, float] = (103.53, 116.28, 123.675)   # in channel_order
    std: tuple[float, float, float] = (57.375, 57.12, 58.395)
    pad_value: float = 114.0                         # raw pixel value of the padding
    resize: str = 'fit'                              # one of RESIZE_MODES
    pad: str = 'fixed'                               # one of PAD_MODES
    size_divisor: int = 32                           # input sides are multiples of this
    pixel_scale: float = 1.0                         # raw pixels are multiplied by it first
    pad_fill: str = 'value'                          # one of PAD_FILLS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> 'PreprocessConfig':
        """From `to_dict`'s form; keys added since a file was written take their defaults."""
        if not isinstance(values, dict):
            raise TypeError(f'must be a JSON object, got {type(values).__name__}')
        defaults = cls()
        return cls(input_size=tuple(values['input_size']), channel_order=values['channel_order'],
                   mean=tuple(values['mean']), std=tuple(values['std']),
                   pad_value=float(values['pad_value']),
                   resize=values.get('resize', defaults.resize),
                   pad=values.get('pad', defaults.pad),
                   size_divisor=int(values.get('size_divisor', defaults.size_divisor)),
                   pixel_scale=float(values.get('pixel_scale', defaults.pixel_scale)),
                   pad_fill=values.get('pad_fill', defaults.pad_fill))

    def problem(self) -> str | None:
        """What makes these values unusable (hand-edited metadata, bad flags), or None."""
        if self.resize not in RESIZE_MODES:
            return f"resize '{self.resize}' is not one of {', '.join(RESIZE_MODES)}"
        if self.pad not in PAD_MODES:
            return f"pad '{self.pad}' is not one of {', '.join(PAD_MODES)}"
        if self.pad_fill not in PAD_FILLS:
            return f"pad_fill '{self.pad_fill}' is not one of {', '.join(PAD_FILLS)}"
        if not isinstance(self.size_divisor, int) or self.size_divisor < 1:
            return f'size_divisor {self.size_divisor} is not a positive integer'
        if len(self.input_size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                and v > 0 for v in self.input_size):
            return f'input_size {list(self.input_size)} is not two positive integers'
        if self.pad == 'fixed' and any(v % self.size_divisor for v in self.input_size):
            return (f'input_size {list(self.input_size)} is not a multiple of size_divisor '
                    f'{self.size_divisor}')
        problem = input_size_problem(self.input_size, 1)
        if problem:
            return f'input_size {list(self.input_size)}: {problem}'
        if self.channel_order not in CHANNEL_ORDERS:
            return f"channel_order '{self.channel_order}' is not rgb or bgr"
        if len(self.mean) != 3 or len(self.std) != 3:
            return 'mean and std need three values each'
        if not _finite((*self.mean, *self.std, self.pad_value, self.pixel_scale)):
            return 'mean, std, pad_value and pixel_scale must be finite numbers'
        if not all(v > 0 for v in self.std) or self.pixel_scale <= 0:
            return 'std and pixel_scale must be above 0'
        return None

    def with_input_size(self, input_hw: tuple[int, int] | None,
                        flag: str = '--input-size') -> 'PreprocessConfig':
        """The same preprocessing at another network input size (checked against the size
        divisor); None keeps this one. The one place an input size is replaced."""
        if input_hw is None or tuple(input_hw) == tuple(self.input_size):
            return self
        check_input_size(tuple(input_hw), self.size_divisor, flag)
        return replace(self, input_size=tuple(input_hw))

    def resized_size(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) an image of `original_hw` is resized to, sides rounded half up as
        mmcv's `rescale_size` does. A side never rounds to 0 (a 1x2000 image keeps one row)."""
        height, width = original_hw
        target_h, target_w = self.input_size
        if self.resize == 'stretch':
            return target_h, target_w
        if self.resize == 'fit':
            scale = min(target_h / height, target_w / width)
        else:   # 'scale': MMDetection keep_ratio with scale=(long edge, short edge)
            long_edge, short_edge = max(self.input_size), min(self.input_size)
            scale = min(long_edge / max(height, width), short_edge / min(height, width))
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def canvas_size(self, resized_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the padded network input holding an image resized to
        `resized_hw`."""
        if self.pad == 'fixed':
            return tuple(self.input_size)
        divisor = self.size_divisor
        return tuple(-(-side // divisor) * divisor for side in resized_hw)
