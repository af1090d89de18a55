"""Model files that do not fit: ONNX files from other tools (no detdeploy metadata) run when
their outputs follow the four-output NMS layout and the flags supply what is missing; a graph
that disagrees with its metadata, a batch above a static batch, input sizes that are not
multiples of 32 are each handled in one line."""
import json

import numpy as np
import pytest
from onnx import TensorProto

import io_helpers
from detdeploy.core.errors import DetdeployError
from detdeploy.core.errors import MetadataError
from detdeploy.core.metadata import ModelOverrides
from detdeploy.runtimes.model_file import resolve_onnx_metadata
from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend

FOREIGN_FLAGS = ('--class-names', 'cat,dog', '--mean', '0,0,0', '--std', '255,255,255',
                 '--channel-order', 'rgb')


@pytest.fixture
def image(tmp_path):
    return io_helpers.save_image(tmp_path / 'x.png', 48, 80)


def test_foreign_file_names_the_missing_flags(tmp_path, image, capsys):
    static = io_helpers.save(io_helpers.detector_model(with_metadata=False), tmp_path / 's.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', static, image)
    io_helpers.assert_one_line_error(code, err, (
        f'{static} has no detdeploy metadata (made by another tool?): to run it, give '
        '--class-names, --mean, --std, --channel-order (its preprocessing and classes), or '
        'export the model with `detdeploy export`'))
    dynamic = io_helpers.save(io_helpers.detector_model(with_metadata=False, dynamic_hw=True),
                              tmp_path / 'd.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', dynamic, image, '--class-names', 'a')
    io_helpers.assert_one_line_error(code, err, 'give --mean, --std, --channel-order, '
                                                '--input-size (its preprocessing')


def test_foreign_file_runs_with_the_flags(tmp_path, image, capsys):
    model = io_helpers.save(io_helpers.detector_model(with_metadata=False, dynamic_hw=True),
                            tmp_path / 'foreign.onnx')
    out = tmp_path / 'out'
    code, stdout, err = io_helpers.run_main(capsys, 'infer', model, image, *FOREIGN_FLAGS,
                                            '--input-size', '96x128', '--out', out)
    assert code == 0, err
    record = json.loads((out / 'x.json').read_text())
    [detection] = record['detections']
    assert detection['label_name'] == 'cat'
    # the fixed box in network pixels, scaled back: 48x80 fits 96x128 as 77x128
    np.testing.assert_allclose(detection['bbox_xyxy'], [4 / 1.6, 8 / (77 / 48), 40 / 1.6,
                                                        48 / (77 / 48)], atol=1e-3)
    metadata = resolve_onnx_metadata(model, ModelOverrides(
        class_names=('cat', 'dog'), input_size=(96, 128), mean=(0, 0, 0), std=(255, 255, 255),
        channel_order='rgb', pad_value=0))
    assert metadata.preprocess.pad_value == 0 and metadata.batch is None
    assert metadata.arch == 'foreign' and metadata.dynamic_shape


def test_foreign_flags_in_bench_and_eval(tmp_path, image, capsys):
    model = io_helpers.save(io_helpers.detector_model(with_metadata=False), tmp_path / 'f.onnx')
    code, stdout, err = io_helpers.run_main(capsys, 'bench', model, *FOREIGN_FLAGS, '--iters', 1,
                                            '--warmup', 0, '--images', image.parent)
    assert code == 0, err
    assert 'f.onnx ort/cpu b1' in stdout
    coco = {'images': [{'id': 1, 'file_name': 'x.png', 'height': 48, 'width': 80}],
            'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [4, 5, 37, 25],
                             'area': 925, 'iscrowd': 0}],
            'categories': [{'id': 1, 'name': 'cat'}, {'id': 2, 'name': 'dog'}]}
    (tmp_path / 'ann.json').write_text(json.dumps(coco))
    code, stdout, err = io_helpers.run_main(capsys, 'eval', model, *FOREIGN_FLAGS, '--ann',
                                            tmp_path / 'ann.json', '--images', image.parent)
    assert code == 0, err
    assert stdout.splitlines()[1].startswith('ort ')


