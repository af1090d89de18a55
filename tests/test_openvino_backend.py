"""The OpenVINO backend: reads our ONNX files directly, agrees with ONNX Runtime FP32 within the
tolerances of the precision it runs at, reports that precision and its threads, is thread-safe,
runs QDQ INT8 files with the NMS graph, and is selectable in infer, parity and bench."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip('openvino', reason='the openvino extra is not installed')

from detdeploy.cli import main  # noqa: E402
from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions  # noqa: E402
from detdeploy.runtimes.openvino_backend import OpenVinoBackend  # noqa: E402
from detdeploy.runtimes.pipeline import prepare_batch  # noqa: E402
from detdeploy.runtimes.preprocess import read_image  # noqa: E402
from detdeploy.verification.compare import (DetectionSet, compare_arrays,  # noqa: E402
                                            match_detections, tolerances_for)


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope='module')
def batches(bundled_onnx_256, shapes256):
    from detdeploy.runtimes.model_file import read_onnx_metadata
    config = read_onnx_metadata(bundled_onnx_256).preprocess
    return [prepare_batch([read_image(path)], config)[0]
            for path in sorted((shapes256 / 'val').glob('*.png'))]


def _detections(outputs) -> DetectionSet:
    count = int(outputs[0][0, 0])
    return DetectionSet(outputs[1][0, :count].astype(np.float64),
                        outputs[2][0, :count].astype(np.float64), outputs[3][0, :count])


def _assert_agree(reference, backend, batches, precision, raw_outputs, min_matched=1.0):
    """Detections agree within the precision's tolerances (with `min_matched` < 1: at least
    that share of them matched), and so do the raw outputs named."""
    tolerances = tolerances_for(precision)
    for index, batch in enumerate(batches):
        want, got = reference.run(batch), backend.run(batch)
        assert [a.dtype for a in got] == [a.dtype for a in want]
        match = match_detections(_detections(want), _detections(got), tolerances,
                                 reference.metadata.nms.score_thr, reference.metadata.nms.max_det,
                                 f'image {index}', backend.name)
        if min_matched < 1:
            assert match.matched >= min_matched * min(match.torch_count,
                                                      match.backend_count) > 0, match
        else:
            assert match.status != 'FAIL' and match.matched > 0, match
        if not raw_outputs:
            continue
        want_raw = reference.run_tensors(list(raw_outputs), batch)
        got_raw = backend.run_tensors(list(raw_outputs), batch)
        for name in raw_outputs:
            comparison = compare_arrays(got_raw[name], want_raw[name], tolerances.atol,
                                        tolerances.rtol, name)
            assert comparison.passed, comparison


@pytest.fixture(scope='module')
def ort_fp32(bundled_onnx_256):
    return OnnxRuntimeBackend(bundled_onnx_256, OrtOptions(threads=2))


def test_f32_hint_agrees_with_onnx_runtime_fp32(bundled_onnx_256, ort_fp32, batches):
    backend = OpenVinoBackend(bundled_onnx_256, 'f32', threads=2)
    described = backend.describe()
    assert backend.name == 'openvino-f32' and described['inference_precision'] == 'f32'
    assert described['precision'] == 'fp32'
    assert described['threads'] == {'openvino_inference_num_threads': 2}
    _assert_agree(ort_fp32, backend, batches, 'fp32', ort_fp32.metadata.raw_outputs)


def test_default_precision_is_reported_and_agrees_within_its_tolerances(bundled_onnx_256,
                                                                         ort_fp32, batches):
    import openvino
    backend = OpenVinoBackend(bundled_onnx_256, threads=2)
    plugin_default = openvino.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT')
    assert backend.precision == plugin_default.get_type_name()     # what it really uses
    assert backend.name == f'openvino-{backend.precision}'
    precision = backend.describe()['precision']
    assert precision in ('fp32', 'fp32+bf16', 'fp32+f16')
    # bf16 moves a box near the image edge by several pixels in some runs (see the preset):
    # 90 % of the detections must match, raw outputs are left to `parity`'s bf16 preset
    _assert_agree(ort_fp32, backend, batches, precision, (), min_matched=0.9)


def test_one_backend_runs_from_several_threads(bundled_onnx_256, batches):
    backend = OpenVinoBackend(bundled_onnx_256, 'f32', threads=1)
    serial = [backend.run(batch) for batch in batches]
    results = [None] * len(batches)

    def work(index):
        for _ in range(3):
            results[index] = backend.run(batches[index])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for want, got in zip(serial, results):
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)


def test_qdq_int8_file_with_the_nms_graph_runs(bundled_onnx_256, shapes256, batches, tmp_path):
    from detdeploy.quantization.calibration import CalibrationOptions
    from detdeploy.quantization.quantize import QuantizeOptions, quantize_file
    report = quantize_file(bundled_onnx_256, sorted((shapes256 / 'train').glob('*.png')),
                           tmp_path / 'int8.onnx',
                           QuantizeOptions(CalibrationOptions(size=2), threads=2))
    reference = OnnxRuntimeBackend(report.path, OrtOptions(threads=2))
    backend = OpenVinoBackend(report.path, 'f32', threads=2)
    assert backend.describe()['precision'] == 'int8'
    assert report.quantized_nodes > 200
    # Both run the same QDQ graph, but requantization rounds differently (OpenVINO fuses
    # other node groups): measured, a box at the image border moved by 9.7 px. Most
    # detections agree within the int8 tolerances.
    _assert_agree(reference, backend, batches, 'int8', (), min_matched=0.5)   # INT8 vs fp32: 0.74-0.89 on an AMD EPYC


def test_cli_infer_parity_and_bench_take_openvino(bundled_onnx_256, shapes256, capsys):
    images = shapes256 / 'val'
    code, out, err = run_cli(capsys, 'infer', bundled_onnx_256, images, '--backend',
                             'openvino-f32')
    assert code == 0, err
    assert out.count('detections') == 4
    code, out, err = run_cli(capsys, 'parity', bundled_onnx_256, '--model', 'rtmdet', '--images',
                             images, '--backend', 'openvino-f32')
    assert code == 0, out + err
    assert 'openvino-f32' in out.splitlines()[0] and out.splitlines()[-1].startswith('PASS')
    code, out, err = run_cli(capsys, 'bench', bundled_onnx_256, '--backend', 'ort,openvino-f32',
                             '--warmup', '0', '--iters', '2', '--images', images, '--threads', '2')
    assert code == 0, err
    rows = [line.split()[1] for line in out.splitlines() if line.startswith('rtmdet256.onnx ')]
    assert 'ort/cpu' in rows and 'openvino-f32/cpu' in rows


@pytest.mark.parametrize('args, message', [
    (['infer', 'model.engine', 'x.png', '--backend', 'openvino'], 'needs an .onnx file'),
    (['bench', 'rtmdet', '--backend', 'openvino'], 'export'),
])
def test_openvino_needs_an_onnx_file(args, message, capsys, tmp_path):
    engine = tmp_path / 'model.engine'
    engine.write_bytes(b'x')
    image = tmp_path / 'x.png'
    image.write_bytes(b'x')
    args = [str(engine) if a == 'model.engine' else str(image) if a == 'x.png' else a
            for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
