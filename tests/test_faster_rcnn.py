"""Faster R-CNN R50/R101-FPN: MMDetection's keys and checkpoints, agreement with numbers
MMDetection computed (tests/data/mmdet_faster_rcnn_*_reference.json, written by
tools/make_mmdet_reference_faster_rcnn.py), the two-stage graph in ONNX Runtime (dynamic batch
and shape without cross-talk, empty RoI levels), each NMS mode's ONNX, and `parity` and `eval`.

Small inputs and synthetic weights; the network is exported once (the `onnx` mode); the `trt`
and `none` modes differ only after the RoI head, so their ONNX is checked on that part alone.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import (DATA_DIR, SPEC_DIR, assert_detections_agree, calibration_images,
                      randomize_detector)
from detdeploy.cli import main
from detdeploy.export.exporter import ExportOptions, _dynamo_export, export_onnx
from detdeploy.models import get_spec, load_detector, save_checkpoint
from detdeploy.models.faster_rcnn import DEPLOY_NMS, EVAL_NMS, RawOutputs
from detdeploy.models.faster_rcnn.roi_head import multi_level_roi_align, roi_levels
from detdeploy.training.shapes import SHAPE_CLASSES, make_shapes_dataset

EXPORT_HW = (128, 160)
PERTURBED_WEIGHT = 'model.roi_head.bbox_head.shared_fcs.1.weight'
PERTURBED_RPN_WEIGHT = 'model.rpn_head.rpn_reg.weight'


def spec_keys(file_name: str) -> dict[str, tuple]:
    rows = [line.rstrip('\n').split('\t') for line in (SPEC_DIR / file_name).open()
            if not line.startswith('#')]
    return {key: tuple(json.loads(shape.replace('(', '[').replace(',)', ']').replace(')', ']')))
            for key, shape, _ in rows}


def synthetic_model(name: str, num_classes: int | None = None):
    """`randomize_detector` weights as the reference script makes them: seed 0, calibrated with
    100 proposals per image (the RoI head on 1000 would dominate the tests' time)."""
    torch.manual_seed(0)
    model = get_spec(name).build(num_classes)
    model.num_proposals = 100
    randomize_detector(model, seed=0)
    model.num_proposals = 1000
    return model


def images(seed: int, count: int, height: int, width: int) -> torch.Tensor:
    return calibration_images(seed=seed, count=count, size=max(height, width))[
        :, :, :height, :width].contiguous()


@pytest.mark.parametrize('name, key_file', [('faster-rcnn-r50', 'keys_faster_rcnn_r50_fpn.txt'),
                                            ('faster-rcnn-r101', 'keys_faster_rcnn_r101_fpn.txt')])
def test_state_dict_keys_and_shapes_are_mmdetections(name, key_file):
    model = get_spec(name).build()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec_keys(key_file)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values()
               if v.is_floating_point())


def test_checkpoint_round_trip_keeps_weights_and_class_count(tmp_path):
    """fc_cls has a background row: 3 classes are 4 rows, and loading must say 3."""
    spec = get_spec('faster-rcnn-r50')
    torch.manual_seed(1)
    model = spec.build(num_classes=3)
    path = tmp_path / 'three.pth'
    save_checkpoint(path, model, spec, ('a', 'b', 'c'))
    loaded = load_detector('faster-rcnn-r50', path)
    assert loaded.model.num_classes == 3 and loaded.class_names == ('a', 'b', 'c')
    assert loaded.model.roi_head.bbox_head.fc_cls.weight.shape[0] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


# --- agreement with MMDetection 3.3.0 ---------------------------------------------------------

@pytest.fixture(scope='module', params=['r50', 'r101'])
def reference_run(request, one_torch_thread):
    depth = request.param
    reference = json.loads((DATA_DIR / f'mmdet_faster_rcnn_{depth}_reference.json').read_text())
    model = synthetic_model(f'faster-rcnn-{depth}')
    inputs = images(7, 1, 256, 320)
    with torch.no_grad():
        raw = model(inputs)
    detections = model.predict(inputs, EVAL_NMS)[0]
    return reference, raw, detections


