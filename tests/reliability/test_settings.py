"""Settings: thresholds outside [0, 1], non-positive counts and batch sizes, unknown model names
(with a suggestion) are one-line errors; existing output files are replaced atomically by
default and refused with --no-overwrite by every command that writes; `train` never replaces
a run by accident."""
import json

import pytest

import io_helpers


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('settings')
    io_helpers.save(io_helpers.detector_model(), root / 'good.onnx')
    io_helpers.save_image(root / 'img.png')
    (root / 'ann.json').write_text(json.dumps({
        'images': [{'id': 1, 'file_name': 'img.png', 'height': 64, 'width': 64}],
        'annotations': [], 'categories': [{'id': 1, 'name': 'circle'},
                                          {'id': 2, 'name': 'square'}]}))
    return root


def fill(args, files):
    return [str(a).format(root=files, good=files / 'good.onnx', img=files / 'img.png',
                          ann=files / 'ann.json') for a in args]


EVAL = ['eval', '{good}', '--ann', '{ann}', '--images', '{root}']
TRAIN = ['train', '--train-ann', '{ann}', '--train-images', '{root}', '--out', '{root}/run']


@pytest.mark.parametrize('args, message', [
    (['infer', '{good}', '{img}', '--score-thr', '1.5'], "'--score-thr': 1.5 is not in the range"),
    (['infer', '{good}', '{img}', '--score-thr', '-0.1'], "'--score-thr': -0.1 is not in the"),
    (['infer', '{good}', '{img}', '--show-thr', '2'], "'--show-thr': 2.0 is not in the range"),
    (['export', '--score-thr', '-1'], "'--score-thr': -1.0 is not in the range"),
    (['export', '--iou-thr', '1.01'], "'--iou-thr': 1.01 is not in the range"),
    ([*EVAL, '--min-ap', '1.1'], "'--min-ap': 1.1 is not in the range"),
    (['parity', '{good}', '--random', '1', '--atol', '-1'], "'--atol': -1.0 is not in the range"),
    (['infer', '{good}', '{img}', '--batch', '0'], "'--batch': 0 is not in the range x>=1"),
    (['export', '--max-det', '0'], "'--max-det': 0 is not in the range x>=1"),
    (['export', '--pre-top-k', '-5'], "'--pre-top-k': -5 is not in the range x>=1"),
    (['export', '--batch', '0'], "'--batch': 0 is not in the range x>=1"),
    (['bench', '{good}', '--batch', '0,2'], "--batch '0,2': give positive integers"),
    (['bench', '{good}', '--iters', '0'], "'--iters': 0 is not in the range x>=1"),
    (['parity', '{good}', '--random', '0'], "'--random': 0 is not in the range x>=1"),
    (['parity', '{good}', '--random', '1', '--batch', '0'], "'--batch': 0 is not in the range"),
    ([*EVAL, '--batch', '0'], "'--batch': 0 is not in the range x>=1"),
    ([*TRAIN, '--batch', '0'], "'--batch': 0 is not in the range x>=1"),
    ([*TRAIN, '--epochs', '0'], "'--epochs': 0 is not in the range x>=1"),
    (['build-engine', '{good}', '--max-batch', '0'], "'--max-batch': 0 is not in the range"),
    (['make-dataset', 'shapes', '--out', '{root}/d', '--size', '10'], "'--size': 10 is not in"),
    # unknown model names, with the closest known one
    (['infer', '--model', 'rtmdet-tinny', '{img}'], "unknown model 'rtmdet-tinny': did you mean "
                                                    "'rtmdet-tiny'?"),
    (['export', '--model', 'rtmdet-xl'], "unknown model 'rtmdet-xl': did you mean"),
    (['bench', 'rtmdet-ss'], "unknown model 'rtmdet-ss': did you mean 'rtmdet-s'?"),
    (['eval', '--model', 'rtmdett', '--ann', '{ann}', '--images', '{root}'],
     "unknown model 'rtmdett': did you mean"),
    (['parity', '{good}', '--model', 'rtmdet-q', '--random', '1'], "unknown model 'rtmdet-q'"),
    ([*TRAIN, '--model', 'rtmdet-mm'], "unknown model 'rtmdet-mm': did you mean 'rtmdet-m'?"),
])
def test_bad_setting_is_one_line(files, capsys, args, message):
    code, _, err = io_helpers.run_main(capsys, *fill(args, files))
    io_helpers.assert_one_line_error(code, err, message)


