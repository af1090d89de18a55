"""Atomic outputs: Ctrl-C in the middle of `detdeploy export` and of `detdeploy infer` leaves the
old file or a complete new one, never a truncated one, and no temp files; every writer goes
through `atomic_write`; `--no-overwrite` and file permissions."""
import json
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import io_helpers
from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write

OLD = b'old contents: must survive an interrupted write\n'


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob('.*.tmp'))


def start(args: list, cwd: Path) -> subprocess.Popen:
    """A real `detdeploy` process that Ctrl-C can reach: SIGINT back at its default, whatever
    the test runner inherited (a shell without job control starts background jobs with it
    ignored, and Python then keeps it ignored)."""
    return subprocess.Popen(
        [io_helpers.DETDEPLOY, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def assert_aborted(proc: subprocess.Popen, code: int = 130,
                   message: str = 'aborted: interrupted (Ctrl-C)') -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == message, err
    assert 'Traceback' not in err


def test_ctrl_c_during_export_keeps_the_old_file(tmp_path):
    target = tmp_path / 'model.onnx'
    target.write_bytes(OLD)
    proc = start(['export', '--model', 'rtmdet-tiny', '-o', target, '--input-size', '64'],
                 tmp_path)
    # the note comes once the model is built; the export (tracing, onnxsim, writing) follows
    note = proc.stderr.readline()
    assert note.startswith('note: no --checkpoint given'), note
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    assert_aborted(proc)
    assert target.read_bytes() == OLD
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize('sent, code, message', [
    (signal.SIGINT, 130, 'aborted: interrupted (Ctrl-C)'),
    (signal.SIGTERM, 143, 'aborted: terminated (SIGTERM)'),     # kill, docker stop, ...
])
def test_interrupted_infer_over_many_images(tmp_path, sent, code, message):
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'model.onnx')
    images = tmp_path / 'images'
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    for index in range(400):
        Image.fromarray(np.roll(pixels, index, axis=1)).save(images / f'{index:03d}.png')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'coco_results.json').write_bytes(OLD)
    (out / '399.json').write_bytes(OLD)
    proc = start(['infer', model, images, '--out', out], tmp_path)
    deadline = time.monotonic() + 120
    while not (out / '005.png').exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sent)
    assert_aborted(proc, code, message)
    # streamed all along, renamed only at the end: the old file is untouched
    assert (out / 'coco_results.json').read_bytes() == OLD
    assert (out / '399.json').read_bytes() == OLD          # not reached
    written = sorted(p for p in out.glob('[0-9]*.json') if p.name != '399.json')
    assert 6 <= len(written) < 399
    for path in written:                     # every file there is complete
        record = json.loads(path.read_text())
        assert record['detections'][0]['label_name'] == 'circle'
    drawn = sorted(out.glob('[0-9]*.png'))   # each image's PNG follows its JSON
    assert len(written) - 1 <= len(drawn) <= len(written)
    for path in drawn:
        with Image.open(path) as image:
            image.load()
    assert temp_files(tmp_path) == []


def test_interrupt_inside_a_write_leaves_the_old_file(tmp_path):
    target = tmp_path / 'report.json'
    target.write_bytes(OLD)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, 'w') as handle:
            handle.write('{"half": ')
            raise KeyboardInterrupt
    assert target.read_bytes() == OLD and temp_files(tmp_path) == []


def fail_before_rename(monkeypatch):
    """Interrupt every `atomic_write` after its data is written, just before the rename."""
    import detdeploy.core.fileio as fileio

    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(fileio.os, 'fsync', interrupted)