def assert_summary_close(tensor: torch.Tensor, summary: dict, atol: float = 1e-4,
                         reorderable: bool = False) -> None:
    """Sampled values within atol (or 1e-4 relative: float32 convolutions differ by that much
    between CPU models) and the same absolute sum. `reorderable` rows (proposals and what
    follows them) may swap where the proposal NMS meets near-tied scores on another CPU: there
    at least 60 % of the samples must agree (R101's low-score tail reorders on an AMD EPYC:
    75 % agreed) and the order-free sum to 1e-3."""
    assert list(tensor.shape) == summary['shape']
    flat = tensor.flatten()
    got, want = flat[summary['index']], torch.tensor(summary['values'])
    if reorderable:
        close = torch.isclose(got, want, atol=atol, rtol=1e-4)
        assert close.float().mean().item() >= 0.6, (got[~close], want[~close])
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    assert flat.double().abs().sum().item() == pytest.approx(summary['abs_sum'],
                                                             rel=1e-3 if reorderable else 1e-5)


def test_rpn_maps_proposals_and_roi_head_outputs_within_1e4(reference_run):
    reference, raw, _ = reference_run
    for level in range(5):
        assert_summary_close(raw.rpn_cls_scores[level], reference['rpn_cls_scores'][level])
        assert_summary_close(raw.rpn_bbox_preds[level], reference['rpn_bbox_preds'][level])
    count = reference['num_proposals']
    assert count == 1000         # random weights give 1000 proposals: no padding rows
    assert_summary_close(raw.proposals[0, :count], reference['proposals'], reorderable=True)
    assert_summary_close(raw.cls_scores[0, :count], reference['cls_scores'], reorderable=True)
    assert_summary_close(raw.bbox_preds[0, :count], reference['bbox_preds'], reorderable=True)


def test_same_final_detections_as_mmdetection(reference_run):
    reference, _, detections = reference_run
    assert len(reference['det_scores']) == len(detections.scores) == 100
    theirs = (torch.tensor(reference['det_bboxes']), torch.tensor(reference['det_scores']),
              torch.tensor(reference['det_labels']))
    assert_detections_agree(tuple(detections), theirs, score_thr=0.05, box_atol=1e-2,
                            box_rtol=0, score_atol=3e-5)
    assert detections.labels.tolist() == reference['det_labels']
    # 1.1e-5 on an AMD EPYC for a reference made on another CPU (float32 convolutions)
    torch.testing.assert_close(detections.scores, theirs[1], atol=3e-5, rtol=0)
    torch.testing.assert_close(detections.boxes, theirs[0], atol=1e-2, rtol=0)


def test_saved_checkpoint_loaded_strictly_by_mmdetection_predicted_the_same():
    """Recorded by the reference script: mmengine's load_checkpoint(strict=True) of a file from
    `save_checkpoint`, and identical predictions to the weights copied in memory."""
    for depth in ('r50', 'r101'):
        reference = json.loads((DATA_DIR / f'mmdet_faster_rcnn_{depth}_reference.json').read_text())
        assert reference['saved_checkpoint_loads_strictly_and_predicts_the_same'] is True


# --- RoI levels --------------------------------------------------------------------------------

def test_roi_levels_follow_mmdetection_scales():
    sides = torch.tensor([1.0, 111.9, 112.0, 224.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(6), torch.zeros(6), sides, sides], 1)
    assert roi_levels(boxes, 4).tolist() == [0, 0, 1, 2, 3, 3]


def _per_level_roi_align(feats, boxes, strides):
    """MMDetection's SingleRoIExtractor loop: each level's RoIs gathered by index (skipping empty
    levels), for one image."""
    from torchvision.ops import roi_align
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    out = torch.zeros(len(boxes), feats[0].shape[1], 7, 7)
    levels = roi_levels(boxes, len(feats))
    for level, (feat, stride) in enumerate(zip(feats, strides)):
        index = (levels == level).nonzero()[:, 0]
        if len(index):
            out[index] = roi_align(feat, rois[index], 7, 1.0 / stride, 0, aligned=True)
    return out


class RoIAlignGraph(nn.Module):
    def forward(self, f0, f1, f2, f3, boxes):
        return multi_level_roi_align((f0, f1, f2, f3), boxes, (4, 8, 16, 32))


