"""Validation at the boundary instead of tracebacks: COCO files (`core.coco`), checkpoints and
training state (`models.checkpoint`), sizes a flag, a file or an image header declares
(`core.memory`), disk-full and SIGTERM while a checkpoint is saved, odd external-data
locations. Each is one line naming the file, the field and the problem, exit 2."""
import copy
import errno
import json

import numpy as np
import pytest
import torch

import io_helpers
from detdeploy.core.errors import DetdeployError

BASE_COCO = {
    'images': [{'id': 1, 'file_name': 'a.png', 'height': 64, 'width': 64}],
    'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [4, 8, 36, 40],
                     'area': 1440, 'iscrowd': 0}],
    'categories': [{'id': 1, 'name': 'circle'}, {'id': 2, 'name': 'square'}]}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('boundaries')
    io_helpers.save(io_helpers.detector_model(), root / 'good.onnx')
    images = root / 'imgs'
    images.mkdir()
    io_helpers.save_image(images / 'a.png')
    io_helpers.save_image(root / 'outside.png')
    return root


def mutated(change):
    data = copy.deepcopy(BASE_COCO)
    change(data)
    return data


def drop(section, key):
    return lambda data: data[section][0].pop(key)


def setter(section, key, value):
    return lambda data: data[section][0].__setitem__(key, value)


COCO_CASES = {
    'missing bbox': (drop('annotations', 'bbox'),
                     'annotations[0].bbox: must be four finite numbers'),
    'short bbox': (setter('annotations', 'bbox', [1, 2, 3]),
                   'annotations[0].bbox: must be four finite numbers [x, y, width, height], got '
                   '[1, 2, 3]'),
    'string in bbox': (setter('annotations', 'bbox', [1, 2, '3', 4]),
                       'annotations[0].bbox: must be four finite numbers'),
    'negative width': (setter('annotations', 'bbox', [1, 2, -3, 4]),
                       'annotations[0].bbox: width and height must not be negative'),
    'missing name': (drop('categories', 'name'), 'categories[0].name: must be a non-empty string'),
    'missing file_name': (drop('images', 'file_name'),
                          'images[0].file_name: must be a non-empty string'),
    'string image id': (setter('images', 'id', '1'), "images[0].id: must be an integer, got '1'"),
    'string category id': (setter('categories', 'id', 'one'), 'categories[0].id: must be an '
                                                               'integer'),
    'duplicate category id': (lambda d: d['categories'][1].__setitem__('id', 1),
                              'categories[1].id: 1 appears twice'),
    'annotation on a missing image id': (setter('annotations', 'image_id', 9),
                                         'annotations[0].image_id: 9 is not the id of any image'),
    'unknown category': (setter('annotations', 'category_id', 7),
                         'annotations[0].category_id: 7 is not the id of any category'),
    'string area': (setter('annotations', 'area', 'big'),
                    "annotations[0].area: must be a non-negative number, got 'big'"),
    'iscrowd 2': (setter('annotations', 'iscrowd', 2), 'annotations[0].iscrowd: must be 0 or 1'),
    'absolute file_name': (setter('images', 'file_name', '/etc/passwd'),
                           "images[0].file_name: '/etc/passwd' is absolute"),
    'file_name climbing out': (setter('images', 'file_name', '../outside.png'),
                               "images[0].file_name: '../outside.png' climbs out of the image "
                               'folder'),
    'no categories': (lambda d: d.__setitem__('categories', []),
                      'categories: is empty: the file names no classes'),
    'images not a list': (lambda d: d.__setitem__('images', {'id': 1}),
                          'images: must be a list, got dict'),
    'a list, not an object': (lambda d: d.clear(), 'is not a COCO instances file (no "images" '
                                                   'list)'),
}


@pytest.mark.parametrize('command', ['eval', 'train'])
@pytest.mark.parametrize('case', list(COCO_CASES))
def test_coco_schema_errors_name_the_field(files, capsys, tmp_path, command, case):
    change, message = COCO_CASES[case]
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(mutated(change)))
    before = ann.read_bytes()
    args = (['eval', files / 'good.onnx', '--ann', ann, '--images', files / 'imgs']
            if command == 'eval' else
            ['train', '--train-ann', ann, '--train-images', files / 'imgs', '--out',
             tmp_path / 'run', '--img-size', '64', '--batch', '1'])
    code, _, err = io_helpers.run_main(capsys, *args)
    io_helpers.assert_one_line_error(code, err, message)
    assert str(ann) in err
    assert ann.read_bytes() == before


