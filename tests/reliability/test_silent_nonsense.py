"""No silent nonsense: NaN and infinity never pass a flag or a metadata value; `train
--checkpoint` loads its weights; class names and a model's outputs are checked against each
other; broken weights are refused; bench's --seconds, --threads and --input-size follow one
rule; parity compares against the weights a file records; unsupported opsets are refused."""
import json
import math
import os

import click
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import io_helpers
from detdeploy.core.errors import CheckpointError, DetdeployError


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('nonsense')
    io_helpers.save(io_helpers.detector_model(), root / 'good.onnx')
    io_helpers.save(io_helpers.detector_model(with_metadata=False), root / 'foreign.onnx')
    images = root / 'imgs'
    images.mkdir()
    io_helpers.save_image(images / 'a.png')
    (root / 'ann.json').write_text(json.dumps({
        'images': [{'id': 1, 'file_name': 'a.png', 'height': 64, 'width': 64}],
        'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [4, 8, 36, 40]}],
        'categories': [{'id': 1, 'name': 'circle'}, {'id': 2, 'name': 'square'}]}))
    return root


def fill(args, files):
    return [str(a).format(root=files, good=files / 'good.onnx', img=files / 'imgs' / 'a.png',
                          imgs=files / 'imgs', ann=files / 'ann.json') for a in args]


# ---- every float flag is finite ---------------------------------------------------------------

FLOAT_FLAGS = [
    (['infer', '{good}', '{img}'], '--score-thr'), (['infer', '{good}', '{img}'], '--show-thr'),
    (['infer', '{good}', '{img}'], '--pad-value'), (['export'], '--score-thr'),
    (['export'], '--iou-thr'), (['parity', '{good}', '--random', '1'], '--atol'),
    (['parity', '{good}', '--random', '1'], '--rtol'),
    (['eval', '{good}', '--ann', '{ann}', '--images', '{imgs}'], '--min-ap'),
    (['bench', '{good}'], '--seconds'), (['bench', '{good}'], '--pad-value'),
    (['train', '--train-ann', '{ann}', '--train-images', '{imgs}', '--out', '{root}/r'], '--lr'),
    (['train', '--train-ann', '{ann}', '--train-images', '{imgs}', '--out', '{root}/r'],
     '--weight-decay'),
    (['train', '--train-ann', '{ann}', '--train-images', '{imgs}', '--out', '{root}/r'],
     '--mosaic'),
]


@pytest.mark.parametrize('value', ['nan', 'inf', '-inf'])
@pytest.mark.parametrize('args, flag', FLOAT_FLAGS, ids=[f'{a[0]} {f}' for a, f in FLOAT_FLAGS])
def test_non_finite_float_flags_are_usage_errors(files, capsys, args, flag, value):
    code, out, err = io_helpers.run_main(capsys, *fill(args, files), flag, value)
    io_helpers.assert_one_line_error(code, err, f"Invalid value for '{flag}'")
    assert 'is not a finite number' in err or 'is not in the range' in err
    assert out == ''


def test_every_float_option_is_finite_by_type():
    """The rule holds by construction: no float option of any command escapes FiniteFloat."""
    from detdeploy.cli import cli
    from detdeploy.commands.common import FiniteFloat
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
                assert isinstance(param.type, FiniteFloat), f'{name} {param.opts}'


@pytest.mark.parametrize('args, message', [
    (['infer', '{root}/foreign.onnx', '{img}', '--class-names', 'a', '--mean', 'nan,0,0',
      '--std', '1,1,1', '--channel-order', 'rgb'], '--mean nan,0,0: values must be finite'),
    (['infer', '{root}/foreign.onnx', '{img}', '--class-names', 'a', '--mean', '0,0,0',
      '--std', 'inf,1,1', '--channel-order', 'rgb'], '--std inf,1,1: values must be finite'),
    (['train', '--train-ann', '{ann}', '--train-images', '{imgs}', '--out', '{root}/r',
      '--scale-range', '0.5,inf'], "--scale-range '0.5,inf': need finite numbers"),
    (['bench', '{good}', '--seconds', '4000'], "'--seconds': 4000.0 is not in the range"),
    (['export', '--opset', '99', '-o', '{root}/x.onnx'],
     '--opset 99 is not supported: the exporter writes opsets 18 to'),
    (['bench', 'rtmdet-tiny', '--input-size', '31'],
     '--input-size 31x31: both sides must be positive multiples of 32'),
    (['infer', 'rtmdet-tiny', '{img}', '--input-size', '31'],
     '--input-size 31x31: both sides must be positive multiples of 32'),
    (['export', '--input-size', '31', '-o', '{root}/x.onnx'],
     '--input-size 31x31: both sides must be positive multiples of 32'),
    (['train', '--train-ann', '{ann}', '--train-images', '{imgs}', '--out', '{root}/r',
      '--checkpoint', '{root}/missing.pth'], 'checkpoint not found: {root}/missing.pth'),
])
def test_bad_numbers_and_settings_are_one_line(files, capsys, args, message):
    code, _, err = io_helpers.run_main(capsys, *fill(args, files))
    io_helpers.assert_one_line_error(code, err, fill([message], files)[0])