def test_foreign_file_with_another_output_layout_is_refused(tmp_path, image, capsys):
    model = io_helpers.save(io_helpers.two_output_model(), tmp_path / 'mmdeploy.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, *FOREIGN_FLAGS)
    io_helpers.assert_one_line_error(code, err, (
        'has no detdeploy metadata and its outputs (dets [?,1,5] float, labels [?,1] int64) '
        'are not the four-output NMS layout detdeploy runs'))


@pytest.mark.parametrize('flags, message', [
    (('--channel-order', 'rgb'), '--channel-order: '),
    (('--mean', '0,0'), "--mean '0,0': give three numbers"),
])
def test_preprocessing_flags_are_only_for_foreign_files(tmp_path, image, capsys, flags,
                                                        message):
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'ours.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, *flags)
    io_helpers.assert_one_line_error(code, err, message)


@pytest.mark.parametrize('build, message', [
    (lambda: io_helpers.detector_model(meta=io_helpers.metadata(input_hw=(96, 96))),
     'the metadata says input 96x96 but the graph input'),
    (lambda: io_helpers.detector_model(batch=1, meta=io_helpers.metadata(batch=None)),
     'the metadata says the batch is dynamic but the graph input'),
    (lambda: io_helpers.detector_model(batch=2, meta=io_helpers.metadata(batch=4)),
     'the metadata says batch 4 but the graph input'),
    (lambda: io_helpers.detector_model(input_type=TensorProto.UINT8),
     "input 'images' is uint8, but runtimes feed float32"),
    (lambda: io_helpers.detector_model(meta=io_helpers.metadata(nms_mode='none')),
     'outputs (num_dets [?,1] int32, boxes [?,1,4] float, scores [?,1] float, labels [?,1] '
     'int32) do not match the layout its metadata states (boxes float rank 3, scores float '
     'rank 3)'),
    (lambda: io_helpers.detector_model(output_names=('num_dets', 'boxes', 'labels', 'scores')),
     'but its metadata layout is (num_dets, boxes, scores, labels): runtimes read outputs by '
     'position'),
])
def test_graph_that_disagrees_with_its_metadata(tmp_path, image, capsys, build, message):
    path = tmp_path / 'bad.onnx'
    io_helpers.save(build(), path)
    with pytest.raises(DetdeployError) as error:
        OnnxRuntimeBackend(path)
    assert message in str(error.value) and '\n' not in str(error.value)
    code, _, err = io_helpers.run_main(capsys, 'infer', path, image)
    io_helpers.assert_one_line_error(code, err, message)


def test_a_file_with_two_inputs(tmp_path):
    model = io_helpers.detector_model()
    extra = model.graph.input.add()
    extra.CopyFrom(model.graph.input[0])
    extra.name = 'scale_factor'
    io_helpers.save(model, tmp_path / 'two.onnx')
    with pytest.raises(DetdeployError, match=r'has 2 inputs \(images, scale_factor\)'):
        OnnxRuntimeBackend(tmp_path / 'two.onnx')


def test_input_size_for_dynamic_and_static_files(tmp_path, image, capsys):
    dynamic = io_helpers.save(io_helpers.detector_model(dynamic_hw=True), tmp_path / 'd.onnx')
    static = io_helpers.save(io_helpers.detector_model(), tmp_path / 's.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', dynamic, image, '--input-size', '100')
    io_helpers.assert_one_line_error(code, err, '--input-size 100x100: both sides must be '
                                                'positive multiples of 32')
    code, _, err = io_helpers.run_main(capsys, 'infer', dynamic, image, '--input-size', '96x128')
    assert code == 0, err
    code, _, err = io_helpers.run_main(capsys, 'infer', static, image, '--input-size', '96')
    io_helpers.assert_one_line_error(code, err, 'has a fixed 64x64 input; --input-size 96x96 '
                                                'needs a --dynamic-shape export')
    backend = OnnxRuntimeBackend(dynamic)
    with pytest.raises(DetdeployError, match='input 64x80: sides must be multiples of 32'):
        backend.run(np.zeros((1, 3, 64, 80), np.float32))
    code, _, err = io_helpers.run_main(capsys, 'infer', 'rtmdet-tiny', image, '--input-size',
                                       '70')
    io_helpers.assert_one_line_error(code, err, '--input-size 70x70: both sides')


def test_batch_above_a_static_batch_is_split_image_by_image(tmp_path):
    backend = OnnxRuntimeBackend(io_helpers.save(io_helpers.detector_model(batch=2),
                                                 tmp_path / 'b2.onnx'))
    batch = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    num_dets, boxes, scores, labels = backend.run(batch)
    assert num_dets.shape == (5, 1) and boxes.shape == (5, 1, 4)
    alone = [backend.run(batch[i:i + 1])[2][0, 0] for i in range(5)]
    np.testing.assert_array_equal(scores[:, 0], alone)
    with pytest.raises(DetdeployError, match='has a static batch of 2; an I/O binding takes at '
                                             'most that, got 3'):
        backend.io_binding().set_input(batch[:3])


def test_class_names_for_a_detdeploy_file(tmp_path, image, capsys):
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'ours.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, '--class-names', 'a,b,c')
    io_helpers.assert_one_line_error(code, err, '--class-names gives 3 names but')
    out = tmp_path / 'out'
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, '--class-names', 'a,b',
                                       '--out', out)
    assert code == 0, err
    assert json.loads((out / 'x.json').read_text())['detections'][0]['label_name'] == 'a'
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, '--checkpoint', 'c.pth')
    io_helpers.assert_one_line_error(code, err, '--checkpoint is for registry models')


