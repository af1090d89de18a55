"""RetinaNet R50-FPN (`retinanet-r50`) through every step: MMDetection's key list and numbers
(tests/data/mmdet_retinanet_r50_reference.json, tools/make_mmdet_reference_retinanet.py),
checkpoints, export in each NMS mode, ONNX Runtime on a mixed-size batch, parity and eval.

ResNet-50 is big for a test: small inputs, random weights, each file exported once per module.
"""
import json
import os
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from conftest import (DATA_DIR, SPEC_DIR, assert_detections_agree, calibration_images, make_image,
                      randomize_detector, reference_outputs)
from detdeploy.cli import main
from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.models import build_model, get_spec, load_detector, save_checkpoint
from detdeploy.models.retinanet import EVAL_NMS, RetinaNet
from detdeploy.runtimes.model_file import read_onnx_metadata
from detdeploy.runtimes.pipeline import prepare_batch

FULL_EXPORTS = os.environ.get('DETDEPLOY_FULL_EXPORT_TESTS') == '1'   # + none/trt files (~2 min)
SCALE_HW = (128, 160)     # resize scale of the exports: small, for a fast test (traced at 256)
REFERENCE = json.loads((DATA_DIR / 'mmdet_retinanet_r50_reference.json').read_text())
pytestmark = pytest.mark.usefixtures('one_torch_thread')   # far faster on a busy 2-core machine


@pytest.fixture(scope='module')
def model():
    """The weights MMDetection's reference was computed with."""
    torch.manual_seed(0)
    return randomize_detector(build_model('retinanet-r50'), seed=0)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp('retina_ckpt') / 'retinanet_r50_test.pth'
    spec = get_spec('retinanet-r50')
    save_checkpoint(path, model, spec, spec.class_names)
    return path


@pytest.fixture(scope='module')
def exported(tmp_path_factory, checkpoint):
    """`detdeploy export`'s file from the saved checkpoint: `onnx` NMS, dynamic batch (and, as
    for every divisor-padded model, dynamic height and width), exported once for the module and
    not simplified: onnxsim runs ResNet-50 to check itself, and the simplified graph (what the
    CLI writes) is checked the same way for RTMDet in tests/test_export.py."""
    folder = tmp_path_factory.mktemp('retina_onnx')
    detector = load_detector('retinanet-r50', checkpoint)
    modes = ('onnx', 'none', 'trt') if FULL_EXPORTS else ('onnx',)
    files = {}
    for mode in modes:
        path = folder / f'retinanet_{mode}.onnx'
        files[mode] = (path, export_onnx(detector, path, ExportOptions(
            nms_mode=mode, nms=EVAL_NMS, input_hw=SCALE_HW, dynamic_batch=mode == 'onnx',
            simplify=False)))
    return detector, files


class HeadGraph(torch.nn.Module):
    """RetinaNet after the backbone and neck: pyramid features -> the head, anchors, decoding and
    the post-processing of an NMS mode, exactly as `DetectorGraph` runs them after the network.
    Exporting it is the NMS-mode-specific part of an export, without ResNet-50's minute of
    tracing."""

    def __init__(self, model: RetinaNet, nms_mode: str):
        super().__init__()
        self.model, self.nms_mode = model, nms_mode

    def forward(self, p3, p4, p5, p6, p7):
        height, width = p3.shape[2] * 8, p3.shape[3] * 8
        raw = self.model.bbox_head((p3, p4, p5, p6, p7))
        return self.model.postprocess(raw, (height, width), EVAL_NMS, self.nms_mode)


def pyramid(model, images):
    with torch.no_grad():
        return model.neck(model.backbone(images))


