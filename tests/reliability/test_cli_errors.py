"""Every command's predictable errors are one line on stderr with exit code 2, no traceback:
unwritable or missing output folders, a directory where a file belongs (and the reverse),
corrupt or empty model files, empty image folders, broken annotation files, OS errors in the
middle of a run; `--debug` shows the traceback; a real process per command family."""
import errno
import importlib.util

import pytest

import io_helpers

UNWRITABLE = '/proc'            # no file can be created there, not even by root


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli_errors')
    (root / 'bad.onnx').write_bytes(b'not an onnx file at all')
    (root / 'empty.onnx').write_bytes(b'')
    (root / 'dir.onnx').mkdir()
    (root / 'emptydir').mkdir()
    (root / 'afile').write_text('plain text\n')
    (root / 'bad.json').write_text('{"images": [')
    (root / 'ann.json').write_text('{"images": [], "annotations": [], "categories": '
                                   '[{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}')
    io_helpers.save(io_helpers.detector_model(), root / 'good.onnx')
    io_helpers.save_image(root / 'img.png')
    return root


CASES = [
    # export
    (['export', '-o', '{emptydir}'], "'{emptydir}' is a directory"),
    (['export', '-o', '{root}/missing/m.onnx'], 'output directory does not exist: {root}/missing'),
    (['export', '-o', f'{UNWRITABLE}/m.onnx'], f'cannot write -o {UNWRITABLE}/m.onnx: directory '
                                              f'{UNWRITABLE} is not writable'),
    (['export', '--checkpoint', '{afile}', '-o', '{root}/m.onnx'],
     '{afile} is not a PyTorch checkpoint'),
    (['export', '--class-names', ',', '-o', '{root}/m.onnx'], "--class-names ',' names no classes"),
    # infer
    (['infer', '{root}/bad.onnx', '{img}'], '{root}/bad.onnx is not an ONNX model'),
    (['infer', '{root}/empty.onnx', '{img}'], '{root}/empty.onnx is empty, not an ONNX model'),
    (['infer', '{root}/dir.onnx', '{img}'], '{root}/dir.onnx is a directory, not a model file'),
    (['infer', '{good}', '{emptydir}'], 'no images found in: {emptydir}'),
    (['infer', '{good}', '{root}/missing.png'], 'no such image file or directory'),
    (['infer', '{good}', '{img}', '--out', '{afile}'], "'{afile}' is a file"),
    (['infer', '{good}', '{img}', '--out', f'{UNWRITABLE}/out'],
     f'cannot write to --out {UNWRITABLE}/out: {UNWRITABLE} is not writable'),
    # parity
    (['parity', '{good}', '--random', '1', '--json', '{root}/missing/r.json'],
     'output directory does not exist'),
    (['parity', '{good}', '--random', '1', '--json', '{emptydir}'], 'is a directory'),
    (['parity', '{root}/bad.onnx', '--random', '1'], 'is not an ONNX model'),
    (['parity', '{root}/dir.onnx', '--random', '1'], 'is a directory'),
    # bench
    (['bench', '{good}', '--json', '{root}/missing/b.json'], 'output directory does not exist'),
    (['bench', '{good}', '--plot', f'{UNWRITABLE}/b.png'], 'is not writable'),
    (['bench', '{good}', '--images', '{emptydir}'], 'no images found in: {emptydir}'),
    (['bench', '{good}', '--images', '{img}'], 'not a directory'),
    (['bench', '{good}', '--json', '{root}/same', '--plot', '{root}/same'],
     '--json and --plot name the same file'),
    (['bench', '{root}/bad.onnx'], 'is not an ONNX model'),
    # build-engine
    (['build-engine', '{good}', '-o', '{good}'], 'would replace the ONNX file it is built from'),
    (['build-engine', '{good}', '-o', '{root}/missing/m.engine'],
     'output directory does not exist'),
    (['build-engine', '{root}/bad.onnx', '-o', '{root}/m.engine'], 'is not an ONNX model'),
    (['build-engine', '{root}/missing.onnx'], 'model file not found'),
    (['build-engine', '{good}', '--timing-cache', '{emptydir}'], 'is a directory'),
    # eval
    (['eval', '{good}', '--ann', '{root}/bad.json', '--images', '{emptydir}'],
     'is not a COCO instances file'),
    (['eval', '{good}', '--ann', '{root}/ann.json', '--images', '{root}/nodir'],
     'image directory {root}/nodir does not exist'),
    (['eval', '{good}', '--ann', '{root}/ann.json', '--images', '{emptydir}', '--json',
      '{root}/missing/e.json'], 'output directory does not exist'),
    (['eval', '{root}/missing.onnx', '--ann', '{root}/ann.json', '--images', '{emptydir}'],
     'model file not found'),
    # train and make-dataset
    (['train', '--train-ann', '{root}/ann.json', '--train-images', '{emptydir}', '--out',
      '{afile}'], "'{afile}' is a file"),
    (['train', '--train-ann', '{root}/ann.json', '--train-images', '{emptydir}', '--out',
      f'{UNWRITABLE}/run'], 'is not writable'),
    (['train', '--train-ann', '{root}/bad.json', '--train-images', '{emptydir}', '--out',
      '{root}/run'], 'is not a COCO instances file'),
    (['make-dataset', 'shapes', '--out', '{afile}'], "'{afile}' is a file"),
    (['make-dataset', 'shapes', '--out', f'{UNWRITABLE}/data'], 'is not writable'),
]