def test_threads_above_the_cores_warn(files, capsys):
    code, _, err = io_helpers.run_main(capsys, 'bench', files / 'good.onnx', '--iters', '1',
                                       '--warmup', '0', '--threads', str(os.cpu_count() + 7))
    assert code == 0, err
    assert f'warning: --threads {os.cpu_count() + 7} is more than the {os.cpu_count()} CPU' in err


# ---- metadata values --------------------------------------------------------------------------

def with_props(path, **changes):
    model = io_helpers.detector_model()
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    return io_helpers.save(model, path)


PREPROCESS = io_helpers.metadata().preprocess.to_dict()
METADATA_CASES = {
    'pad_value inf': ({'preprocess': json.dumps({**PREPROCESS, 'pad_value': math.inf})},
                      'mean, std, pad_value and pixel_scale must be finite'),
    'mean NaN': ({'preprocess': json.dumps({**PREPROCESS, 'mean': [math.nan, 0, 0]})},
                 'must be finite'),
    'iou_thr NaN': ({'nms': '{"score_thr": 0.1, "pre_top_k": 1, "iou_thr": NaN, "max_det": 1}'},
                    'nms: iou_thr must be a number in [0, 1], got nan'),
    'max_det huge': ({'nms': '{"score_thr": 0.1, "pre_top_k": 1, "iou_thr": 0.5, '
                             '"max_det": 1e300}'}, 'max_det must be an integer'),
    'pad_value a string': ({'preprocess': json.dumps({**PREPROCESS, 'pad_value': 'grey'})},
                           'preprocess: could not convert string to float'),
    'nms a string': ({'nms': '"fast"'}, 'nms: must be a JSON object, got str'),
    'preprocess a list': ({'preprocess': '[1, 2]'}, 'preprocess: must be a JSON object'),
    'input size 2**40': ({'preprocess': json.dumps({**PREPROCESS, 'input_size': [2**40, 2**40]})},
                         'of memory, more than this machine has'),
    'static batch 10**9': ({'batch': str(10**9)}, 'needs at least'),
    'dynamic_shape a string': ({'dynamic_shape': '"yes"'}, 'dynamic_shape must be true or false'),
    'raw_outputs a string': ({'raw_outputs': '"cls"'}, 'raw_outputs: a str, not a list'),
    'class_names one string': ({'class_names': '"person"'}, 'class_names is a str, not a list'),
    'class_names numbers': ({'class_names': '[1, 2]'}, 'class_names must be a non-empty list'),
    'opset a word': ({'opset': 'eighteen'}, 'invalid literal for int()'),
}


@pytest.mark.parametrize('case', list(METADATA_CASES))
def test_metadata_values_are_checked(files, capsys, tmp_path, case):
    changes, message = METADATA_CASES[case]
    path = with_props(tmp_path / 'm.onnx', **changes)
    before = path.read_bytes()
    code, _, err = io_helpers.run_main(capsys, 'infer', path, files / 'imgs' / 'a.png')
    io_helpers.assert_one_line_error(code, err, message)
    assert 'has invalid detdeploy metadata' in err
    assert path.read_bytes() == before


# ---- outputs are validated --------------------------------------------------------------------

def with_outputs(path, num_dets=1, label=0, box=None):
    """The synthetic detector with its constant outputs changed."""
    model = io_helpers.detector_model()
    for node in model.graph.node:
        for name, value in (('num_dets', num_dets), ('labels', label)):
            if node.output[0] == name:
                del node.attribute[:]
                node.attribute.append(helper.make_attribute(
                    'value', numpy_helper.from_array(np.array([value], np.int32))))
    if box is not None:
        [initializer] = [i for i in model.graph.initializer if i.name == 'box']
        initializer.CopyFrom(numpy_helper.from_array(np.array([[box]], np.float32), 'box'))
    return io_helpers.save(model, path)