NO_OVERWRITE = {
    'export': (['export', '-o', '{root}/taken.onnx'], ['taken.onnx']),
    'build-engine': (['build-engine', '{good}', '-o', '{root}/taken.engine'], ['taken.engine']),
    'build-engine sidecar': (['build-engine', '{good}', '-o', '{root}/new.engine'],
                             ['new.engine.json']),
    'infer --out': (['infer', '{good}', '{img}', '--out', '{root}/out'], ['out/img.png']),
    'bench --json': (['bench', '{good}', '--json', '{root}/taken.json'], ['taken.json']),
    'bench --plot': (['bench', '{good}', '--plot', '{root}/taken.png'], ['taken.png']),
    'parity --json': (['parity', '{good}', '--random', '1', '--json', '{root}/taken.json'],
                      ['taken.json']),
    'eval --json': ([*EVAL, '--json', '{root}/taken.json'], ['taken.json']),
    'make-dataset': (['make-dataset', 'shapes', '--out', '{root}/data', '--train', '0', '--val',
                      '2'], ['data/val/000001.png']),
}


@pytest.mark.parametrize('command', list(NO_OVERWRITE))
def test_no_overwrite_refuses_existing_files_before_any_work(files, tmp_path, capsys, command):
    args, existing = NO_OVERWRITE[command]
    for name in existing:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b'keep me')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    args = [str(a).format(root=tmp_path, good=files / 'good.onnx', img=files / 'img.png',
                          ann=files / 'ann.json') for a in args]
    code, _, err = io_helpers.run_main(capsys, *args, '--no-overwrite')
    io_helpers.assert_one_line_error(code, err, 'exists and --no-overwrite was given: remove it')
    assert existing[0] in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before
    for name in existing:
        assert (tmp_path / name).read_bytes() == b'keep me'


def test_without_no_overwrite_files_are_replaced(files, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'img.json').write_text('stale')
    code, _, err = io_helpers.run_main(capsys, 'infer', files / 'good.onnx', files / 'img.png',
                                       '--out', out)
    assert code == 0, err
    assert json.loads((out / 'img.json').read_text())['detections']
    assert not list(out.glob('.*.tmp'))


def test_train_never_replaces_a_run_by_accident(files, tmp_path, capsys):
    from detdeploy.commands.train import _check_run_folder
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'last.pth').write_bytes(b'hours of training')
    args = fill(TRAIN, files)
    args[args.index('--out') + 1] = str(run)
    code, _, err = io_helpers.run_main(capsys, *args)
    io_helpers.assert_one_line_error(code, err, (
        f'--out {run} already holds a run (last.pth): pass --resume to continue it, '
        '--overwrite to start over, or choose another --out'))
    code, _, err = io_helpers.run_main(capsys, *args, '--resume', '--overwrite')
    io_helpers.assert_one_line_error(code, err, 'give --resume (continue the run) or '
                                                '--overwrite (start over), not both')
    _check_run_folder(str(run), resume=False, overwrite=True)      # allowed: starts over
    _check_run_folder(str(run), resume=True, overwrite=False)      # allowed: continues
    _check_run_folder(str(tmp_path / 'fresh'), resume=False, overwrite=False)
    (tmp_path / 'empty').mkdir()
    _check_run_folder(str(tmp_path / 'empty'), resume=False, overwrite=False)
    assert (run / 'last.pth').read_bytes() == b'hours of training'
