"""Property: random malformed metadata, checkpoints and COCO files fed to the loaders (through
the command line, in this process) give exit 2 and one `error:` line, or success with valid
output; never a traceback, never a hang (an alarm bounds each run), never a changed input."""
import copy
import hashlib
import json
import math
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import io_helpers

SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
BOUND_SECONDS = 120


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no command's error handling swallows it."""


def run_bounded(capsys, *args):
    def hung(signum, frame):
        raise Hung(' '.join(map(str, args)))
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(BOUND_SECONDS)
    try:
        return io_helpers.run_main(capsys, *args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_error_line_or_success(code, out, err, success_check):
    assert 'Traceback' not in err, err
    if code == 0:
        success_check(out)
    else:
        io_helpers.assert_one_line_error(code, err, '')


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# JSON values of every kind, with the numbers that break naive code
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.sampled_from([0, 1, -1, 32, 64, 2**40, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf]),
    st.text(max_size=8), st.sampled_from(['', '64', 'rgb', 'dynamic', 'person']))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=8)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('property')
    io_helpers.save(io_helpers.detector_model(), root / 'good.onnx')
    images = root / 'imgs'
    images.mkdir()
    io_helpers.save_image(images / 'a.png')
    return root


# ---- metadata -------------------------------------------------------------------------------

VALID_PROPS = io_helpers.metadata().to_props()
NESTED = {'preprocess': io_helpers.metadata().preprocess.to_dict(),
          'nms': io_helpers.metadata().nms.to_dict()}


@st.composite
def malformed_props(draw):
    props = dict(VALID_PROPS)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(props)))
        if key in NESTED and draw(st.booleans()):       # one field inside the JSON dict
            values = dict(NESTED[key])
            values[draw(st.sampled_from(sorted(values)))] = draw(json_values)
            props[key] = json.dumps(values)
        elif draw(st.booleans()):
            props[key] = json.dumps(draw(json_values))
        else:
            props[key] = draw(st.text(max_size=12))
    return props


@settings(max_examples=40, **SETTINGS)
@given(props=malformed_props())
def test_malformed_metadata(files, capsys, tmp_path_factory, props):
    model = io_helpers.detector_model()
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    path = io_helpers.save(model, tmp_path_factory.mktemp('meta') / 'm.onnx')
    before = digest(path)
    code, out, err = run_bounded(capsys, 'infer', path, files / 'imgs' / 'a.png')

    def detections_printed(text):
        assert 'a.png: ' in text and '(1 detections' in text
    assert_error_line_or_success(code, out, err, detections_printed)
    assert digest(path) == before


# ---- checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_state(tiny_checkpoint):
    return torch.load(tiny_checkpoint, weights_only=True)


tensors = st.one_of(
    st.builds(torch.zeros, st.integers(0, 3)),
    st.builds(lambda v: torch.tensor(v), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda n: torch.ones(n, dtype=torch.int64), st.integers(0, 3)),
    st.just(torch.zeros(2, 2).to_sparse()))


@st.composite
def malformed_checkpoints(draw, state):
    weights = dict(state['state_dict'])
    keys = sorted(weights)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(['drop', 'replace', 'add', 'retype']))
        key = draw(st.sampled_from(keys))
        if action == 'drop':
            weights.pop(key, None)
        elif action == 'replace':
            weights[key] = draw(tensors)
        elif action == 'add':
            weights[draw(st.one_of(st.text(max_size=5), st.integers()))] = draw(tensors)
        elif key in weights:
            weights[key] = weights[key].to(draw(st.sampled_from([torch.int8, torch.bool,
                                                                 torch.float16])))
    checkpoint = {'state_dict': weights}
    shape = draw(st.sampled_from(['plain', 'meta', 'junk meta', 'no dict']))
    if shape == 'meta':
        checkpoint['meta'] = {'dataset_meta': {'classes': draw(json_values)},
                              'detdeploy': {'input_size': draw(json_values)}}
    elif shape == 'junk meta':
        checkpoint['meta'] = draw(json_values)
    elif shape == 'no dict':
        checkpoint = draw(st.one_of(json_values, st.lists(tensors, max_size=2)))
    return checkpoint


def test_malformed_checkpoints(files, capsys, tmp_path_factory, tiny_state):
    @settings(max_examples=12, **SETTINGS)
    @given(checkpoint=malformed_checkpoints(tiny_state))
    def check(checkpoint):
        path = tmp_path_factory.mktemp('ckpt') / 'c.pth'
        torch.save(checkpoint, path)
        before = digest(path)
        code, out, err = run_bounded(capsys, 'infer', '--model', 'rtmdet-tiny', '--checkpoint',
                                     path, '--input-size', '64', files / 'imgs' / 'a.png')

        def ran(text):
            assert 'a.png: ' in text and ' detections' in text
        assert_error_line_or_success(code, out, err, ran)
        assert digest(path) == before
    torch.set_num_threads(1)        # a loaded 2-core machine: far faster on one thread
    check()


# ---- COCO files -----------------------------------------------------------------------------

BASE_COCO = {
    'images': [{'id': 1, 'file_name': 'a.png', 'height': 64, 'width': 64}],
    'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [4, 8, 36, 40],
                     'area': 1440, 'iscrowd': 0}],
    'categories': [{'id': 1, 'name': 'circle'}, {'id': 2, 'name': 'square'}]}


@st.composite
def malformed_coco(draw):
    data = copy.deepcopy(BASE_COCO)
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(data) + ['(top)']))
        if section == '(top)':
            data[draw(st.sampled_from(['images', 'annotations', 'categories', 'x']))] = \
                draw(json_values)
        elif not isinstance(data.get(section), list) or not data[section]:
            data[section] = draw(json_values)
        else:
            row = data[section][0]
            if not isinstance(row, dict) or draw(st.booleans()):
                data[section][0] = draw(json_values)
            elif draw(st.booleans()) and row:
                row.pop(draw(st.sampled_from(sorted(row))))
            else:
                row[draw(st.sampled_from(sorted(row) + ['extra']))] = draw(json_values)
    return data


@settings(max_examples=60, **SETTINGS)
@given(data=malformed_coco())
def test_malformed_coco_files(files, capsys, tmp_path_factory, data):
    ann = tmp_path_factory.mktemp('coco') / 'ann.json'
    ann.write_text(json.dumps(data))
    before = digest(ann)
    code, out, err = run_bounded(capsys, 'eval', files / 'good.onnx', '--ann', ann, '--images',
                                 files / 'imgs')

    def scored(text):
        assert text.splitlines()[1].startswith('ort') and 'AP' in text
    assert_error_line_or_success(code, out, err, scored)
    assert digest(ann) == before
