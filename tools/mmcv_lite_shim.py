"""Make MMDetection 3.3.0 importable on mmcv-lite (no compiled ops) for the tools/ reference scripts.

`install()` puts a `mmcv._ext` module in place whose kernels are Python ports of mmcv's CPU
kernels (NMS, and RoIAlign on torchvision's; a family needing another kernel adds its port here).
Not part of the package.
"""
import os
import sys
import types

import torch


def nms_kernel(boxes, scores, iou_threshold, offset):
    """mmcv 2.1 nms_cpu: unstable descending sort, suppress where IoU > threshold."""
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = scores.sort(0, descending=True)[1]
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if not keep[i]:
            continue
        a, rest = order[i], order[i + 1:]
        width = (torch.minimum(x2[a], x2[rest]) - torch.maximum(x1[a], x1[rest]) + offset).clamp(min=0)
        height = (torch.minimum(y2[a], y2[rest]) - torch.maximum(y1[a], y1[rest]) + offset).clamp(min=0)
        inter = width * height
        keep[i + 1:] &= ~(inter / (areas[a] + areas[rest] - inter) > float(iou_threshold))
    return order[keep]


def roi_align_kernel(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                     spatial_scale, sampling_ratio, pool_mode, aligned):
    """mmcv 2.1 roi_align_forward, average mode, by `torchvision.ops.roi_align`: both are
    Detectron's RoIAlign (adaptive sampling grid ceil(roi_size / output_size) when
    sampling_ratio is 0, half-pixel offset when aligned, bilinear sampling with the same border
    rules, the average over max(samples, 1))."""
    import torchvision
    if pool_mode != 1:       # mmcv's RoIAlign passes 0 for 'max', 1 for 'avg'
        raise NotImplementedError('roi_align_forward: only pool_mode avg is ported')
    output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width),
                                           spatial_scale, sampling_ratio, aligned))


def missing_kernel(name):
    if name.startswith('__'):
        raise AttributeError(name)

    def fail(*args, **kwargs):
        raise NotImplementedError(f'mmcv._ext.{name} is not available (mmcv-lite)')
    return fail


def install(**kernels) -> types.ModuleType:
    """Install the stub `mmcv._ext` (before importing mmdet); extra kernels by name."""
    ext = types.ModuleType('mmcv._ext')
    ext.nms = nms_kernel
    ext.roi_align_forward = roi_align_kernel
    for name, kernel in kernels.items():
        setattr(ext, name, kernel)
    ext.__getattr__ = missing_kernel         # mmcv.ops checks every kernel exists at import
    sys.modules['mmcv._ext'] = ext
    return ext


def syncbn_to_bn(cfg):
    """Official configs use SyncBN, which needs a process group: BN computes the same in eval."""
    if isinstance(cfg, dict):
        if cfg.get('type') == 'SyncBN':
            cfg['type'] = 'BN'
        for value in cfg.values():
            syncbn_to_bn(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            syncbn_to_bn(value)


def config_path(relative: str) -> str:
    """Path of an official config shipped inside the mmdet package, e.g. 'rtmdet/rtmdet_tiny_8xb32-300e_coco.py'."""
    import mmdet
    return os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', relative)