def test_metadata_error_type(tmp_path):
    model = io_helpers.save(io_helpers.detector_model(with_metadata=False), tmp_path / 'f.onnx')
    with pytest.raises(MetadataError):
        resolve_onnx_metadata(model)


def test_tensorrt_batches_above_the_profile_are_split_and_the_profile_is_named():
    """No GPU here: the host logic of the TensorRT backend. Above the profile's max a batch is
    run in pieces (as ONNX Runtime does above a static batch); a profile that cannot hold its
    own sizes names them."""
    from detdeploy.runtimes.backend import run_in_chunks
    from detdeploy.runtimes.tensorrt_common import BatchProfile
    seen = []

    def run_chunk(chunk):
        seen.append(len(chunk))
        return [chunk[:, :1, 0, 0]]
    batch = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    [out] = run_in_chunks(batch, max_batch=2, static_batch=None, run_chunk=run_chunk)
    assert seen == [2, 2, 1] and out[:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DetdeployError, match='--opt-batch 9 must lie between --min-batch 1 and '
                                             '--max-batch 8'):
        BatchProfile(1, 9, 8)


def test_damaged_metadata_is_one_line(tmp_path, image, capsys):
    meta = io_helpers.metadata()
    props = meta.to_props()
    props['preprocess'] = json.dumps({**json.loads(props['preprocess']), 'input_size': [0, 64]})
    model = io_helpers.detector_model(with_metadata=False)
    io_helpers.helper.set_model_props(model, props)
    path = io_helpers.save(model, tmp_path / 'damaged.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', path, image)
    io_helpers.assert_one_line_error(code, err, 'has invalid detdeploy metadata: '
                                                'preprocess.input_size [0, 64] is not two '
                                                'positive integers')


def test_commands_without_foreign_flags_say_export(tmp_path, capsys):
    model = io_helpers.save(io_helpers.detector_model(with_metadata=False), tmp_path / 'f.onnx')
    for args in (['build-engine', model, '-o', tmp_path / 'f.engine'],
                 ['parity', model, '--random', '1']):
        code, _, err = io_helpers.run_main(capsys, *args)
        io_helpers.assert_one_line_error(code, err, 'has no detdeploy metadata (was it exported '
                                                    'by another tool?); export it with')


def test_class_names_file_that_is_not_text(tmp_path, image, capsys):
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'ours.onnx')
    (tmp_path / 'names.txt').write_bytes(b'\xff\xfe\x00binary')
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, '--class-names',
                                       tmp_path / 'names.txt')
    io_helpers.assert_one_line_error(code, err, 'cannot read it as a text file')