def test_empty_roi_levels_in_pytorch_and_onnx_runtime(tmp_path):
    """All RoIs on one level (three empty levels), then a mix with level 2 empty: the same
    features as MMDetection's per-level gather, in PyTorch and in ONNX Runtime."""
    generator = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, 64 // s, 64 // s, generator=generator) for s in (1, 2, 4, 8)]
    small = torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 20.5, 60.0], [0, 0, 5, 5]])
    mixed = torch.tensor([[2.0, 3.0, 30.0, 40.0], [0.0, 0.0, 150.0, 120.0],
                          [5.0, 0.0, 200.0, 200.0], [1.0, 1.0, 500.0, 500.0]])
    assert roi_levels(mixed, 4).tolist() == [0, 1, 1, 3]
    model = _dynamo_export(RoIAlignGraph(), (*feats, small[None]),
                           ['f0', 'f1', 'f2', 'f3', 'boxes'], ['roi_feats'],
                           {'f0': {}, 'f1': {}, 'f2': {}, 'f3': {},
                            'boxes': {1: torch.export.Dim('rois', min=1, max=4096)}}, None)
    onnx.checker.check_model(model, full_check=True)
    onnx_model = ort.InferenceSession(model.SerializeToString(),
                                      providers=['CPUExecutionProvider'])
    for boxes in (small, mixed):
        want = _per_level_roi_align(feats, boxes, (4, 8, 16, 32))
        got = multi_level_roi_align(feats, boxes[None], (4, 8, 16, 32))
        assert torch.equal(got, want)
        [from_ort] = onnx_model.run(None, {**{f'f{i}': f.numpy() for i, f in enumerate(feats)},
                                           'boxes': boxes[None].numpy()})
        np.testing.assert_allclose(from_ort, want.numpy(), atol=1e-6, rtol=0)


# --- post-processing modes ----------------------------------------------------------------------

class RoIPostprocess(nn.Module):
    """The RoI head's raw outputs -> one NMS mode's outputs (the part that differs by mode)."""

    def __init__(self, model, nms, nms_mode):
        super().__init__()
        self.model, self.nms, self.nms_mode = model, nms, nms_mode

    def forward(self, proposals, cls_scores, bbox_preds):
        raw = RawOutputs((), (), proposals, cls_scores, bbox_preds)
        return self.model.postprocess(raw, EXPORT_HW, self.nms, self.nms_mode)


@pytest.fixture(scope='module')
def roi_outputs(one_torch_thread):
    model = synthetic_model('faster-rcnn-r50', num_classes=6)
    with torch.no_grad():
        raw = model(images(3, 2, *EXPORT_HW))
    # padding rows, as an image with fewer proposals has
    proposals = raw.proposals.clone()
    proposals[1, 900:] = 0
    return model, (proposals, raw.cls_scores, raw.bbox_preds)


def test_trt_mode_in_pytorch_equals_onnx_mode(roi_outputs):
    """EfficientNMS_TRT's semantics with class-specific boxes give the `onnx` mode's
    detections (fewer than 4096 candidates here)."""
    model, tensors = roi_outputs
    for nms in (DEPLOY_NMS, EVAL_NMS):
        onnx_mode = RoIPostprocess(model, nms, 'onnx')(*tensors)
        trt_mode = RoIPostprocess(model, nms, 'trt')(*tensors)
        for a, b in zip(onnx_mode, trt_mode):
            assert torch.equal(a, b)
        assert onnx_mode[0].min() > 0


@pytest.mark.parametrize('nms_mode', ['trt', 'none'])
def test_trt_and_none_modes_export_and_check(roi_outputs, nms_mode):
    model, tensors = roi_outputs
    graph = RoIPostprocess(model, DEPLOY_NMS, nms_mode).eval()
    names = ['num_dets', 'boxes', 'scores', 'labels'] if nms_mode == 'trt' else ['boxes', 'scores']
    batch = torch.export.Dim('batch', min=1, max=64)
    dynamic = {name: {0: batch} for name in ('proposals', 'cls_scores', 'bbox_preds')}
    exported = _dynamo_export(graph, tensors, ['proposals', 'cls_scores', 'bbox_preds'], names,
                              dynamic, None)
    onnx.checker.check_model(exported, full_check=True)
    with torch.no_grad():
        want = graph(*tensors)
    if nms_mode == 'trt':
        [plugin] = [node for node in exported.graph.node if node.op_type == 'EfficientNMS_TRT']
        assert plugin.domain == 'TRT'
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in plugin.attribute}
        assert attributes['max_output_boxes'] == DEPLOY_NMS.max_det
        return
    session = ort.InferenceSession(exported.SerializeToString(),
                                   providers=['CPUExecutionProvider'])
    got = session.run(None, dict(zip(['proposals', 'cls_scores', 'bbox_preds'],
                                     (t.numpy() for t in tensors))))
    assert got[0].shape == (2, 1000 * 6, 4) and got[1].shape == (2, 1000 * 6, 6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-5)
    # each (proposal, class) row carries its own class's score only
    assert (np.count_nonzero(got[1], axis=2) <= 1).all()


