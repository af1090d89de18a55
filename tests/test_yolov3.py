"""YOLOv3-MobileNetV2 (320, 416): MMDetection's state-dict layout, agreement with numbers
MMDetection 3.3.0 computed for the same weights, export in every NMS mode, ONNX Runtime against
PyTorch, and the `parity` and `eval` commands by name.

tests/data/mmdet_yolov3_mobilenetv2_reference.json was written by
tools/make_mmdet_reference_yolov3.py (MMDetection's own YOLOv3 on `randomize_detector` weights);
MMDetection is not a dependency.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import (DATA_DIR, SPEC_DIR, assert_detections_agree, calibration_images,
                      make_image, randomize_detector, reference_outputs)
from detdeploy.cli import main
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.models import build_model, get_spec, load_detector, save_checkpoint
from detdeploy.models.yolov3 import EVAL_NMS
from detdeploy.runtimes.model_file import read_onnx_metadata
from detdeploy.runtimes.pipeline import prepare_batch
from detdeploy.runtimes.preprocess import preprocess
from detdeploy.training.shapes import SHAPE_CLASSES, make_shapes_dataset

NAME = 'yolov3-mobilenetv2-320'
PERTURBED_WEIGHT = 'model.neck.detect2.conv2.conv.weight'


@pytest.fixture(scope='module', autouse=True)
def _one_thread(one_torch_thread):
    """One PyTorch thread for the module (see conftest: much faster on the busy 2-core CI)."""
    yield


@pytest.fixture(scope='module')
def shapes_detector():
    """A 6-class model (the shapes dataset's) with synthetic weights."""
    torch.manual_seed(0)
    detector = load_detector(NAME, class_names=tuple(SHAPE_CLASSES))
    randomize_detector(detector.model, seed=1)
    return detector


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, shapes_detector):
    path = tmp_path_factory.mktemp('yolov3') / 'yolov3_shapes.pth'
    save_checkpoint(path, shapes_detector.model, shapes_detector.spec,
                    shapes_detector.class_names)
    return path


@pytest.fixture(scope='module')
def exports(tmp_path_factory, checkpoint):
    """`onnx`: dynamic batch and shape at 160x160 (simplified, as `detdeploy export` does);
    `trt` and `none`: batch 1 at scale 64x96, unsimplified (export time is the test's cost);
    all three take any multiple of 32 (the exporter's rule for divisor-padded models)."""
    folder = tmp_path_factory.mktemp('yolov3_onnx')
    detector = load_detector(NAME, checkpoint)
    options = {
        'onnx': ExportOptions(nms_mode='onnx', dynamic_batch=True, dynamic_shape=True,
                              input_hw=(160, 160)),
        'trt': ExportOptions(nms_mode='trt', input_hw=(64, 96), simplify=False),
        'none': ExportOptions(nms_mode='none', input_hw=(64, 96), simplify=False),
    }
    return {mode: export_onnx(detector, folder / f'yolov3_{mode}.onnx', option).path
            for mode, option in options.items()}


@pytest.mark.parametrize('name', [NAME, 'yolov3-mobilenetv2-416'])
def test_state_dict_keys_shapes_and_dtypes_equal_mmdetection(name):
    lines = (SPEC_DIR / 'keys_yolov3_mobilenetv2_320.txt').read_text().splitlines()
    expected = [line.split('\t') for line in lines if not line.startswith('#')]
    state = build_model(name).state_dict()
    assert [(key, str(tuple(value.shape)), str(value.dtype).removeprefix('torch.'))
            for key, value in state.items()] == [tuple(row) for row in expected]


def test_checkpoint_round_trip_keeps_classes_and_outputs(checkpoint, shapes_detector):
    loaded = load_detector(NAME, checkpoint)
    assert loaded.model.num_classes == 6 and loaded.class_names == tuple(SHAPE_CLASSES)
    images = calibration_images(seed=3, count=1)[..., :96, :128]
    with torch.no_grad():
        for ours, theirs in zip(loaded.model(images).pred_maps,
                                shapes_detector.model(images).pred_maps):
            assert torch.equal(ours, theirs)


