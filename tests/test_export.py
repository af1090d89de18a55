"""`detdeploy export`: files that onnx.checker and ONNX Runtime accept and that agree with PyTorch."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from conftest import assert_detections_agree, make_image, reference_outputs
from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.export.graph import DetectorGraph
from detdeploy.core.nms import NMSConfig
from detdeploy.models import load_detector
from detdeploy.models.rtmdet import DEPLOY_NMS, EVAL_NMS
from detdeploy.models.checkpoint import file_sha256
from detdeploy.runtimes.model_file import read_onnx_metadata
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.runtimes.preprocess import preprocess

DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')
SIZE = (320, 320)
EXPORTS = {          # 'onnx_dynamic' (onnx, deploy preset, dynamic batch) is conftest's tiny_onnx
    # name: (NMS mode, NMS settings, options)
    'onnx_eval_batch2': ('onnx', EVAL_NMS, dict(batch=2)),
    'none_dynamic_shape': ('none', DEPLOY_NMS, dict(dynamic_batch=True, dynamic_shape=True)),
    'trt': ('trt', DEPLOY_NMS, dict()),
}


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tiny_checkpoint, tiny_onnx):
    """Each file exported once, from the saved checkpoint (so its weights must survive)."""
    folder = tmp_path_factory.mktemp('exports')
    detector = load_detector('rtmdet-tiny', tiny_checkpoint)
    files = {'onnx_dynamic': tiny_onnx}
    for name, (mode, nms, extra) in EXPORTS.items():
        options = ExportOptions(nms_mode=mode, nms=nms, input_hw=SIZE, **extra)
        files[name] = (folder / f'{name}.onnx', export_onnx(detector, folder / f'{name}.onnx',
                                                             options))
    return files


def session(path):
    return onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def batch_of(shapes, size=SIZE, first_seed=10):
    config = PreprocessConfig(input_size=size)
    return np.stack([preprocess(make_image(h, w, first_seed + i), config)[0]
                     for i, (h, w) in enumerate(shapes)])


def assert_padded_outputs_agree(got, want, score_thr):
    """The four NMS outputs of two runs agree image by image (same counts); padding rows are
    padding."""
    np.testing.assert_array_equal(got[0], want[0])
    for image in range(len(got[0])):
        count = int(got[0][image, 0])
        assert (got[3][image, count:] == -1).all() and (got[2][image, count:] == 0).all()
        assert_detections_agree(
            [t[image, :count] for t in got[1:]],
            [t[image, :int(want[0][image, 0])] for t in want[1:]], score_thr)


def test_files_pass_the_full_checker(exported):
    for path, report in exported.values():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        assert report.size_bytes == path.stat().st_size
        assert report.opset >= 18


def test_metadata_round_trip(exported, tiny_checkpoint, tiny_detector):
    meta = read_onnx_metadata(exported['onnx_dynamic'][0])
    assert meta.arch == 'rtmdet-tiny' and meta.class_names == tiny_detector.class_names
    assert meta.preprocess == PreprocessConfig(input_size=SIZE)
    assert meta.nms_mode == 'onnx' and meta.nms == DEPLOY_NMS
    assert (meta.family, meta.task, meta.precision) == ('rtmdet', 'detect', 'fp32')
    assert meta.raw_outputs == tuple(f'{kind}.{level}' for kind in ('cls_scores', 'bbox_preds')
                                     for level in range(3))
    assert meta.batch is None and meta.dynamic_shape is False
    assert meta.checkpoint == str(tiny_checkpoint)
    assert meta.checkpoint_sha256 == file_sha256(tiny_checkpoint)
    assert meta.torch_version == torch.__version__ and meta.onnx_version == onnx.__version__
    assert 'rows past num_dets are padding' in meta.output_layout
    static = read_onnx_metadata(exported['onnx_eval_batch2'][0])
    assert static.batch == 2 and static.nms == EVAL_NMS
    assert read_onnx_metadata(exported['trt'][0]).trt_plugin_domain == 'TRT'


def test_onnx_mode_matches_pytorch_on_a_mixed_batch(exported, tiny_detector):
    """Checkpoint weights (random BN statistics) survive export; detections agree."""
    images = batch_of([(300, 400), (500, 333), (64, 64)])
    got = session(exported['onnx_dynamic'][0]).run(None, {'images': images})
    want = [t.numpy() for t in tiny_detector.model.predict_outputs(torch.from_numpy(images),
                                                                    DEPLOY_NMS)]
    assert [g.dtype for g in got] == [np.int32, np.float32, np.float32, np.int32]
    assert got[0][:, 0].min() > 5
    assert_padded_outputs_agree(got, want, DEPLOY_NMS.score_thr)


def test_dynamic_batch_image_alone_equals_image_in_batch(exported):
    images = batch_of([(300, 400), (500, 333), (64, 64)])
    runner = session(exported['onnx_dynamic'][0])
    together = runner.run(None, {'images': images})
    for index in range(len(images)):
        alone = runner.run(None, {'images': images[index:index + 1]})
        for tensor_alone, tensor_together in zip(alone, together):
            np.testing.assert_array_equal(tensor_alone[0], tensor_together[index])


def test_eval_preset_static_batch(exported, tiny_detector):
    path, report = exported['onnx_eval_batch2']
    assert report.inputs == [('images', [2, 3, 320, 320])]
    assert report.outputs[1] == ('boxes', [2, 300, 4])
    images = batch_of([(200, 300), (320, 320)], first_seed=20)
    got = session(path).run(None, {'images': images})
    want = [t.numpy() for t in tiny_detector.model.predict_outputs(torch.from_numpy(images),
                                                                    EVAL_NMS)]
    assert got[0][:, 0].tolist() == [300, 300]
    assert_padded_outputs_agree(got, want, EVAL_NMS.score_thr)


@pytest.mark.parametrize('size', [(320, 320), (256, 384)])
def test_none_mode_raw_outputs_at_two_sizes(exported, tiny_detector, size):
    """Scores within 1e-4; boxes as close to a float64 PyTorch run as float32 PyTorch is."""
    images = batch_of([(500, 333), (64, 64)], size=size)
    got = session(exported['none_dynamic_shape'][0]).run(None, {'images': images})
    want = reference_outputs(tiny_detector, images, 'none', DEPLOY_NMS)
    anchors = sum((size[0] // s) * (size[1] // s) for s in (8, 16, 32))
    assert got[0].shape == (2, anchors, 4) and got[1].shape == (2, anchors, 80)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=0)
    model64 = copy.deepcopy(tiny_detector.model).double()
    with torch.no_grad():
        boxes64 = DetectorGraph(model64, 'none', DEPLOY_NMS)(torch.from_numpy(images).double())[0]
    torch_error = np.abs(want[0] - boxes64.numpy()).max()
    onnx_error = np.abs(got[0] - boxes64.numpy()).max()
    assert onnx_error <= 2 * torch_error + 1e-5
    np.testing.assert_allclose(got[0], want[0], atol=1e-3, rtol=1e-5)


def test_trt_file_carries_the_plugin_node(exported):
    model = onnx.load(str(exported['trt'][0]))
    [node] = [n for n in model.graph.node if n.op_type == 'EfficientNMS_TRT']
    assert node.domain == 'TRT'
    assert {o.domain: o.version for o in model.opset_import}['TRT'] == 1
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {
        'score_threshold': pytest.approx(0.05), 'iou_threshold': pytest.approx(0.65),
        'max_output_boxes': 100, 'background_class': -1, 'score_activation': 0,
        'box_coding': 0, 'plugin_version': b'1'}
    assert len(node.input) == 2 and len(node.output) == 4
    assert [o.name for o in model.graph.output] == ['num_dets', 'boxes', 'scores', 'labels']


def test_trt_semantics_equal_onnx_semantics_in_pytorch(tiny_detector):
    """The eager EfficientNMS_TRT stand-in gives the onnx mode's answers (< 4096 candidates)."""
    images = torch.from_numpy(batch_of([(300, 400), (64, 64)]))
    nms = NMSConfig(score_thr=0.3, pre_top_k=500, iou_thr=0.6, max_det=50)
    with torch.no_grad():
        trt = DetectorGraph(tiny_detector.model, 'trt', nms)(images)
        standard = DetectorGraph(tiny_detector.model, 'onnx', nms)(images)
    for a, b in zip(trt, standard):
        torch.testing.assert_close(a, b)