# --- the whole graph in ONNX Runtime ------------------------------------------------------------

@pytest.fixture(scope='module')
def exported(tmp_path_factory, one_torch_thread):
    """faster-rcnn-r50 (6 classes, synthetic weights) exported once, not simplified: --nms onnx,
    deploy preset, dynamic batch and shape, traced at 128x160; its checkpoint."""
    folder = tmp_path_factory.mktemp('faster_rcnn')
    spec = get_spec('faster-rcnn-r50')
    model = synthetic_model('faster-rcnn-r50', num_classes=6)
    checkpoint = folder / 'faster6.pth'
    # the checkpoint's meta carries the small input size, so `eval` runs at it
    small = dataclasses.replace(spec, preprocessing=spec.preprocessing.with_input_size(EXPORT_HW))
    save_checkpoint(checkpoint, model, small, SHAPE_CLASSES)
    detector = load_detector('faster-rcnn-r50', checkpoint)
    path = folder / 'faster6.onnx'
    # onnxsim would add ~50 s here (it runs the graph to check itself); the simplified graph
    # is what `detdeploy export` writes, checked the same way by hand (README, issue note)
    report = export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=DEPLOY_NMS,
                                                       dynamic_batch=True, input_hw=EXPORT_HW,
                                                       simplify=False))
    return detector, checkpoint, path, report