@pytest.mark.parametrize('command', ['infer', 'eval'])
@pytest.mark.parametrize('changes, message', [
    ({'label': 5}, 'output labels holds 5, outside the model\'s 2 classes'),
    ({'label': -1}, 'output labels holds -1'),
    ({'num_dets': -1}, 'output num_dets is -1, outside 0..1'),
    ({'num_dets': 7}, 'output num_dets is 7, outside 0..1'),
    ({'box': [math.nan, 0, 10, 10]}, 'output boxes holds non-finite values'),
], ids=['label above', 'label -1', 'negative num_dets', 'num_dets above K', 'NaN box'])
def test_model_outputs_are_validated(files, capsys, tmp_path, command, changes, message):
    path = with_outputs(tmp_path / 'm.onnx', **changes)
    args = ([path, files / 'imgs'] if command == 'infer'
            else [path, '--ann', files / 'ann.json', '--images', files / 'imgs'])
    code, out, err = io_helpers.run_main(capsys, command, *args)
    io_helpers.assert_one_line_error(code, err, f'{path}: {message}')


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_state(tiny_checkpoint):
    return torch.load(tiny_checkpoint, weights_only=True)


def changed_checkpoint(checkpoint, path, change):
    checkpoint = {'meta': dict(checkpoint['meta']), 'state_dict': dict(checkpoint['state_dict'])}
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


def nan_weight(checkpoint):
    key = next(k for k, v in checkpoint['state_dict'].items() if v.is_floating_point())
    checkpoint['state_dict'][key] = checkpoint['state_dict'][key].clone().fill_(math.nan)


def int_weight(checkpoint):
    key = next(k for k, v in checkpoint['state_dict'].items() if k.endswith('conv.weight'))
    checkpoint['state_dict'][key] = checkpoint['state_dict'][key].to(torch.int32)


def bool_weight(checkpoint):
    key = next(k for k, v in checkpoint['state_dict'].items() if k.endswith('conv.weight'))
    checkpoint['state_dict'][key] = checkpoint['state_dict'][key] > 0


def inf_weight(checkpoint):
    key = next(k for k, v in checkpoint['state_dict'].items() if v.is_floating_point())
    checkpoint['state_dict'][key] = checkpoint['state_dict'][key].clone()
    checkpoint['state_dict'][key].view(-1)[0] = math.inf


@pytest.mark.parametrize('change, message', [
    (nan_weight, 'non-finite values (NaN or infinity)'),
    (inf_weight, 'holds 1 non-finite values'),
    (int_weight, 'not floating point (for float parameters)'),
    (bool_weight, 'not floating point (for float parameters)'),
], ids=['NaN', 'inf', 'int32', 'bool'])
def test_broken_weights_are_refused(tiny_state, tmp_path, capsys, change, message):
    from detdeploy.models import load_detector
    path = changed_checkpoint(tiny_state, tmp_path / 'broken.pth', change)
    with pytest.raises(CheckpointError, match=message.replace('(', r'\(').replace(')', r'\)')):
        load_detector('rtmdet-tiny', path)
    if change is nan_weight:            # and on the command line: one line, nothing written
        code, _, err = io_helpers.run_main(capsys, 'export', '--model', 'rtmdet-tiny',
                                           '--checkpoint', path, '-o', tmp_path / 'x.onnx')
        io_helpers.assert_one_line_error(code, err, message)
        assert not (tmp_path / 'x.onnx').exists()


@pytest.mark.parametrize('classes, message', [
    ('circle', "meta.dataset_meta.classes is one string ('circle'), not a list"),
    (5, 'meta.dataset_meta.classes must be a list of non-empty strings, got int'),
    (['a', 3], 'must be a list of non-empty strings, got list'),
])
def test_checkpoint_class_names_are_a_list_of_strings(classes, message):
    from detdeploy.models.checkpoint import class_names_from_meta
    with pytest.raises(CheckpointError, match=message.replace('(', r'\(').replace(')', r'\)')):
        class_names_from_meta({'dataset_meta': {'classes': classes}}, 'c.pth')
    assert class_names_from_meta({'dataset_meta': {'classes': ['a', 'b']}}) == ('a', 'b')


