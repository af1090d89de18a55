"""The blocks the zoo's families share (ResNet, FPN, anchors, delta-xywh decoding) against
MMDetection 3.3.0: state-dict keys and shapes from its key lists, numbers from
tests/data/mmdet_shared_blocks_reference.json (tools/make_shared_blocks_reference.py)."""
import json
import re

import pytest
import torch

from conftest import DATA_DIR, SPEC_DIR
from detdeploy.models.anchors import AnchorGenerator
from detdeploy.models.box_coders import delta2bbox
from detdeploy.models.fpn import FPN
from detdeploy.models.resnet import ResNet

REFERENCE = json.loads((DATA_DIR / 'mmdet_shared_blocks_reference.json').read_text())


def spec_part(key_list: str, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    keys = {}
    for line in (SPEC_DIR / key_list).read_text().splitlines()[1:]:
        key, shape, dtype = line.split('\t')
        if key.startswith(prefix):
            keys[key[len(prefix):]] = (tuple(int(d) for d in re.findall(r'\d+', shape)), dtype)
    return keys


def state_dict_spec(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).replace('torch.', ''))
            for k, v in module.state_dict().items()}


@pytest.mark.parametrize('depth, key_list', [(50, 'keys_retinanet_r50_fpn.txt'),
                                             (101, 'keys_faster_rcnn_r101_fpn.txt')])
def test_resnet_keys_and_shapes(depth, key_list):
    ours = state_dict_spec(ResNet(depth))
    spec = spec_part(key_list, 'backbone.')
    assert list(ours) == list(spec)
    assert ours == spec


def test_resnet_outputs_strides_and_channels():
    backbone = ResNet(50).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 24), (1, 512, 8, 12),
                                             (1, 1024, 4, 6), (1, 2048, 2, 3)]
    assert backbone.out_channels == (256, 512, 1024, 2048)
    assert all(m.eps == 1e-5 for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match='depth'):
        ResNet(34)


@pytest.mark.parametrize('key_list, kwargs, out_hw', [
    ('keys_retinanet_r50_fpn.txt', dict(start_level=1, add_extra_convs='on_input', num_outs=5),
     [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]),
    ('keys_faster_rcnn_r50_fpn.txt', dict(num_outs=5),
     [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)])])
def test_fpn_keys_shapes_and_levels(key_list, kwargs, out_hw):
    neck = FPN([256, 512, 1024, 2048], 256, **kwargs)
    ours, spec = state_dict_spec(neck), spec_part(key_list, 'neck.')
    assert list(ours) == list(spec)
    assert ours == spec
    inputs = tuple(torch.randn(1, c, 16 // 2 ** i, 24 // 2 ** i)
                   for i, c in enumerate([256, 512, 1024, 2048]))
    with torch.no_grad():
        outs = neck(inputs)
    assert [tuple(o.shape[-2:]) for o in outs] == out_hw


def test_fpn_upsamples_to_odd_lateral_sizes_and_pools_extra_level():
    """Nearest upsampling to the lower level's size (odd sides round differently from x2), and
    the max-pooled P6 is P5 subsampled (kernel 1, stride 2), as mmdet does."""
    neck = FPN([8, 16], 4, num_outs=3).eval()
    inputs = (torch.randn(1, 8, 7, 9), torch.randn(1, 16, 4, 5))
    with torch.no_grad():
        p3, p4, p5 = neck(inputs)
        top = neck.lateral_convs[1](inputs[1])
        expected_p3 = neck.fpn_convs[0](neck.lateral_convs[0](inputs[0]) + top.repeat_interleave(
            2, -2).repeat_interleave(2, -1)[..., :7, :9])
    torch.testing.assert_close(p3, expected_p3)
    torch.testing.assert_close(p5, p4[..., ::2, ::2])


@pytest.mark.parametrize('name', sorted(REFERENCE['anchors']))
def test_anchors_equal_mmdet(name):
    reference = REFERENCE['anchors'][name]
    generator = AnchorGenerator(**reference['config'])
    assert generator.num_base_anchors == reference['num_base_anchors']
    levels = generator.grid_anchors([tuple(s) for s in reference['feature_sizes']], 'cpu')
    for ours, theirs in zip(levels, reference['anchors'], strict=True):
        torch.testing.assert_close(ours, torch.tensor(theirs), atol=0, rtol=0)


def test_anchors_export_with_dynamic_feature_sizes(tmp_path):
    """grid_anchors follows the feature map's symbolic size in the exported graph."""
    onnxruntime = pytest.importorskip('onnxruntime')
    generator = AnchorGenerator(octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                strides=[8, 16])

    class Anchors(torch.nn.Module):
        def forward(self, p3: torch.Tensor, p4: torch.Tensor) -> torch.Tensor:
            sizes = [(p.shape[-2], p.shape[-1]) for p in (p3, p4)]
            return torch.cat(generator.grid_anchors(sizes, p3.device))

    def maps(height, width):
        return torch.zeros(1, 1, height, width), torch.zeros(1, 1, height // 2, width // 2)
    side = torch.export.Dim.AUTO
    path = tmp_path / 'anchors.onnx'
    torch.onnx.export(Anchors().eval(), maps(8, 6), str(path), dynamo=True,
                      dynamic_shapes=({2: side, 3: side}, {2: side, 3: side}), verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    p3, p4 = maps(6, 10)
    got = session.run(None, {'p3': p3.numpy(), 'p4': p4.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), Anchors()(p3, p4), atol=0, rtol=0)


@pytest.mark.parametrize('name', ['unit_stds', 'rcnn_stds_clipped'])
def test_delta2bbox_equals_mmdet_per_class(name):
    reference = REFERENCE['decoded'][name]
    rois, deltas = torch.tensor(REFERENCE['rois']), torch.tensor(REFERENCE['deltas'])
    max_shape = tuple(reference['max_shape']) if reference['max_shape'] else None
    boxes = delta2bbox(rois[:, None], deltas.reshape(len(deltas), -1, 4), reference['means'],
                       reference['stds'], max_shape)
    torch.testing.assert_close(boxes.reshape(len(deltas), -1), torch.tensor(reference['boxes']),
                               atol=0, rtol=0)


def test_delta2bbox_batched_matches_per_image():
    rois, deltas = torch.tensor(REFERENCE['rois']), torch.tensor(REFERENCE['deltas'])[:, :4]
    batch_deltas = torch.stack([deltas, deltas.flip(0)])
    batched = delta2bbox(rois[None], batch_deltas, max_shape=(50, 70))
    for image in range(2):
        torch.testing.assert_close(batched[image], delta2bbox(rois, batch_deltas[image],
                                                              max_shape=(50, 70)))