def test_export_is_one_checked_graph_with_dynamic_batch_and_shape(exported):
    _, _, path, report = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert {'RoiAlign', 'NonMaxSuppression', 'TopK'} <= ops and not ops & {'Loop', 'If'}
    [images_input] = model.graph.input
    dims = [d.dim_param or d.dim_value for d in images_input.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    assert [name for name, _ in report.outputs] == ['num_dets', 'boxes', 'scores', 'labels']


def test_onnx_runtime_matches_pytorch_on_a_mixed_size_batch_without_cross_talk(exported):
    """Batch of 2 at 128x192 (not the traced size): a full image and a 96x128 one padded with
    0 (the host pads normalised images with 0 for this family). ONNX Runtime equals PyTorch,
    and each image's detections equal its batch-1 run."""
    detector, _, path, _ = exported
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    batch = images(5, 2, 128, 192)
    batch[1, :, 96:, :] = 0
    batch[1, :, :, 128:] = 0
    with torch.no_grad():
        want = detector.model.predict_outputs(batch, DEPLOY_NMS)
    got = session.run(None, {'images': batch.numpy()})
    singles = [session.run(None, {'images': batch[i:i + 1].numpy()}) for i in range(2)]
    for image in range(2):
        count = int(got[0][image, 0])
        assert count == int(want[0][image, 0]) > 0
        ours = tuple(torch.from_numpy(o[image, :count]) for o in got[1:])
        # ONNX Runtime's float32 kernels round differently: parity's fp32 tolerances
        assert_detections_agree(ours, tuple(w[image, :count] for w in want[1:]),
                                score_thr=DEPLOY_NMS.score_thr, box_atol=0.02, box_rtol=1e-4,
                                score_atol=5e-4, borderline=5e-4)
        single = singles[image]
        assert int(single[0][0, 0]) == count
        assert_detections_agree(ours, tuple(torch.from_numpy(o[0, :count]) for o in single[1:]),
                                score_thr=DEPLOY_NMS.score_thr)


def _run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_parity_passes_and_catches_a_perturbed_weight(exported, tmp_path, capsys):
    _, checkpoint, path, _ = exported
    code, out, err = _run_cli(capsys, 'parity', path, '--model', 'faster-rcnn-r50',
                              '--checkpoint', checkpoint, '--random', '1')
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith(f'PASS: {path} agrees with PyTorch')
    for name in ('rpn_cls_scores.0', 'rpn_bbox_preds.4', 'proposals', 'cls_scores',
                 'bbox_preds'):
        assert name in out
    assert 'proposals rows paired by box' in out
    model = onnx.load(str(path))
    [weight] = [i for i in model.graph.initializer if i.name == PERTURBED_WEIGHT]
    values = onnx.numpy_helper.to_array(weight).copy()
    values[:, :] *= 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    perturbed = tmp_path / 'perturbed.onnx'
    onnx.save(model, str(perturbed))
    code, out, _ = _run_cli(capsys, 'parity', perturbed, '--model', 'faster-rcnn-r50',
                            '--checkpoint', checkpoint, '--random', '1')
    assert code == 1
    assert 'FAIL: ' in out and 'raw outputs differ: cls_scores, bbox_preds' in out


def test_eval_runs_on_the_shapes_val_set(exported, tmp_path, capsys):
    _, checkpoint, _, _ = exported
    data = tmp_path / 'shapes'
    make_shapes_dataset(data, train=0, val=3, size=96, seed=11)
    report = tmp_path / 'eval.json'
    code, out, err = _run_cli(capsys, 'eval', '--model', 'faster-rcnn-r50', '--checkpoint',
                              checkpoint, '--ann', data / 'annotations/instances_val.json',
                              '--images', data / 'val', '--backend', 'torch', '--json', report)
    assert code == 0, out + err
    result = json.loads(report.read_text())['results'][0]
    assert result['images'] == 3
    assert 0 <= result['metrics']['AP'] < 0.05          # synthetic weights detect nothing


def test_parity_on_flat_images_passes_and_a_perturbed_rpn_weight_fails(exported, tmp_path,
                                                                         capsys):
    """A shapes image (flat colour areas: many near-tied RPN scores, which the two runtimes'
    RPN NMS order differently) passes: the rows are paired by proposal box, padding with
    padding, and any unpaired ones must be NMS ties within the budget. It false-alarmed before
    (the old pairing collapsed the padding rows and compared the rows unpaired: `proposals` off
    by 106 px). A perturbed RPN weight still fails: its maps differ and the proposal rows find
    no partner."""
    _, checkpoint, path, _ = exported
    make_shapes_dataset(tmp_path, train=0, val=1, size=96, seed=3)
    report = tmp_path / 'parity.json'
    code, out, err = _run_cli(capsys, 'parity', path, tmp_path / 'val', '--model',
                              'faster-rcnn-r50', '--checkpoint', checkpoint, '--json', report)
    assert code == 0 and f'PASS: {path} agrees with PyTorch on 1 image' in out, out + err
    pairings = json.loads(report.read_text())['raw_row_pairing']
    assert [p['key'] for p in pairings] == ['proposals']
    for pairing in pairings:
        assert pairing['passed'] and pairing['unexplained'] == 0
        assert pairing['paired'] >= 0.98 * pairing['torch_rows'] > 0
        assert max(pairing['unpaired_torch'], pairing['unpaired_backend']) <= pairing['budget']
    model = onnx.load(str(path))
    [weight] = [i for i in model.graph.initializer if i.name == PERTURBED_RPN_WEIGHT]
    values = onnx.numpy_helper.to_array(weight).copy()
    values *= 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    perturbed = tmp_path / 'perturbed.onnx'
    onnx.save(model, str(perturbed))
    code, out, _ = _run_cli(capsys, 'parity', perturbed, tmp_path / 'val', '--model',
                            'faster-rcnn-r50', '--checkpoint', checkpoint)
    assert code == 1
    assert 'FAIL: ' in out and 'raw outputs differ: rpn_bbox_preds.0' in out
    assert 'raw rows unpaired: proposals on 1 of 1 images' in out


def test_the_exported_file_needs_no_flags_in_parity_infer_and_eval(exported, tmp_path, capsys):
    """`parity FILE`, `infer FILE IMAGES` and `eval FILE --ann --images`: no --model,
    --checkpoint or size flags; parity finds the weights the file records (sha256 checked)."""
    path = exported[2]
    make_shapes_dataset(tmp_path, train=0, val=2, size=96, seed=3)
    val = tmp_path / 'val'
    code, out, err = _run_cli(capsys, 'parity', path, '--random', '1')
    assert code == 0 and f'PASS: {path} agrees with PyTorch on 1 image' in out, out + err
    assert 'no --checkpoint given, using the one' in err and 'proposals rows paired' in out
    code, out, err = _run_cli(capsys, 'infer', path, val)
    assert code == 0 and out.startswith('nms: score > 0.05'), out + err
    code, out, err = _run_cli(capsys, 'eval', path, '--ann',
                              tmp_path / 'annotations/instances_val.json', '--images', val)
    assert code == 0 and 'AP' in out, out + err