@pytest.mark.parametrize('text, message', [
    ('[' * 100000 + ']' * 100000, 'JSON nested too deeply'),
    ('{"images": [', 'invalid JSON'),
    ('\xff\xfe', 'not UTF-8 text'),
])
def test_unreadable_annotation_files(files, capsys, tmp_path, text, message):
    ann = tmp_path / 'ann.json'
    ann.write_bytes(text.encode('latin-1'))
    code, _, err = io_helpers.run_main(capsys, 'eval', files / 'good.onnx', '--ann', ann,
                                       '--images', files / 'imgs')
    io_helpers.assert_one_line_error(code, err, message)


def test_empty_ground_truth_is_not_an_ap_of_zero(files, capsys, tmp_path):
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps({**BASE_COCO, 'annotations': []}))
    code, _, err = io_helpers.run_main(capsys, 'eval', files / 'good.onnx', '--ann', ann,
                                       '--images', files / 'imgs', '--min-ap', '0')
    io_helpers.assert_one_line_error(code, err, 'has no annotations (no ground truth): there is '
                                                'nothing to score')


def test_missing_area_and_iscrowd_take_cocos_meaning(files, capsys, tmp_path):
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(mutated(lambda d: (d['annotations'][0].pop('area'),
                                                 d['annotations'][0].pop('iscrowd')))))
    code, out, err = io_helpers.run_main(capsys, 'eval', files / 'good.onnx', '--ann', ann,
                                         '--images', files / 'imgs')
    assert code == 0, err
    assert 'ort' in out


# ---- sizes that would end in MemoryError ------------------------------------------------------

def png_header(path, width, height):
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack(
        '>IIBBBBB', width, height, 8, 2, 0, 0, 0)) + chunk(b'IEND', b''))
    return path


@pytest.mark.parametrize('args, message', [
    (['infer', 'rtmdet-tiny', '{img}', '--input-size', '99968'],
     "--input-size 99968x99968: one image's network input alone needs 119.9 GB"),
    (['bench', 'rtmdet-tiny', '--batch', '100000'], '--batch 100000 needs at least'),
    (['parity', '{good}', '--random', '100000000'], '--random 100000000 (images kept for the '
                                                    'comparison) needs at least'),
    (['make-dataset', 'shapes', '--out', '{root}/ds', '--size', '100000'],
     '--size 100000 (100000x100000 images) needs at least 320.0 GB'),
    (['parity', '{good}', '--images', '{root}/huge.png', '--max-pixels', '0'],
     'decoding {root}/huge.png (2000000x2000000) needs at least 24.0 TB'),
])
def test_huge_sizes_are_refused_with_the_figure(files, capsys, args, message):
    png_header(files / 'huge.png', 2_000_000, 2_000_000)
    filled = [str(a).format(root=files, img=files / 'imgs' / 'a.png', good=files / 'good.onnx')
              for a in args]
    code, _, err = io_helpers.run_main(capsys, *filled)
    io_helpers.assert_one_line_error(code, err, message.format(root=files))
    assert 'more than this machine has' in err


def test_huge_static_dims_of_a_foreign_file(files, capsys, tmp_path):
    model = io_helpers.detector_model(input_hw=(2**20, 2**20), with_metadata=False)
    path = io_helpers.save(model, tmp_path / 'wide.onnx')
    code, _, err = io_helpers.run_main(capsys, 'infer', path, files / 'imgs', '--class-names',
                                       'a', '--mean', '0,0,0', '--std', '1,1,1',
                                       '--channel-order', 'rgb')
    io_helpers.assert_one_line_error(code, err, 'more than this machine has')


# ---- checkpoint oddities ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_state(tiny_checkpoint):
    return torch.load(tiny_checkpoint, weights_only=True)


def odd_checkpoints(state):
    weights = state['state_dict']
    from detdeploy.models.registry import get_spec
    key = get_spec('rtmdet-tiny').model_class.num_classes_key
    return {
        'non-string key': ({**weights, 3: torch.zeros(1)},
                           'state dict key 3 is a int, not a parameter name'),
        'sparse tensor': ({**weights, 'x': torch.zeros(3, 3).to_sparse()},
                          'x is a sparse_coo tensor'),
        'scalar classifier': ({**weights, key: torch.tensor(1.0)},
                              f'{key} has shape []; a classifier has one row per class'),
        'empty': ({}, 'has no state dict of tensors'),
    }


@pytest.mark.parametrize('case', ['non-string key', 'sparse tensor', 'scalar classifier',
                                  'empty'])
def test_odd_checkpoints_are_one_line(tiny_state, tmp_path, capsys, case):
    weights, message = odd_checkpoints(tiny_state)[case]
    path = tmp_path / 'odd.pth'
    torch.save({'meta': tiny_state['meta'], 'state_dict': weights}, path)
    code, _, err = io_helpers.run_main(capsys, 'infer', '--model', 'rtmdet-tiny', '--checkpoint',
                                       path, tmp_path / 'none.png')
    if code == 2 and 'no such image' in err:       # images are collected first: give one
        io_helpers.save_image(tmp_path / 'none.png')
        code, _, err = io_helpers.run_main(capsys, 'infer', '--model', 'rtmdet-tiny',
                                           '--checkpoint', path, tmp_path / 'none.png')
    io_helpers.assert_one_line_error(code, err, message)