@pytest.fixture(scope='module')
def head_graphs(tmp_path_factory, model):
    """The `none` and `trt` modes' graphs, exported by the exporter's dynamo call and op
    translations, with dynamic batch and pyramid sizes."""
    from detdeploy.core.tasks import output_names
    from detdeploy.export.exporter import _dynamo_export
    folder = tmp_path_factory.mktemp('retina_heads')
    # 320x416: no two traced sizes equal (nor the batch of 2), so none is tied to another
    feats = pyramid(model, calibration_images(seed=3, count=2, size=416)[:, :, :320])
    names = [f'p{level}' for level in range(3, 8)]
    batch = torch.export.Dim('batch', min=1, max=8)
    dynamic = {name: {0: batch, 2: torch.export.Dim(f'{name}_h', min=1, max=512),
                      3: torch.export.Dim(f'{name}_w', min=1, max=512)} for name in names}
    files = {}
    for mode in ('none', 'trt'):
        graph = HeadGraph(model, mode).eval()
        proto = _dynamo_export(graph, feats, names, list(output_names('detect', mode)), dynamic,
                               None)
        files[mode] = folder / f'head_{mode}.onnx'
        onnx.save(proto, str(files[mode]))
    return files


def test_state_dict_equals_mmdetection_key_list(model):
    lines = (SPEC_DIR / 'keys_retinanet_r50_fpn.txt').read_text().splitlines()
    spec = {}
    for line in lines[1:]:
        key, shape, dtype = line.split('\t')
        spec[key] = (tuple(int(d) for d in re.findall(r'\d+', shape)), dtype)
    ours = {k: (tuple(v.shape), str(v.dtype).replace('torch.', ''))
            for k, v in model.state_dict().items()}
    assert list(ours) == list(spec)
    assert ours == spec
    unique = int(re.search(r'(\d+) unique parameters', lines[0]).group(1))
    assert sum(p.numel() for p in model.parameters()) == unique
    assert RetinaNet.num_classes_in(model.state_dict()) == 80
    assert RetinaNet.num_classes_in(RetinaNet(num_classes=3).state_dict()) == 3