def test_simplify_fallback_keeps_the_export(tmp_path, tiny_detector, monkeypatch):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError('simplifier crashed')
    monkeypatch.setattr(onnxsim, 'simplify', broken)
    report = export_onnx(tiny_detector, tmp_path / 'm.onnx',
                         ExportOptions(nms_mode='none', input_hw=(64, 64)))
    assert not report.simplified and report.nodes_final == report.nodes_exported
    assert report.warnings == ['not simplified: onnxsim failed (RuntimeError: simplifier '
                               'crashed); kept the exported graph']
    images = batch_of([(64, 64)], size=(64, 64))
    got = session(tmp_path / 'm.onnx').run(None, {'images': images})
    np.testing.assert_allclose(got[1], reference_outputs(tiny_detector, images, 'none',
                                                         DEPLOY_NMS)[1], atol=1e-4)


def test_simplified_graph_that_disagrees_is_not_used(exported, monkeypatch):
    import onnxsim

    from detdeploy.export.simplify import simplify
    model = onnx.load(str(exported['none_dynamic_shape'][0]))
    tampered = onnx.ModelProto()
    tampered.CopyFrom(model)
    weight = max(tampered.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    monkeypatch.setattr(onnxsim, 'simplify', lambda *args, **kwargs: (tampered, True))
    result = simplify(model, batch_of([(64, 64)]))
    assert result.model is model and not result.simplified
    assert result.warning.startswith('simplified graph disagrees on a random input')


def run_cli(*args):
    return subprocess.run([DETDEPLOY, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_export_summary_and_atomic_replace(tmp_path):
    target = tmp_path / 'tiny.onnx'
    target.write_bytes(b'old file')
    result = run_cli('export', '--model', 'rtmdet', '-o', target, '--input-size', '64x96',
                     '--nms', 'onnx', '--max-det', '20', '--class-names', 'circle, square')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f'wrote {target} (') and ', opset ' in lines[0]
    assert '  input  images [1, 3, 64, 96]' in lines
    assert '  output labels [1, 20]' in lines
    assert any(line.startswith('  nodes: ') and 'after onnxsim' in line for line in lines)
    assert lines[-1] == ('  nms: onnx, score > 0.05, pre-top-k 1000 per level, IoU 0.65, '
                         'max 20 per image')
    assert result.stderr.startswith('note: no --checkpoint given')
    # stderr is not a terminal: one progress line per export stage (issue 20)
    stages = [line.split(': ', 1)[1].split(' (')[0] for line in result.stderr.splitlines()
              if line.startswith(f'export {target}: ')]
    assert stages == ['tracing the model', 'simplifying', 'checking', 'writing', 'done']
    metadata = read_onnx_metadata(target)
    assert metadata.preprocess.input_size == (64, 96)
    assert metadata.class_names == ('circle', 'square')
    assert [p.name for p in tmp_path.iterdir()] == ['tiny.onnx']


@pytest.mark.parametrize('args, message', [
    (['--input-size', '100'], 'error: --input-size 100x100: both sides must be positive multiples of 32'),
    (['--input-size', 'big'], "error: --input-size 'big': give one side (640) or HEIGHTxWIDTH"),
    (['--nms', 'fast'], "Invalid value for '--nms'"),
    (['-o', '/nonexistent/dir/m.onnx'], 'error: output directory does not exist: /nonexistent/dir'),
    (['--iou-thr', '2'], "Invalid value for '--iou-thr'"),
])
def test_cli_export_bad_input(args, message):
    result = run_cli('export', *args)
    assert result.returncode == 2
    assert message in result.stderr and 'Traceback' not in result.stderr


def test_static_batch_file_runs_any_number_of_images(exported):
    """The ONNX Runtime backend pads or splits to a file's static batch of 2."""
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend
    backend = OnnxRuntimeBackend(exported['onnx_eval_batch2'][0])
    images = batch_of([(200, 300), (320, 320), (90, 400)], first_seed=20)
    three = backend.run(images)
    assert [t.shape[0] for t in three] == [3, 3, 3, 3]
    pair = session(exported['onnx_eval_batch2'][0]).run(None, {'images': images[:2]})
    for got, want in zip(three, pair):
        np.testing.assert_array_equal(got[:2], want)
    single = backend.run(images[2:])
    for got, want in zip(single, three):
        np.testing.assert_array_equal(got[0], want[2])