def fill(text: str, files) -> str:
    return text.format(root=files, emptydir=files / 'emptydir', afile=files / 'afile',
                       good=files / 'good.onnx', img=files / 'img.png')


@pytest.mark.parametrize('args, message', CASES, ids=[
    f'{case[0][0]}-{i}' for i, case in enumerate(CASES)])
def test_predictable_error_is_one_line(files, capsys, args, message):
    code, _, err = io_helpers.run_main(capsys, *[fill(a, files) for a in args])
    io_helpers.assert_one_line_error(code, err, fill(message, files))


@pytest.mark.skipif(importlib.util.find_spec('tensorrt') is not None,
                    reason='tensorrt is installed here')
def test_build_engine_without_tensorrt(files, capsys):
    code, _, err = io_helpers.run_main(capsys, 'build-engine', files / 'good.onnx', '-o',
                                       files / 'out.engine')
    io_helpers.assert_one_line_error(code, err, 'TensorRT is not installed')


def test_os_error_in_the_middle_of_a_run(files, capsys, monkeypatch):
    """A full disk while writing: one line naming the error and the file; --debug shows where."""
    import detdeploy.inference.batch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device', str(files / 'out' / 'img.png'))
    monkeypatch.setattr(detdeploy.inference.batch, 'run_infer', disk_full)
    args = ['infer', files / 'good.onnx', files / 'img.png', '--out', files / 'out']
    code, _, err = io_helpers.run_main(capsys, *args)
    io_helpers.assert_one_line_error(code, err, f'No space left on device: {files}/out/img.png')
    with pytest.raises(OSError):
        io_helpers.run_main(capsys, '--debug', *args)


@pytest.mark.parametrize('args, message', [
    (['infer', '--batch', 'x', 'IMG'], "Invalid value for '--batch': 'x' is not a valid integer"),
    (['export', '--nms', 'fast'], "Invalid value for '--nms'"),
    (['nosuch'], "No such command 'nosuch'"),
    (['parity'], "Missing argument 'MODEL_FILE'"),
])
def test_usage_errors_are_one_line(files, capsys, args, message):
    code, _, err = io_helpers.run_main(capsys, *[files / 'img.png' if a == 'IMG' else a
                                                 for a in args])
    io_helpers.assert_one_line_error(code, err, message)
    assert '--help)' in err


@pytest.mark.parametrize('args, message', [
    (['parity', '{good}', '--random', '1', '--json', '{root}/missing/r.json'],
     'output directory does not exist'),
    (['bench', '{root}/bad.onnx'], 'is not an ONNX model'),
    (['eval', '{good}', '--ann', '{root}/bad.json', '--images', '{emptydir}'],
     'is not a COCO instances file'),
    (['build-engine', '{good}', '-o', '{good}'], 'would replace the ONNX file'),
    (['make-dataset', 'shapes', '--out', '{afile}'], 'is a file'),
])
def test_real_process_exit_codes(files, args, message):
    done = io_helpers.run_subprocess(*[fill(a, files) for a in args])
    io_helpers.assert_one_line_error(done.returncode, done.stderr, fill(message, files))


def test_debug_shows_the_traceback_in_a_real_process(files):
    done = io_helpers.run_subprocess('--debug', 'bench', files / 'bad.onnx')
    assert done.returncode != 0 and 'Traceback' in done.stderr
    assert 'is not an ONNX model' in done.stderr