def writers(tmp_path):
    """Every writer of detdeploy that can run here, each as (target, write it)."""
    from detdeploy.benchmark import report as bench_report
    from detdeploy.evaluation import coco_eval as evaluate
    from detdeploy.verification import parity
    from detdeploy.inference.batch import run_infer
    from detdeploy.models import save_checkpoint
    from detdeploy.models.registry import get_spec
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend
    from detdeploy.runtimes.tensorrt_common import write_sidecar
    from detdeploy.training.shapes import ShapesConfig, write_split
    from detdeploy.training.trainer import write_curves

    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'model.onnx')
    image = tmp_path / 'in.png'
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    report = type('Report', (), {'to_dict': lambda self: {'verdict': 'PASS'}})()
    sidecar = type('Sidecar', (), {'to_json': lambda self: '{}'})()
    infer_out = tmp_path / 'infer'
    infer_out.mkdir()
    return [
        (infer_out / 'in.json', lambda: run_infer(OnnxRuntimeBackend(model), [image], infer_out)),
        (tmp_path / 'parity.json', lambda: parity.write_report(report, tmp_path / 'parity.json')),
        (tmp_path / 'eval.json', lambda: evaluate.write_json(tmp_path / 'eval.json', {'a': 1})),
        (tmp_path / 'bench.json', lambda: bench_report.write_json(None, tmp_path / 'bench.json')),
        (tmp_path / 'ckpt.pth', lambda: save_checkpoint(   # as train writes last/best.pth
            tmp_path / 'ckpt.pth', {'w': torch.zeros(2)}, get_spec('rtmdet-tiny'), ('a',))),
        (tmp_path / 'm.engine.json', lambda: write_sidecar(tmp_path / 'm.engine', sidecar)),
        (tmp_path / 'curves.png', lambda: write_curves([], tmp_path / 'curves.png')),
        (tmp_path / 'data' / 'annotations' / 'instances_val.json',
         lambda: write_split(tmp_path / 'data', 'val', 1, 0, ShapesConfig(size=64))),
    ]


def test_every_writer_goes_through_atomic_write(tmp_path, monkeypatch):
    """Interrupted just before their rename, no writer has touched its target: each one writes
    to a temp file and renames (a direct writer would have replaced the old contents)."""
    from detdeploy.benchmark import report as bench_report
    monkeypatch.setattr(bench_report, 'result_to_json', lambda result: {'schema_version': 1})
    cases = writers(tmp_path)
    for target, write in cases:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(OLD)
    fail_before_rename(monkeypatch)
    for target, write in cases:
        with pytest.raises(KeyboardInterrupt):
            write()
        assert target.read_bytes() == OLD, target
    assert temp_files(tmp_path) == []


def test_no_overwrite_is_checked_at_the_rename(tmp_path):
    target = tmp_path / 'out.json'
    with atomic_write(target, 'w', overwrite=False) as handle:     # a new name: written
        handle.write('new')
    assert target.read_text() == 'new'
    with pytest.raises(DetdeployError, match='exists and --no-overwrite was given'):
        with atomic_write(target, 'w', overwrite=False) as handle:
            handle.write('newer')
    assert target.read_text() == 'new' and temp_files(tmp_path) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    """The temp file is private while written; the result has the mode open() would give (or
    the replaced file's)."""
    plain = tmp_path / 'plain.json'
    plain.write_text('{}')                                   # what open() gives here
    with atomic_write(tmp_path / 'new.json', 'w') as handle:
        handle.write('{}')
    assert (stat.S_IMODE((tmp_path / 'new.json').stat().st_mode)
            == stat.S_IMODE(plain.stat().st_mode))
    existing = tmp_path / 'shared.json'
    existing.write_text('{}')
    existing.chmod(0o664)
    with atomic_write(existing, 'w') as handle:
        handle.write('[]')
    assert stat.S_IMODE(existing.stat().st_mode) == 0o664


def test_a_directory_in_place_of_the_file_is_one_line(tmp_path):
    (tmp_path / 'taken').mkdir()
    with pytest.raises(DetdeployError, match='it is a directory'):
        with atomic_write(tmp_path / 'taken') as handle:
            handle.write(b'x')
