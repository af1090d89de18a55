"""No output may destroy an input: every writing command refuses, before any work, an output
path that is one of its inputs (the same path, another spelling, a symlink or a hard link to
it, an output folder that would overwrite input images); outputs that are symlinks are written
through, FIFOs, devices and symlink loops are refused (`core.fileio`)."""
import hashlib
import json
import os
import shutil

import pytest

import io_helpers


@pytest.fixture(scope='module')
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp('outputs_vs_inputs')
    io_helpers.save(io_helpers.detector_model(), root / 'good.onnx')
    images = root / 'imgs'
    images.mkdir()
    io_helpers.save_image(images / 'a.png')
    io_helpers.save_image(images / 'b.png', seed=1)
    jpgs = root / 'jpgs'
    jpgs.mkdir()
    from PIL import Image
    import numpy as np
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(jpgs / 'c.jpg')
    (root / 'ann.json').write_text(json.dumps({
        'images': [{'id': 1, 'file_name': 'a.png', 'height': 64, 'width': 64}],
        'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [4, 8, 36, 40],
                         'area': 1440, 'iscrowd': 0}],
        'categories': [{'id': 1, 'name': 'circle'}, {'id': 2, 'name': 'square'}]}))
    shutil.copy(tiny_checkpoint, root / 'ck.pth')
    os.symlink(root / 'ck.pth', root / 'ck_link.pth')
    os.link(root / 'ck.pth', root / 'ck_hard.pth')
    os.symlink(root / 'good.onnx', root / 'good_link.json')
    run = root / 'run'
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / 'last.pth')
    (root / 'run2').mkdir()
    shutil.copy(root / 'ann.json', root / 'run2' / 'log.jsonl')
    os.mkfifo(root / 'fifo.json')
    os.symlink('loop.json', root / 'loop.json')
    return root


def fill(args, files):
    return [str(a).format(root=files, good=files / 'good.onnx', imgs=files / 'imgs',
                          ann=files / 'ann.json', ck=files / 'ck.pth') for a in args]


def digests(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob('*'))
            if p.is_file() and not p.is_symlink() and not p.name.startswith('.')}


TRAIN = ['train', '--train-ann', '{ann}', '--train-images', '{imgs}', '--epochs', '1']
CASES = {
    'export -o == --checkpoint': (['export', '-o', '{ck}', '--checkpoint', '{ck}'],
                                  'would overwrite the input --checkpoint'),
    'export -o symlink to --checkpoint': (['export', '-o', '{root}/ck_link.pth',
                                           '--checkpoint', '{ck}'],
                                          'would overwrite the input --checkpoint'),
    'export -o hard link of --checkpoint': (['export', '-o', '{root}/ck_hard.pth',
                                             '--checkpoint', '{ck}'],
                                            'would overwrite the input --checkpoint'),
    'infer --out == image folder': (['infer', '{good}', '{imgs}', '--out', '{imgs}'],
                                    'would overwrite the input image'),
    'infer --out == image folder, other spelling': (
        ['infer', '{good}', '{imgs}/a.png', '--out', '{imgs}/../imgs/.'],
        'would overwrite the input image'),
    'bench --json == model': (['bench', '{good}', '--json', '{good}'],
                              'would overwrite the input model'),
    'bench --plot == model': (['bench', '{good}', '--plot', '{good}'],
                              'would overwrite the input model'),
    'bench --json symlink to model': (['bench', '{good}', '--json', '{root}/good_link.json'],
                                      'would overwrite the input model'),
    'bench --json == an --images file': (['bench', '{good}', '--images', '{imgs}', '--json',
                                          '{imgs}/b.png'], 'would overwrite the input --images'),
    'parity --json == model': (['parity', '{good}', '--random', '1', '--json', '{good}'],
                               'would overwrite the input model'),
    'parity --json == an image': (['parity', '{good}', '--images', '{imgs}', '--json',
                                   '{imgs}/a.png'], 'would overwrite the input image'),
    'eval --json == --ann': (['eval', '{good}', '--ann', '{ann}', '--images', '{imgs}',
                              '--json', '{ann}'], 'would overwrite the input --ann'),
    'eval --json == an image of the dataset': (['eval', '{good}', '--ann', '{ann}', '--images',
                                                '{imgs}', '--json', '{imgs}/a.png'],
                                               'would overwrite the input image'),
    'eval --json == model': (['eval', '{good}', '--ann', '{ann}', '--images', '{imgs}',
                              '--json', '{good}'], 'would overwrite the input model'),
    'build-engine --timing-cache == its ONNX': (
        ['build-engine', '{good}', '-o', '{root}/m.engine', '--timing-cache', '{good}'],
        'would overwrite the input MODEL.onnx'),
    'train --out holding its --checkpoint': (
        [*TRAIN, '--out', '{root}/run', '--overwrite', '--checkpoint', '{root}/run/last.pth'],
        'would overwrite the input --checkpoint'),
    'train --out holding its --train-ann': (
        ['train', '--train-ann', '{root}/run2/log.jsonl', '--train-images', '{imgs}',
         '--out', '{root}/run2', '--overwrite'], 'would overwrite the input --train-ann'),
    'output is a FIFO': (['parity', '{good}', '--random', '1', '--json', '{root}/fifo.json'],
                         'is not a regular file (a FIFO'),
    'output is a device': (['bench', '{good}', '--json', '/dev/null'],
                           'is not a regular file (a character device)'),
    'output is a symlink loop': (['eval', '{good}', '--ann', '{ann}', '--images', '{imgs}',
                                  '--json', '{root}/loop.json'],
                                 'is not a regular file (a symlink loop)'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_output_that_is_an_input_is_refused_before_any_work(files, capsys, case):
    args, message = CASES[case]
    before = digests(files)
    code, out, err = io_helpers.run_main(capsys, *fill(args, files))
    io_helpers.assert_one_line_error(code, err, message)
    assert out == ''                # refused before any work
    assert digests(files) == before


def test_output_symlinks_are_written_through(files, capsys, tmp_path):
    """A symlinked output replaces the file it points to (existing or not); the link stays."""
    existing, dangling = tmp_path / 'existing.json', tmp_path / 'new.json'
    existing.write_text('old')
    os.symlink(existing, tmp_path / 'to_existing.json')
    os.symlink(dangling, tmp_path / 'to_new.json')
    for link, target in (('to_existing.json', existing), ('to_new.json', dangling)):
        code, _, err = io_helpers.run_main(capsys, 'bench', files / 'good.onnx', '--iters', '1',
                                           '--warmup', '0', '--json', tmp_path / link)
        assert code == 0, err
        assert (tmp_path / link).is_symlink()
        assert json.loads(target.read_text())['configs']


def test_output_folder_beside_inputs_of_other_names_is_fine(files, capsys):
    """Writing into the image folder is allowed when nothing read would be overwritten."""
    before = digests(files / 'jpgs')
    code, _, err = io_helpers.run_main(capsys, 'infer', files / 'good.onnx', files / 'jpgs',
                                       '--out', files / 'jpgs')
    assert code == 0, err
    assert all(digests(files / 'jpgs')[path] == digest for path, digest in before.items())
    assert (files / 'jpgs' / 'c.json').is_file()