def test_checkpoint_with_one_string_of_class_names_is_refused(tiny_state, tmp_path):
    from detdeploy.models import load_detector

    def change(checkpoint):
        checkpoint['meta'] = {'dataset_meta': {'classes': 'person'}}
    path = changed_checkpoint(tiny_state, tmp_path / 'names.pth', change)
    with pytest.raises(CheckpointError, match='is one string'):
        load_detector('rtmdet-tiny', path)


def test_train_checkpoint_loads_its_weights(files, tiny_checkpoint, tmp_path):
    """`train --checkpoint` sets the initial weights (the classifier, of another class count,
    stays initialised); a checkpoint none of whose tensors fit is refused."""
    from detdeploy.training.trainer import TrainConfig, Trainer
    config = TrainConfig(model='rtmdet-tiny', train_ann=str(files / 'ann.json'),
                         train_images=str(files / 'imgs'), out=str(tmp_path / 'run'), epochs=1,
                         batch=1, img_size=64, init_checkpoint=str(tiny_checkpoint))
    trainer = Trainer(config, show_progress=False, echo=lambda _: None)
    saved = torch.load(tiny_checkpoint, weights_only=True)['state_dict']
    own = trainer.model.state_dict()
    key = 'backbone.stem.0.conv.weight'
    assert torch.equal(own[key], saved[key])
    unrelated = tmp_path / 'unrelated.pth'
    torch.save({'state_dict': {'other.weight': torch.zeros(3)}}, unrelated)
    with pytest.raises(CheckpointError, match='none of its 1 tensors fits'):
        Trainer(TrainConfig(**{**config.to_dict(), 'init_checkpoint': str(unrelated),
                               'out': str(tmp_path / 'run2')}),
                show_progress=False, echo=lambda _: None)


# ---- parity compares against the weights the file records -------------------------------------

def test_parity_uses_the_recorded_weights_or_says_they_are_missing(files, capsys, tmp_path,
                                                                   tiny_checkpoint):
    from detdeploy.core.fileio import file_sha256
    from detdeploy.models.bundled import BUNDLED_FILE
    from detdeploy.verification.parity import recorded_checkpoint
    missing = io_helpers.save(io_helpers.detector_model(meta=io_helpers.metadata(
        checkpoint=str(tmp_path / 'gone.pth'), checkpoint_sha256='ab' * 32)), tmp_path / 'm.onnx')
    code, _, err = io_helpers.run_main(capsys, 'parity', missing, '--random', '1')
    io_helpers.assert_one_line_error(code, err, f'was exported from {tmp_path}/gone.pth (sha256 '
                                                'abababababab...), which is not here')
    sha = file_sha256(tiny_checkpoint)
    assert recorded_checkpoint(io_helpers.metadata(checkpoint=str(tiny_checkpoint),
                                                   checkpoint_sha256=sha), 'm') == str(tiny_checkpoint)
    moved = io_helpers.metadata(checkpoint='/elsewhere/rtmdet_tiny_shapes.pth',
                                checkpoint_sha256=file_sha256(BUNDLED_FILE))
    assert recorded_checkpoint(moved, 'm') == str(BUNDLED_FILE)
    assert recorded_checkpoint(io_helpers.metadata(checkpoint='random weights'), 'm') is None
    with pytest.raises(DetdeployError, match='which is not here'):
        recorded_checkpoint(io_helpers.metadata(checkpoint=str(tiny_checkpoint),
                                                checkpoint_sha256='0' * 64), 'm')


def test_raw_output_class_count_is_checked_against_the_metadata(tmp_path):
    """A --nms none graph's scores [B, N, C] state the class count: names must match it."""
    from detdeploy.core.errors import ModelFileError
    from detdeploy.runtimes.model_file import resolve_onnx_metadata
    graph = helper.make_graph(
        [helper.make_node('Constant', [], ['boxes'], value=numpy_helper.from_array(
            np.zeros((1, 5, 4), np.float32))),
         helper.make_node('Constant', [], ['scores'], value=numpy_helper.from_array(
             np.zeros((1, 5, 3), np.float32)))],
        'raw', [helper.make_tensor_value_info('images', onnx.TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info('boxes', onnx.TensorProto.FLOAT, [1, 5, 4]),
         helper.make_tensor_value_info('scores', onnx.TensorProto.FLOAT, [1, 5, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    model.ir_version = 8
    helper.set_model_props(model, io_helpers.metadata(batch=1, nms_mode='none').to_props())
    path = io_helpers.save(model, tmp_path / 'raw.onnx')
    with pytest.raises(ModelFileError, match='its graph scores 3 classes but its metadata names 2'):
        resolve_onnx_metadata(path)
