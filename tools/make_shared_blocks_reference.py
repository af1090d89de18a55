"""Write tests/data/mmdet_shared_blocks_reference.json: MMDetection 3.3.0's anchors and
delta-xywh decoding on fixed inputs, for tests/test_shared_blocks.py.

Not part of the package or CI. Needs MMDetection outside the repo (see
tools/make_mmdet_reference.py):
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/make_shared_blocks_reference.py
"""
import json

import torch

import mmcv_lite_shim

mmcv_lite_shim.install()

import mmdet  # noqa: E402
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder  # noqa: E402
from mmdet.models.task_modules.prior_generators import AnchorGenerator  # noqa: E402

from conftest import DATA_DIR  # noqa: E402

# the anchor generators of the zoo's configs: RetinaNet's head and Faster R-CNN's RPN
ANCHOR_CONFIGS = {
    'retinanet': dict(octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                      strides=[8, 16, 32, 64, 128]),
    'rpn': dict(scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
    'offset_half': dict(scales=[2, 3], ratios=[1.0, 3.0], strides=[(8, 16), 32], center_offset=0.5),
}
FEATURE_SIZES = {'retinanet': [(5, 4), (3, 2), (2, 1), (1, 1), (1, 1)],
                 'rpn': [(6, 5), (3, 3), (2, 2), (1, 1), (1, 1)],
                 'offset_half': [(3, 4), (2, 3)]}


def main() -> None:
    anchors = {}
    for name, cfg in ANCHOR_CONFIGS.items():
        generator = AnchorGenerator(**cfg)
        levels = generator.grid_priors(FEATURE_SIZES[name], device='cpu')
        anchors[name] = {'config': {k: v for k, v in cfg.items()},
                         'feature_sizes': FEATURE_SIZES[name],
                         'num_base_anchors': generator.num_base_anchors,
                         'anchors': [level.tolist() for level in levels]}

    generator = torch.Generator().manual_seed(3)
    xy = torch.rand(40, 2, generator=generator) * 60
    rois = torch.cat([xy, xy + 1 + torch.rand(40, 2, generator=generator) * 40], 1)
    deltas = torch.randn(40, 8, generator=generator) * 1.5
    deltas[0, 2], deltas[1, 3], deltas[2, 6] = 9.0, -9.0, 12.0     # beyond the wh clamp
    decoded = {}
    for name, kwargs, max_shape in [
            ('unit_stds', dict(target_means=[0.0] * 4, target_stds=[1.0] * 4), None),
            ('rcnn_stds_clipped', dict(target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
             (50, 70))]:
        coder = DeltaXYWHBBoxCoder(**kwargs)
        boxes = coder.decode(rois, deltas, max_shape=max_shape)     # [40, 8]: 2 classes
        decoded[name] = {'means': kwargs['target_means'], 'stds': kwargs['target_stds'],
                         'max_shape': max_shape, 'boxes': boxes.tolist()}
    out = DATA_DIR / 'mmdet_shared_blocks_reference.json'
    out.write_text(json.dumps({
        'about': f'MMDetection {mmdet.__version__} AnchorGenerator.grid_priors and '
                 'DeltaXYWHBBoxCoder.decode (per-class deltas [40, 8]) on the inputs stored here; '
                 'written by tools/make_shared_blocks_reference.py',
        'anchors': anchors, 'rois': rois.tolist(), 'deltas': deltas.tolist(),
        'decoded': decoded}))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