def test_odd_meta_is_ignored_not_a_traceback(tiny_state, tmp_path):
    from detdeploy.models import load_detector
    path = tmp_path / 'meta.pth'
    torch.save({'meta': 'trained by me', 'state_dict': tiny_state['state_dict']}, path)
    assert load_detector('rtmdet-tiny', path).class_names[0] == 'person'
    torch.save({'meta': {'detdeploy': {'input_size': [2**40, 2**40]}},
                'state_dict': tiny_state['state_dict']}, path)
    with pytest.raises(DetdeployError, match='meta.detdeploy.input_size .*more than this machine'):
        load_detector('rtmdet-tiny', path)


# ---- training state and saving ----------------------------------------------------------------

@pytest.fixture(scope='module')
def train_files(files):
    ann = files / 'train.json'
    ann.write_text(json.dumps(BASE_COCO))
    return ['train', '--train-ann', ann, '--train-images', files / 'imgs', '--img-size', '64',
            '--batch', '1', '--epochs', '1', '--max-iters-per-epoch', '1', '--warmup-iters', '1']


@pytest.mark.parametrize('content, message', [
    ('truncated', 'cannot read checkpoint'),
    ('pickled class', 'needs arbitrary unpickling'),
    ('no training state', 'holds no training state'),
])
def test_resume_from_a_broken_last_pth(train_files, tiny_state, tmp_path, capsys, content,
                                       message):
    run = tmp_path / 'run'
    run.mkdir()
    last = run / 'last.pth'
    if content == 'truncated':
        buffer = __import__('io').BytesIO()
        torch.save(tiny_state, buffer)
        last.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    elif content == 'pickled class':
        torch.save({'meta': {}, 'train_state': np.random.default_rng(0)}, last)
    else:
        torch.save(tiny_state, last)
    before = last.read_bytes()
    code, _, err = io_helpers.run_main(capsys, *train_files, '--out', run, '--resume')
    io_helpers.assert_one_line_error(code, err, message)
    assert last.read_bytes() == before


def full_disk_handle(monkeypatch, error):
    """Every `atomic_write` handle raises `error` once a few kilobytes are written."""
    import detdeploy.core.fileio as fileio
    real_fdopen = fileio.os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise error
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)
    monkeypatch.setattr(fileio.os, 'fdopen', lambda fd, mode: Full(real_fdopen(fd, mode)))


def test_disk_full_while_saving_a_checkpoint_names_the_file(tiny_state, tmp_path, monkeypatch):
    """torch.save wraps the disk's OSError into a RuntimeError; `atomic_write` still finds it
    and names the file (the CLI prints that line, exit 2)."""
    from detdeploy.core.errors import OutputError
    from detdeploy.models import save_checkpoint
    from detdeploy.models.registry import get_spec
    target = tmp_path / 'last.pth'
    target.write_bytes(b'previous run')
    full_disk_handle(monkeypatch, OSError(errno.ENOSPC, 'No space left on device'))
    with pytest.raises(OutputError, match=f'cannot write {target}: No space left on device'):
        save_checkpoint(target, tiny_state['state_dict'], get_spec('rtmdet-tiny'), ('a',))
    assert target.read_bytes() == b'previous run'
    assert sorted(tmp_path.glob('.*.tmp')) == []


def test_sigterm_while_saving_a_checkpoint_is_one_line(train_files, tmp_path, capsys,
                                                       monkeypatch):
    """torch.save wraps an exception raised in its writer (where a signal handler runs) into a
    RuntimeError; the command still ends as terminated, with no chained traceback."""
    from detdeploy.cli import Terminated
    full_disk_handle(monkeypatch, Terminated())
    code, _, err = io_helpers.run_main(capsys, *train_files, '--out', tmp_path / 'run')
    assert code == 143, err
    assert err.strip().splitlines()[-1] == 'aborted: terminated (SIGTERM)'
    assert 'Traceback' not in err and 'RuntimeError' not in err
    assert sorted(p.name for p in (tmp_path / 'run').glob('.*.tmp')) == []


def test_nul_byte_in_an_external_data_location(tmp_path, capsys):
    path = io_helpers.save_with_external_data(io_helpers.detector_model(), tmp_path / 'm.onnx')
    io_helpers.edit_external_data(path, 'box', location='weights.bin\x00.txt')
    io_helpers.save_image(tmp_path / 'a.png')
    code, _, err = io_helpers.run_main(capsys, 'infer', path, tmp_path / 'a.png')
    io_helpers.assert_one_line_error(code, err, 'has an external data location with a NUL byte')