@pytest.fixture(scope='module')
def mmdet_reference():
    reference = json.loads((DATA_DIR / 'mmdet_yolov3_mobilenetv2_reference.json').read_text())
    torch.manual_seed(0)
    model = randomize_detector(build_model(NAME), seed=0)
    height, width = reference['input_hw']
    images = calibration_images(seed=7, count=1)[..., :height, :width]
    with torch.no_grad():
        raw = model(images)
    return reference, raw, model.predict(images, EVAL_NMS)[0], model, images


def test_prediction_maps_within_1e4_of_mmdetection(mmdet_reference):
    reference, raw = mmdet_reference[:2]
    for level, pred_map in zip(reference['levels'], raw.pred_maps):
        assert list(pred_map.shape) == level['shape']
        flat = pred_map.flatten()
        torch.testing.assert_close(flat[level['index']], torch.tensor(level['values']),
                                   atol=1e-4, rtol=0)
        assert flat.double().abs().sum().item() == pytest.approx(level['abs_sum'], rel=1e-5)


def test_same_final_detections_as_mmdetection(mmdet_reference):
    """100 detections after the objectness filter (it drops anchors among the 1000 best class
    scores with these weights), score = class x objectness, NMS 0.45."""
    reference, detections = mmdet_reference[0], mmdet_reference[2]
    assert len(reference['det_scores']) == len(detections.scores) == 100
    assert detections.labels.tolist() == reference['det_labels']
    torch.testing.assert_close(detections.scores, torch.tensor(reference['det_scores']),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(detections.boxes, torch.tensor(reference['det_bboxes']),
                               atol=1e-2, rtol=0)


def test_saved_checkpoint_loaded_strictly_by_mmdetection_predicted_the_same(mmdet_reference):
    """Recorded by the reference tool: our `save_checkpoint` file, loaded by mmengine's
    load_checkpoint(strict=True) into a fresh MMDetection model, predicts what the weights copied
    in memory predict, and what we predict."""
    check = mmdet_reference[0]['checkpoint_check']
    assert check['loads_strictly'] and check['same_as_direct_load']
    assert check['same_labels_as_ours']
    assert check['max_box_diff_vs_ours_px'] <= 1e-2 and check['max_score_diff_vs_ours'] <= 1e-5


def test_416_config_agrees_with_mmdetection(mmdet_reference):
    """The 416 config (its own anchors) on a 320x416 input: maps within 1e-4, same detections."""
    reference = mmdet_reference[0]['config_416']
    torch.manual_seed(0)
    model = randomize_detector(build_model('yolov3-mobilenetv2-416'), seed=0)
    height, width = reference['input_hw']
    images = calibration_images(seed=7, count=1, size=width)[..., :height, :]
    with torch.no_grad():
        raw = model(images)
        detections = model.predict(images, EVAL_NMS)[0]
    for level, pred_map in zip(reference['levels'], raw.pred_maps, strict=True):
        assert list(pred_map.shape) == level['shape']
        torch.testing.assert_close(pred_map.flatten()[level['index']],
                                   torch.tensor(level['values']), atol=1e-4, rtol=0)
    assert len(detections.scores) == len(reference['det_scores']) > 0
    assert detections.labels.tolist() == reference['det_labels']
    torch.testing.assert_close(detections.scores, torch.tensor(reference['det_scores']),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(detections.boxes, torch.tensor(reference['det_bboxes']),
                               atol=1e-2, rtol=0)


def test_objectness_threshold_filters_and_old_settings_still_read(mmdet_reference):
    assert NMSConfig.from_dict({'score_thr': 0.05, 'pre_top_k': 1000, 'iou_thr': 0.45,
                                'max_det': 100}) == NMSConfig(0.05, 1000, 0.45, 100)
    assert NMSConfig.from_dict(EVAL_NMS.to_dict()) == EVAL_NMS
    assert 'objectness_thr' not in NMSConfig().to_dict()           # as before, without it
    assert EVAL_NMS.describe().startswith('objectness >= 0.005, score > 0.05')
    assert NMSConfig(objectness_thr=1.5).problem() == (
        'objectness_thr must be a number in [0, 1], got 1.5')
    model, images = mmdet_reference[3:]
    with torch.no_grad():
        decoded = model.decode(model(images))
    cut = float(decoded.objectness.quantile(0.9))
    kept = model.predict(images, NMSConfig(0.05, 1000, 0.45, 100, objectness_thr=cut))[0]
    assert len(kept.scores) > 0
    # each detection's score is class score x objectness, with objectness at least `cut`
    for box, score, label in zip(*kept):
        [anchor] = (decoded.boxes[0] == box).all(-1).nonzero()[:, 0].tolist()
        assert decoded.objectness[0, anchor] >= cut
        assert score == pytest.approx(float(decoded.cls_scores[0, anchor, label]
                                            * decoded.objectness[0, anchor]), rel=1e-6)
    assert model.predict(images, NMSConfig(objectness_thr=1.0))[0].scores.numel() == 0


def test_trt_mode_detects_as_the_onnx_mode_in_pytorch(mmdet_reference):
    """EfficientNMS_TRT's eager semantics on the same candidates (class score x objectness,
    -1 elsewhere, plugin threshold 0) give the `onnx` mode's detections."""
    model, images = mmdet_reference[3:]
    with torch.no_grad():
        raw = model(images)
    hw = tuple(images.shape[-2:])
    onnx_mode = model.postprocess(raw, hw, EVAL_NMS, 'onnx')
    trt_mode = model.postprocess(raw, hw, EVAL_NMS, 'trt')
    for ours, theirs in zip(trt_mode, onnx_mode):
        assert torch.equal(ours, theirs)


def test_preprocessing_pads_to_32_with_zeros_after_normalisation():
    config = get_spec(NAME).preprocessing
    image = make_image(480, 640, 0)
    tensor, meta = preprocess(image, config)
    assert meta.resized_hw == (240, 320) and tensor.shape == (3, 256, 320)
    assert not tensor[:, 240:].any()
    # red first (RGB), ImageNet statistics
    expected = (image[0, 0, 0] - 123.675) / 58.395
    assert tensor[0, 0, 0] == pytest.approx(expected, abs=0.05)
    old = PreprocessConfig().to_dict()
    del old['pad_fill']
    assert PreprocessConfig.from_dict(old).pad_fill == 'value'


def test_every_nms_mode_exports_a_valid_graph(exports):
    for mode, path in exports.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        metadata = read_onnx_metadata(path)
        assert (metadata.arch, metadata.family, metadata.nms_mode) == (NAME, 'yolov3', mode)
        assert metadata.nms == EVAL_NMS
        # divisor-padded models always export with dynamic height and width
        assert metadata.preprocess.pad == 'divisor' and metadata.dynamic_shape
    ops = {node.op_type for node in onnx.load(str(exports['trt'])).graph.node}
    assert 'EfficientNMS_TRT' in ops and 'NonMaxSuppression' not in ops
    assert 'NonMaxSuppression' in {n.op_type for n in onnx.load(str(exports['onnx'])).graph.node}


def test_onnxruntime_matches_pytorch_on_a_mixed_size_batch(exports, checkpoint):
    detector = load_detector(NAME, checkpoint)
    config = detector.spec.preprocessing.with_input_size((160, 160))
    images = [make_image(120, 200, 1), make_image(60, 300, 2), make_image(90, 150, 3)]
    batch, metas = prepare_batch(images, config)
    assert [meta.resized_hw for meta in metas] == [(96, 160), (32, 160), (96, 160)]
    assert batch.shape == (3, 3, 96, 160)                 # padded to the largest, by 32
    session = ort.InferenceSession(str(exports['onnx']), providers=['CPUExecutionProvider'])
    got = session.run(None, {'images': batch})
    want = reference_outputs(detector, batch, 'onnx', EVAL_NMS)
    np.testing.assert_array_equal(got[0], want[0])
    assert want[0].min() > 0
    for index, count in enumerate(want[0][:, 0]):
        assert_detections_agree([output[index, :count] for output in got[1:]],
                                [output[index, :count] for output in want[1:]],
                                EVAL_NMS.score_thr, box_atol=1e-2)

    none_session = ort.InferenceSession(str(exports['none']), providers=['CPUExecutionProvider'])
    small = batch[:1, :, :64, :96]
    for got_none, want_none in zip(none_session.run(None, {'images': small}),
                                   reference_outputs(detector, small, 'none', EVAL_NMS)):
        np.testing.assert_allclose(got_none, want_none, atol=1e-2, rtol=1e-4)


def _run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def test_parity_passes_and_catches_a_perturbed_weight(exports, checkpoint, tmp_path, capsys):
    code, out = _run_cli(capsys, 'parity', exports['onnx'], '--checkpoint', checkpoint,
                         '--random', '2')
    assert code == 0, out
    assert 'nms (both sides, --nms onnx): objectness >= 0.005' in out
    model = onnx.load(str(exports['onnx']))
    [init] = [i for i in model.graph.initializer if i.name == PERTURBED_WEIGHT]
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    perturbed = tmp_path / 'perturbed.onnx'
    onnx.save(model, str(perturbed))
    code, out = _run_cli(capsys, 'parity', perturbed, '--checkpoint', checkpoint, '--random', '1')
    assert code == 1 and 'raw outputs differ' in out, out

    model = onnx.load(str(exports['onnx']))
    props = {p.key: p for p in model.metadata_props}
    preprocess = json.loads(props['preprocess'].value)
    preprocess['pad_fill'] = 'value'                      # pad with raw pad_value instead
    props['preprocess'].value = json.dumps(preprocess)
    onnx.save(model, str(perturbed))
    code, out = _run_cli(capsys, 'parity', perturbed, '--checkpoint', checkpoint, '--random', '1')
    assert code == 1 and "padding filled by 'value' in the file, 'mean'" in out, out


def test_eval_runs_on_the_shapes_val_set(checkpoint, tmp_path, capsys):
    make_shapes_dataset(tmp_path, train=0, val=3, size=64, seed=11)
    report = tmp_path / 'eval.json'
    code, out = _run_cli(capsys, 'eval', '--model', NAME, '--checkpoint', checkpoint,
                         '--ann', tmp_path / 'annotations/instances_val.json',
                         '--images', tmp_path / 'val', '--backend', 'torch', '--json', report)
    assert code == 0, out
    [result] = json.loads(report.read_text())['results']
    assert result['images'] == 3 and result['detections'] > 0


def test_the_exported_file_needs_no_flags_in_parity_infer_and_eval(exports, tmp_path, capsys):
    """`parity FILE IMAGES`, `infer FILE IMAGES` and `eval FILE --ann --images`: no --model,
    --checkpoint or size flags; parity finds the weights the file records (sha256 checked)."""
    make_shapes_dataset(tmp_path, train=0, val=2, size=64, seed=3)
    path, val = exports['onnx'], tmp_path / 'val'
    code, out = _run_cli(capsys, 'parity', path, val)
    assert code == 0 and f'PASS: {path} agrees with PyTorch on 2 images' in out, out
    assert 'no --checkpoint given, using the one' in out
    code, out = _run_cli(capsys, 'infer', path, val)
    assert code == 0 and 'nms: objectness >= 0.005' in out, out
    code, out = _run_cli(capsys, 'eval', path, '--ann', tmp_path / 'annotations/instances_val.json',
                         '--images', val)
    assert code == 0 and 'AP' in out, out
