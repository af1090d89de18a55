"""Synthetic weights that behave like trained ones, for tests and benchmarks without a checkpoint.

RTMDet's own initialisation gives near-constant head outputs (every score 0.01, boxes under a
pixel): nothing to compare or time NMS on. `randomize_detector` gives spread scores, real boxes
and normalised features, deterministically. Not for accuracy: these weights detect nothing.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Detector


def make_image(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB image with smooth colour blobs on noise (something for a detector to see)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        y1, x1 = y0 + rng.integers(height // 8, height // 2), x0 + rng.integers(width // 8, width // 2)
        image[y0:y1, x0:x1] = rng.integers(80, 255, 3, dtype=np.uint8)
    return image


def calibration_images(seed: int, count: int = 4, size: int = 320) -> torch.Tensor:
    """Normalised images like the tests' (`make_image`), for measuring BN statistics."""
    images = [make_image(size, size, seed * 100 + i) for i in range(count)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (batch - 120.0) / 58.0


def randomize_detector(model: Detector, seed: int = 0,
                       measured: dict[str, torch.Tensor] | None = None,
                       record: dict[str, torch.Tensor] | None = None) -> Detector:
    """Give a model non-trivial weights, as a trained one has: random BN affine parameters,
    BN statistics measured in eval mode on random images, layer by layer (so features stay
    normalised and keep their spatial variation),
    head towers with He-initialised convs, spread class scores and boxes with positive extent.
    The result depends only on `seed` and the model's initial weights.

    The two calibration passes (BN statistics, the predictors' output spread) are what costs
    time on a large model: `record` receives what they measured, and `measured` (a `record`
    of the same model and seed) replays it without running them, giving the same weights."""
    generator = torch.Generator().manual_seed(seed)
    tower_convs, predictor_kinds, box_bias = model.synthetic_head()
    names = {module: name for name, module in model.named_modules()}
    with torch.no_grad():
        # MMDetection's N(0, 0.01) head init makes head features near constant
        for conv in tower_convs:
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
        batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in batch_norms:
            bn.weight.copy_(1 + 0.1 * torch.randn(bn.num_features, generator=generator))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=generator))

        def measure_statistics(bn, args):      # runs just before each BN, in forward order
            bn.running_mean.copy_(args[0].mean((0, 2, 3)))
            bn.running_var.copy_(args[0].var((0, 2, 3)))
        model.eval()
        if measured is None:
            hooks = [bn.register_forward_pre_hook(measure_statistics) for bn in batch_norms]
            model(calibration_images(seed))
            for hook in hooks:
                hook.remove()
        for bn in batch_norms:
            for stat in ('running_mean', 'running_var'):
                key = f'{names[bn]}.{stat}'
                if measured is not None:
                    getattr(bn, stat).copy_(measured[key])
                if record is not None:
                    record[key] = getattr(bn, stat).clone()
        # Scale the predictors on the features they see, so logits and box terms stay moderate;
        # a predictor shared by the pyramid levels (RetinaNet) is scaled on its widest level.
        predictors = [conv for conv, _ in predictor_kinds]
        features = {}
        if measured is None:
            hooks = [p.register_forward_hook(
                         lambda mod, args, out: features.setdefault(mod, []).append(args[0]))
                     for p in predictors]
            model(calibration_images(seed + 1))
            for hook in hooks:
                hook.remove()
        for predictor, kind in predictor_kinds:
            predictor.weight.normal_(0, 1, generator=generator)
            project = (torch.nn.functional.linear if predictor.weight.dim() == 2
                       else torch.nn.functional.conv2d)      # fully connected or conv heads
            key = f'{names[predictor]}.output_spread'
            spread = (measured[key] if measured is not None else
                      max(project(level, predictor.weight).std() for level in features[predictor]))
            if record is not None:
                record[key] = torch.as_tensor(spread).clone()
            is_logits = kind == 'logits'
            predictor.weight.mul_((1.0 if kind in ('logits', 'angle') else 0.2) / spread)
            if is_logits:
                predictor.bias.copy_(-3 + torch.randn(predictor.weight.shape[0],
                                                      generator=generator))
            else:    # 'box', 'angle' (radians around 0) or 'kernel' (RTMDet-Ins parameters)
                predictor.bias.fill_(box_bias if kind == 'box' else 0.0)
        model.adjust_synthetic_weights(generator)
    return model.eval()
