"""Interrupts and messages: SIGHUP ends a run like SIGTERM (temp files removed), leftovers of
killed runs are removed on the next run into the folder, one I/O binding shared by threads is
an error and never a crash, and messages keep the runtime's whole reason, name the file on a
full disk, say "not a regular file" for FIFOs, devices and symlink loops, and stay on one line
when names contain newlines."""
import errno
import os
import signal
import subprocess
import threading
import time

import numpy as np
import onnx
import pytest
from PIL import Image

import io_helpers
from detdeploy.core.errors import DetdeployError


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('interrupts')
    io_helpers.save(io_helpers.detector_model(), root / 'good.onnx')
    io_helpers.save_image(root / 'img.png')
    return root


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no command's error handling swallows it."""


@pytest.fixture
def no_hang():
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def timeout(signum, frame):
        raise Hung()
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_sighup_during_infer_is_handled_like_sigterm(tmp_path):
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'model.onnx')
    images = tmp_path / 'images'
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    for index in range(150):
        Image.fromarray(np.roll(pixels, index, axis=1)).save(images / f'{index:03d}.png')
    out = tmp_path / 'out'
    proc = subprocess.Popen([io_helpers.DETDEPLOY, 'infer', model, images, '--out', out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / '003.png').exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 129, err
    assert err.strip().splitlines()[-1] == 'aborted: hung up (SIGHUP)'
    assert 'Traceback' not in err
    assert sorted(tmp_path.rglob('.*.tmp')) == []
    assert not (out / 'coco_results.json').exists()       # renamed only at the end


def test_stale_temp_files_of_dead_runs_are_removed(files, capsys, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    finished = subprocess.Popen(['true'])
    finished.wait()
    alive = subprocess.Popen(['sleep', '60'])
    try:
        stale = out / f'.img.json.{finished.pid}.k3j_x9q2.tmp'
        in_use = out / f'.img.png.{alive.pid}.a8d2kq0z.tmp'
        others = [out / '.img.json.k3j_x9q2.tmp', out / '.notes.tmp', out / 'keep.tmp']
        for path in (stale, in_use, *others):
            path.write_text('partial')
        code, _, err = io_helpers.run_main(capsys, 'infer', files / 'good.onnx',
                                           files / 'img.png', '--out', out)
        assert code == 0, err
        assert not stale.exists()
        assert in_use.exists() and all(path.exists() for path in others)
    finally:
        alive.kill()
        alive.wait()


def test_one_io_binding_shared_by_threads_is_an_error_not_a_crash(files):
    from detdeploy.runtimes.open import open_model_file
    backend = open_model_file(files / 'good.onnx')
    shared = backend.io_binding()
    batch = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    want = backend.run(batch)
    outcomes = {'ran': 0, 'refused': 0}
    lock = threading.Lock()

    def hammer():
        for _ in range(150):
            try:
                shared.set_input(batch)
                shared.run()
                got = shared.outputs()
            except DetdeployError as error:
                assert 'in use by another thread' in str(error)
                with lock:
                    outcomes['refused'] += 1
                continue
            assert all(np.array_equal(g, w) for g, w in zip(got, want))
            with lock:
                outcomes['ran'] += 1
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes['ran'] > 0 and outcomes['ran'] + outcomes['refused'] == 600


def test_the_runtimes_whole_reason_is_kept(files, capsys, tmp_path):
    model = io_helpers.detector_model()
    model.ir_version = 99
    path = tmp_path / 'ir99.onnx'
    onnx.save_model(model, str(path))
    code, _, err = io_helpers.run_main(capsys, 'infer', path, files / 'img.png')
    io_helpers.assert_one_line_error(code, err, f'ONNX Runtime cannot load {path}')
    assert 'Unsupported model IR version: 99' in err          # past 200 characters


def test_disk_full_names_the_file(files, capsys, tmp_path, monkeypatch):
    import detdeploy.core.fileio as fileio
    real_fdopen = fileio.os.fdopen

    def full(fd, mode):
        handle = real_fdopen(fd, mode)

        def write(data):
            raise OSError(errno.ENOSPC, 'No space left on device')
        handle.write = write
        return handle
    monkeypatch.setattr(fileio.os, 'fdopen', full)
    code, _, err = io_helpers.run_main(capsys, 'infer', files / 'good.onnx', files / 'img.png',
                                       '--out', tmp_path / 'out')
    io_helpers.assert_one_line_error(code, err, f'cannot write {tmp_path}/out/')
    assert err.rstrip().endswith(': No space left on device')
    assert sorted((tmp_path / 'out').glob('.*.tmp')) == []


def special_files(root):
    fifo = root / 'fifo.onnx'
    if not fifo.exists():
        os.mkfifo(fifo)
        os.mkfifo(root / 'fifo.png')
        os.mkfifo(root / 'fifo.pth')
        os.mkfifo(root / 'fifo.json')
        os.symlink('/dev/null', root / 'device.onnx')
        os.symlink('loop.onnx', root / 'loop.onnx')
        os.symlink(root / 'gone.onnx', root / 'dangling.onnx')
    return root


@pytest.mark.parametrize('args, message', [
    (['infer', '{root}/fifo.onnx', '{img}'], 'model file {root}/fifo.onnx is not a regular file '
                                             '(a FIFO (named pipe))'),
    (['infer', '{root}/device.onnx', '{img}'], 'is not a regular file (a character device)'),
    (['infer', '{root}/loop.onnx', '{img}'], 'is not a regular file (a symlink loop)'),
    (['infer', '{root}/dangling.onnx', '{img}'], 'is not a regular file (a symlink to '
                                                 '{root}/gone.onnx, which does not exist)'),
    (['parity', '{root}/fifo.onnx', '--random', '1'], 'is not a regular file (a FIFO'),
    (['bench', '{root}/loop.onnx'], 'is not a regular file (a symlink loop)'),
    (['build-engine', '{root}/device.onnx'], 'is not a regular file (a character device)'),
    (['infer', '{good}', '{root}/fifo.png'], 'image {root}/fifo.png is not a regular file'),
    (['export', '--checkpoint', '{root}/fifo.pth', '-o', '{root}/x.onnx'],
     'checkpoint {root}/fifo.pth is not a regular file (a FIFO'),
    (['eval', '{good}', '--ann', '{root}/fifo.json', '--images', '{root}'],
     'annotation file {root}/fifo.json is not a regular file (a FIFO'),
], ids=['fifo model', 'device model', 'loop model', 'dangling link', 'parity fifo',
        'bench loop', 'build-engine device', 'fifo image', 'fifo checkpoint', 'fifo annotations'])
def test_special_files_are_not_regular_files(files, capsys, no_hang, args, message):
    root = special_files(files)
    filled = [str(a).format(root=root, img=root / 'img.png', good=root / 'good.onnx')
              for a in args]
    code, _, err = io_helpers.run_main(capsys, *filled)
    io_helpers.assert_one_line_error(code, err, message.format(root=root))


def test_names_with_newlines_keep_messages_and_the_verdict_on_one_line(files, capsys,
                                                                       tmp_path):
    odd = io_helpers.save(io_helpers.detector_model(), tmp_path / 'two\nlines.onnx')
    code, out, err = io_helpers.run_main(capsys, 'parity', odd, '--random', '1')
    assert code in (0, 1), err
    lines = out.strip().splitlines()
    assert lines[0].startswith('parity: ') and 'two\\nlines.onnx' in lines[0]
    assert lines[-1].startswith(('PASS: ', 'FAIL: '))
    assert not any(line.startswith('lines.onnx') for line in lines)
    code, _, err = io_helpers.run_main(capsys, 'infer', tmp_path / 'gone\nmodel.onnx',
                                       files / 'img.png')
    io_helpers.assert_one_line_error(code, err, 'gone\\nmodel.onnx')