def test_preprocessing_is_mmdetections():
    """Keep-ratio (1333, 800), RGB, ImageNet mean/std, padded to 32 after normalising."""
    config = get_spec('retinanet-r50').preprocessing
    assert config.resized_size((480, 640)) == (800, 1067)
    assert config.canvas_size((800, 1067)) == (800, 1088)
    assert config.resized_size((2000, 500)) == (1333, 333)
    assert (config.channel_order, config.mean, config.std) == (
        'rgb', (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    assert config.pad_fill == 'mean' and config.pad_value == 0.0
    assert get_spec('retinanet-r50').nms('eval') == EVAL_NMS == get_spec('retinanet-r50').nms(
        'deploy')
    assert (EVAL_NMS.pre_top_k, EVAL_NMS.score_thr, EVAL_NMS.iou_thr, EVAL_NMS.max_det) == (
        1000, 0.05, 0.5, 100)


def test_checkpoint_round_trip(model, checkpoint):
    detector = load_detector('retinanet-r50', checkpoint)
    assert detector.class_names == get_spec('retinanet-r50').class_names
    loaded = detector.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture(scope='module')
def reference_run(model):
    height, width = REFERENCE['input_hw']
    images = calibration_images(seed=7, count=1, size=width)[:, :, :height].contiguous()
    with torch.no_grad():
        raw = model(images)
    return raw, model.predict(images, EVAL_NMS)[0]


def test_raw_head_outputs_equal_mmdetection_within_1e4(reference_run):
    raw, _ = reference_run
    for level, cls, box in zip(REFERENCE['levels'], raw.cls_scores, raw.bbox_preds, strict=True):
        for ours, theirs in ((cls, level['cls']), (box, level['box'])):
            assert list(ours.shape) == theirs['shape']
            flat = ours.flatten()
            torch.testing.assert_close(flat[theirs['index']], torch.tensor(theirs['values']),
                                       atol=1e-4, rtol=0)
            assert flat.double().abs().sum().item() == pytest.approx(theirs['abs_sum'], rel=1e-5)


def test_final_detections_equal_mmdetection(reference_run):
    """Same labels in the same order, scores within 1e-5, boxes within 1e-2 px."""
    _, detections = reference_run
    assert len(detections.scores) == len(REFERENCE['det_scores']) == 100
    assert detections.labels.tolist() == REFERENCE['det_labels']
    torch.testing.assert_close(detections.scores, torch.tensor(REFERENCE['det_scores']),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(detections.boxes, torch.tensor(REFERENCE['det_bboxes']),
                               atol=1e-2, rtol=0)
    # written by the reference tool: our checkpoint, loaded strictly by mmengine, predicts the same
    check = REFERENCE['checkpoint_check']
    assert check['loads_strictly'] and check['same_as_direct_load']
    assert check['same_labels_as_ours'] and check['max_box_diff_vs_ours_px'] <= 1e-2


def test_export_writes_a_checked_file_with_dynamic_sides(exported):
    detector, files = exported
    expected_outputs = {'onnx': ['num_dets', 'boxes', 'scores', 'labels'],
                        'trt': ['num_dets', 'boxes', 'scores', 'labels'],
                        'none': ['boxes', 'scores']}
    for mode, (path, report) in files.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert [o.name for o in model.graph.output] == expected_outputs[mode]
        height, width = report.inputs[0][1][2:]
        assert isinstance(height, str) and isinstance(width, str)      # symbolic sides
        assert any('dynamic height and width' in note for note in report.warnings)
        metadata = read_onnx_metadata(path)
        assert metadata.arch == 'retinanet-r50' and metadata.dynamic_shape
        assert metadata.preprocess == detector.spec.preprocessing.with_input_size(SCALE_HW)
        assert metadata.nms == EVAL_NMS and metadata.nms_mode == mode
    if 'trt' in files:
        trt_ops = {node.op_type for node in onnx.load(str(files['trt'][0])).graph.node}
        assert 'EfficientNMS_TRT' in trt_ops and 'NonMaxSuppression' not in trt_ops


def test_none_and_trt_modes_export_checked_graphs(head_graphs, model):
    """`none`: every anchor's box and scores, equal in ONNX Runtime and PyTorch at another batch
    and pyramid size than traced; `trt`: EfficientNMS_TRT instead of NonMaxSuppression."""
    for path in head_graphs.values():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    trt_ops = {node.op_type for node in onnx.load(str(head_graphs['trt'])).graph.node}
    assert 'EfficientNMS_TRT' in trt_ops and 'NonMaxSuppression' not in trt_ops
    feats = pyramid(model, calibration_images(seed=4, count=1, size=320)[:, :, :192])
    session = onnxruntime.InferenceSession(str(head_graphs['none']),
                                           providers=['CPUExecutionProvider'])
    boxes, scores = session.run(None, {f'p{level}': f.numpy()
                                       for level, f in zip(range(3, 8), feats)})
    num_anchors = 9 * sum(f.shape[2] * f.shape[3] for f in feats)
    assert boxes.shape == (1, num_anchors, 4) and scores.shape == (1, num_anchors, 80)
    with torch.no_grad():
        want_boxes, want_scores = HeadGraph(model, 'none')(*feats)
    np.testing.assert_allclose(scores, want_scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(boxes, want_boxes.numpy(), rtol=2e-5, atol=1e-3)
    assert boxes.max() <= 320 and boxes.min() >= 0          # clamped to the 192x320 input


def _mixed_batch(detector):
    """Two images of different shapes, resized at SCALE_HW and padded into one batch."""
    config = detector.spec.preprocessing.with_input_size(SCALE_HW)
    batch, metas = prepare_batch([make_image(90, 150, 3), make_image(160, 100, 4)], config)
    assert batch.shape == (2, 3, 160, 160)
    assert [m.resized_hw for m in metas] == [(96, 160), (160, 100)]
    return batch


def test_onnxruntime_matches_pytorch_on_a_mixed_size_batch(exported):
    detector, files = exported
    batch = _mixed_batch(detector)
    session = onnxruntime.InferenceSession(str(files['onnx'][0]),
                                           providers=['CPUExecutionProvider'])
    got = session.run(None, {'images': batch})
    want = reference_outputs(detector, batch, 'onnx', EVAL_NMS)
    np.testing.assert_array_equal(got[0], want[0])
    assert (got[0] > 0).all()
    for image in range(2):
        count = int(got[0][image, 0])
        assert_detections_agree([t[image, :count] for t in got[1:]],
                                [t[image, :count] for t in want[1:]], EVAL_NMS.score_thr)
        assert (got[3][image, count:] == -1).all()
    # an image alone gives what it gives in the batch: no cross-talk between images
    alone = session.run(None, {'images': batch[1:]})
    assert int(alone[0][0, 0]) == int(got[0][1, 0])
    np.testing.assert_allclose(alone[1][0], got[1][1], atol=1e-3)
    # the first image at its own canvas, 96x160, where P7 has a single row
    own_canvas = np.ascontiguousarray(batch[:1, :, :96])
    got_own = session.run(None, {'images': own_canvas})
    want_own = reference_outputs(detector, own_canvas, 'onnx', EVAL_NMS)
    np.testing.assert_array_equal(got_own[0], want_own[0])
    count = int(got_own[0][0, 0])
    assert_detections_agree([t[0, :count] for t in got_own[1:]],
                            [t[0, :count] for t in want_own[1:]], EVAL_NMS.score_thr)


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_parity_passes_and_catches_a_perturbed_weight(exported, checkpoint, image_dir, tmp_path,
                                                      capsys):
    path = exported[1]['onnx'][0]
    code, out, err = run_cli(capsys, 'parity', path, '--checkpoint', checkpoint,
                             '--images', image_dir, '--batch', '2')
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith(f'PASS: {path} agrees with PyTorch on 3 images')

    model = onnx.load(str(path))
    weight = next(i for i in model.graph.initializer
                  if i.name == 'model.backbone.layer3.0.conv2.weight')
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    perturbed = tmp_path / 'perturbed.onnx'
    onnx.save(model, str(perturbed))
    code, out, _ = run_cli(capsys, 'parity', perturbed, '--checkpoint', checkpoint,
                           '--random', '1')
    assert code == 1
    assert 'FAIL: ' in out and 'raw outputs differ' in out


def test_eval_runs_on_shapes_val(exported, tmp_path, capsys):
    """Random weights on the shapes set: the run must work, AP is about 0."""
    from detdeploy.training.shapes import make_shapes_dataset
    make_shapes_dataset(tmp_path, train=0, val=1, size=64, seed=5)
    report = tmp_path / 'eval.json'
    code, out, err = run_cli(capsys, 'eval', '--model', 'retinanet-r50', '--class-names',
                             'a,b,c,d,e,f', '--ann', tmp_path / 'annotations/instances_val.json',
                             '--images', tmp_path / 'val', '--json', report)
    assert code == 0, out + err
    assert 'random weights' in err
    [result] = json.loads(report.read_text())['results']
    assert result['images'] == 1 and 0 <= result['metrics']['AP'] <= 0.05


def test_the_exported_file_needs_no_flags_in_parity_and_infer(exported, image_dir, capsys):
    """`parity FILE IMAGES` and `infer FILE IMAGES`: no --model, --checkpoint or size flags;
    parity finds the weights the file records (sha256 checked). (`eval` of a file is the same
    code as for YOLOv3 and Faster R-CNN; this file has COCO's 80 classes, not the shapes'.)"""
    path = exported[1]['onnx'][0]
    code, out, err = run_cli(capsys, 'parity', path, image_dir)
    assert code == 0 and f'PASS: {path} agrees with PyTorch on 3 images' in out, out + err
    assert 'no --checkpoint given, using the one' in err
    code, out, err = run_cli(capsys, 'infer', path, image_dir)
    assert code == 0 and out.startswith('nms: score > 0.05'), out + err
